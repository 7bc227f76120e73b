#!/usr/bin/env bash
# Soak test: the release sidecar in front of a faulty fake provider under steady load, watching
# for drift in memory and file descriptors and checking every token served.
#
#   bench/soak.sh [MINUTES]      default 10
#
# Starts (all on 127.0.0.1, ports picked free): the project's provider (bench/provider.rs:
# expires_in 10 s; a few per cent each of 429 + Retry-After: 1, 503, 500, dropped connections, 2 s
# answers and garbage), the sidecar (RUST_LOG=warn), and bench/soak.py's load (wrk with
# bench/clients.lua: 50 keep-alive clients over 20 credential sets at 2000 req/s in all). Writes
# bench/out/soak-<UTC time>/ (summary.txt, summary.json, logs) and prints the summary. Everything
# it starts is stopped on exit, however it exits.
# Extra load options can be passed through SOAK_LOAD_ARGS (e.g. "--rate 0" for unthrottled).
set -euo pipefail

minutes=${1:-10}
if ! [[ $minutes =~ ^[0-9]+([.][0-9]+)?$ ]] || ! awk -v m="$minutes" 'BEGIN { exit !(m > 0 && m <= 1440) }'; then
  echo "usage: $0 [MINUTES, more than 0 and at most 1440]" >&2
  exit 64
fi
cd "$(dirname "$0")/.."
out="bench/out/soak-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$out"

pids=()
cleanup() {
  local pid i
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    for ((i = 0; i < 100; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
  done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "== building the release binary and the provider"
# Two invocations, as in bench/run.sh: the example's dev-dependencies must not change the binary.
cargo build --release --bin token-sidecar
cargo build --release --example provider
target=${CARGO_TARGET_DIR:-target}
bin=$target/release/token-sidecar
provider=$target/release/examples/provider
# The provider's faults, per token call; the load's estimate of upstream calls uses the same.
faults="429=0.03,503=0.02,500=0.03,drop=0.02,slow=0.03,garbage=0.02"

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

echo "== starting the fake provider"
"$provider" --port-file "$out/provider.port" --lifetime 10 --token-bytes 0 --faults "$faults" \
  --call-log 10000000 --max-seconds "$(awk -v m="$minutes" 'BEGIN { printf "%d", m * 60 + 600 }')" \
  >"$out/provider.log" 2>&1 &
pids+=($!)
for ((i = 0; i < 100; i++)); do
  [[ -s $out/provider.port ]] && break
  sleep 0.1
done
provider_port=$(cat "$out/provider.port")

listen_port=$(free_port)
admin_port=$(free_port)
echo "== starting the sidecar: :$listen_port -> provider :$provider_port (admin :$admin_port)"
RUST_LOG=warn "$bin" --upstream "http://127.0.0.1:$provider_port" \
  --listen "127.0.0.1:$listen_port" --admin "127.0.0.1:$admin_port" \
  >"$out/sidecar.log" 2>&1 &
sidecar_pid=$!
pids+=("$sidecar_pid")
ready=0
for ((i = 0; i < 100; i++)); do
  if "$bin" healthcheck --admin "127.0.0.1:$admin_port" --timeout 1s 2>/dev/null; then
    ready=1
    break
  fi
  sleep 0.1
done
if ((ready == 0)); then
  echo "the sidecar did not become ready; its log:" >&2
  cat "$out/sidecar.log" >&2
  exit 1
fi

{
  echo "date      $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "machine   $(nproc) cores, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1), $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)"
  echo "command   bench/soak.sh $minutes"
  echo "sidecar   $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- src Cargo.toml 2>/dev/null || echo ' (+ uncommitted src changes)'), pid $sidecar_pid"
} | tee "$out/header.txt"

echo "== load for $minutes min"
status=0
# shellcheck disable=SC2086 # SOAK_LOAD_ARGS is a list of options on purpose
python3 bench/soak.py load --sidecar "127.0.0.1:$listen_port" --admin "127.0.0.1:$admin_port" \
  --provider "127.0.0.1:$provider_port" --pid "$sidecar_pid" --minutes "$minutes" \
  --faults "$faults" --out "$out" ${SOAK_LOAD_ARGS:-} || status=$?

# The log at warn level: faults show up here; no credential may.
warns=$(grep -c 'WARN' "$out/sidecar.log" || true)
leaks=$(grep -c 'soak-secret-\|tok-[0-9]' "$out/sidecar.log" || true)

echo "== stopping the sidecar (SIGTERM)"
kill -TERM "$sidecar_pid"
started=$SECONDS
code=timeout
for ((i = 0; i < 300; i++)); do
  if ! kill -0 "$sidecar_pid" 2>/dev/null; then
    wait "$sidecar_pid" && code=0 || code=$?
    break
  fi
  sleep 0.1
done
{
  echo "sidecar log        $warns WARN lines, $leaks lines containing a secret or token (must be 0)"
  echo "shutdown           exit status $code $((SECONDS - started)) s after SIGTERM"
} | tee -a "$out/summary.txt"
cat "$out/header.txt" "$out/summary.txt" >"$out/report.txt"
echo "== report: $out/report.txt"
if ((leaks > 0)); then
  status=1
fi
exit "$status"
