"""The pictures: the dashboard's main panels from a real run, the story, the hit path's rounds.

Run by `bash bench/plots.sh` (which makes the venv with matplotlib and prometheus_client and
builds the release binary). Three PNGs:

- `docs/dashboard.png`: the Overview and Token path rows of the Grafana dashboard, laid out by
  their gridPos, each panel's expressions (read from the dashboard JSON) evaluated by
  `promql.py` on the sidecar's `/metrics` as scraped once a second through the story run
  (`storyrun.py`);
- `bench/story.png`: that run's 429s per second and calls reaching the provider per second,
  directly and through the sidecar;
- `bench/hit-rounds.png`: the hit path's per-round sidecar/ceiling ratios of the run that
  bench/RESULTS.md reports (read from its headline table, with the targets it states).

It then rewrites the "Plots" section at the end of bench/RESULTS.md (bench.py rewrites the whole
file, so run this again after `bench/run.sh`). Exits non-zero when anything fails.
"""

import argparse
import math
import os
import re
import signal
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

import dashboard  # noqa: E402
from promql import Store  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = ("Overview", "Token path")
DASHBOARD_PNG = "docs/dashboard.png"
STORY_PNG = "bench/story.png"
HIT_PNG = "bench/hit-rounds.png"
RESULTS = "bench/RESULTS.md"
COMMAND = "bash bench/plots.sh"
# Grafana's classic palette, in its order, and its named threshold colours.
PALETTE = ["#7EB26D", "#EAB839", "#6ED0E0", "#EF843C", "#E24D42", "#1F78C1", "#BA43A9",
           "#705DA0", "#508642", "#CCA300"]
NAMED = {"green": "#56A64B", "red": "#E02F44", "orange": "#FF780A", "yellow": "#F2CC0C",
         "blue": "#3274D9"}
DIRECT, SIDECAR = "#E24D42", "#1F78C1"


# ---------------------------------------------------------------------------------------------
# Units, as Grafana shows them


def fmt_value(unit, v, decimals=None):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "No data"
    if unit == "percentunit":
        return "%.*f%%" % (1 if decimals is None else decimals, v * 100)
    if unit == "s":
        return "%.3g ms" % (v * 1000) if abs(v) < 1 else "%.3g s" % v
    text = ("%.*f" % (decimals, v)) if decimals is not None else "%.3g" % v
    return text + (" req/s" if unit == "reqps" else "")


def axis_formatter(unit):
    def tick(v, _):
        if unit == "s":
            return "%g ms" % round(v * 1000, 3) if abs(v) < 1 else "%g s" % round(v, 3)
        if unit == "percentunit":
            return "%g%%" % round(v * 100, 2)
        return ("%g" % round(v, 3)) + (" req/s" if unit == "reqps" else "")
    return FuncFormatter(tick)


def threshold_colour(field, value):
    steps = field.get("thresholds", {}).get("steps", [])
    colour = "green"
    for step in steps:
        if step.get("value") is None or (value is not None and value >= step["value"]):
            colour = step["color"]
    return NAMED.get(colour, colour)


# ---------------------------------------------------------------------------------------------
# The dashboard


def evaluation_times(document):
    return [t for t, _ in document["scrapes"]]


def store_of(document):
    store = Store()
    for t, samples in document["scrapes"]:
        store.add_scrape(t, samples)
    return store


def cell(fig, grid, x, y, w, h, pad):
    """Figure-fraction rectangle of a gridPos cell, shrunk by `pad` inches on each side (left,
    bottom, right, top)."""
    fw, fh = fig.get_size_inches()
    top_in, unit_w, unit_h = grid
    left = x * unit_w + pad[0]
    width = w * unit_w - pad[0] - pad[2]
    top = top_in + y * unit_h + pad[3]
    height = h * unit_h - pad[1] - pad[3]
    return [left / fw, 1 - (top + height) / fh, width / fw, height / fh]


def draw_frame(fig, grid, pos, fill, edge):
    ax = fig.add_axes(cell(fig, grid, pos["x"], pos["y"], pos["w"], pos["h"],
                           (0.04, 0.04, 0.04, 0.04)))
    ax.set_axis_off()
    ax.add_patch(Rectangle((0, 0), 1, 1, transform=ax.transAxes, facecolor=fill,
                           edgecolor=edge, linewidth=0.8))
    return ax


