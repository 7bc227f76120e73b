"""The loads of the benchmark (bench/bench.py) and the soak (bench/soak.py), and what their outputs
say. The talking is done by wrk and the project's binaries; this module starts them, reads what
they print, and turns it into figures:

- wrk with `bench/clients.lua`, one client per wrk thread: the story, the burst, the fleet, the
  steady state and the soak. Its `WRK_JSON` line counts statuses and `Cache-Status` values.
- `bench/storm.rs`, the cold storm's client: one JSON object with a row per request.
- `bench/provider.rs`, the fake identity provider: `GET /stats` (counts) and `GET /calls` (one row
  per token call), read with urllib; the calls' times are moved onto this process's monotonic
  clock, which is also the clock `clients.lua` writes its times in.

Every wait is bounded; every process is started and ended here by its pid.
"""

import collections
import json
import os
import signal
import subprocess
import time
import urllib.request

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
CLIENTS_LUA = "bench/clients.lua"  # wrk runs with the repository as its working directory


def form(key):
    """The token request body of credential set `key`."""
    return ("grant_type=client_credentials&client_id=svc-%d&client_secret=secret-%d&scope=read"
            % (key, key))


def write_requests(path, requests):
    """The `requests=` file of clients.lua: one `(authorization, body)` per line."""
    with open(path, "w") as f:
        for authorization, body in requests:
            f.write("%s\t%s\n" % (authorization, body))
    return os.path.relpath(path, ROOT)


def clients_argv(url, clients, seconds, timeout_s=10, **opts):
    """wrk with clients.lua: `clients` threads of one connection each, for at most `seconds`."""
    argv = ["wrk", "-t%d" % clients, "-c%d" % clients, "-d%ds" % seconds,
            "--timeout", "%ds" % timeout_s, "-s", CLIENTS_LUA, url, "--", "clients=%d" % clients]
    return argv + ["%s=%s" % (name, value) for name, value in opts.items()]


def start_wrk(argv, stderr=None):
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, cwd=ROOT)


def wrk_summary(proc, limit_s, done=None, threads=0):
    """Waits for wrk to end, at most `limit_s`; when `done` is a file its threads append to once
    they have sent their requests, interrupts wrk as soon as all `threads` have (wrk's main thread
    would otherwise sleep out its whole -d). wrk prints its summary on SIGINT too."""
    deadline = time.monotonic() + limit_s
    while proc.poll() is None and time.monotonic() < deadline:
        if done and os.path.exists(done):
            with open(done) as f:
                if len(f.readlines()) >= threads:
                    break
        time.sleep(0.05)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        out = proc.communicate(timeout=30)[0].decode()
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=5)
        raise RuntimeError("wrk did not stop within 30 s of SIGINT")
    for line in out.splitlines():
        if line.startswith("WRK_JSON "):
            return json.loads(line[len("WRK_JSON "):])
    raise RuntimeError("wrk gave no summary (exit %s): %s" % (proc.returncode, out[-2000:]))


def outcome(cache_status):
    """A sidecar `Cache-Status` value → hit | miss | coalesced | stale | cooldown | other | none."""
    if not cache_status or cache_status == "none":
        return "none"
    if "collapsed" in cache_status:
        return "coalesced"
    if "; hit" in cache_status:
        return "hit"
    if "fwd=stale" in cache_status:
        return "stale"
    if "fwd=miss" in cache_status:
        return "miss"
    if "cooldown" in cache_status:
        return "cooldown"
    return "other"


def outcomes(cache_status_counts):
    counted = collections.Counter()
    for value, n in cache_status_counts.items():
        counted[outcome(value)] += n
    return dict(counted)


def percentile(values, p):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, int(round(p / 100.0 * len(values) + 0.5)) - 1))]


def ms(seconds):
    return None if seconds is None else round(seconds * 1000.0, 3)


def answers(result):
    """The figures of a clients.lua run: requests (answers and socket errors), ok, 429s, errors
    (everything but a 200), statuses, outcomes, and wrk's latency percentiles in ms."""
    statuses = {k: v for k, v in sorted(result["statuses"].items())}
    transport = {k: v for k, v in result["errors"].items() if k != "status" and v}
    total = sum(statuses.values()) + sum(transport.values())
    ok = statuses.get("200", 0)
    latency = result["latency_us"]
    answered = sum(statuses.values()) > 0
    return {
        "requests": total, "ok": ok, "throttled_429": statuses.get("429", 0),
        "errors": total - ok, "statuses": statuses,
        "outcomes": outcomes(result["cache_status"]), "transport_errors": transport,
        "p50_ms": latency["p50"] / 1000 if answered else None,
        "p99_ms": latency["p99"] / 1000 if answered else None,
        "max_ms": latency["max"] / 1000 if answered else None,
    }


def storm(argv, limit_s):
    """Runs the storm client (`argv`) and sums up its rows: ok, failures, statuses, outcomes,
    latency percentiles from the storm's start (ms), and its times."""
    done = subprocess.run(argv, capture_output=True, timeout=limit_s, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError("storm failed: %s" % done.stderr.decode()[-2000:])
    data = json.loads(done.stdout.decode())
    statuses, cache_status, latencies, failed = collections.Counter(), collections.Counter(), [], 0
    for latency_ms, status, value in data.pop("rows"):
        if latency_ms is None:
            failed += 1
            continue
        latencies.append(latency_ms / 1000.0)
        statuses[str(status)] += 1
        cache_status[value] += 1
    ok = statuses.get("200", 0)
    return dict(data, **{
        "connect_s": round(data["connect_s"], 3), "send_s": round(data["send_s"], 3),
        "wall_s": round(data["wall_s"], 3), "ok": ok, "failures": data["requests"] - ok,
        "statuses": dict(sorted(statuses.items())), "outcomes": outcomes(cache_status),
        "errors": {"failed": failed} if failed else {},
        "p50_ms": ms(percentile(latencies, 50)), "p99_ms": ms(percentile(latencies, 99)),
        "max_ms": ms(max(latencies) if latencies else None),
    })


def provider_argv(binary, **opts):
    """The provider's command line: `opts` as flags (`latency_ms=50` → `--latency-ms 50`)."""
    argv = [binary]
    for name, value in opts.items():
        argv += ["--" + name.replace("_", "-"), str(value)]
    return argv


def get_json(url, timeout=10.0):
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        return json.load(answer)


def provider_stats(addr):
    """The provider's counts: calls, issued, throttled, requests, most_in_progress, connections."""
    return get_json("http://%s/stats" % addr)["counts"]


def provider_calls(addr):
    """The provider's call log, its times (`arrived`, `answered`) on this process's monotonic clock.
    The offset between the clocks comes from the quickest of three `/stats` round trips; its error
    is at most half that round trip (well under a millisecond on loopback)."""
    best = None
    for _ in range(3):
        sent = time.monotonic()
        clock = get_json("http://%s/stats" % addr)["clock_s"]
        back = time.monotonic()
        if best is None or back - sent < best[0]:
            best = (back - sent, (sent + back) / 2 - clock)
    offset = best[1]
    rows = get_json("http://%s/calls" % addr, timeout=60)["calls"]
    for row in rows:
        row["arrived"] = row.pop("arrived_s") + offset
        row["answered"] = row.pop("answered_s") + offset
    return rows
