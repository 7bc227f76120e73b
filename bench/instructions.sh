#!/usr/bin/env bash
# User-space instructions per pass-through request or cache hit, counted by valgrind's callgrind:
# a figure that does not move with the machine's load, for changes too small for paired
# wall-clock rounds to see (bench/README.md, "Instructions per request").
#
#   bash bench/instructions.sh BINARY...     one line per binary; a binary named `floor` is run
#                                            as bench/floor.rs (ADDR UPSTREAM), any other as the
#                                            sidecar with a [[routes]] table to the upstream
#   POST=1 bash bench/instructions.sh ...    a 4 KiB POST instead of a GET
#   HIT=1 bash bench/instructions.sh ...     cache hits (bench/hit.lua) from the sidecar in front
#                                            of the provider example instead (no floor)
#
# Each binary runs under callgrind in front of the ceiling (plain HTTP/1.1, one thread); wrk
# (1 thread, 8 connections, bench/pass.lua) warms it for 3 s, the counters are zeroed, 8 s more
# are counted and dumped, and the total is divided by the requests wrk completed. Everything runs
# on 127.0.0.1 and every process is stopped by its pid. Needs valgrind and wrk (installed from the
# distribution's packages if missing) and the ceiling and provider examples (built here).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: $0 BINARY..." >&2; exit 64; }
missing=""
command -v valgrind >/dev/null 2>&1 || missing="valgrind"
command -v wrk >/dev/null 2>&1 || missing="$missing wrk"
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq >/dev/null
  # shellcheck disable=SC2086 # a list of package names
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $missing >/dev/null
fi
target=${CARGO_TARGET_DIR:-target}
cargo build --release --example ceiling --example provider >&2
out=bench/out/instructions
mkdir -p "$out"
post=()
[ "${POST:-0}" = 1 ] && post=(-- post)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

for binary in "$@"; do
  name=$(basename "$binary")
  listen="127.0.0.1:$(free_port)"
  if [ "${HIT:-0}" = 1 ]; then
    up="127.0.0.1:$(free_port)"
    "$target/release/examples/provider" --listen "$up" > "$out/upstream.out" 2>&1 &
  else
    "$target/release/examples/ceiling" 127.0.0.1:0 - 1 http1 > "$out/upstream.out" 2>&1 &
  fi
  upstream=$!
  for _ in $(seq 50); do grep -q 'listening on' "$out/upstream.out" && break; sleep 0.1; done
  [ "${HIT:-0}" = 1 ] || up=$(grep -o '127.0.0.1:[0-9]*' "$out/upstream.out" | head -1)
  if [ "${HIT:-0}" = 1 ]; then
    args=(--upstream "http://$up" --listen "$listen" --admin "127.0.0.1:$(free_port)")
  elif [ "$name" = floor ]; then
    args=("$listen" "$up")
  else
    printf '[[routes]]\nlisten = "%s"\nname = "pass"\nupstream = "http://%s"\n' "$listen" "$up" > "$out/sidecar.toml"
    args=(--config "$out/sidecar.toml")
  fi
  rm -f "$out/callgrind.out"*
  valgrind --tool=callgrind --callgrind-out-file="$out/callgrind.out" "$binary" "${args[@]}" \
    > "$out/binary.out" 2> "$out/valgrind.err" &
  counted=$!
  url="http://$listen/api/v2/users/me" script=bench/pass.lua first=()
  if [ "${HIT:-0}" = 1 ]; then
    # The first request is the miss that fills the cache; every counted one is a hit.
    url="http://$listen/oauth/token" script=bench/hit.lua
    first=(-d "grant_type=client_credentials&client_id=bench-client&client_secret=bench-secret&scope=read")
  fi
  for _ in $(seq 100); do curl -sf -o /dev/null "${first[@]}" "$url" && break; sleep 0.2; done
  wrk -t1 -c8 -d3s -s "$script" "$url" "${post[@]}" > /dev/null
  callgrind_control -z "$counted" > /dev/null
  wrk -t1 -c8 -d8s -s "$script" "$url" "${post[@]}" > "$out/wrk.out"
  callgrind_control -d "$counted" > /dev/null
  kill "$counted" "$upstream"
  wait "$counted" 2>/dev/null || true
  wait "$upstream" 2>/dev/null || true
  requests=$(grep -o '"requests":[0-9]*' "$out/wrk.out" | cut -d: -f2)
  total=$(callgrind_annotate "$out/callgrind.out.1" 2>/dev/null | grep -m1 'PROGRAM TOTALS' | awk '{gsub(",","",$1); print $1}')
  kind=GET
  [ "${POST:-0}" = 1 ] && kind=POST
  [ "${HIT:-0}" = 1 ] && kind=hit
  echo "$binary: $((total / requests)) instructions per request ($requests requests, $kind)"
done