def draw_stat(fig, grid, panel, lines, times):
    field = panel["fieldConfig"]["defaults"]
    values = lines[0][1] if lines else []
    present = [v for v in values if v is not None and not math.isnan(v)]
    last = present[-1] if present else None  # reduceOptions: lastNotNull
    colour = threshold_colour(field, last) if last is not None else "#C7C7C7"
    frame = draw_frame(fig, grid, panel["gridPos"], colour, colour)
    frame.text(0.03, 0.92, panel["title"], transform=frame.transAxes, va="top", ha="left",
               color="white", fontsize=10, fontweight="bold")
    frame.text(0.5, 0.5, fmt_value(field.get("unit"), last, field.get("decimals")),
               transform=frame.transAxes, ha="center", va="center", color="white",
               fontsize=24, fontweight="bold")
    if panel.get("options", {}).get("graphMode") == "area" and len(present) > 1:
        spark = fig.add_axes(cell(fig, grid, **panel["gridPos"],
                                  pad=(0.06, 0.06, 0.06, 0.9)))
        spark.set_axis_off()
        xs = [t for t, v in zip(times, values) if v is not None and not math.isnan(v)]
        spark.fill_between(xs, present, color="white", alpha=0.25, linewidth=0)
        spark.plot(xs, present, color="white", alpha=0.6, linewidth=1)
        spark.set_xlim(times[0], times[-1])
        low, high = min(present + [0.0]), max(present)
        spark.set_ylim(low, high + (high - low) * 0.1 + 1e-9)


def visible(lines):
    """Series that stayed at 0 (or empty) all run are left out when another one moved."""
    moved = [(name, vs) for name, vs in lines
             if any(v not in (None, 0.0) and not math.isnan(v) for v in vs)]
    return (moved or lines), len(lines) - len(moved or lines)


def draw_timeseries(fig, grid, panel, lines, times, load_s):
    field = panel["fieldConfig"]["defaults"]
    custom = field.get("custom", {})
    pos = panel["gridPos"]
    draw_frame(fig, grid, pos, "white", "#D0D0D0")
    shown, hidden = visible(lines)
    columns = min(max(len(shown), 1), 4)
    legend_rows = max(1, math.ceil(len(shown) / columns))
    ax = fig.add_axes(cell(fig, grid, **pos,
                           pad=(0.75, 0.3 + 0.17 * legend_rows, 0.15, 0.32)))
    fig.text(*title_at(fig, grid, pos), panel["title"] + (
        "  (%d series at 0 throughout not shown)" % hidden if hidden else ""),
        fontsize=10, fontweight="bold", va="top", ha="left")
    ax.axvspan(0, load_s, color="#F2F2F2", zorder=0, linewidth=0)
    if not shown:
        ax.text(0.5, 0.5, "No data", transform=ax.transAxes, ha="center", va="center",
                fontsize=12, color="#888888")
    stacked = custom.get("stacking", {}).get("mode") == "normal"
    base = [0.0] * len(times)
    for i, (name, values) in enumerate(shown):
        colour = PALETTE[i % len(PALETTE)]
        ys = [math.nan if v is None else v for v in values]
        if stacked:
            top = [b + (0.0 if math.isnan(y) else y) for b, y in zip(base, ys)]
            ax.fill_between(times, base, top, color=colour, alpha=custom.get("fillOpacity", 0)
                            / 100, linewidth=0)
            ax.plot(times, top, color=colour, linewidth=1.2, label=name)
            base = top
        else:
            if custom.get("fillOpacity"):
                ax.fill_between(times, ys, color=colour, alpha=custom["fillOpacity"] / 100,
                                linewidth=0)
            ax.plot(times, ys, color=colour, linewidth=1.2, label=name)
    ax.set_xlim(times[0], times[-1])
    if field.get("min") is not None or stacked:
        ax.set_ylim(bottom=field.get("min", 0))
    if all(v in (None, 0.0) or math.isnan(v) for _, vs in shown for v in vs):
        ax.set_ylim(0, 1)  # as Grafana draws a flat zero
    ax.yaxis.set_major_formatter(axis_formatter(field.get("unit")))
    ax.yaxis.set_major_locator(MaxNLocator(5))
    ax.tick_params(labelsize=8)
    ax.grid(color="#E6E6E6", linewidth=0.6)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if shown:
        ax.legend(loc="upper left", bbox_to_anchor=(0, -0.1), ncol=columns, fontsize=8,
                  frameon=False, handlelength=1.5, borderaxespad=0)


def title_at(fig, grid, pos):
    fw, fh = fig.get_size_inches()
    top_in, unit_w, unit_h = grid
    return ((pos["x"] * unit_w + 0.12) / fw, 1 - (top_in + pos["y"] * unit_h + 0.1) / fh)


