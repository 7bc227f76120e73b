#!/usr/bin/env bash
# Checks config/observability/: the Prometheus alert rules (promtool check rules), their unit
# tests (promtool test rules), and the Grafana dashboard (valid JSON, unique panel ids, every
# query panel has a datasource and targets, panels do not overlap), and that every
# token_sidecar_* metric name used by a panel, an alert or a test series is a family registered
# in src/metrics.rs. Installs Debian's prometheus package for promtool if it is missing; starts no
# server. Exits non-zero on any failure. Usage: bash .ci/observability.sh
set -euo pipefail
cd "$(dirname "$0")/.."

dir=config/observability
alerts=$dir/token-sidecar-alerts.yml
tests=$dir/token-sidecar-alerts.test.yml
dashboard=$dir/token-sidecar-dashboard.json
metrics_rs=src/metrics.rs

step() { printf '\n=== %s (%ss)\n' "$1" "$SECONDS"; }

step "promtool"
if ! command -v promtool >/dev/null; then
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  # Only promtool is wanted: keep the package's service from starting (Debian's policy-rc.d
  # mechanism; exit 101 = action forbidden), unless the host already has a policy in place.
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo_cmd tee "$policy" >/dev/null
    $sudo_cmd chmod 755 "$policy"
    trap '$sudo_cmd rm -f "$policy"' EXIT
  fi
  before=$(pgrep -x prometheus || true)
  $sudo_cmd apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -q --no-install-recommends prometheus
  # Belt and braces: stop a server the install started anyway (by pid, only new ones).
  for pid in $(pgrep -x prometheus || true); do
    if ! grep -qx "$pid" <<<"$before"; then
      echo "stopping prometheus pid $pid started by the package install"
      $sudo_cmd kill "$pid" || true
    fi
  done
fi
promtool --version 2>&1 | head -1

failed=()

step "promtool check rules"
promtool check rules "$alerts" || failed+=("promtool check rules $alerts")

step "promtool test rules"
promtool test rules "$tests" || failed+=("promtool test rules $tests")

step "dashboard and metric names"
python3 - "$dashboard" "$alerts" "$tests" "$metrics_rs" <<'PY' || failed+=("dashboard / metric name check")
"""Checks the Grafana dashboard's structure and that every token_sidecar_* name in the dashboard,
the alert rules and the rule tests is a family registered in src/metrics.rs. Stdlib only."""
import json
import re
import sys

dashboard_path, alerts_path, tests_path, metrics_path = sys.argv[1:5]
errors = []
NAME = re.compile(r"token_sidecar_[a-z_]+")
SUFFIXES = ("", "_total", "_bucket", "_sum", "_count")

# Families: registry.register("name", ...) and, for the scrape-time collector,
# encoder.encode_descriptor("name", ...). The registry prefix is token_sidecar.
source = open(metrics_path, encoding="utf-8").read()
if 'Registry::with_prefix("token_sidecar")' not in source:
    errors.append(f"{metrics_path}: the registry prefix is no longer token_sidecar")
families = set(re.findall(r'\b(?:register|encode_descriptor)\(\s*"([a-z_]+)"', source))
if not families:
    errors.append(f"{metrics_path}: no metric families found (register / encode_descriptor)")
known = {f"token_sidecar_{f}{s}" for f in families for s in SUFFIXES}
print(f"{len(families)} families in {metrics_path}: {', '.join(sorted(families))}")

used = {}  # name -> where


def note(text, where):
    for name in NAME.findall(text):
        used.setdefault(name, where)


# --- dashboard ---
try:
    dash = json.load(open(dashboard_path, encoding="utf-8"))
except (OSError, ValueError) as e:
    print(f"FAIL: {dashboard_path}: not valid JSON: {e}")
    sys.exit(1)

if dash.get("schemaVersion") != 39:
    errors.append(f"dashboard: schemaVersion is {dash.get('schemaVersion')!r}, want 39")
variables = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
ds_var = variables.get("datasource")
has_input = any(i.get("pluginId") == "prometheus" for i in dash.get("__inputs", []))
if not has_input and not (ds_var and ds_var.get("type") == "datasource"
                          and ds_var.get("query") == "prometheus"):
    errors.append("dashboard: no prometheus datasource variable or __inputs entry")
