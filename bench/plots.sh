#!/usr/bin/env bash
# Draws the pictures (see bench/plots.py): docs/dashboard.png and bench/story.png from one real
# run of the story (about 80 s), bench/hit-rounds.png from bench/RESULTS.md, and rewrites the
# "Plots" section at the end of bench/RESULTS.md.
#
#   bash bench/plots.sh                  build, run the story, draw
#   bash bench/plots.sh --render-only    draw again from the last run (bench/out/plots/)
#   bash bench/plots.sh --seconds 10     a shorter story
#
# matplotlib and prometheus_client come from PyPI into a venv under target/ (made once; later
# runs only check it). Everything runs on 127.0.0.1; the one process it starts is stopped by pid.
set -euo pipefail
cd "$(dirname "$0")/.."

target="${CARGO_TARGET_DIR:-target}"
venv="$target/plots-venv"
requirements="matplotlib==3.11.2 prometheus-client==0.26.0"

command -v python3 >/dev/null 2>&1 || { echo "plots: python3 is required" >&2; exit 1; }
if [ "$(cat "$venv/.requirements" 2>/dev/null)" != "$requirements" ]; then
  echo "plots: installing $requirements into $venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv" || { echo "plots: cannot create a venv (is python3-venv installed?)" >&2; exit 1; }
  # shellcheck disable=SC2086 # the list is meant to split
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check $requirements
  echo "$requirements" > "$venv/.requirements"
fi

render_only=0
for arg in "$@"; do
  [ "$arg" = --render-only ] && render_only=1
done
if [ "$render_only" = 0 ]; then
  cargo build --release --bin token-sidecar
fi
exec "$venv/bin/python" bench/plots.py --binary "$target/release/token-sidecar" "$@"
