#!/usr/bin/env bash
# Paired hit-path rounds of the working tree's build against another revision's, in one run: what
# a hit-path change must show before it stays (bench/README.md, "The rule for the hit path").
#
#   bash bench/compare.sh BASE_REV [--rounds N] [--seconds S] [--path hit|pass|pass-post|inject]
#
# Builds the working tree (cargo build --release, then the provider example) and BASE_REV (in a
# detached git worktree under $CARGO_TARGET_DIR/compare, with its own target directory), then runs
# bench/compare.py. Writes bench/out/COMPARE.md. Everything runs on 127.0.0.1; needs wrk
# (installed if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: $0 BASE_REV [--rounds N] [--seconds S]" >&2; exit 64; }
base_rev=$1
shift
base_commit=$(git rev-parse --verify "$base_rev^{commit}") || { echo "compare: no such revision: $base_rev" >&2; exit 64; }

if ! command -v wrk >/dev/null 2>&1; then
  echo "compare: installing wrk" >&2
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
fi

target=${CARGO_TARGET_DIR:-target}
case "$target" in /*) ;; *) target="$PWD/$target" ;; esac
cargo build --release --bin token-sidecar
# The provider (hit path) or upstream (pass-through) both builds are served by, built apart so the
# binary keeps its own features.
cargo build --release --example provider --example ceiling
new_bin="$target/release/token-sidecar"

work="$target/compare"
src="$work/src-$base_commit"
if [ ! -d "$src" ]; then
  mkdir -p "$work"
  git worktree prune
  git worktree add --detach "$src" "$base_commit" >/dev/null
fi
CARGO_TARGET_DIR="$work/target" cargo build --release --bin token-sidecar --manifest-path "$src/Cargo.toml"
base_bin="$work/base-$base_commit"
cp "$work/target/release/token-sidecar" "$base_bin"

mkdir -p bench/out
exec python3 bench/compare.py --base "$base_bin" --new "$new_bin" "$@"
