#!/usr/bin/env bash
# The one entry point of the benchmark suite.
#
#   bash bench/run.sh            full run (about 10 minutes): writes bench/RESULTS.md
#   bash bench/run.sh --quick    a few seconds per scenario, small N: writes bench/out/RESULTS.md
#                                and exits non-zero only if a scenario failed to run
#   bash bench/run.sh --profile  also profiles the hit path with perf (builds a symbolized copy
#                                of the sidecar in target/bench-profile first; slow the first time)
#   --only hit,storm,...         run some scenarios only (output goes to bench/out/)
#
# Everything runs on 127.0.0.1. Needs cargo, python3 (stdlib only), wrk, and for the pass-through
# scenario nginx and h2load (each installed from the distribution's packages if missing). See
# bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=0
only=""
next_is_only=0
for arg in "$@"; do
  if [ "$next_is_only" = 1 ]; then only="$arg"; next_is_only=0; continue; fi
  case "$arg" in
    --profile) profile=1 ;;
    --only) next_is_only=1 ;;
    --only=*) only="${arg#--only=}" ;;
  esac
done
# The pass-through scenario's peer (nginx) and h2c caller (h2load); no other scenario needs them.
passthrough=0
case ",$only," in
  ,,|*,passthrough,*) passthrough=1 ;;
esac

# Debian packages the suite needs, installed when missing. A policy-rc.d that refuses is put in
# place for the install if there is none, so that installing nginx starts no system-wide server
# (the suite runs its own, on 127.0.0.1, with a config in bench/out).
packages=""
command -v wrk >/dev/null 2>&1 || packages="wrk"
if [ "$passthrough" = 1 ]; then
  command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || packages="$packages nginx"
  command -v h2load >/dev/null 2>&1 || packages="$packages nghttp2-client"
fi
if [ -n "$packages" ]; then
  packages="${packages# }"
  echo "bench: installing $packages" >&2
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
    $sudo chmod 755 "$policy"
  fi
  $sudo apt-get update -qq >/dev/null
  # shellcheck disable=SC2086 # a list of package names
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $packages >/dev/null
  if [ -n "$policy" ]; then $sudo rm -f "$policy"; fi
fi
command -v python3 >/dev/null 2>&1 || { echo "bench: python3 is required" >&2; exit 1; }
if [ "$profile" = 1 ] && ! command -v perf >/dev/null 2>&1; then
  echo "bench: --profile needs perf (linux-perf)" >&2
  exit 1
fi

# Two invocations: building the examples in the same one would unify the dev-dependencies'
# features (tokio's test-util and others) into the binary, which would then not be the one
# `cargo build --release` gives users. The examples: the loopback ceiling, the pass-through floor, the fake provider
# (the project's own, src/demo/provider.rs) and the cold storm's client.
cargo build --release --bin token-sidecar
cargo build --release --example ceiling --example provider --example storm --example floor --example delay --example hold
if [ "$profile" = 1 ]; then
  # Same source and profile, but with symbols and line tables, in a separate target directory so
  # the measured binary stays exactly the release one. Cargo.toml is not touched.
  CARGO_TARGET_DIR=target/bench-profile CARGO_PROFILE_RELEASE_STRIP=none \
    CARGO_PROFILE_RELEASE_DEBUG=line-tables-only \
    cargo build --release --bin token-sidecar
fi

# The cold storm holds 10,000 client sockets in the client and as many in the sidecar.
hard=$(ulimit -Hn)
if [ "$hard" = unlimited ] || [ "$hard" -ge 30000 ]; then ulimit -n 30000; else ulimit -n "$hard"; fi
if [ "$(ulimit -n)" -lt 10100 ]; then
  echo "bench: warning: ulimit -n is $(ulimit -n); the cold storm needs about 10,100" >&2
fi

mkdir -p bench/out
rm -f bench/out/logs/*.log
exec python3 bench/bench.py "$@"