def render_dashboard(document, path):
    board = dashboard.load(os.path.join(ROOT, dashboard.DASHBOARD))
    params = document["params"]
    values = dashboard.variables(board, params["scrape_s"])
    store = store_of(document)
    times = evaluation_times(document)
    chosen = dashboard.rows(board, ROWS)
    panels = [p for _, ps in chosen for p in ps]
    top = min(p["gridPos"]["y"] for p in panels) - 1
    bottom = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    unit_w, unit_h, title_in, foot_in = 0.66, 0.36, 0.95, 0.55
    fig = plt.figure(figsize=(24 * unit_w, title_in + (bottom - top) * unit_h + foot_in),
                     dpi=80, facecolor="#F4F5F5")
    grid = (title_in - top * unit_h, unit_w, unit_h)
    fw, fh = fig.get_size_inches()
    fig.text(0.008, 1 - 0.2 / fh, board["title"], fontsize=15, fontweight="bold", va="top")
    fig.text(0.008, 1 - 0.48 / fh,
             "Rows %s of config/observability/token-sidecar-dashboard.json, every expression "
             "evaluated by bench/promql.py on the sidecar's /metrics scraped every %g s "
             "(route = All, $__rate_interval = %s).\nx: seconds since the load started; "
             "shaded: the %d s of load." % (
                 " and ".join("“%s”" % r for r in ROWS), params["scrape_s"],
                 values["__rate_interval"], params["seconds"]),
             fontsize=9, va="top", color="#444444")
    figures = {}
    for title, row_panels in chosen:
        row = next(p for p in board["panels"] if p["type"] == "row" and p["title"] == title)
        fig.text((0.1) / fw, 1 - (grid[0] + row["gridPos"]["y"] * unit_h + 0.12) / fh, title,
                 fontsize=12, fontweight="bold", va="top")
        for panel in row_panels:
            lines = dashboard.series(panel, store, times, values)
            if panel["type"] == "stat":
                draw_stat(fig, grid, panel, lines, times)
                present = [v for v in (lines[0][1] if lines else [])
                           if v is not None and not math.isnan(v)]
                figures[panel["title"]] = present[-1] if present else None
            elif panel["type"] == "timeseries":
                draw_timeseries(fig, grid, panel, lines, times, params["seconds"])
            else:
                raise ValueError("panel type %r is not drawn here" % panel["type"])
    fig.text(0.008, 0.25 / fh, story_caption(document), fontsize=8.5, color="#444444",
             va="center")
    fig.savefig(os.path.join(ROOT, path), facecolor=fig.get_facecolor())
    plt.close(fig)
    return figures


def story_caption(document):
    p = document["params"]
    return ("Run: %s, `%s`: token-sidecar demo --serve (release build, default settings) in "
            "front of its demo provider (%d token calls/s, then 429; %d-s tokens); %d clients "
            "over %d credential sets, a token each every %g s for %d s." % (
                document["when"], COMMAND, p["rate"], p["lifetime_s"], p["clients"], p["keys"],
                p["interval_s"], p["seconds"]))


# ---------------------------------------------------------------------------------------------
# The story


def per_second(answers, seconds, test):
    counts = [0] * seconds
    for t, status in answers:
        if 0 <= int(t) < seconds and test(status):
            counts[int(t)] += 1
    return counts


def upstream_per_interval(document):
    """The sidecar's upstream token calls between consecutive scrapes: [(t0, t1, calls)]."""
    totals = []
    for t, samples in document["scrapes"]:
        totals.append((t, sum(v for name, _, v in samples
                              if name == "token_sidecar_upstream_token_calls_total")))
    return [(t0, t1, c1 - c0) for (t0, c0), (t1, c1) in zip(totals, totals[1:])]


def story_figures(document):
    direct, via = document["direct"], document["via_sidecar"]
    calls = upstream_per_interval(document)
    return {
        "direct_requests": len(direct),
        "direct_ok": sum(1 for _, s in direct if s == 200),
        "direct_429": sum(1 for _, s in direct if s == 429),
        "direct_other": sum(1 for _, s in direct if s not in (200, 429)),
        "via_requests": len(via),
        "via_ok": sum(1 for _, s in via if s == 200),
        "via_429": sum(1 for _, s in via if s == 429),
        "via_other": sum(1 for _, s in via if s not in (200, 429)),
        "via_upstream_calls": int(sum(c for _, _, c in calls)),
    }