route = variables.get("route")
if not route:
    errors.append("dashboard: no route template variable")
for name, var in variables.items():
    query = var.get("query")
    if isinstance(query, dict):
        query = query.get("query", "")
    if var.get("type") == "query":
        note(str(query), f"dashboard variable {name}")
        note(str(var.get("definition", "")), f"dashboard variable {name}")


def walk(panels):
    for panel in panels:
        yield panel
        yield from walk(panel.get("panels", []))


ids = {}
boxes = []
panels = list(walk(dash.get("panels", [])))
if not panels:
    errors.append("dashboard: no panels")
for panel in panels:
    pid = panel.get("id")
    title = panel.get("title", "?")
    label = f"panel {pid} {title!r}"
    if not isinstance(pid, int):
        errors.append(f"dashboard: {label}: id missing or not an integer")
    elif pid in ids:
        errors.append(f"dashboard: {label}: id also used by {ids[pid]!r}")
    else:
        ids[pid] = title
    grid = panel.get("gridPos")
    if not grid or not all(isinstance(grid.get(k), int) for k in ("x", "y", "w", "h")):
        errors.append(f"dashboard: {label}: gridPos missing or incomplete")
    else:
        if grid["x"] + grid["w"] > 24:
            errors.append(f"dashboard: {label}: wider than the 24-column grid")
        for other, box in boxes:
            if (grid["x"] < box["x"] + box["w"] and box["x"] < grid["x"] + grid["w"]
                    and grid["y"] < box["y"] + box["h"] and box["y"] < grid["y"] + grid["h"]):
                errors.append(f"dashboard: {label} overlaps {other}")
        boxes.append((label, grid))
    if panel.get("type") == "row":  # a row header: no queries of its own
        continue
    if not panel.get("datasource"):
        errors.append(f"dashboard: {label}: no datasource")
    targets = panel.get("targets") or []
    if not targets:
        errors.append(f"dashboard: {label}: no targets")
    for target in targets:
        expr = target.get("expr", "")
        if not expr.strip():
            errors.append(f"dashboard: {label}: target {target.get('refId')} has no expr")
        if not target.get("refId"):
            errors.append(f"dashboard: {label}: a target has no refId")
        note(expr, f"dashboard {label}")

# --- alert rules: every expr, block scalars included ---
def exprs(path):
    lines = open(path, encoding="utf-8").read().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)(?:- )?expr:\s*(.*)$", lines[i])
        i += 1
        if not m:
            continue
        indent, value = len(m.group(1)), m.group(2)
        if value[:1] in "|>":
            block = []
            while i < len(lines) and (not lines[i].strip()
                                      or len(lines[i]) - len(lines[i].lstrip()) > indent):
                block.append(lines[i])
                i += 1
            value = "\n".join(block)
        yield value


alert_exprs = list(exprs(alerts_path))
if not alert_exprs:
    errors.append(f"{alerts_path}: no expr found")
for expr in alert_exprs:
    note(expr, alerts_path)
# --- rule tests: the input series names, so a test cannot pass on a name that never exists ---
for line in open(tests_path, encoding="utf-8"):
    if re.match(r"^\s*-?\s*(series|expr):", line):
        note(line, tests_path)

unknown = sorted(n for n in used if n not in known)
for name in unknown:
    errors.append(f"unknown metric {name} (in {used[name]}): not a family of {metrics_path}")
print(f"{len(used)} metric names used, all checked against {metrics_path}")

shown = {n for n, w in used.items() if w.startswith("dashboard")}
missing = sorted(f for f in families
                 if not any(f"token_sidecar_{f}{s}" in shown for s in SUFFIXES))
if missing:
    print(f"note: families not on the dashboard: {', '.join(missing)}")
print(f"{len(panels)} panels, {len(ids)} unique ids")

if errors:
    for e in errors:
        print(f"FAIL: {e}")
    sys.exit(1)
print("dashboard OK")
PY

step "the PromQL evaluator behind docs/dashboard.png"
# Standard library only; among its tests, every panel's expression parses.
python3 bench/test_promql.py || failed+=("bench/test_promql.py")

step "done"
if [ ${#failed[@]} -gt 0 ]; then
  printf 'FAILED: %s\n' "${failed[@]}"
  exit 1
fi
echo "observability checks passed"
