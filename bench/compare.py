"""Paired hit-path rounds of two sidecar builds in one run: the evidence a hit-path change needs
(bench/README.md, "The rule for the hit path"). Usually started by bench/compare.sh, which builds
the base revision.

    python3 bench/compare.py --base BINARY --new BINARY [--rounds N] [--seconds S] [--out FILE]
                             [--path hit|pass|pass-post|inject]

With `--path hit` (the default) both builds serve the same cached key from the same provider;
with `pass` they forward `GET /api/v2/users/me` on a `[[routes]]` route to the same upstream (the
ceiling, as in the pass-through scenario), with `pass-post` a 4 KiB POST to it; with `inject` they
forward the provider's `GET /api/v2/users/me` on a route that injects its bearer (the inject
scenario's `inject` route). In each setup (isolated: one worker
pinned to a CPU and wrk pinned to another; shared: default workers, nothing pinned) the rounds
alternate between the builds, flipping the order every round, and each round's new/base ratio is
kept. The verdict per figure: `gain` or `loss` when the middle half of the per-round ratios (the
interquartile range) lies wholly above or below 1.0, `noise` otherwise.

Every process is ours, on 127.0.0.1, ended by its pid; every wait is bounded.
"""

import argparse
import os
import statistics
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (the driver's process and load helpers)


def quartiles(values):
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return q[0], q[2]


def verdict(ratios, higher_is_better):
    low, high = quartiles(ratios)
    if low > 1.0:
        return "gain" if higher_is_better else "loss"
    if high < 1.0:
        return "loss" if higher_is_better else "gain"
    return "noise"


def start_servers(run, setup, path, prov_addr, binaries, server_prefix, workers):
    """Each build, ready for `path`'s load: (servers, urls, wrk options)."""
    if path == "hit":
        servers = {name: bench.Sidecar(run, "compare-%s-%s" % (setup, name), prov_addr,
                                       binary=binary, prefix=server_prefix, workers=workers)
                   for name, binary in binaries.items()}
        urls = {}
        for name, sidecar in servers.items():
            url = "http://" + sidecar.listen
            for _ in range(2):  # the first request fills the cache, the second must be a hit
                status, headers, _ = bench.token_request(url)
                assert status == 200, (name, status)
            assert "hit" in headers.get("cache-status", ""), (name, headers)
            urls[name] = url + "/oauth/token"
        return servers, urls, {}
    route = {"name": "pass", "upstream": "http://" + prov_addr}
    script = "pass.lua"
    if path == "inject":
        secret = os.path.join(run.out, "compare-inject.secret")
        with open(secret, "w") as f:
            f.write(bench.INJECT_CLIENT[1] + "\n")
        route["inject"] = {"token_url": "http://%s/oauth/token" % prov_addr,
                           "client_id": bench.INJECT_CLIENT[0],
                           "client_secret_file": bench.rel(secret)}
        script = "api.lua"
    servers = {name: bench.Sidecar(run, "compare-%s-%s" % (setup, name), None, binary=binary,
                                   prefix=server_prefix, workers=workers, routes=[route])
               for name, binary in binaries.items()}
    urls = {name: "http://" + s.listens["pass"] + bench.PASS_PATH for name, s in servers.items()}
    for name, url in urls.items():
        status, _, _ = bench.http("GET", url)
        assert status == 200, (name, status)
    return servers, urls, {"script": script, "args": ["post"] if path == "pass-post" else ()}


def setup_rounds(run, setup, path, prov_addr, binaries, rounds, seconds, cpus):
    client_prefix = ["taskset", "-c", cpus[0]] if cpus else []
    server_prefix = ["taskset", "-c", cpus[1]] if cpus else []
    workers = 1 if cpus else 0
    servers, urls, load = start_servers(run, setup, path, prov_addr, binaries, server_prefix,
                                        workers)
    for url in urls.values():
        bench.wrk(run, url, 1, prefix=client_prefix, **load)  # warm connections and caches
    runs = {name: [] for name in servers}
    for r in range(rounds):
        for name in (["base", "new"] if r % 2 == 0 else ["new", "base"]):
            pid = servers[name].proc.pid
            before = bench.cpu_seconds(pid)
            result = bench.wrk(run, urls[name], seconds, prefix=client_prefix, **load)
            after = bench.cpu_seconds(pid)
            result["cpu_us"] = (sum(after) - sum(before)) * 1e6 / max(result["requests"], 1)
            runs[name].append(result)
    for sidecar in servers.values():
        sidecar.stop()
    figures = {}
    for key, higher_is_better in (("rps", True), ("p99_us", False), ("cpu_us", False)):
        ratios = [n[key] / b[key] for n, b in zip(runs["new"], runs["base"]) if b[key]]
        figures[key] = {
            "base": statistics.median(x[key] for x in runs["base"]),
            "new": statistics.median(x[key] for x in runs["new"]),
            "ratio": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
            "iqr": quartiles(ratios), "verdict": verdict(ratios, higher_is_better),
        }
    return figures


def report(setups, args):
    lines = ["| setup | figure | base | new | new/base (median) | rounds' range | middle half | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    names = {"rps": "req/s", "p99_us": "p99 µs", "cpu_us": "CPU µs/request"}
    for setup, figures in setups.items():
        for key, f in figures.items():
            lines.append("| %s | %s | %.0f | %.0f | %.3f | %.2f–%.2f | %.3f–%.3f | %s |" % (
                setup, names[key], f["base"], f["new"], f["ratio"], f["min"], f["max"],
                f["iqr"][0], f["iqr"][1], f["verdict"]))
    head = "%d paired rounds of %d s per setup, path %s; base %s, new %s\n\n" % (
        args.rounds, args.seconds, args.path, bench.rel(args.base), bench.rel(args.new))
    return head + "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="the sidecar binary before the change")
    parser.add_argument("--new", required=True, help="the sidecar binary with the change")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--seconds", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(bench.BENCH, "out", "COMPARE.md"))
    parser.add_argument("--path", choices=("hit", "pass", "pass-post", "inject"), default="hit",
                        help="the cache-hit path, pass-through (GET, or a 4 KiB POST), or an "
                        "injecting route")
    args = parser.parse_args()
    for path in (args.base, args.new):
        if not os.access(path, os.X_OK):
            parser.error("%s is not an executable" % path)
    if not 1 <= args.rounds <= 200 or not 1 <= args.seconds <= 60:
        parser.error("--rounds 1..200 and --seconds 1..60")
    run = bench.Run(False, os.path.join(bench.BENCH, "out"), False)
    run.scenario = "compare"
    setups = {}
    try:
        if args.path in ("hit", "inject"):
            prov, prov_addr = bench.start_provider(run, "compare-provider", lifetime=3600,
                                                   call_log=0, token_bytes=1024)
        else:  # the pass-through scenario's upstream: the ceiling, HTTP/1.1, one thread
            prov, prov_addr = run.spawn("compare-upstream",
                                        [bench.CEILING, "127.0.0.1:0", "-", "1", "http1"])
        binaries = {"base": args.base, "new": args.new}
        cpus = bench.isolation_cpus()
        if cpus:
            setups["isolated"] = setup_rounds(run, "isolated", args.path, prov_addr, binaries,
                                              args.rounds, args.seconds, cpus)
        setups["shared"] = setup_rounds(run, "shared", args.path, prov_addr, binaries,
                                        args.rounds, args.seconds, None)
        bench.stop(prov)
    finally:
        run.stop_all()
    text = report(setups, args)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    print("compare: wrote %s" % bench.rel(args.out), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
