#!/usr/bin/env bash
# Runs every fuzz target for a bounded time and prints, per target, executions, executions per
# second, coverage and findings.
#
#   fuzz/run.sh [SECONDS]        SECONDS per target, default 60
#
# Only a stable toolchain may be on the machine: cargo-fuzz's nightly flags (-Zsanitizer, ...)
# are unlocked with RUSTC_BOOTSTRAP=1. AddressSanitizer is tried first; if that build fails the
# targets are built with `--sanitizer none` (the crate forbids unsafe code, so ASan mainly
# watches the dependencies). Targets are built with debug assertions and overflow checks (-a).
#
# Corpora grow in fuzz/corpus/<target> (seeded from fuzz/seeds/<target>), crashes land in
# fuzz/artifacts/<target>, logs and the summary in fuzz/logs/. Known crashing inputs in
# fuzz/regressions/<target>/ are replayed first. Exit status 1 if anything was found or a
# regression input still fails.
set -euo pipefail

per_target=${1:-60}
if ! [[ $per_target =~ ^[0-9]+$ ]] || ((per_target < 1 || per_target > 86400)); then
  echo "usage: $0 [SECONDS per target, 1..86400]" >&2
  exit 64
fi
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/.."
targets=(form keys retry_after token_json)
export RUSTC_BOOTSTRAP=1
export CARGO_TERM_COLOR=never

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

mkdir -p "$here/logs"
sanitizer=(--sanitizer address)
echo "== building ${targets[*]} (AddressSanitizer, debug assertions)"
if ! cargo fuzz build -a "${sanitizer[@]}" >"$here/logs/build.log" 2>&1; then
  echo "   AddressSanitizer build failed (see fuzz/logs/build.log); building with --sanitizer none"
  sanitizer=(--sanitizer none)
  cargo fuzz build -a "${sanitizer[@]}" >"$here/logs/build.log" 2>&1 || {
    tail -30 "$here/logs/build.log" >&2
    exit 1
  }
fi

summary="$here/logs/summary.txt"
{
  echo "# fuzz/run.sh $per_target on $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores, $(rustc --version)"
  echo "# sanitizer: ${sanitizer[1]}; debug assertions on"
  echo "# cov: edges covered (of the instrumented edges in 'edges'); ft: libFuzzer features"
  printf '%-12s %12s %10s %8s %8s %8s %10s %9s %s\n' target executions exec/s cov edges ft corpus new findings
} >"$summary"

found=0
# Known crashing inputs (fuzz/regressions/<target>/*) are replayed first: each fails until its
# bug is fixed, and then guards the fix.
open_regressions=()
for input in "$here"/regressions/*/*; do
  [[ -f $input ]] || continue
  target=$(basename "$(dirname "$input")")
  if ! cargo fuzz run -a "${sanitizer[@]}" "$target" "$input" >"$here/logs/regression.log" 2>&1; then
    open_regressions+=("$target/$(basename "$input")")
    found=1
  fi
done

for target in "${targets[@]}"; do
  corpus="$here/corpus/$target"
  artifacts="$here/artifacts/$target"
  log="$here/logs/$target.log"
  mkdir -p "$corpus" "$artifacts"
  before=$(find "$artifacts" -type f | wc -l)
  echo "== $target for ${per_target}s"
  status=0
  # -max_total_time bounds the run; the outer timeout only guards against a wedged process.
  timeout --kill-after=30 $((per_target + 120)) \
    cargo fuzz run -a "${sanitizer[@]}" "$target" "$corpus" "$here/seeds/$target" -- \
    -max_total_time="$per_target" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$artifacts/" -dict="$here/dict/$target.dict" >"$log" 2>&1 || status=$?
  after=$(find "$artifacts" -type f | wc -l)
  stat() { sed -n "s/^stat::$1: *//p" "$log" | tail -1; }
  last=$(grep -E '^#[0-9]+.*cov: ' "$log" | tail -1 || true)
  field() { sed -n "s/.* $1: \([0-9]*\).*/\1/p" <<<"$last"; }
  findings=$((after - before))
  if ((status != 0 && findings == 0)); then
    findings="exit-$status"
  fi
  if [[ $findings != 0 ]]; then
    found=1
    grep -E 'panicked at|ERROR: |SUMMARY: ' "$log" | head -5 || true
  fi
  edges=$(sed -n 's/.*Loaded 1 modules *(\([0-9]*\) inline 8-bit counters.*/\1/p' "$log" | head -1)
  printf '%-12s %12s %10s %8s %8s %8s %10s %9s %s\n' "$target" "$(stat number_of_executed_units)" \
    "$(stat average_exec_per_sec)" "$(field cov)" "$edges" "$(field ft)" "$(field corp)" \
    "$(stat new_units_added)" "$findings" | tee -a "$summary"
done

echo "regression inputs still failing: ${open_regressions[*]:-none}" >>"$summary"
echo
cat "$summary"
exit "$found"