def render_story(document, path):
    p = document["params"]
    seconds = int(p["seconds"])
    f = story_figures(document)
    xs = [i + 0.5 for i in range(seconds)]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), dpi=90, sharex=True)
    fig.suptitle("The story: %d clients over %d credential sets, a token each every %g s; the "
                 "provider allows %d calls/s" % (p["clients"], p["keys"], p["interval_s"],
                                                 p["rate"]), fontsize=12, fontweight="bold")
    top.plot(xs, per_second(document["direct"], seconds, lambda s: s == 429), "o-",
             color=DIRECT, markersize=3.5,
             label="directly: %d × 429 of %d requests" % (f["direct_429"], f["direct_requests"]))
    top.plot(xs, per_second(document["via_sidecar"], seconds, lambda s: s == 429), "o-",
             color=SIDECAR, markersize=3.5,
             label="through the sidecar: %d × 429 of %d requests" % (f["via_429"],
                                                                      f["via_requests"]))
    top.set_title("429 answers the clients got, per second", fontsize=10)
    top.set_ylabel("429s per second")
    bottom.plot(xs, per_second(document["direct"], seconds, lambda s: s is not None), "o-",
                color=DIRECT, markersize=3.5,
                label="directly: every request is a call (%d)" % f["direct_requests"])
    calls = upstream_per_interval(document)
    bottom.step([t0 for t0, _, _ in calls] + [calls[-1][1]], [c for _, _, c in calls] +
                [calls[-1][2]], where="post", color=SIDECAR,
                label="through the sidecar: its upstream token calls (%d, from /metrics)"
                % f["via_upstream_calls"])
    bottom.set_title("Token calls that reached the provider, per second", fontsize=10)
    bottom.set_ylabel("calls per second")
    bottom.set_xlabel("seconds since the clients started")
    for ax in (top, bottom):
        ax.set_xlim(0, seconds)
        ax.set_ylim(bottom=0)
        ax.grid(color="#E6E6E6", linewidth=0.6)
        ax.legend(fontsize=9, loc="center right")
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    fig.text(0.01, 0.01, "Run: %s, `%s` (bench/storyrun.py): token-sidecar demo --serve, "
             "release build, %d-s tokens; clients on keep-alive connections." % (
                 document["when"], COMMAND, p["lifetime_s"]), fontsize=8, color="#444444")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(os.path.join(ROOT, path))
    plt.close(fig)
    return f


# ---------------------------------------------------------------------------------------------
# The hit path's rounds


HEADLINE = re.compile(r"^\| hit path, (\S+) \| sidecar/ceiling (req/s|p99) = ([\d.]+) "
                      r"\((?:median of \d+ paired )?rounds: ([\d., ]+)\) \| ([≥≤]) ([\d.]+) \|",
                      re.M)


def hit_rounds(results_md):
    """{setup: {"req/s"|"p99": (median, [per round], (sign, target))}} from RESULTS.md."""
    out = {}
    for setup, metric, median, rounds, sign, target in HEADLINE.findall(results_md):
        out.setdefault(setup, {})[metric] = (
            float(median), [float(r) for r in rounds.split(",")], (sign, float(target)))
    if not out:
        raise ValueError("no hit-path rows in %s's headline table" % RESULTS)
    return out


def render_hit_rounds(results_md, path):
    data = hit_rounds(results_md)
    date = re.search(r"^\| date \| (.+?) \|", results_md, re.M)
    commit = re.search(r"^\| commit \| (.+?) \|", results_md, re.M)
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.4), dpi=90)
    colours = [SIDECAR, "#EF843C", "#7EB26D", "#BA43A9"]
    for ax, metric, better in zip(axes, ("req/s", "p99"), ("higher", "lower")):
        for colour, (setup, metrics) in zip(colours, data.items()):
            median, rounds, (sign, target) = metrics[metric]
            xs = range(1, len(rounds) + 1)
            ax.plot(xs, rounds, "o-", color=colour, markersize=4, linewidth=1.2,
                    label="%s: median %.2f (target %s %.2f)" % (setup, median, sign, target))
            ax.axhline(target, color=colour, linestyle="--", linewidth=0.9, alpha=0.8)
        ax.axhline(1.0, color="#888888", linewidth=0.8)
        ax.set_title("%s, sidecar ÷ ceiling (%s is better)" % (metric, better), fontsize=10)
        ax.set_xlabel("round (order of ceiling and sidecar flipped each round)")
        ax.set_ylabel("ratio in that round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(color="#E6E6E6", linewidth=0.6)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    fig.suptitle("Hit path: the paired rounds behind bench/RESULTS.md's ratios (dashed: targets)",
                 fontsize=12, fontweight="bold")
    fig.text(0.01, 0.01, "From bench/RESULTS.md's headline table (run of %s, commit %s); "
             "redrawn by `%s`." % (date.group(1) if date else "?",
                                    commit.group(1) if commit else "?", COMMAND),
             fontsize=8, color="#444444")
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    fig.savefig(os.path.join(ROOT, path))
    plt.close(fig)
    return data


