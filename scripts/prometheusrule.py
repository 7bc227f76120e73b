#!/usr/bin/env python3
"""Generates config/kubernetes/components/observability/prometheusrule.yaml, the Prometheus
Operator PrometheusRule, from config/observability/token-sidecar-alerts.yml, so the alert rules
have one source. The rules file's `groups:` block becomes the resource's `spec.groups`, text for
text: every line is indented by the same two spaces, which keeps block scalars and comments as
they are. The rules file's leading comments are replaced by a header saying where the file comes
from.

Usage: python3 scripts/prometheusrule.py            (writes the file)
       python3 scripts/prometheusrule.py --check    (exit 1 if the file is not current)
Stdlib only; .ci/kubernetes.sh runs the check and also compares the rendered resource's groups
with the rules file's, parsed."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RULES = "config/observability/token-sidecar-alerts.yml"
OUT = "config/kubernetes/components/observability/prometheusrule.yaml"

HEADER = f"""\
# GENERATED from {RULES} by scripts/prometheusrule.py:
# do not edit. Change the rules file, run `python3 scripts/prometheusrule.py` and commit both;
# .ci/kubernetes.sh fails while this file is stale. What each alert means and what to check
# first: the rules' descriptions, and docs/DEPLOYMENT.md ("Dashboard and alerts").
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: token-sidecar
  labels:
    app.kubernetes.io/name: token-sidecar
    app.kubernetes.io/component: alerts
spec:
"""


def generate(rules: str) -> str:
    lines = rules.splitlines()
    starts = [i for i, line in enumerate(lines) if line.rstrip() == "groups:"]
    if len(starts) != 1:
        raise SystemExit(f"{RULES}: want exactly one top-level `groups:` line, found {len(starts)}")
    body = lines[starts[0]:]
    for n, line in enumerate(body[1:], start=starts[0] + 2):
        # Anything else at the top level (another key, a second document) would not belong in
        # spec: refuse it rather than guess.
        if line and not line[0].isspace() and not line.startswith("#"):
            raise SystemExit(f"{RULES}:{n}: only `groups:` may be at the top level: {line!r}")
        if "\t" in line[: len(line) - len(line.lstrip())]:
            raise SystemExit(f"{RULES}:{n}: a tab in the indentation")
    return HEADER + "".join(f"  {line}\n" if line else "\n" for line in body)


def main() -> int:
    check = sys.argv[1:] == ["--check"]
    if sys.argv[1:] and not check:
        print(__doc__, file=sys.stderr)
        return 2
    want = generate((ROOT / RULES).read_text(encoding="utf-8"))
    out = ROOT / OUT
    if check:
        have = out.read_text(encoding="utf-8") if out.exists() else ""
        if have != want:
            print(f"{OUT} is stale: run `python3 scripts/prometheusrule.py` and commit it",
                  file=sys.stderr)
            return 1
        print(f"{OUT} is current with {RULES}")
        return 0
    out.write_text(want, encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
