#!/usr/bin/env bash
# Installs the real Genesys Cloud SDKs that tests/genesys_sdks.rs drives through the sidecar:
#   - Python PureCloudPlatformClientV2 (pip) into a venv at target/genesys-sdk/venv
#   - JavaScript purecloud-platform-client-v2 (npm) into target/genesys-sdk/node
# Idempotent: when both are installed at the wanted versions it only checks them (a second or
# two) and says so. Exits non-zero with a message naming the SDK that could not be installed;
# the tests treat that as a failure, never as a skip.
#
# Environment:
#   GENESYS_PY_SDK_VERSION  pip requirement spec for the Python SDK (default below)
#   GENESYS_JS_SDK_VERSION  npm version range for the JS SDK (default below)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

py_spec="${GENESYS_PY_SDK_VERSION:-==269.*}"
js_spec="${GENESYS_JS_SDK_VERSION:-~262.0.0}"
root="target/genesys-sdk"
venv="$root/venv"
node_dir="$root/node"

fail() {
    echo "genesys-sdks: $*" >&2
    exit 1
}

mkdir -p "$root"

# --- Python ------------------------------------------------------------------------------------
py_version() {
    [[ -x "$venv/bin/python" ]] || return 1
    "$venv/bin/python" - <<'EOF' 2>/dev/null
# Metadata and a findable package, without importing it (the import alone takes seconds).
from importlib.metadata import version
from importlib.util import find_spec
assert find_spec("PureCloudPlatformClientV2") is not None
print(version("PureCloudPlatformClientV2"))
EOF
}

py_wanted() {
    # The installed version satisfies the spec's major version ("==269.*" -> 269).
    local major="${py_spec//[^0-9.]/}"
    major="${major%%.*}"
    [[ "$1" == "$major".* ]]
}

if v="$(py_version)" && py_wanted "$v"; then
    echo "genesys-sdks: Python PureCloudPlatformClientV2 $v already installed in $venv"
else
    echo "genesys-sdks: installing Python PureCloudPlatformClientV2$py_spec into $venv"
    if [[ ! -x "$venv/bin/python" ]]; then
        python3 -m venv "$venv" ||
            fail "cannot create a Python venv at $venv (is python3-venv installed?)"
    fi
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        "PureCloudPlatformClientV2$py_spec" ||
        fail "pip could not install PureCloudPlatformClientV2$py_spec"
    "$venv/bin/python" -c 'import PureCloudPlatformClientV2' ||
        fail "PureCloudPlatformClientV2 installed but does not import"
    v="$(py_version)" || fail "PureCloudPlatformClientV2 installed but has no version metadata"
    py_wanted "$v" || fail "PureCloudPlatformClientV2 $v installed, wanted $py_spec"
    echo "genesys-sdks: Python PureCloudPlatformClientV2 $v installed"
fi

# --- JavaScript --------------------------------------------------------------------------------
command -v node >/dev/null 2>&1 || fail "node is not on PATH; the JS SDK test needs Node.js"
command -v npm >/dev/null 2>&1 || fail "npm is not on PATH; the JS SDK test needs npm"

js_version() {
    [[ -f "$node_dir/node_modules/purecloud-platform-client-v2/package.json" ]] || return 1
    (cd "$node_dir" && node -e '
        require("purecloud-platform-client-v2");
        console.log(require("purecloud-platform-client-v2/package.json").version);
    ' 2>/dev/null)
}

js_wanted() {
    local major="${js_spec//[^0-9.]/}"
    major="${major%%.*}"
    [[ "$1" == "$major".* ]]
}

if v="$(js_version)" && js_wanted "$v"; then
    echo "genesys-sdks: JS purecloud-platform-client-v2 $v already installed in $node_dir"
else
    echo "genesys-sdks: installing JS purecloud-platform-client-v2@$js_spec into $node_dir"
    mkdir -p "$node_dir"
    if [[ ! -f "$node_dir/package.json" ]]; then
        cat >"$node_dir/package.json" <<'EOF'
{
  "name": "token-sidecar-genesys-sdk-tests",
  "private": true,
  "description": "The Genesys Cloud JS SDK, installed by .ci/genesys-sdks.sh for tests/genesys_sdks.rs"
}
EOF
    fi
    (cd "$node_dir" && npm install --no-audit --no-fund --loglevel=error \
        "purecloud-platform-client-v2@$js_spec") ||
        fail "npm could not install purecloud-platform-client-v2@$js_spec"
    v="$(js_version)" || fail "purecloud-platform-client-v2 installed but does not load"
    js_wanted "$v" || fail "purecloud-platform-client-v2 $v installed, wanted $js_spec"
    echo "genesys-sdks: JS purecloud-platform-client-v2 $v installed"
fi