# ---------------------------------------------------------------------------------------------
# RESULTS.md's Plots section


def plots_section(document, story, hit):
    p = document["params"]
    rows = []
    for setup, metrics in hit.items():
        rows.append("%s: req/s %.2f (rounds %.2f–%.2f), p99 %.2f (rounds %.2f–%.2f)" % (
            setup, metrics["req/s"][0], min(metrics["req/s"][1]), max(metrics["req/s"][1]),
            metrics["p99"][0], min(metrics["p99"][1]), max(metrics["p99"][1])))
    return "\n".join([
        "## Plots",
        "",
        "Made by `%s` (about 80 s; this section too: run it again after `bash bench/run.sh`, "
        "which rewrites this file). See [README.md](README.md#plots)." % COMMAND,
        "",
        "### The story, over time",
        "",
        "![429s per second and provider calls per second, directly and through the sidecar]"
        "(story.png)",
        "",
        "Its own run (%s), not section 3's: the story's load (%d clients over %d credential sets, "
        "a token each every %g s for %d s) against `token-sidecar demo --serve`'s provider "
        "(%d token calls per second, then 429; %d-s tokens; 20 ms per call), first directly, then "
        "through the demo's sidecar with default settings. Directly: %d requests, %d ok, %d × 429. "
        "Through the sidecar: %d requests, %d ok, %d × 429, %d other errors, %d upstream token "
        "calls. The same run drew the dashboard in [docs/dashboard.png](../docs/dashboard.png)." % (
            document["when"], p["clients"], p["keys"], p["interval_s"], p["seconds"], p["rate"],
            p["lifetime_s"], story["direct_requests"], story["direct_ok"], story["direct_429"],
            story["via_requests"], story["via_ok"], story["via_429"], story["via_other"],
            story["via_upstream_calls"]),
        "",
        "### The hit path, round by round",
        "",
        "![Per-round sidecar/ceiling ratios of req/s and p99, per setup](hit-rounds.png)",
        "",
        "The per-round ratios of section 1, as the headline table above gives them: %s." %
        "; ".join(rows),
        "",
    ])


def update_results(section):
    path = os.path.join(ROOT, RESULTS)
    with open(path) as f:
        text = f.read()
    at = text.find("\n## Plots\n")
    text = (text if at < 0 else text[:at + 1]).rstrip("\n") + "\n\n\n" + section
    with open(path, "w") as f:
        f.write(text)


# ---------------------------------------------------------------------------------------------


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--binary", required=True, help="the release token-sidecar binary")
    parser.add_argument("--seconds", type=int, default=30, help="each leg of the story")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "plots"))
    parser.add_argument("--render-only", action="store_true",
                        help="draw from the last run's story-run.json instead of running")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    # SIGTERM unwinds like Ctrl-C, so the run's `finally` stops the demo process.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.render_only:
        import json
        with open(os.path.join(args.out, "story-run.json")) as f:
            document = json.load(f)
    else:
        import storyrun
        started = time.monotonic()
        document = storyrun.run(args.binary, args.out, args.seconds)
        print("plots: the run took %.0f s" % (time.monotonic() - started), flush=True)
    stats = render_dashboard(document, DASHBOARD_PNG)
    story = render_story(document, STORY_PNG)
    with open(os.path.join(ROOT, RESULTS)) as f:
        hit = render_hit_rounds(f.read(), HIT_PNG)
    update_results(plots_section(document, story, hit))
    for path in (DASHBOARD_PNG, STORY_PNG, HIT_PNG):
        print("plots: wrote %s (%d KB)" % (path, os.path.getsize(path) // 1024))
    print("plots: story: %s" % ", ".join("%s %s" % kv for kv in story.items()))
    print("plots: dashboard stats (last value): %s" % "; ".join(
        "%s = %s" % (k, "No data" if v is None else "%.4g" % v) for k, v in stats.items()))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception:  # noqa: BLE001 - any failure is an exit status, with its traceback
        import traceback
        traceback.print_exc()
        sys.exit(1)
