"""The Grafana dashboard as data: its rows, panels and expressions, evaluated on scraped samples.

`bench/plots.py` draws `docs/dashboard.png` from what this module returns. The expressions are
read from `config/observability/token-sidecar-dashboard.json` at run time, never copied, and the
dashboard's template variables are expanded as Grafana would with their current values (`route`:
All, which is `.*`; `max_entries`: its textbox value); `$__rate_interval` is what Grafana derives
from a 1-s scrape interval: 4 × the scrape interval, 4 s. Standard library only.
"""

import json
import re

from promql import evaluate_range

DASHBOARD = "config/observability/token-sidecar-dashboard.json"


def load(path=DASHBOARD):
    with open(path) as f:
        return json.load(f)


def variables(dashboard, scrape_interval_s):
    """Each template variable's value as Grafana expands it with its current selection."""
    values = {"__rate_interval": "%ds" % round(4 * scrape_interval_s)}
    for var in dashboard.get("templating", {}).get("list", []):
        current = var.get("current", {}).get("value")
        if var.get("type") == "datasource":
            continue
        if var.get("includeAll") and current in (["$__all"], "$__all"):
            values[var["name"]] = var.get("allValue") or ".*"
        elif isinstance(current, list):
            values[var["name"]] = "|".join(current)
        elif current is not None:
            values[var["name"]] = str(current)
        else:
            raise ValueError("template variable %r has no current value" % var["name"])
    return values


def expand(expr, values):
    """`$name` and `${name}` replaced; an unknown variable is an error, not an empty string."""
    def one(m):
        name = m.group(1) or m.group(2)
        if name not in values:
            raise ValueError("unknown dashboard variable $%s in %r" % (name, expr))
        return values[name]
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, expr)


def rows(dashboard, titles):
    """The panels of the rows with these titles, in order: [(row title, [panel, ...])]. Rows are
    read from the flat panel list (a row panel, then its panels), as an expanded dashboard is."""
    out, current = [], None
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            current = (panel["title"], []) if panel["title"] in titles else None
            if current:
                out.append(current)
            if panel.get("panels"):
                raise ValueError("collapsed row %r: expand it in the JSON" % panel["title"])
        elif current:
            current[1].append(panel)
    missing = set(titles) - {title for title, _ in out}
    if missing:
        raise ValueError("no row titled %s in the dashboard" % ", ".join(sorted(missing)))
    return out


def legend(fmt, labels):
    """Grafana's legendFormat: `{{label}}` replaced by the label's value."""
    if not fmt:
        return ", ".join("%s=%s" % kv for kv in labels) or "value"
    labels = dict(labels)
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip()


def series(panel, store, times, values):
    """Every target's result over `times`: [(legend, [value or None])], in target order and then
    label order, as Grafana lists them."""
    out = []
    for target in panel.get("targets", []):
        expr = expand(target["expr"], values)
        for labels, points in sorted(evaluate_range(expr, store, times).items()):
            out.append((legend(target.get("legendFormat"), labels), points))
    return out
