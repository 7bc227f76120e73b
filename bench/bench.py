"""The benchmark driver behind bench/run.sh: starts the processes of each scenario on 127.0.0.1,
runs the load, reads the counters on both sides, and writes the report.

Scenarios (see bench/README.md): hit path, cold storm, the story (a throttled provider), the
burst (a provider whose limit is below the cold-key burst), steady state with rotation, the fleet,
credential injection's cost per API call, memory and start. References run in the same process tree and, where the scenario allows,
interleaved with the sidecar, so that only ratios from this one run are compared. The loads are
wrk and the project's binaries (bench/loads.py runs them and reads their outputs); the provider
is `bench/provider.rs`, the project's own.

Every child process is ours and is ended by its pid; every wait is bounded.
"""

import argparse
import collections
import datetime
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
import traceback
import urllib.request

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
# Where cargo put the binaries: CARGO_TARGET_DIR when set (relative to the repository, as cargo
# reads it), else target/. run.sh builds there first; check_binaries() refuses stale ones.
TARGET = os.path.join(ROOT, os.environ.get("CARGO_TARGET_DIR") or "target")
SIDECAR = os.path.join(TARGET, "release", "token-sidecar")
CEILING = os.path.join(TARGET, "release", "examples", "ceiling")
PROVIDER = os.path.join(TARGET, "release", "examples", "provider")
STORM = os.path.join(TARGET, "release", "examples", "storm")
FLOOR = os.path.join(TARGET, "release", "examples", "floor")
DELAY = os.path.join(TARGET, "release", "examples", "delay")
HOLD = os.path.join(TARGET, "release", "examples", "hold")
PROFILE_SIDECAR = os.path.join(ROOT, "target", "bench-profile", "release", "token-sidecar")

sys.dont_write_bytecode = True  # no __pycache__ in bench/
sys.path.insert(0, BENCH)
import loads  # noqa: E402  (running the loads and reading their outputs)


def check_binaries():
    """Fails loudly when a binary the run needs is missing or older than its Rust sources (the
    sidecar's: src/; an example's: src/ and its own file in bench/): a stale build would measure
    other code than the tree's. Cargo.toml is left out: an edit that changes no binary relinks
    none."""
    found = 0.0
    for base, _, files in os.walk(os.path.join(ROOT, "src")):
        for name in files:
            if name.endswith(".rs"):
                found = max(found, os.path.getmtime(os.path.join(base, name)))
    sources = {SIDECAR: found}
    for binary in (CEILING, PROVIDER, STORM, FLOOR, DELAY, HOLD):
        own = os.path.join(BENCH, os.path.basename(binary) + ".rs")
        sources[binary] = max(found, os.path.getmtime(own))
    for binary, newest_source in sources.items():
        if not os.path.exists(binary):
            sys.exit("bench: %s is missing: build with `cargo build --release --bin token-sidecar` "
                     "then `cargo build --release --example ceiling --example provider --example "
                     "storm --example floor --example delay --example hold` (CARGO_TARGET_DIR=%s)"
                     % (binary, TARGET))
        if os.path.getmtime(binary) < newest_source:
            sys.exit("bench: %s is older than the sources: rebuild it (bench/run.sh does)" % binary)


def rel(path):
    return os.path.relpath(path, ROOT)


class Run:
    """Shared state of one run: settings, output folder, the commands executed, the children."""

    def __init__(self, quick, out, profile):
        self.quick = quick
        self.out = out
        self.profile = profile
        self.commands = []  # (scenario, command line) in execution order
        self.children = []
        self.scenario = ""
        os.makedirs(os.path.join(out, "logs"), exist_ok=True)

    def note(self, argv):
        shown = [rel(a) if os.path.isabs(a) and a.startswith(ROOT) else a for a in argv]
        line = " ".join(shlex.quote(a) for a in shown)
        for entry in self.commands:
            if entry[:2] == [self.scenario, line]:
                entry[2] += 1
                return
        self.commands.append([self.scenario, line, 1])

    def log(self, name):
        return open(os.path.join(self.out, "logs", name + ".log"), "ab")

    def spawn(self, name, argv, env=None, announce=True):
        """Starts a child; if `announce`, waits for its `listening on ADDR` line and returns it."""
        self.note(argv)
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE if announce else subprocess.DEVNULL,
                                stderr=self.log(name), env=env, cwd=ROOT)
        self.children.append(proc)
        if not announce:
            return proc, None
        line = read_line(proc, 10.0)
        if not line.startswith("listening on "):
            stop(proc)
            raise RuntimeError("%s did not start: %r" % (name, line))
        return proc, line.split()[-1]

    def stop_all(self):
        stop(*self.children)
        self.children = []


def read_line(proc, timeout):
    """One stdout line of a child, bounded in time."""
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout):
        return ""
    return proc.stdout.readline().decode().strip()


def stop(*procs):
    """SIGTERM to every process still running, then waits for each (10 s, then SIGKILL): a
    sidecar takes half a second to drain, and several drain at once."""
    running = [proc for proc in procs if proc.poll() is None]
    for proc in running:
        proc.send_signal(signal.SIGTERM)
    for proc in running:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, headers=None, timeout=10.0):
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


FORM = b"grant_type=client_credentials&client_id=bench-client&client_secret=bench-secret&scope=read"
FORM_HEADERS = {"Content-Type": "application/x-www-form-urlencoded"}


def start_provider(run, name, **opts):
    """`bench/provider.rs` on a free port, with `opts` as its flags; (process, address)."""
    return run.spawn(name, loads.provider_argv(PROVIDER, max_seconds=900, **opts))


def provider_stats(addr):
    return loads.provider_stats(addr)


def token_file(run):
    """The token JSON a token call gets from the provider (1 KiB `access_token`), written to
    bench/out/token.json for the ceiling to serve: the same bytes a provider answers."""
    prov, addr = start_provider(run, "token-provider", lifetime=3600, token_bytes=1024)
    status, _, body = token_request("http://" + addr)
    stop(prov)
    assert status == 200, status
    path = os.path.join(run.out, "token.json")
    with open(path, "wb") as f:
        f.write(body)
    return path


class Sidecar:
    """A sidecar on free loopback ports. `routes`, if given, is a list of `[[routes]]` tables
    (dicts; a dict value is written as the route's sub-table, e.g. `inject`), each on a listener
    of its own, instead of `--upstream` and `--listen`; `listens` maps each route's name to its
    listener and `listen` is the first one."""

    def __init__(self, run, name, upstream, binary=SIDECAR, token=None, prefix=(), workers=None,
                 args=(), grace=None, routes=None):
        self.listen = "127.0.0.1:%d" % free_port()
        self.admin = "127.0.0.1:%d" % free_port()
        self.config = os.path.join(run.out, name + ".toml")
        token = dict({"max_entries": 200000}, **(token or {}))
        self.listens = {}
        with open(self.config, "w") as f:
            f.write("# Written by bench/bench.py for the %s scenario.\n" % name)
            if grace is not None:
                f.write("shutdown_grace = %s\n" % json.dumps(grace))
            f.write("[limits]\nmax_connections = 20000\n\n[token]\n")
            for key, value in token.items():
                f.write("%s = %s\n" % (key, json.dumps(value)))
            for route in routes or ():
                listen = self.listens[route["name"]] = "127.0.0.1:%d" % free_port()
                f.write("\n[[routes]]\nlisten = %s\n" % json.dumps(listen))
                tables = {k: v for k, v in route.items() if isinstance(v, dict)}
                for key, value in route.items():
                    if key not in tables:
                        f.write("%s = %s\n" % (key, json.dumps(value)))
                for table, values in tables.items():
                    f.write("[routes.%s]\n" % table)
                    for key, value in values.items():
                        f.write("%s = %s\n" % (key, json.dumps(value)))
        if routes:
            self.listen = next(iter(self.listens.values()))
            flags = []
        else:
            flags = ["--upstream", "http://" + upstream, "--listen", self.listen]
        argv = list(prefix) + [binary] + flags + ["--admin", self.admin, "--config", self.config]
        if workers is not None:
            argv += ["--workers", str(workers)]
        argv += list(args)
        env = dict(os.environ, RUST_LOG=os.environ.get("BENCH_RUST_LOG", "warn"))
        self.name, self.argv, self.env = name, argv, env  # for restart()
        self.started = time.monotonic()
        self.proc, _ = run.spawn(name + "-sidecar", argv, env=env, announce=False)
        self.ready_s = wait_ready(self.admin, self.proc, 10.0) - self.started

    def restart(self, run):
        """A pod restart: SIGTERM, wait for the exit, then the same command line on the same ports
        until /readyz answers 200. The monotonic times of the three steps."""
        times = {"sigterm": time.monotonic()}
        self.proc.send_signal(signal.SIGTERM)
        try:
            # Under load a sidecar drains for its whole grace (10 s by default): its keep-alive
            # callers, told `Connection: close`, come back on new connections.
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        times["exited"] = time.monotonic()
        self.proc, _ = run.spawn(self.name + "-sidecar", self.argv, env=self.env, announce=False)
        times["ready"] = wait_ready(self.admin, self.proc, 10.0)
        return times

    def metrics(self):
        status, _, body = http("GET", "http://%s/metrics" % self.admin)
        assert status == 200, status
        return body.decode()

    def metric(self, name, **labels):
        """Sum of the samples of `name` whose labels include `labels`."""
        total = 0.0
        for line in self.metrics().splitlines():
            if not line.startswith(name) or line.startswith("#"):
                continue
            head, _, value = line.rpartition(" ")
            metric, _, rest = head.partition("{")
            if metric != name:
                continue
            pairs = dict(p.split("=", 1) for p in rest.rstrip("}").split(",") if "=" in p)
            if all(pairs.get(k) == '"%s"' % v for k, v in labels.items()):
                total += float(value)
        return total

    def rss_kib(self):
        return rss_kib(self.proc.pid)

    def stop(self):
        stop(self.proc)


def wait_ready(admin, proc, timeout):
    """Polls GET /readyz every millisecond until 200; returns the monotonic time of that 200."""
    host, port = admin.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    probe = b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("sidecar exited with %s" % proc.returncode)
        try:
            with socket.create_connection((host, int(port)), timeout=1.0) as s:
                s.sendall(probe)
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return time.monotonic()
        except OSError:
            pass
        time.sleep(0.001)
    raise RuntimeError("sidecar not ready within %.0fs" % timeout)


def wrk(run, url, seconds, script="hit.lua", connections=64, args=(), prefix=()):
    argv = list(prefix) + ["wrk", "-t1", "-c%d" % connections, "-d%ds" % seconds, "--timeout", "10s",
            "-s", os.path.join(BENCH, script), url]
    if args:
        argv += ["--"] + [str(a) for a in args]
    run.note(argv)
    done = subprocess.run(argv, capture_output=True, timeout=seconds + 60, cwd=ROOT)
    text = done.stdout.decode()
    for line in text.splitlines():
        if line.startswith("WRK_JSON "):
            return json.loads(line[len("WRK_JSON "):])
    raise RuntimeError("wrk gave no summary: %s %s" % (text, done.stderr.decode()))


def clients_start(run, name, url, clients, seconds, requests, **opts):
    """Starts wrk with bench/clients.lua: `clients` clients (one wrk thread each) sending
    `requests` (`(authorization, body)` pairs, see clients.lua) for at most `seconds`; a handle
    for clients_finish()."""
    requests = loads.write_requests(os.path.join(run.out, name + ".requests"), requests)
    done = None
    if opts.get("ticks"):
        done = os.path.join(run.out, name + ".done")
        if os.path.exists(done):
            os.remove(done)
        opts["done"] = rel(done)
    argv = loads.clients_argv(url, clients, seconds, requests=requests, **opts)
    run.note(argv)
    proc = loads.start_wrk(argv, stderr=run.log(name + "-wrk"))
    run.children.append(proc)
    return proc, seconds + 30, done, clients


def clients_finish(handle):
    """clients.lua's summary (see loads.answers)."""
    proc, limit, done, clients = handle
    return loads.wrk_summary(proc, limit, done, clients)


def clients_load(run, name, url, clients, seconds, requests, **opts):
    return clients_finish(clients_start(run, name, url, clients, seconds, requests, **opts))


def storm(run, target, n, key=0):
    """The storm client (`bench/storm.rs`) against `target`: see loads.storm."""
    argv = [STORM, "--target", target, "-n", str(n), "--key", str(key)]
    run.note(argv)
    return loads.storm(argv, 180)


def token_request(url):
    return http("POST", url + "/oauth/token", FORM, FORM_HEADERS)


# ---------------------------------------------------------------------------------------------
# Scenarios. Each returns a dict of figures; an exception marks the scenario as failed to run.


def cpu_seconds(pid):
    """User and system CPU time a process has used so far."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def isolation_cpus():
    """Two CPUs this process may run on, one for wrk and one for the server under test, or None
    when there are not two (or no taskset)."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2 or subprocess.run(
            ["sh", "-c", "command -v taskset"], capture_output=True).returncode != 0:
        return None
    return str(allowed[0]), str(allowed[1])


def scenario_hit(run):
    """The hit path in two setups. `isolated`: the server under test (ceiling or sidecar) runs one
    worker thread pinned to one CPU and wrk is pinned to another, so neither competes for a core and
    the ratio measures the servers, not the scheduler. `shared`: default worker counts, nothing
    pinned, as a pod would run it; on a 2-core machine wrk's thread and two server workers share
    two cores and the ratio also measures where the scheduler puts them."""
    body_file = token_file(run)
    prov, prov_addr = start_provider(run, "hit-provider", lifetime=3600, token_bytes=1024,
                                     call_log=0)
    setups = {}
    cpus = isolation_cpus()
    if cpus:
        setups["isolated"] = hit_setup(run, "isolated", body_file, prov_addr,
                                       *((1, 1) if run.quick else (16, 2)), cpus=cpus)
    setups["shared"] = hit_setup(run, "shared", body_file, prov_addr,
                                 *((1, 1) if run.quick else (10, 2)))
    # The same, with the sidecar on one worker per CPU (`--workers 0`) instead of its default 1.
    setups["shared-percpu"] = hit_setup(run, "shared-percpu", body_file, prov_addr,
                                        *((1, 1) if run.quick else (10, 2)), sidecar_workers=0)
    provider = wrk(run, "http://" + prov_addr + "/oauth/token", 1 if run.quick else 4)
    stop(prov)
    return {"setups": setups, "primary": "isolated" if "isolated" in setups else "shared",
            "provider": provider, "body_bytes": os.path.getsize(body_file)}


def hit_setup(run, setup, body_file, prov_addr, rounds, seconds, cpus=None,
              sidecar_workers=None):
    client_prefix = ["taskset", "-c", cpus[0]] if cpus else []
    server_prefix = ["taskset", "-c", cpus[1]] if cpus else []
    if sidecar_workers is None and cpus:
        sidecar_workers = 1
    # The ceiling (plain HTTP/1.1) runs the sidecar's worker count: one, on a current-thread
    # runtime, unless the setup gives the sidecar one per CPU.
    workers = 0 if sidecar_workers == 0 else 1
    ceiling, ceiling_addr = run.spawn("hit-ceiling-" + setup, server_prefix + [
        CEILING, "127.0.0.1:0", body_file, str(workers), "http1"])
    sidecar = Sidecar(run, "hit-" + setup, prov_addr, prefix=server_prefix,
                      workers=sidecar_workers)
    targets = {"ceiling": ("http://" + ceiling_addr + "/oauth/token", ceiling.pid),
               "sidecar": ("http://" + sidecar.listen + "/oauth/token", sidecar.proc.pid)}
    first = token_request("http://" + sidecar.listen)
    second = token_request("http://" + sidecar.listen)
    assert first[0] == 200 and second[0] == 200, (first[0], second[0])
    assert "hit" in second[1].get("cache-status", ""), second[1]
    for name in ("ceiling", "sidecar"):  # warm both: connections, allocator, CPU caches
        wrk(run, targets[name][0], 1, prefix=client_prefix)
    hits_before = sidecar.metric("token_sidecar_token_requests_total", outcome="hit")
    results = {"ceiling": [], "sidecar": []}
    for r in range(rounds):
        order = ["ceiling", "sidecar"] if r % 2 == 0 else ["sidecar", "ceiling"]
        for name in order:
            url, pid = targets[name]
            before = cpu_seconds(pid)
            result = wrk(run, url, seconds, prefix=client_prefix)
            after = cpu_seconds(pid)
            n = max(result["requests"], 1)
            result["user_us"] = (after[0] - before[0]) * 1e6 / n
            result["sys_us"] = (after[1] - before[1]) * 1e6 / n
            results[name].append(result)
    sidecar_requests = sum(x["requests"] for x in results["sidecar"])
    hits = sidecar.metric("token_sidecar_token_requests_total", outcome="hit") - hits_before
    upstream_calls = sidecar.metric("token_sidecar_upstream_token_calls_total")
    sidecar.stop()
    stop(ceiling)

    def med(name, key):
        return statistics.median(x[key] for x in results[name])

    def paired(key):
        return [s[key] / c[key] for s, c in zip(results["sidecar"], results["ceiling"])]

    keys = ("rps", "p50_us", "p90_us", "p99_us", "max_us", "user_us", "sys_us")
    summary = {name: {k: med(name, k) for k in keys} for name in results}
    errors = {name: sum(x[k] for x in results[name] for k in x if k.startswith("errors_"))
              for name in results}
    return {
        "rounds": rounds, "seconds": seconds, "workers": workers,
        "sidecar_workers": sidecar_workers, "runs": results,
        "summary": summary, "errors": errors,
        # Paired: each round's sidecar run against the ceiling run next to it, then the median.
        "rps_ratio_per_round": paired("rps"), "p99_ratio_per_round": paired("p99_us"),
        "rps_ratio": statistics.median(paired("rps")),
        "p99_ratio": statistics.median(paired("p99_us")),
        "p50_ratio": statistics.median(paired("p50_us")),
        "p90_ratio": statistics.median(paired("p90_us")),
        "sidecar_requests": sidecar_requests, "sidecar_hits": hits,
        "sidecar_upstream_calls": upstream_calls,
    }


def scenario_storm(run):
    n = 1000 if run.quick else 10_000
    body_file = token_file(run)
    ceiling, ceiling_addr = run.spawn("storm-ceiling", [CEILING, "127.0.0.1:0", body_file])
    floor = storm(run, ceiling_addr, n)
    stop(ceiling)
    prov, prov_addr = start_provider(run, "storm-provider", latency_ms=50, lifetime=3600)
    sidecar = Sidecar(run, "storm", prov_addr)
    via = storm(run, sidecar.listen, n)
    calls_sidecar = sidecar.metric("token_sidecar_upstream_token_calls_total")
    calls_provider_via = provider_stats(prov_addr)["calls"]
    sidecar.stop()
    # The same storm against a provider that takes 2 s, so every request arrives while the one
    # upstream call is still in flight: all but the leader must be coalesced waiters.
    slow, slow_addr = start_provider(run, "storm-slow-provider", latency_ms=2000, lifetime=3600)
    sidecar = Sidecar(run, "storm-slow", slow_addr)
    via_slow = storm(run, sidecar.listen, n)
    via_slow["upstream_calls"] = provider_stats(slow_addr)["calls"]
    sidecar.stop()
    stop(slow)
    direct = storm(run, prov_addr, n, key=1)
    calls_direct = provider_stats(prov_addr)["calls"] - calls_provider_via
    return {"n": n, "via_sidecar": via, "direct": direct, "ceiling": floor, "via_slow": via_slow,
            "upstream_calls_via_sidecar": calls_provider_via,
            "upstream_calls_sidecar_metric": calls_sidecar,
            "upstream_calls_direct": calls_direct}


def story_load(run, name, target, clients, keys, interval, duration):
    """`clients` clients over `keys` credential sets (client i asks for set i mod keys), each
    asking for a token every `interval` s for `duration` s, all starting together."""
    result = clients_load(run, name, "http://%s/oauth/token" % target, clients, duration + 30,
                          [("", loads.form(k)) for k in range(keys)], every=interval,
                          jitter=0.05, ticks=int(duration / interval))
    return dict(loads.answers(result), clients=clients, keys=keys, duration_s=duration,
                interval_s=interval)


def scenario_story(run):
    clients, keys, interval = 100, 5, 1.0
    duration, lifetime = (4, 3) if run.quick else (30, 10)
    prov, prov_addr = start_provider(run, "story-direct-provider", latency_ms=50,
                                     lifetime=lifetime, rate_limit=10)
    direct = story_load(run, "story-direct", prov_addr, clients, keys, interval, duration)
    direct["upstream_calls"] = provider_stats(prov_addr)
    stop(prov)
    prov, prov_addr = start_provider(run, "story-sidecar-provider", latency_ms=50,
                                     lifetime=lifetime, rate_limit=10)
    sidecar = Sidecar(run, "story", prov_addr)
    via = story_load(run, "story-sidecar", sidecar.listen, clients, keys, interval, duration)
    via["upstream_calls"] = provider_stats(prov_addr)
    via["sidecar_outcomes"] = {o: sidecar.metric("token_sidecar_token_requests_total", outcome=o)
                               for o in ("hit", "miss", "coalesced", "stale", "cooldown",
                                         "error")}
    sidecar.stop()
    refresh_every = 0.8 * lifetime
    expected_per_key = 1 + int(duration // refresh_every)
    return {"clients": clients, "keys": keys, "interval_s": interval, "duration_s": duration,
            "lifetime_s": lifetime, "direct": direct, "via_sidecar": via,
            "expected_upstream_calls": keys * expected_per_key}


BURST_LIMIT = 3  # the provider's token calls per second, below the 5 cold keys


def scenario_burst(run):
    """The story's load against a provider whose limit (3 calls per second) is below the burst of
    5 cold keys at once, three ways in one run: the provider directly, through the sidecar with
    default settings (holds absorbed), and through the sidecar with `absorb_hold = "0s"` (holds
    passed on as 429s)."""
    clients, keys, interval = 100, 5, 1.0
    duration, lifetime = (4, 3) if run.quick else (30, 10)
    outcomes = ("hit", "miss", "coalesced", "stale", "cooldown", "error")
    legs = {}
    for leg, token in (("direct", None), ("absorb", {}), ("pass", {"absorb_hold": "0s"})):
        prov, prov_addr = start_provider(run, "burst-%s-provider" % leg, latency_ms=50,
                                         lifetime=lifetime, rate_limit=BURST_LIMIT)
        sidecar = None
        target = prov_addr
        if token is not None:
            sidecar = Sidecar(run, "burst-" + leg, prov_addr, token=token)
            target = sidecar.listen
        result = story_load(run, "burst-" + leg, target, clients, keys, interval, duration)
        result["upstream_calls"] = provider_stats(prov_addr)
        sent = collections.Counter(call["retry_after"] for call in loads.provider_calls(prov_addr)
                                   if call["status"] == 429)
        result["retry_after"] = dict(sorted(sent.items()))
        if sidecar is not None:
            result["sidecar_outcomes"] = {
                o: sidecar.metric("token_sidecar_token_requests_total", outcome=o)
                for o in outcomes}
            result["holds_absorbed"] = sidecar.metric("token_sidecar_holds_absorbed_total")
            result["config"] = rel(sidecar.config)
            sidecar.stop()
        stop(prov)
        legs[leg] = result
    return {"clients": clients, "keys": keys, "interval_s": interval, "duration_s": duration,
            "lifetime_s": lifetime, "rate_limit": BURST_LIMIT, **legs}


def scenario_steady(run):
    duration, lifetime = (6, 3) if run.quick else (60, 10)
    keys, connections = 10, 16
    prov, prov_addr = start_provider(run, "steady-provider", latency_ms=50, lifetime=lifetime)
    sidecar = Sidecar(run, "steady", prov_addr)
    log = os.path.join(run.out, "steady-answers-")
    for i in range(1, connections + 1):
        if os.path.exists("%s%d.txt" % (log, i)):
            os.remove("%s%d.txt" % (log, i))
    # A closed loop: each client sends its next request as soon as its answer is in, cycling
    # through the keys; every answer's send time and latency goes to the log.
    summary = clients_load(run, "steady", "http://%s/oauth/token" % sidecar.listen, connections,
                           duration, [("", loads.form(k)) for k in range(keys)], rotate=1,
                           log=rel(log))
    result = steady_figures(["%s%d.txt" % (log, i) for i in range(1, connections + 1)],
                            loads.provider_calls(prov_addr))
    answered = loads.answers(summary)
    result.update({"connections": connections, "keys": keys,
                   "duration_s": round(summary["duration_s"], 3),
                   "rps": round(result["requests"] / summary["duration_s"], 1),
                   "statuses": answered["statuses"], "outcomes": answered["outcomes"],
                   "transport_errors": answered["transport_errors"]})
    result["sidecar_outcomes"] = {o: sidecar.metric("token_sidecar_token_requests_total",
                                                    outcome=o)
                                  for o in ("hit", "miss", "coalesced", "stale", "error")}
    sidecar.stop()
    result["lifetime_s"] = lifetime
    result["target_calls_per_key"] = duration / (0.8 * lifetime)
    return result


def steady_figures(logs, calls, warmup=1.0, margin=0.02):
    """Splits the steady load's answers (`logs`: clients.lua's per-client answer files, read and
    then removed: they are large) into those sent during a refresh and the rest. A refresh moment
    runs from just before a background call reaches the provider until a little after its answer,
    when the new token is swapped in; first calls per key are cold misses, not refreshes."""
    starts, lats = [], []
    for path in logs:
        with open(path) as f:
            for line in f:
                sent, latency_us = line.split()[:2]
                starts.append(float(sent))
                lats.append(int(latency_us) / 1e6)
        os.remove(path)
    by_key = collections.defaultdict(list)
    for call in calls:
        by_key[call["client_id"]].append((call["arrived"], call["answered"]))
    windows = sorted((a - margin, d + margin)
                     for rows in by_key.values() for (a, d) in sorted(rows)[1:])
    warm_from = min(starts, default=0) + warmup
    during, elsewhere = [], []
    wi = 0
    for i in sorted(range(len(starts)), key=starts.__getitem__):
        t = starts[i]
        if t < warm_from:
            continue
        while wi < len(windows) and windows[wi][1] < t:
            wi += 1
        inside = any(lo <= t <= hi for lo, hi in windows[wi:wi + 4])
        (during if inside else elsewhere).append(lats[i])
    per_key = sorted(len(rows) for rows in by_key.values())

    def figures(values):
        return {"requests": len(values), "p50_ms": loads.ms(loads.percentile(values, 50)),
                "p99_ms": loads.ms(loads.percentile(values, 99)),
                "max_ms": loads.ms(max(values) if values else None)}

    return {"requests": len(lats), "upstream_calls": len(calls),
            "upstream_calls_per_key": per_key,
            "upstream_calls_per_key_mean": round(sum(per_key) / max(1, len(per_key)), 2),
            "refresh_windows": len(windows),
            "during_refresh": figures(during), "elsewhere": figures(elsewhere)}


def redis_server(run):
    """A real redis-server on a free loopback port for the fleet scenario, (process, URL); stopped
    with the scenario's other children."""
    if subprocess.run(["sh", "-c", "command -v redis-server"], capture_output=True).returncode:
        raise RuntimeError("the fleet scenario needs redis-server (Debian's redis-server package)")
    port = free_port()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", run.out]
    proc, _ = run.spawn("fleet-redis", argv, announce=False)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return proc, "redis://127.0.0.1:%d/0" % port
        except OSError:
            pass
        time.sleep(0.02)
    raise RuntimeError("redis-server did not answer within 10 s")


def fleet_load(run, mode, sidecars, seconds, every=0.05, disturb=None):
    """Each sidecar asked for the same key by two clients every `every` s for `seconds` (one
    wrk per sidecar, all at once), every answer logged (clients.lua's `log=`). `disturb(started)`,
    if given, runs while the load does and returns its timeline. Returns (clients.lua's summary
    per sidecar, the answer files per sidecar, the timeline)."""
    prefixes = [os.path.join(run.out, "fleet-%s-%d-answers-" % (mode, i))
                for i in range(len(sidecars))]
    files = [["%s%d.txt" % (prefix, client) for client in (1, 2)] for prefix in prefixes]
    for path in sum(files, []):
        if os.path.exists(path):
            os.remove(path)
    handles = [clients_start(run, "fleet-%s-%d" % (mode, i), "http://%s/oauth/token" % s.listen,
                             2, seconds + 30, [("", FORM.decode())], every=every,
                             ticks=int(seconds / every), log=rel(prefixes[i]))
               for i, s in enumerate(sidecars)]
    timeline = disturb(time.monotonic()) if disturb else {}
    summaries = [clients_finish(h) for h in handles]
    timeline["load_end"] = time.monotonic()
    return summaries, files, timeline


def sleep_until(moment):
    time.sleep(max(0.0, moment - time.monotonic()))


def blip_start(prov_addr, lifetime, earliest, latest, lead=0.5):
    """When the Redis blip starts: `lead` s before the first token refresh due at or after
    `earliest` (a refresh leaves at 75-80 % of a token's life, counted from the provider's last
    call), so that the blip meets the tier's claim and commit rather than only hits; no later than
    `latest`."""
    last = max(call["arrived"] for call in loads.provider_calls(prov_addr))
    due = last + 0.75 * lifetime
    while due - lead < earliest:
        due += 0.75 * lifetime
    return min(due - lead, latest)


def fleet_disturbance(run, pod, redis, seconds, prov_addr, lifetime, blip_s=2.0):
    """The shared mode's disturbances, for fleet_load: at a third of the load `pod` restarts; from
    two thirds on, at the next token refresh, `redis` stops (SIGSTOP) for `blip_s`, a stall as a
    failover or a GC pause looks to its clients, then goes on (SIGCONT)."""
    def disturb(started):
        sleep_until(started + seconds / 3)
        timeline = {"restart": pod.restart(run)}
        sleep_until(blip_start(prov_addr, lifetime, started + 2 * seconds / 3,
                               started + seconds - blip_s - 0.5))
        timeline["blip_from"] = time.monotonic()
        redis.send_signal(signal.SIGSTOP)
        try:
            time.sleep(blip_s)
        finally:
            redis.send_signal(signal.SIGCONT)
        timeline["blip_to"] = time.monotonic()
        timeline["blip_at_s"] = round(timeline["blip_from"] - started, 2)
        return timeline
    return disturb


def read_answers(paths):
    """clients.lua's answer files, read and then removed: (sent, latency_s, status, held_s) rows."""
    rows = []
    for path in paths:
        with open(path) as f:
            for line in f:
                sent, latency_us, status, held_us = line.split()
                rows.append((float(sent), int(latency_us) / 1e6, int(status), int(held_us) / 1e6))
        os.remove(path)
    return rows


def stall_figures(rows, stall_s=1.0):
    """Answers slower than `stall_s` (a caller stalled) and the worst answer, in ms."""
    return {"stalled_over_1s": sum(1 for r in rows if r[1] > stall_s),
            "worst_ms": loads.ms(max((r[1] for r in rows), default=None))}


def phase(start, end, timeline):
    """Which disturbance the span [start, end] overlaps: restart (SIGTERM until a second after
    /readyz answered again), blip (the stop until a second after it), or none."""
    restart = timeline["restart"]
    if start <= restart["ready"] + 1.0 and end >= restart["sigterm"]:
        return "restart"
    if start <= timeline["blip_to"] + 1.0 and end >= timeline["blip_from"]:
        return "blip"
    return "none"


def calls_by_phase(calls, timeline):
    """Provider calls (loads.provider_calls) by when they arrived: before the restart, during it
    (SIGTERM to ready), between, during the blip, after it (to the end of the load)."""
    restart = timeline["restart"]
    bounds = [("before", restart["sigterm"]), ("restart", restart["ready"]),
              ("between", timeline["blip_from"]), ("blip", timeline["blip_to"]),
              ("after", timeline["load_end"])]
    counts = {name: 0 for name, _ in bounds}
    for call in calls:
        name = next((name for name, until in bounds if call["arrived"] <= until), None)
        if name:
            counts[name] += 1
    return counts


def disturbance_figures(summaries, rows, timeline, calls, pod, stall_s=1.0):
    """What the restart of sidecar `pod` and the Redis blip did to the callers (`rows`: every
    pod's answers, read_answers): answers over `stall_s`, by phase, and the worst; the restarted
    pod's requests that met a refused or broken connection and were sent again
    (`restart_refused`), wrk's failed connection attempts (it retries at once), and how late its
    callers' requests left; requests sent and never answered (any pod); provider calls by
    phase."""
    answers = [r for pod_rows in rows for r in pod_rows]
    stalls = [r for r in answers if r[1] > stall_s]
    worst = max(answers, key=lambda r: r[1])
    restart, errors = timeline["restart"], summaries[pod]["errors"]
    return dict(stall_figures(answers, stall_s), **{
        "stalls_by_phase": dict(collections.Counter(
            phase(r[0], r[0] + r[1], timeline) for r in stalls)),
        "worst_phase": phase(worst[0], worst[0] + worst[1], timeline),
        "restart_refused": summaries[pod]["counts"].get("retried", 0),
        "restart_failed_attempts": errors["connect"] + errors["read"] + errors["write"],
        "restart_drain_ms": round((restart["exited"] - restart["sigterm"]) * 1000, 1),
        "restart_down_ms": round((restart["ready"] - restart["sigterm"]) * 1000, 1),
        "restart_held_max_ms": loads.ms(max((r[3] for r in rows[pod]), default=0.0)),
        "lost_in_flight": sum(s["counts"].get("sent", 0) for s in summaries) - len(answers),
        "blip_ms": round((timeline["blip_to"] - timeline["blip_from"]) * 1000, 1),
        "blip_at_s": timeline["blip_at_s"],
        "provider_calls": calls_by_phase(calls, timeline),
    })


def fleet_mode(run, mode, sidecars, prov_addr, duration, disturb):
    """The steady load on `sidecars` (disturbed by `disturb` if given) and its figures."""
    summaries, files, timeline = fleet_load(run, mode, sidecars, duration, disturb=disturb)
    calls = provider_stats(prov_addr)["issued"]
    answered = [loads.answers(s) for s in summaries]
    rows = [read_answers(paths) for paths in files]
    figures = {"answers": sum(a["requests"] for a in answered),
               "errors": sum(a["errors"] for a in answered), "provider_calls": calls}
    figures.update(stall_figures([r for pod_rows in rows for r in pod_rows]))
    if disturb:
        figures["disturbance"] = disturbance_figures(
            summaries, rows, timeline, loads.provider_calls(prov_addr), len(sidecars) - 1)
        # The restarted pod's failed connection attempts are counted there, not as errors.
        figures["answers"] -= figures["disturbance"]["restart_failed_attempts"]
        figures["errors"] -= figures["disturbance"]["restart_failed_attempts"]
    return figures


def fill_keys(run, name, sidecar, n, connections):
    """`fill.lua`: `n` requests for `n` new client ids on `connections` connections (1: each a
    sequential cold miss); (wrk's summary, wall time). wrk is interrupted once fill.lua has all
    `n` answers (its main thread would sleep out the whole -d)."""
    done = os.path.join(run.out, name + ".done")
    if os.path.exists(done):
        os.remove(done)
    argv = ["wrk", "-t1", "-c%d" % connections, "-d120s", "--timeout", "10s", "-s",
            os.path.join(BENCH, "fill.lua"), "http://%s/oauth/token" % sidecar.listen, "--",
            str(n), rel(done)]
    run.note(argv)
    started = time.monotonic()
    proc = loads.start_wrk(argv, stderr=run.log(name + "-wrk"))
    run.children.append(proc)
    summary = loads.wrk_summary(proc, 150, done, 1)
    return summary, time.monotonic() - started


def scenario_fleet(run):
    """N sidecars for one key, without and with the shared tier on a real redis-server: provider
    calls per token lifetime under steady load, callers stalled over 1 s, the cold path's added
    latency, and the hit path with the tier on and off (hits never touch Redis). With the tier,
    the load also lives through a pod restart and a Redis blip (fleet_disturbance)."""
    pods, lifetime, duration = (4, 4, 8) if run.quick else (4, 10, 40)
    redis_proc, redis = redis_server(run)
    key_file = os.path.join(run.out, "fleet.key")
    with open(key_file, "wb") as f:
        f.write(os.urandom(48))
    tier = ["--shared-redis", redis, "--shared-key-file", key_file]
    result = {"pods": pods, "lifetime_s": lifetime, "duration_s": duration}
    for mode, args in (("alone", []), ("shared", tier)):
        prov, prov_addr = start_provider(run, "fleet-provider-" + mode, latency_ms=20,
                                         lifetime=lifetime)
        # The quick run's load is shorter than the default grace a restart drains for.
        sidecars = [Sidecar(run, "fleet-%s-%d" % (mode, i), prov_addr, args=args,
                            grace="1s" if run.quick else None) for i in range(pods)]
        disturb = fleet_disturbance(run, sidecars[-1], redis_proc, duration, prov_addr,
                                    lifetime) if mode == "shared" else None
        result[mode] = fleet_mode(run, mode, sidecars, prov_addr, duration, disturb)
        # Tokens are served for ~80 % of their lifetime, then refreshed.
        result[mode]["calls_per_lifetime"] = result[mode]["provider_calls"] * lifetime / duration
        cold, _ = fill_keys(run, "fleet-cold-" + mode, sidecars[0], 30 if run.quick else 300, 1)
        assert cold["errors_status"] == 0, cold
        result[mode]["cold_p50_ms"] = cold["p50_us"] / 1000
        result[mode]["cold_p99_ms"] = cold["p99_us"] / 1000
        hits = [wrk(run, "http://" + sidecars[0].listen + "/oauth/token", 1 if run.quick else 3)
                for _ in range(1 if run.quick else 3)]
        result[mode]["hit_rps"] = statistics.median(h["rps"] for h in hits)
        result[mode]["hit_p99_us"] = statistics.median(h["p99_us"] for h in hits)
        if mode == "shared":
            result[mode]["shared_claims"] = {
                o: sum(s.metric("token_sidecar_shared_claims_total", outcome=o) for s in sidecars)
                for o in ("hit", "lead", "busy", "cooldown", "commit", "skipped")}
        stop(prov, *(s.proc for s in sidecars))
    return result


def redis_commands(addr):
    """Commands redis-server at `addr` (host:port) has run so far, from `INFO commandstats`:
    {command: calls}."""
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"INFO commandstats\r\n")
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            head, _, rest = data.partition(b"\r\n")
            if head.startswith(b"$") and len(rest) >= int(head[1:]) + 2:
                break
    calls = {}
    for line in data.decode().splitlines():
        if line.startswith("cmdstat_"):
            name, _, fields = line[len("cmdstat_"):].partition(":")
            calls[name] = int(dict(f.split("=") for f in fields.split(","))["calls"])
    return calls


def redis_rtt_ms(addr, n=50):
    """The median time of `n` PINGs, one at a time on one connection, to `addr` (host:port):
    the round trip through a delay proxy as the sidecar sees it, its timer rounding included."""
    host, port = addr.rsplit(":", 1)
    times = []
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(n):
            started = time.perf_counter()
            sock.sendall(b"PING\r\n")
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = sock.recv(64)
                if not chunk:
                    raise RuntimeError("redis closed the connection during PING")
                reply += chunk
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def scenario_fleetcold(run):
    """The fleet's cold path (issue 24, item 3): one sidecar, N sequential cold misses (a new
    key each, one connection), alone and with the tier on a real redis-server behind a TCP proxy
    adding 1 ms and 5 ms each way (bench/delay.rs), and reached directly (0 ms). Per cold miss: the latency the caller sees
    (the difference to the sidecar alone is what the tier adds) and the commands Redis ran, from
    its INFO commandstats (no pipelining: a command is a round trip)."""
    n = 20 if run.quick else 200
    redis_proc, redis = redis_server(run)
    redis_addr = redis.split("//", 1)[1].split("/", 1)[0]
    prov, prov_addr = start_provider(run, "fleetcold-provider", latency_ms=20, lifetime=3600)
    result = {"keys": n, "provider_latency_ms": 20, "runs": {}}
    # 0 ms: Redis reached directly, the tier's own cost.
    legs = [("alone", None)] + [("%d ms" % ms, ms) for ms in (0, 1, 5)]
    for leg, delay_ms in legs:
        args = []
        if delay_ms is not None:
            proxy = redis_addr
            if delay_ms:
                _, proxy = run.spawn("fleetcold-delay-%d" % delay_ms,
                                     [DELAY, "127.0.0.1:0", redis_addr, str(delay_ms)])
            key_file = os.path.join(run.out, "fleetcold-%d.key" % delay_ms)  # new names per leg
            with open(key_file, "wb") as f:
                f.write(os.urandom(48))
            args = ["--shared-redis", "redis://%s/0" % proxy, "--shared-key-file", key_file]
        rtt = redis_rtt_ms(proxy) if delay_ms is not None else None
        sidecar = Sidecar(run, "fleetcold-%s" % leg.replace(" ", ""), prov_addr, args=args)
        before = redis_commands(redis_addr)
        cold, _ = fill_keys(run, "fleetcold-%s" % leg.replace(" ", ""), sidecar, n, 1)
        assert cold["errors_status"] == 0, cold
        # The last commit may still be on its way: give it the time of a few round trips.
        time.sleep(0.2)
        after = redis_commands(redis_addr)
        commands = {c: after.get(c, 0) - before.get(c, 0) for c in after
                    if after.get(c, 0) != before.get(c, 0)}
        result["runs"][leg] = {"delay_ms": delay_ms, "rtt_ms": rtt, "p50_ms": cold["p50_us"] / 1000,
                               "p90_ms": cold["p90_us"] / 1000, "p99_ms": cold["p99_us"] / 1000,
                               "mean_ms": cold["mean_us"] / 1000,
                               "commands": commands,
                               "commands_per_miss": sum(commands.values()) / n}
        sidecar.stop()
    stop(prov, redis_proc)
    alone = result["runs"]["alone"]
    for leg, x in result["runs"].items():
        if x["delay_ms"] is not None:
            x["added_p50_ms"] = x["p50_ms"] - alone["p50_ms"]
            x["added_mean_ms"] = x["mean_ms"] - alone["mean_ms"]
    return result


def rss_kib(pid):
    """A process's resident memory, from /proc."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS for %d" % pid)


def held_rss(run, name, pid, target, n, path):
    """`hold connect`: `n` connections to `target`, one `GET path` on each; the RSS of `pid`
    before and once every answer's head has arrived (KiB), and how many did."""
    time.sleep(0.3)
    before = rss_kib(pid)
    argv = [HOLD, "connect", target, str(n), path]
    run.note(argv)
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=run.log(name + "-hold"), cwd=ROOT)
    run.children.append(proc)
    line = read_line(proc, 60.0)
    if not line.startswith("held "):
        stop(proc)
        raise RuntimeError("hold gave %r" % line)
    time.sleep(1.0)  # streamed chunks and connection tasks settle
    after = rss_kib(pid)
    proc.stdin.close()
    stop(proc)
    return {"before_kib": before, "after_kib": after, "held": int(line.split()[1]),
            "per_conn_kib": (after - before) / n}


def scenario_connmem(run):
    """Memory of the pass-through path (issue 24, item 4): RSS under N idle keep-alive
    connections (each answered once by the ceiling, then idle) and under N requests streaming at
    once (`hold serve`: answers that never end), for the sidecar on a `[[routes]]` route, the
    hyper floor (bench/floor.rs: hyper's server and client connections, nothing else) and, for
    idle connections, the ceiling alone (hyper's server connection)."""
    n = 200 if run.quick else 1000
    result = {"n": n, "idle": {}, "streaming": {}}
    for case, path in (("idle", PASS_PATH), ("streaming", "/stream")):
        if case == "idle":
            upstream, up_addr = run.spawn("connmem-ceiling",
                                          [CEILING, "127.0.0.1:0", "-", "1", "http1"])
        else:
            upstream, up_addr = run.spawn("connmem-stream", [HOLD, "serve", "127.0.0.1:0"])
        targets = ["sidecar", "floor"] + (["ceiling"] if case == "idle" else [])
        for name in targets:
            if name == "sidecar":
                sidecar = Sidecar(run, "connmem-%s" % case, None,
                                  routes=[{"name": "pass", "upstream": "http://" + up_addr}])
                proc, addr = sidecar.proc, sidecar.listens["pass"]
            elif name == "floor":
                proc, addr = run.spawn("connmem-floor-" + case, [FLOOR, "127.0.0.1:0", up_addr])
            else:
                proc, addr = upstream, up_addr
            status = http("GET", "http://%s%s" % (addr, PASS_PATH))[0] if case == "idle" else 200
            assert status == 200, (name, status)
            result[case][name] = held_rss(run, "connmem-%s-%s" % (case, name), proc.pid, addr,
                                          n, path)
            if proc is not upstream:
                stop(proc)
        stop(upstream)
    return result


INJECT_CLIENT = ("bench-inject", "bench-inject-secret")  # the injecting route's credentials


def scenario_inject(run):
    """The injection's own cost per API call: one sidecar with two routes to the provider's
    `GET /api/v2/users/me`, each on its own listener: `inject` has a `[routes.inject]` table and
    is called with no Authorization; `bearer` has none and is called with a bearer fetched from
    the provider once beforehand. Paired wrk rounds alternate between them (order flipped each
    round); both send a 1 KiB token upstream, so the difference is what injecting adds."""
    rounds, seconds = (2, 1) if run.quick else (12, 3)
    prov, prov_addr = start_provider(run, "inject-provider", lifetime=3600, token_bytes=1024,
                                     call_log=0)
    secret = os.path.join(run.out, "inject.secret")
    with open(secret, "w") as f:
        f.write(INJECT_CLIENT[1] + "\n")
    status, _, body = token_request("http://" + prov_addr)
    assert status == 200, status
    bearer = os.path.join(run.out, "inject-bearer.txt")  # read by api.lua, kept off command lines
    with open(bearer, "w") as f:
        f.write("Bearer %s\n" % json.loads(body)["access_token"])
    routes = [
        {"name": "inject", "upstream": "http://" + prov_addr,
         "inject": {"token_url": "http://%s/oauth/token" % prov_addr,
                    "client_id": INJECT_CLIENT[0], "client_secret_file": rel(secret)}},
        {"name": "bearer", "upstream": "http://" + prov_addr},
    ]
    sidecar = Sidecar(run, "inject", None, routes=routes)
    api = "http://%s/api/v2/users/me"
    targets = {"inject": (api % sidecar.listens["inject"], ()),
               "bearer": (api % sidecar.listens["bearer"], (rel(bearer),))}
    # The routes do what they say: the injecting one answers 200 to a bare call, the other only
    # to the caller's bearer.
    with open(bearer) as f:
        caller = {"Authorization": f.read().strip()}
    checks = {"inject, no Authorization": http("GET", targets["inject"][0])[0],
              "bearer, caller's bearer": http("GET", targets["bearer"][0], headers=caller)[0],
              "bearer, no Authorization": http("GET", targets["bearer"][0])[0]}
    assert list(checks.values()) == [200, 200, 401], checks
    for name in targets:  # warm both: connections to the provider, allocator, CPU caches
        wrk(run, targets[name][0], 1, script="api.lua", args=targets[name][1])
    results = {"inject": [], "bearer": []}
    pid = sidecar.proc.pid
    for r in range(rounds):
        for name in ("inject", "bearer") if r % 2 == 0 else ("bearer", "inject"):
            url, args = targets[name]
            before = cpu_seconds(pid)
            result = wrk(run, url, seconds, script="api.lua", args=args)
            after = cpu_seconds(pid)
            n = max(result["requests"], 1)
            result["user_us"] = (after[0] - before[0]) * 1e6 / n
            result["sys_us"] = (after[1] - before[1]) * 1e6 / n
            result["cpu_us"] = result["user_us"] + result["sys_us"]
            results[name].append(result)
    token_calls = provider_stats(prov_addr)["issued"] - 1  # less the caller's own, above
    sidecar.stop()
    stop(prov)

    def paired(key, how):
        return [how(i[key], b[key]) for i, b in zip(results["inject"], results["bearer"])]

    keys = ("rps", "p50_us", "p99_us", "max_us", "user_us", "sys_us", "cpu_us")
    ratio = paired("rps", lambda i, b: i / b)
    p99 = paired("p99_us", lambda i, b: i / b)
    cpu = paired("cpu_us", lambda i, b: i / b)
    cost = paired("cpu_us", lambda i, b: i - b)
    return {
        "rounds": rounds, "seconds": seconds, "checks": checks, "runs": results,
        "summary": {name: {k: statistics.median(x[k] for x in results[name]) for k in keys}
                    for name in results},
        "errors": {name: sum(x[k] for x in results[name] for k in x if k.startswith("errors_"))
                   for name in results},
        "rps_ratio_per_round": ratio, "p99_ratio_per_round": p99,
        "cpu_ratio_per_round": cpu, "cost_us_per_round": cost,
        "rps_ratio": statistics.median(ratio), "p99_ratio": statistics.median(p99),
        "cpu_ratio": statistics.median(cpu), "cost_us": statistics.median(cost),
        "requests": {name: sum(x["requests"] for x in results[name]) for name in results},
        "token_calls": token_calls, "config": rel(sidecar.config),
    }


def nginx_binary():
    """nginx from PATH or Debian's /usr/sbin (not on a user's PATH), else None."""
    import shutil
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


def wait_listening(addr, proc, timeout=10.0):
    """Polls a TCP connect to `addr` every 10 ms until it is accepted (for a child that prints no
    `listening on` line)."""
    host, port = addr.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("%s exited with %s" % (proc.args[0], proc.returncode))
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return
        except OSError:
            time.sleep(0.01)
    raise RuntimeError("nothing listening on %s within %.0f s" % (addr, timeout))


def child_pids(pid):
    """The pids whose parent is `pid` (nginx's workers under its master)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return found


def start_nginx(run, name, upstream, h1, h2c):
    """nginx, one worker (master + worker, as nginx runs in production), `proxy_pass` to
    `upstream` over a keep-alive pool, HTTP/1.1 callers on `h1` and h2c (prior knowledge) on
    `h2c`, 127.0.0.1 only; its config, temp files, pid file and logs in bench/out. (process,
    worker pid): the worker is the process that does the work, so its CPU is the one measured."""
    binary = nginx_binary()
    if binary is None:
        raise RuntimeError("the passthrough scenario needs nginx (Debian's nginx package; "
                           "bench/run.sh installs it)")
    prefix = os.path.join(run.out, name)
    os.makedirs(os.path.join(prefix, "tmp"), exist_ok=True)
    config = os.path.join(run.out, name + ".conf")
    log = os.path.join(run.out, "logs", name + "-error.log")
    with open(config, "w") as f:
        f.write("""# Written by bench/bench.py for the passthrough scenario: nginx's proxy_pass as the peer.
worker_processes 1;
daemon off;
pid %(prefix)s/nginx.pid;
error_log %(log)s warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path %(prefix)s/tmp/body;
    proxy_temp_path %(prefix)s/tmp/proxy;
    fastcgi_temp_path %(prefix)s/tmp/fastcgi;
    uwsgi_temp_path %(prefix)s/tmp/uwsgi;
    scgi_temp_path %(prefix)s/tmp/scgi;
    # A caller's keep-alive connection is not closed after 1,000 requests (the default): the
    # sidecar does not close them either.
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    upstream backend {
        server %(upstream)s;
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen %(h1)s;
        listen %(h2c)s http2;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
""" % {"prefix": prefix, "log": log, "upstream": upstream, "h1": h1, "h2c": h2c})
    proc, _ = run.spawn(name, [binary, "-p", prefix + "/", "-e", log, "-c", config],
                        announce=False)
    wait_listening(h1, proc)
    wait_listening(h2c, proc)
    deadline = time.monotonic() + 5
    while not child_pids(proc.pid):
        if time.monotonic() > deadline:
            raise RuntimeError("nginx started no worker")
        time.sleep(0.01)
    workers = child_pids(proc.pid)
    assert len(workers) == 1, workers
    return proc, workers[0], config


def h2load(run, url, seconds, post_file=None, connections=64):
    """h2load (nghttp2-client), h2c with prior knowledge, one thread, `connections` connections
    with one stream each (as wrk's keep-alive connections carry one request at a time), for
    `seconds`; the same figures as wrk's summary, the percentiles from its per-request log."""
    log = os.path.join(run.out, "h2load-requests.tsv")
    argv = ["h2load", "-t1", "-c%d" % connections, "-m1", "-D%d" % seconds,
            "--log-file", log, url]
    if post_file:
        argv[1:1] = ["-d", post_file, "-H", "content-type: application/octet-stream"]
    run.note([a if a != log else rel(log) for a in argv])
    done = subprocess.run(argv, capture_output=True, timeout=seconds + 60, cwd=ROOT)
    text = done.stdout.decode()
    counts, rps = None, None
    for line in text.splitlines():
        if line.startswith("finished in ") and " req/s" in line:
            rps = float(line.split(",")[1].split()[0])
        if line.startswith("requests:"):
            words = line.replace(",", "").split()
            counts = {words[i + 1]: int(words[i]) for i in range(1, len(words) - 1, 2)}
    if done.returncode != 0 or counts is None or rps is None or not counts.get("succeeded"):
        raise RuntimeError("h2load failed: %s %s" % (text, done.stderr.decode()))
    latencies = []
    bad = 0
    with open(log) as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3:
                latencies.append(int(fields[2]))
                bad += not fields[1].startswith("2")
    os.remove(log)
    latencies.sort()
    n = len(latencies)

    def pct(p):
        return latencies[min(n - 1, int(n * p / 100))] if n else 0

    return {"requests": counts.get("succeeded", 0), "duration_s": seconds,
            "rps": rps, "p50_us": pct(50), "p90_us": pct(90),
            "p99_us": pct(99), "max_us": latencies[-1] if n else 0,
            "errors_status": bad, "errors_failed": counts.get("failed", 0),
            "errors_errored": counts.get("errored", 0),
            "errors_timeout": counts.get("timeout", 0)}


PASS_TARGETS = ("upstream", "sidecar", "nginx", "floor")
PASS_LABELS = {"upstream": "upstream alone", "sidecar": "sidecar", "nginx": "nginx",
               "floor": "hyper floor"}
PASS_CASES = ("GET h1", "POST h1", "GET h2c", "POST h2c")
PASS_PATH = "/api/v2/users/me"


def scenario_passthrough(run):
    """Pass-through (issue 24, item 1): the upstream alone (the ceiling, HTTP/1.1, one thread,
    fixed bytes), the sidecar forwarding to it on a `[[routes]]` route (default runtime, one
    thread) and nginx's `proxy_pass` to it (one worker, upstream keep-alive). GET and a 4 KiB
    POST, HTTP/1.1 (wrk) and h2c (h2load) from the caller; nothing pinned. Paired rounds: each
    case runs on the three targets back to back, order reversed every round, and the
    sidecar/nginx ratios are taken per round, then the median."""
    rounds, seconds = (1, 1) if run.quick else (6, 2)
    upstream, up_addr = run.spawn("pass-upstream", [CEILING, "127.0.0.1:0", "-", "1", "http1"])
    # The upstream alone over h2c: the same server with hyper-util's auto builder (the proxies
    # reach the HTTP/1.1 one).
    upstream_h2, up_h2_addr = run.spawn("pass-upstream-h2c",
                                        [CEILING, "127.0.0.1:0", "-", "1", "auto"])
    sidecar = Sidecar(run, "passthrough", None,
                      routes=[{"name": "pass", "upstream": "http://" + up_addr}])
    # The stack's own limit for an HTTP/1.1 proxy (bench/floor.rs); it has no h2c listener.
    floor, floor_addr = run.spawn("pass-floor", [FLOOR, "127.0.0.1:0", up_addr])
    h1, h2c = "127.0.0.1:%d" % free_port(), "127.0.0.1:%d" % free_port()
    _, nginx_worker, nginx_config = start_nginx(run, "passthrough-nginx", up_addr, h1, h2c)
    post_file = os.path.join(run.out, "pass-body.bin")
    with open(post_file, "wb") as f:
        f.write(b"x" * 4096)
    listen = sidecar.listens["pass"]
    # (HTTP/1.1 address, h2c address, the pid whose CPU is measured for each)
    targets = {"upstream": (up_addr, up_h2_addr, (upstream.pid, upstream_h2.pid)),
               "sidecar": (listen, listen, (sidecar.proc.pid,) * 2),
               "nginx": (h1, h2c, (nginx_worker,) * 2),
               "floor": (floor_addr, None, (floor.pid, None))}

    def serves(name, case):
        return not (name == "floor" and case.endswith("h2c"))
    # Each target answers the upstream's bytes to both methods.
    expected = http("GET", "http://%s%s" % (up_addr, PASS_PATH))[2]
    checks = {}
    for name, (addr, _, _) in targets.items():
        for method, body in (("GET", None), ("POST", b"x" * 4096)):
            status, _, got = http(method, "http://%s%s" % (addr, PASS_PATH), body)
            checks["%s %s" % (name, method)] = status
            assert status == 200 and got == expected, (name, method, status, got[:200])

    def load(name, case, secs):
        h1_addr, h2_addr, _ = targets[name]
        method, protocol = case.split()
        if protocol == "h1":
            return wrk(run, "http://" + h1_addr + PASS_PATH, secs, script="pass.lua",
                       args=["post"] if method == "POST" else ())
        return h2load(run, "http://" + h2_addr + PASS_PATH, secs,
                      post_file if method == "POST" else None)

    for name in PASS_TARGETS:  # warm all: connections to the upstream, allocator, CPU caches
        load(name, "GET h1", 1)
        if not run.quick and serves(name, "GET h2c"):
            load(name, "GET h2c", 1)
    results = {case: {name: [] for name in PASS_TARGETS if serves(name, case)}
               for case in PASS_CASES}
    for r in range(rounds):
        order = PASS_TARGETS if r % 2 == 0 else tuple(reversed(PASS_TARGETS))
        for case in PASS_CASES:
            for name in order:
                if not serves(name, case):
                    continue
                pid = targets[name][2][case.endswith("h2c")]
                before = cpu_seconds(pid)
                result = load(name, case, seconds)
                after = cpu_seconds(pid)
                n = max(result["requests"], 1)
                if not result["requests"]:
                    raise RuntimeError("no answers: %s, %s: %s" % (name, case, result))
                result["user_us"] = (after[0] - before[0]) * 1e6 / n
                result["sys_us"] = (after[1] - before[1]) * 1e6 / n
                result["cpu_us"] = result["user_us"] + result["sys_us"]
                results[case][name].append(result)
    run.stop_all()

    keys = ("rps", "p50_us", "p99_us", "max_us", "user_us", "sys_us", "cpu_us")
    cases = {}
    for case, runs in results.items():
        def paired(key, of="sidecar", to="nginx", runs=runs):
            return [a[key] / max(b[key], 1e-9) for a, b in zip(runs[of], runs[to])]
        floor_ratios = {}
        if "floor" in runs:
            floor_ratios = {"sidecar_of_floor": statistics.median(paired("rps", to="floor")),
                            "floor_of_nginx": statistics.median(paired("rps", "floor")),
                            "floor_cpu_of_nginx": statistics.median(paired("cpu_us", "floor"))}
        cases[case] = {
            **floor_ratios,
            "summary": {name: {k: statistics.median(x[k] for x in runs[name]) for k in keys}
                        for name in runs},
            "errors": {name: sum(x[k] for x in runs[name] for k in x if k.startswith("errors_"))
                       for name in runs},
            "rps_ratio_per_round": paired("rps"), "p99_ratio_per_round": paired("p99_us"),
            "rps_ratio": statistics.median(paired("rps")),
            "p99_ratio": statistics.median(paired("p99_us")),
            "cpu_ratio": statistics.median(paired("cpu_us")),
            "sidecar_of_upstream": statistics.median(paired("rps", to="upstream")),
            "nginx_of_upstream": statistics.median(paired("rps", "nginx", "upstream")),
        }
    return {"rounds": rounds, "seconds": seconds, "checks": checks, "cases": cases,
            "runs": results, "upstream_body_bytes": len(expected),
            "config": rel(sidecar.config), "nginx_config": rel(nginx_config),
            "nginx_version": subprocess.run([nginx_binary(), "-v"], capture_output=True)
            .stderr.decode().strip()}


def scenario_memory(run):
    n = 10_000 if run.quick else 100_000
    starts = 3 if run.quick else 10
    ready = []
    rss_idle = []
    for i in range(starts):
        sidecar = Sidecar(run, "start", "127.0.0.1:9")  # never contacted: nothing is requested
        ready.append(sidecar.ready_s)
        if i == 0:
            time.sleep(0.5)
            rss_idle.append(sidecar.rss_kib())
        sidecar.stop()

    body_file = token_file(run)
    ceiling, ceiling_addr = run.spawn("memory-ceiling", [CEILING, "127.0.0.1:0", body_file])
    sidecar = Sidecar(run, "memory", ceiling_addr)
    url = "http://" + sidecar.listen + "/oauth/token"
    wrk(run, url, 1)  # the same 64 connections and buffers the fill will use, on one key
    time.sleep(0.3)
    rss_base = sidecar.rss_kib()
    fill, fill_s = fill_keys(run, "memory", sidecar, n, 64)
    time.sleep(0.3)
    rss_full = sidecar.rss_kib()
    entries = sidecar.metric("token_sidecar_cache_entries")
    calls = sidecar.metric("token_sidecar_upstream_token_calls_total")
    sidecar.stop()
    stop(ceiling)
    return {
        "binary_bytes": os.path.getsize(SIDECAR),
        "ready_ms": [round(x * 1000, 2) for x in ready],
        "ready_ms_median": round(statistics.median(ready) * 1000, 2),
        "rss_idle_kib": rss_idle[0],
        "rss_base_kib": rss_base, "rss_full_kib": rss_full, "keys": n,
        "cache_entries": entries, "upstream_calls": calls, "fill": fill,
        "fill_wall_s": round(fill_s, 2),
        "token_body_bytes": os.path.getsize(body_file),
        "bytes_per_entry": (rss_full - rss_base) * 1024 / n,
    }


PROFILE_ROWS = [
    # (label, symbol prefix): inclusive share of the sidecar's samples under that frame.
    ("hyper connection task (all request work on a connection)",
     "poll<token_sidecar::server::serve::{async_fn#0}::{async_block_env#0}"),
    ("writev: sending responses (kernel loopback TCP, incl. delivery to wrk)", "__GI___writev"),
    ("recv: reading requests", "__libc_recv"),
    ("epoll_wait", "do_epoll_wait"),
    ("hyper: read + parse request heads", "hyper::proto::h1::io::Buffered<T,B>::parse"),
    ("hyper: encode response heads",
     "<hyper::proto::h1::role::Server as hyper::proto::h1::Http1Transaction>::encode"),
    ("router + token path (all the sidecar adds to hyper)",
     "poll<tower_http::catch_panic::CatchPanic<token_sidecar::router::Dispatch"),
    ("  collect the request body", "<http_body_util::combinators::collect::Collect<T> as core::"),
    ("  request::parse (form, Basic, HMAC-SHA256 key)", "token_sidecar::token::request::parse"),
    ("    parse_form", "token_sidecar::token::request::parse_form"),
    ("    SHA-256 blocks", "sha2::sha256::"),
    ("  TokenRoute::answer (parse, key, lookup, decide, respond)",
     "token_sidecar::token::TokenRoute::answer"),
    ("    render_token (response headers)", "token_sidecar::token::render_token"),
    ("malloc (all callers)", "__GI___libc_malloc"),
    ("free (all callers)", "__GI___libc_free"),
    ("memmove/memcpy (all callers)", "__memmove_avx_unaligned_erms"),
]


def scenario_profile(run):
    """perf samples, with DWARF call graphs, of a symbolized build of the sidecar under the
    hit-path load."""
    if not os.path.exists(PROFILE_SIDECAR):
        raise RuntimeError("no profiling build at %s" % rel(PROFILE_SIDECAR))
    seconds = 3 if run.quick else 8
    prov, prov_addr = start_provider(run, "profile-provider", lifetime=3600, token_bytes=1024,
                                     call_log=0)
    sidecar = Sidecar(run, "profile", prov_addr, binary=PROFILE_SIDECAR)
    url = "http://" + sidecar.listen + "/oauth/token"
    token_request("http://" + sidecar.listen)
    wrk(run, url, 1)
    data = os.path.join(run.out, "perf.data")
    argv = ["perf", "record", "-F", "499", "--call-graph", "dwarf,8192", "-o", data,
            "-p", str(sidecar.proc.pid), "--", "sleep", str(seconds)]
    run.note(argv)
    perf = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=run.log("perf"))
    load = wrk(run, url, seconds)
    perf.wait(seconds + 120)
    sidecar.stop()

    def report(extra):
        argv = ["perf", "report", "-i", data, "--stdio", "-g", "none"] + extra
        run.note(argv)
        text = subprocess.run(argv, capture_output=True, timeout=600).stdout.decode()
        rows = []
        for line in text.splitlines():
            parts = line.split(None, 3 if "--children" in extra else 2)
            if not parts or line.startswith("#") or not parts[0].endswith("%"):
                continue
            rows.append(parts)
        return rows

    dso = [(float(r[0][:-1]), r[1]) for r in report(["--no-children", "--sort", "dso"])]
    inclusive = {}
    for r in report(["--children", "--sort", "symbol", "--percent-limit", "0.2"]):
        if len(r) == 4:
            name = r[3].split("] ", 1)[-1].strip()
            inclusive.setdefault(name, float(r[0][:-1]))
    rows = []
    for label, prefix in PROFILE_ROWS:
        shares = [v for k, v in inclusive.items() if k.startswith(prefix)]
        rows.append((label, max(shares) if shares else None))
    top_self = [(float(r[0][:-1]), r[2].strip().split("  ")[0][:120])
                for r in report(["--no-children", "--sort", "symbol", "--percent-limit", "1"])][:15]
    return {"seconds": seconds, "load": load, "dso": dso, "rows": rows, "top_self": top_self}


# ---------------------------------------------------------------------------------------------
# The report.


def machine():
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    nproc = subprocess.run(["nproc"], capture_output=True).stdout.decode().strip()
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True).stdout.decode()
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                         cwd=ROOT).stdout.decode().strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "src", "Cargo.toml"],
                           capture_output=True, cwd=ROOT).stdout.decode().strip()
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    return {"loadavg": load, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "nproc": nproc, "cpu": model, "kernel": platform.release(),
            "python": platform.python_version(),
            "wrk": wrk_version.splitlines()[0] if wrk_version else "?",
            "commit": rev + (" (src/ or Cargo.toml modified)" if dirty else "")}


def us(x):
    return "%.0f µs" % x if x < 10_000 else "%.1f ms" % (x / 1000)


def verdict(ok):
    return "met" if ok else "**not met**"


def render_disturbance(w, d):
    """The fleet section's line on the shared mode's pod restart and Redis blip."""
    calls = d["provider_calls"]
    w("\nPod restart and a %.0f-s Redis blip under load: **%d requests over 1 s** (target 0; "
      "by phase: %s), worst %s ms (%s), refused while the pod restarted: %d, provider calls "
      "during/after the blip: %d/%d."
      % (d["blip_ms"] / 1000, d["stalled_over_1s"],
         ", ".join("%s %d" % kv for kv in sorted(d["stalls_by_phase"].items())) or "none",
         d["worst_ms"], d["worst_phase"], d["restart_refused"], calls["blip"], calls["after"]))
    w("The blip began %.1f s into the load, just before a token refresh. "
      "The restarted pod was down %.0f ms (SIGTERM to /readyz 200; %.0f ms of it draining); "
      "*refused* counts its callers' requests whose connection was refused or broke before the "
      "answer, sent again on a new one (%d failed attempts: wrk retries at once); those "
      "requests left up to %s ms late; %d requests (all pods) were sent and never answered. "
      "Provider calls by phase: %s."
      % (d["blip_at_s"], d["restart_down_ms"], d["restart_drain_ms"],
         d["restart_failed_attempts"],
         d["restart_held_max_ms"], d["lost_in_flight"],
         ", ".join("%s %d" % kv for kv in calls.items())))


def render_connmem(w, x):
    """Memory under many idle connections and many streaming requests."""
    w("\n## Pass-through memory: idle connections and streaming requests\n")
    w("%d connections opened at once by `bench/hold.rs` (hyper's client), one `GET` on each. "
      "*Idle*: the ceiling answers its fixed bytes, after which every connection stays open and "
      "idle (keep-alive). *Streaming*: the upstream (`hold serve`) answers 200 with a body that "
      "never ends (64 bytes a second), read as it comes, so %d requests are in flight at once, "
      "each with its own upstream connection. RSS of the process under test before and once "
      "every head has arrived (plus 1 s), from /proc. The hyper floor (`bench/floor.rs`) opens "
      "an upstream connection per caller connection; the ceiling alone is hyper's server "
      "connection without a proxy behind it (measured last: its RSS before includes the "
      "proxies' upstream connections it served first).\n" % (x["n"], x["n"]))
    w("| case | process | RSS before | RSS held | per connection | held |\n"
      "|---|---|---|---|---|---|")
    labels = {"sidecar": "sidecar (`[[routes]]`)", "floor": "hyper floor",
              "ceiling": "ceiling (hyper's server alone)"}
    for case in ("idle", "streaming"):
        for name, r in x[case].items():
            w("| %s | %s | %.1f MiB | %.1f MiB | %.1f KiB | %d |"
              % (case, labels[name], r["before_kib"] / 1024, r["after_kib"] / 1024,
                 r["per_conn_kib"], r["held"]))
    w("\nWhere the sidecar's bytes go (valgrind's massif, 500 idle connections after one "
      "request each, on the pass-through route): hyper's server read buffers (16 KiB each) and "
      "write buffers (8 KiB), the pooled upstream connections' read and write buffers "
      "(about 16 KiB each) and hyper's request channel to each (6.5 KiB, a tokio channel "
      "block), and the connection tasks (4.6 KiB per caller connection with hyper's own "
      "connection state, 2.8 KiB per upstream one). The forward path itself keeps no buffer: "
      "bodies stream through frame by frame.\n")


def render_fleetcold(w, x):
    """The fleet's cold path: latency per cold miss alone and with Redis near and far."""
    w("\n## The fleet's cold path\n")
    w("One sidecar, %d cold misses one after another (a new client id each, `fill.lua`, one "
      "connection), the provider answering after %d ms; alone, then with the tier on a real "
      "redis-server reached directly and behind `bench/delay.rs` set to 1 ms and 5 ms each way "
      "(a new fleet key each leg, so every miss is cold in Redis too). The round trip is "
      "measured through the proxy (median of 50 PINGs): tokio's millisecond timer rounds each "
      "delay up, so it is more than twice the setting. Commands are Redis's own count "
      "(`INFO commandstats`) over the leg; those a script runs are counted as well, so the "
      "round trips are the EVALSHA calls: a claim before the call and a commit after it.\n"
      % (x["keys"], x["provider_latency_ms"]))
    w("| leg | round trip | p50 | p90 | p99 | added p50 | commands per miss | EVALSHA per miss |\n"
      "|---|---|---|---|---|---|---|---|")
    for leg, r in x["runs"].items():
        w("| %s | %s | %.1f ms | %.1f ms | %.1f ms | %s | %.1f | %.1f |"
          % ("alone" if r["delay_ms"] is None else "Redis %s" % ("direct" if not r["delay_ms"]
                                                                 else leg + " each way"),
             "—" if r["rtt_ms"] is None else "%.2f ms" % r["rtt_ms"], r["p50_ms"], r["p90_ms"],
             r["p99_ms"], "—" if "added_p50_ms" not in r else "+%.2f ms" % r["added_p50_ms"],
             r["commands_per_miss"], r["commands"].get("evalsha", 0) / x["keys"]))
    w("\nThe caller waits for the claim only: the flight answers its callers, then commits "
      "(`src/token/flight.rs`, `land`). The sidecar's Redis connections set `TCP_NODELAY`; "
      "without it (before issue 24) a claim written while the last commit's answer was on its "
      "way waited for that answer's acknowledgement, one round trip more: +9.0 ms at the 1 ms "
      "setting and +24.7 ms at 5 ms, against +4.6 and +13.2 ms now (one quick run each).\n")


def render_inject(w, x):
    """The section on the injection's cost per API call."""
    w("\n## Injection: the cost per API call\n")
    w("One sidecar (default runtime: one worker thread) with two routes to the provider's "
      "`GET /api/v2/users/me`, each on its own listener (`%s`): `inject` carries a "
      "`[routes.inject]` table (client secret from a file, `auth_method` basic) and is called "
      "with no `Authorization`; `bearer` has no inject table and is called with "
      "`Authorization: Bearer <token>`, a token fetched from the provider once beforehand. Both "
      "send the provider a 1 KiB bearer, which it checks against the tokens it issued. wrk, 1 "
      "thread, 64 keep-alive connections, `bench/api.lua`, %d rounds of %d s alternating between "
      "the routes (order flipped each round), nothing pinned. CPU per request is the sidecar's "
      "user + system time (from /proc) over the requests wrk completed; the injection's own cost "
      "is the median of the per-round differences (inject − bearer).\n"
      % (x["config"], x["rounds"], x["seconds"]))
    w("| route | req/s | p50 | p99 | max | sidecar CPU per request (user + sys) | "
      "socket/status errors |\n|---|---|---|---|---|---|---|")
    for name, label in (("inject", "(a) `inject`, no Authorization (injected)"),
                        ("bearer", "(b) `bearer`, caller-supplied bearer")):
        y = x["summary"][name]
        w("| %s | %.0f | %s | %s | %s | %.1f µs (%.1f + %.1f) | %d |"
          % (label, y["rps"], us(y["p50_us"]), us(y["p99_us"]), us(y["max_us"]), y["cpu_us"],
             y["user_us"], y["sys_us"], x["errors"][name]))
    split = {k: statistics.median(i[k] - b[k] for i, b in zip(x["runs"]["inject"],
                                                              x["runs"]["bearer"]))
             for k in ("user_us", "sys_us")}
    w("\nRatios inject/bearer (median of the per-round ratios): req/s **%.2f**, p99 **%.2f**, "
      "sidecar CPU per request **%.2f**. **The injection's own cost: %+.1f µs of sidecar CPU per "
      "API call** (per round: %s µs; user %+.1f µs, system %+.1f µs, medians of the per-round "
      "differences). Per round (req/s, p99): %s. Token calls the injecting route made for its "
      "%s API calls: %d. Checks before the rounds: %s.\n"
      % (x["rps_ratio"], x["p99_ratio"], x["cpu_ratio"], x["cost_us"],
         ", ".join("%+.1f" % c for c in x["cost_us_per_round"]), split["user_us"],
         split["sys_us"],
         "; ".join("%.2f, %.2f" % rp for rp in zip(x["rps_ratio_per_round"],
                                                   x["p99_ratio_per_round"])),
         "{:,}".format(x["requests"]["inject"]), x["token_calls"],
         ", ".join("%s → %d" % kv for kv in x["checks"].items())))
    w("The sidecar, the provider (one thread) and wrk share the machine's cores, so req/s and "
      "p99 also measure the scheduler; CPU per request is the figure that isolates the "
      "sidecar's work. What the injecting route does per call besides forwarding "
      "(`src/inject.rs`): takes the bearer it keeps (at most 1 s, then it asks its token path "
      "again, as an app sending those credentials would), keeps the request's head for a retry "
      "after a 401, and adds the header.\n")


def render_passthrough(w, x):
    """The pass-through section: per case, the three targets and the sidecar/nginx ratios."""
    w("\n## Pass-through against nginx\n")
    w("The upstream is the ceiling (`bench/ceiling.rs`: plain HTTP/1.1, one thread, the same "
      "%d bytes to every request, the request body read to the end; for the h2c rows of the "
      "upstream alone, the same server with hyper-util's auto builder). In front of it, the sidecar "
      "on a `[[routes]]` route (`%s`: default runtime, one thread, no token path involved) and "
      "%s with `proxy_pass` over an upstream keep-alive pool (`%s`: one worker, "
      "`keepalive 64`). Callers: `GET %s` and a `POST` of 4 KiB to the same path; HTTP/1.1 from "
      "wrk (1 thread, 64 keep-alive connections, `bench/pass.lua`), h2c with prior knowledge "
      "from h2load (1 thread, 64 connections, one stream each; p99 from its per-request log). "
      "%d round(s) of %d s: each round runs every case on the three targets back to back, the "
      "order reversed every round; nothing pinned, so the caller, the proxy and the upstream "
      "share the cores. Tables show medians over rounds; ratios are medians of the per-round "
      "ratios. CPU per request is the proxy's (for the upstream alone: the upstream's) user + "
      "system time from /proc over the requests answered; for nginx it is the worker's.\n"
      % (x["upstream_body_bytes"], x["config"], x["nginx_version"].replace("nginx version: ", ""),
         x["nginx_config"], PASS_PATH, x["rounds"], x["seconds"]))
    w("The hyper floor (`bench/floor.rs`, HTTP/1.1 rows only) is the least a proxy on the "
      "sidecar's own stack can do: hyper's HTTP/1.1 server and client connections on a "
      "current-thread runtime, each caller connection with an upstream connection of its own, "
      "nothing else (no pool, routing, header rewriting or timeouts).\n")
    w("| path | target | req/s | p50 | p99 | max | CPU per request (user + sys) | errors |\n"
      "|---|---|---|---|---|---|---|---|")
    for case, c in x["cases"].items():
        for name in PASS_TARGETS:
            if name not in c["summary"]:
                continue
            y = c["summary"][name]
            w("| %s | %s | %.0f | %s | %s | %s | %.1f + %.1f µs | %d |"
              % (case, PASS_LABELS[name], y["rps"], us(y["p50_us"]), us(y["p99_us"]),
                 us(y["max_us"]), y["user_us"], y["sys_us"], c["errors"][name]))
    w("\n| path | sidecar/nginx req/s (target ≥ 1.0) | sidecar/nginx p99 (target ≤ 1.2) | "
      "sidecar/nginx CPU per request | sidecar, nginx req/s of the upstream alone | "
      "hyper floor/nginx req/s, CPU per request | sidecar/hyper floor req/s | "
      "per round (req/s, p99) |\n|---|---|---|---|---|---|---|---|")
    for case, c in x["cases"].items():
        floor = ("%.2f, %.2f" % (c["floor_of_nginx"], c["floor_cpu_of_nginx"])
                 if "floor_of_nginx" in c else "—")
        w("| %s | **%.2f** | **%.2f** | %.2f | %.2f, %.2f | %s | %s | %s |"
          % (case, c["rps_ratio"], c["p99_ratio"], c["cpu_ratio"], c["sidecar_of_upstream"],
             c["nginx_of_upstream"], floor,
             "%.2f" % c["sidecar_of_floor"] if "sidecar_of_floor" in c else "—",
             "; ".join("%.2f, %.2f" % rp for rp in zip(c["rps_ratio_per_round"],
                                                       c["p99_ratio_per_round"]))))
    w("\nChecks before the rounds (status of a GET and a 4 KiB POST through each target, each "
      "answering the upstream's bytes): %s.\n"
      % ", ".join("%s %d" % kv for kv in x["checks"].items()))


def hit_targets(setup):
    """The hit path's (req/s, p99) targets, sidecar/ceiling, for a setup: the shared setup at the
    default runtime carries issue 24's (0.95, 1.3), the others the earlier (0.9, 1.5)."""
    return (0.95, 1.3) if setup == "shared" else (0.9, 1.5)


def hit_cpu_row(h):
    """The headline row for a hit setup's CPU per request (user + system), sidecar/ceiling,
    paired round by round."""
    cpu = lambda x: x["user_us"] + x["sys_us"]  # noqa: E731
    ratios = [cpu(s) / cpu(c) for s, c in zip(h["runs"]["sidecar"], h["runs"]["ceiling"])]
    median = statistics.median(ratios)
    return ("| hit path, isolated | sidecar/ceiling CPU per request = %.2f (median of %d paired "
            "rounds: %s) | ≤ 1.3 | %s |" % (median, len(ratios),
                                            ", ".join("%.2f" % r for r in ratios),
                                            verdict(median <= 1.3)))


def render(run, info, results, argv):
    out = []
    w = out.append
    w("# token-sidecar benchmark results\n")
    w("Written by `bash bench/run.sh%s`. Regenerate with the same command; read "
      "[README.md](README.md) for what each scenario does and how to read it.\n"
      % (" " + " ".join(argv) if argv else ""))
    w("| | |\n|---|---|")
    w("| date | %s |" % info["date"])
    w("| nproc | %s |" % info["nproc"])
    w("| CPU | %s |" % info["cpu"])
    w("| kernel | %s |" % info["kernel"])
    w("| commit | %s |" % info["commit"])
    w("| tools | %s; Python %s |" % (info["wrk"], info["python"]))
    w("| load average (1, 5, 15 min) | %s at start, %s at end (other work on the machine "
      "shows here) |" % (info["loadavg"], info.get("loadavg_end", "?")))
    w("| mode | %s |" % ("quick (small N, figures are not meaningful)" if run.quick else "full"))
    w("\nThe machine is shared and noisy: compare figures within this run (the ratios), not "
      "across runs.\n")

    w("## Headline\n")
    w("| scenario | figure | target | result |\n|---|---|---|---|")
    hit = results.get("hit")
    if isinstance(hit, dict):
        for setup, h in hit["setups"].items():
            rps_target, p99_target = hit_targets(setup)
            w("| hit path, %s | sidecar/ceiling req/s = %.2f (median of %d paired rounds: %s) "
              "| ≥ %.2f | %s |" % (setup, h["rps_ratio"], h["rounds"],
                                   ", ".join("%.2f" % r for r in h["rps_ratio_per_round"]),
                                   rps_target, verdict(h["rps_ratio"] >= rps_target)))
            w("| hit path, %s | sidecar/ceiling p99 = %.2f (rounds: %s) | ≤ %.1f | %s |"
              % (setup, h["p99_ratio"], ", ".join("%.2f" % r for r in h["p99_ratio_per_round"]),
                 p99_target, verdict(h["p99_ratio"] <= p99_target)))
            if setup == "isolated":  # issue 24: CPU per hit within 1.3x the ceiling's, pinned
                w(hit_cpu_row(h))
    storm = results.get("storm")
    if isinstance(storm, dict):
        v = storm["via_sidecar"]
        w("| cold storm | %d concurrent cold requests → %d upstream call(s), %d failures, "
          "wall %.2f s | 1 call, 0 failures | %s |"
          % (storm["n"], storm["upstream_calls_via_sidecar"], v["failures"], v["wall_s"],
             verdict(storm["upstream_calls_via_sidecar"] == 1 and v["failures"] == 0)))
        x = storm["via_slow"]
        w("| cold storm, 2-s provider | %d requests → %d upstream call(s), %d failures, %d "
          "coalesced | 1 call, 0 failures | %s |"
          % (storm["n"], x["upstream_calls"], x["failures"], x["outcomes"].get("coalesced", 0),
             verdict(x["upstream_calls"] == 1 and x["failures"] == 0)))
    story = results.get("story")
    if isinstance(story, dict):
        d, s = story["direct"], story["via_sidecar"]
        w("| story | direct: %d ok, %d × 429 of %d; via sidecar: %d ok, %d errors, %d upstream "
          "calls | 0 errors, %d calls | %s |"
          % (d["ok"], d["throttled_429"], d["requests"], s["ok"], s["errors"],
             s["upstream_calls"].get("calls", 0), story["expected_upstream_calls"],
             verdict(s["errors"] == 0
                     and s["upstream_calls"].get("calls", 0)
                     <= story["expected_upstream_calls"] + story["keys"])))
    burst = results.get("burst")
    if isinstance(burst, dict):
        a, p, d = burst["absorb"], burst["pass"], burst["direct"]
        w("| burst (limit %d/s < %d cold keys) | via sidecar, defaults: %d ok, %d × 429, %d other "
          "errors; with `absorb_hold = \"0s\"`: %d × 429; direct: %d × 429 of %d "
          "| 0 × 429, 0 errors (defaults) | %s |"
          % (burst["rate_limit"], burst["keys"], a["ok"], a["throttled_429"],
             a["errors"] - a["throttled_429"], p["throttled_429"], d["throttled_429"],
             d["requests"], verdict(a["errors"] == 0 and a["requests"] > 0)))
    steady = results.get("steady")
    if isinstance(steady, dict):
        dr, el = steady["during_refresh"], steady["elsewhere"]
        ok_p99 = dr["p99_ms"] is not None and el["p99_ms"] is not None \
            and dr["p99_ms"] <= el["p99_ms"] * 1.1
        w("| steady state | %.2f refreshes per key in %.0f s (%d s lifetime; %.2f calls with the "
          "first fetch); p99 %s ms during refreshes vs %s ms elsewhere | ≈ %.1f; p99 no worse "
          "(≤ 1.1×) | %s |"
          % (steady["upstream_calls_per_key_mean"] - 1, steady["duration_s"],
             steady["lifetime_s"], steady["upstream_calls_per_key_mean"], dr["p99_ms"],
             el["p99_ms"], steady["target_calls_per_key"],
             verdict(abs(steady["upstream_calls_per_key_mean"] - 1
                         - steady["target_calls_per_key"]) <= 1.0 and ok_p99)))
    fleet = results.get("fleet")
    if isinstance(fleet, dict):
        a, sh = fleet["alone"], fleet["shared"]
        worth = sh["provider_calls"] / max(a["provider_calls"] / fleet["pods"], 1e-9)
        stalls = a["stalled_over_1s"] + sh["stalled_over_1s"]
        w("| fleet (%d sidecars, one key) | provider calls: %d alone, %d with the shared tier "
          "(%.2f pods' worth, through a pod restart and a Redis blip); %d errors; stalls over "
          "1 s: %d | ≤ 1.5 pods' worth (vs %d), 0 errors, 0 stalls | %s |"
          % (fleet["pods"], a["provider_calls"], sh["provider_calls"], worth,
             a["errors"] + sh["errors"], stalls, fleet["pods"],
             verdict(worth <= 1.5 and a["errors"] + sh["errors"] == 0 and stalls == 0)))
    inject = results.get("inject")
    if isinstance(inject, dict):
        w("| injection (`GET /api/v2/users/me`) | sidecar CPU per API call %+.1f µs injected vs "
          "caller's bearer (%.1f vs %.1f µs); req/s ratio %.2f, p99 ratio %.2f (median of %d "
          "paired rounds); %d token call(s) for %s injected calls | — (measured, no target) | — |"
          % (inject["cost_us"], inject["summary"]["inject"]["cpu_us"],
             inject["summary"]["bearer"]["cpu_us"], inject["rps_ratio"], inject["p99_ratio"],
             inject["rounds"], inject["token_calls"], "{:,}".format(inject["requests"]["inject"])))
    passthrough = results.get("passthrough")
    if isinstance(passthrough, dict):
        for case, c in passthrough["cases"].items():
            w("| pass-through, %s | sidecar/nginx req/s = %.2f, p99 = %.2f (median of %d paired "
              "rounds); CPU per request %.1f vs %.1f µs | req/s ≥ 1.0, p99 ≤ 1.2 | %s |"
              % (case, c["rps_ratio"], c["p99_ratio"], passthrough["rounds"],
                 c["summary"]["sidecar"]["cpu_us"], c["summary"]["nginx"]["cpu_us"],
                 verdict(c["rps_ratio"] >= 1.0 and c["p99_ratio"] <= 1.2)))
    cold = results.get("fleetcold")
    if isinstance(cold, dict):
        for leg, x in cold["runs"].items():
            if x["delay_ms"]:
                w("| fleet cold path, Redis %s away each way (round trip %.1f ms) | +%.1f ms per "
                  "cold miss (p50, against the sidecar alone); %.1f commands, %.1f EVALSHA per "
                  "miss | at most 2 round trips, nothing past the claim's on the caller's path | "
                  "%s |" % (leg, x["rtt_ms"], x["added_p50_ms"], x["commands_per_miss"],
                            x["commands"].get("evalsha", 0) / cold["keys"],
                            verdict(x["commands"].get("evalsha", 0) <= 2 * cold["keys"]
                                    and x["added_p50_ms"] <= x["rtt_ms"] + 1.0)))
    conn = results.get("connmem")
    if isinstance(conn, dict):
        for case in ("idle", "streaming"):
            side, floor = conn[case]["sidecar"], conn[case]["floor"]
            w("| pass-through memory, %d %s | sidecar RSS %.1f MiB (%.1f KiB per connection), "
              "hyper floor %.1f KiB | reported; no buffer beyond hyper's | — |"
              % (conn["n"], "idle keep-alive connections" if case == "idle"
                 else "concurrent streaming requests", side["after_kib"] / 1024,
                 side["per_conn_kib"], floor["per_conn_kib"]))
    mem = results.get("memory")
    if isinstance(mem, dict):
        w("| memory | %.0f bytes per cached key (%d-byte token JSON) | ≤ token + 1024 = %d | %s |"
          % (mem["bytes_per_entry"], mem["token_body_bytes"], mem["token_body_bytes"] + 1024,
             verdict(mem["bytes_per_entry"] <= mem["token_body_bytes"] + 1024)))
        w("| start | exec → /readyz 200: median %.1f ms (%d starts) | — | — |"
          % (mem["ready_ms_median"], len(mem["ready_ms"])))
        w("| size | release binary %.2f MiB, idle RSS %.1f MiB | — | — |"
          % (mem["binary_bytes"] / 2**20, mem["rss_idle_kib"] / 1024))
    failed = [k for k, v in results.items() if not isinstance(v, dict)]
    if failed:
        w("\nScenarios that failed to run: %s (see the end of this file).\n" % ", ".join(failed))

    if isinstance(hit, dict):
        w("\n## 1. Hit path\n")
        w("wrk, 1 thread, 64 keep-alive connections, the same POST (`bench/hit.lua`) against "
          "each target. The token body is %d bytes (1 KiB `access_token`). Ceiling and sidecar "
          "run in interleaved rounds (order flipped every round); tables show medians over "
          "rounds, ratios are the median of the per-round ratios, raw runs are in "
          "`bench/out/results.json`. CPU per request is the server's user and system time "
          "(from /proc) over the requests wrk completed.\n" % hit["body_bytes"])
        labels = {
            "isolated": "Each server runs 1 worker thread (`--workers 1`, the ceiling's third "
                        "argument) pinned to one CPU with `taskset`, and wrk is pinned to another, "
                        "so client and server never compete for a core.",
            "shared": "Default worker counts (the sidecar's default of 1 on a current-thread "
                      "runtime; the ceiling the same), nothing pinned: wrk's thread and the "
                      "servers' workers share the cores as the scheduler decides.",
            "shared-percpu": "As shared, but the sidecar and the ceiling run one worker per CPU "
                             "(`--workers 0`), as before the one-thread default.",
        }
        for setup, h in hit["setups"].items():
            rps_target, p99_target = hit_targets(setup)
            w("\n### %s setup, %d rounds of %d s\n\n%s\n"
              % (setup.capitalize(), h["rounds"], h["seconds"], labels[setup]))
            w("| target | req/s | p50 | p90 | p99 | max | CPU per request (user + sys) | "
              "socket/status errors |\n|---|---|---|---|---|---|---|---|")
            for name in ("ceiling", "sidecar"):
                x = h["summary"][name]
                w("| %s | %.0f | %s | %s | %s | %s | %.1f + %.1f µs | %d |" % (
                    {"ceiling": "(a) ceiling (`bench/ceiling.rs`, HTTP/1.1)",
                     "sidecar": "(b) sidecar, warm cache"}[name],
                    x["rps"], us(x["p50_us"]), us(x["p90_us"]), us(x["p99_us"]), us(x["max_us"]),
                    x["user_us"], x["sys_us"], h["errors"][name]))
            w("\nRatios sidecar/ceiling: req/s **%.2f** (target ≥ %.2f), p99 **%.2f** (target "
              "≤ %.1f); p50 %.2f, p90 %.2f. Per round (req/s, p99): %s. The sidecar answered %d "
              "requests in the measured runs and counted %d hits; it made %d upstream call(s) "
              "in total.\n"
              % (h["rps_ratio"], rps_target, h["p99_ratio"], p99_target,
                 h["p50_ratio"], h["p90_ratio"],
                 "; ".join("%.2f, %.2f" % rp for rp in zip(h["rps_ratio_per_round"],
                                                           h["p99_ratio_per_round"])),
                 h["sidecar_requests"], h["sidecar_hits"], h["sidecar_upstream_calls"]))
        p = hit["provider"]
        w("(c) The provider directly (`bench/provider.rs`, one thread, no added latency, "
          "shared setup): %.0f req/s, "
          "p50 %s, p99 %s.\n\nThe machine's other work moves every figure from one round to "
          "the next (a round's req/s can swing by half for the ceiling alone), which is why "
          "rounds are paired and the median is taken.\n"
          % (p["rps"], us(p["p50_us"]), us(p["p99_us"])))

    if isinstance(fleet, dict):
        a, sh = fleet["alone"], fleet["shared"]
        w("\n## Fleet: N sidecars, with and without the shared tier\n")
        w("%d sidecar processes in front of one provider (20 ms per call, tokens of %d s), each "
          "asked for the same key by two clients every 50 ms for %d s (`bench/clients.lua`); "
          "then, on one of them, sequential cold misses (`bench/fill.lua` on one connection: a "
          "new client id each) and 3-s wrk hit rounds. `shared` adds "
          "`--shared-redis` on a real `redis-server` on loopback and `--shared-key-file`, and "
          "its load lives through two disturbances: at a third, the last sidecar restarts "
          "(SIGTERM, exit, the same command line on the same ports until `/readyz` answers 200); "
          "from two thirds, half a second before the next token refresh is due, `redis-server` "
          "stops for 2 s (SIGSTOP, then SIGCONT). Every answer's "
          "latency is logged (`clients.lua` `log=`); *over 1 s* counts answers slower than 1 s "
          "(a stalled caller), *worst* is the slowest answer.\n"
          % (fleet["pods"], fleet["lifetime_s"], fleet["duration_s"]))
        w("| | provider calls | per token lifetime | answers | errors | over 1 s | worst | "
          "cold miss p50 | cold miss p99 | hit req/s | hit p99 |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")
        for mode in ("alone", "shared"):
            x = fleet[mode]
            w("| %s | %d | %.2f | %d | %d | %d | %s ms | %.1f ms | %.1f ms | %.0f | %s |"
              % (mode, x["provider_calls"], x["calls_per_lifetime"], x["answers"], x["errors"],
                 x["stalled_over_1s"], x["worst_ms"], x["cold_p50_ms"], x["cold_p99_ms"],
                 x["hit_rps"], us(x["hit_p99_us"])))
        render_disturbance(w, sh["disturbance"])
        w("\nA token is served until its lifetime less max(1 s, 10 %) less a second, and "
          "refreshed ahead at 75-80 % of it, so each pod alone calls a little more often than "
          "once per lifetime; what matters is the shared row against a quarter of the alone "
          "row.")
        w("\nShared-tier round trips, all pods: %s. The cold path's added latency is the claim "
          "(one Redis round trip on loopback; the commit follows once the callers have their "
          "answer, see the fleet's cold path below); a hit never touches Redis. The "
          "hit rows are medians of 3 unpaired rounds on a shared machine, so they show only "
          "that the tier made the hit path no slower, not a gain.\n"
          % ", ".join("%s %d" % (k, v) for k, v in sh.get("shared_claims", {}).items()))

    if isinstance(results.get("fleetcold"), dict):
        render_fleetcold(w, results["fleetcold"])

    if isinstance(results.get("connmem"), dict):
        render_connmem(w, results["connmem"])

    if isinstance(inject, dict):
        render_inject(w, inject)

    if isinstance(passthrough, dict):
        render_passthrough(w, passthrough)

    if isinstance(storm, dict):
        v, d = storm["via_sidecar"], storm["direct"]
        w("\n## 2. Cold storm\n")
        w("%d connections opened first, then one cold request for the same key written on each "
          "before any answer is read (`bench/storm.rs`). The provider answers after 50 ms."
          "\n" % storm["n"])
        w("| | upstream calls | ok | failures | wall time (send → last answer) | p50 | p99 | "
          "outcomes |\n|---|---|---|---|---|---|---|---|")
        w("| via sidecar | %d (sidecar's own metric: %d) | %d | %d | %.3f s | %s ms | %s ms | %s |"
          % (storm["upstream_calls_via_sidecar"], storm["upstream_calls_sidecar_metric"],
             v["ok"], v["failures"], v["wall_s"], v["p50_ms"], v["p99_ms"],
             ", ".join("%s %d" % kv for kv in sorted(v["outcomes"].items()))))
        w("| provider directly | %d | %d | %d | %.3f s | %s ms | %s ms | — |"
          % (storm["upstream_calls_direct"], d["ok"], d["failures"], d["wall_s"], d["p50_ms"],
             d["p99_ms"]))
        x = storm["via_slow"]
        w("| via sidecar, provider taking 2 s | %d | %d | %d | %.3f s | %s ms | %s ms | %s |"
          % (x["upstream_calls"], x["ok"], x["failures"], x["wall_s"], x["p50_ms"], x["p99_ms"],
             ", ".join("%s %d" % kv for kv in sorted(x["outcomes"].items()))))
        c = storm["ceiling"]
        w("| ceiling (answers at once: the client's and loopback's own floor) | — | %d | %d | "
          "%.3f s | %s ms | "
          "%s ms | — |" % (c["ok"], c["failures"], c["wall_s"], c["p50_ms"], c["p99_ms"]))
        w("\nConnecting the %d client sockets took %.2f s (not part of the wall time); handing "
          "every request to its connection took %.3f s of the wall time. Requests that reach the "
          "sidecar while the one upstream call is in flight are coalesced waiters; any that "
          "arrive after it landed are hits. The 2-s provider row is the same storm with every "
          "request arriving while the call is in flight.\n"
          % (storm["n"], v["connect_s"], v["send_s"]))

    if isinstance(story, dict):
        d, s = story["direct"], story["via_sidecar"]
        w("\n## 3. The story: a provider that allows 10 token calls per second\n")
        w("%d clients sharing %d credential sets (%d replicas each) each fetch a token every "
          "%.0f s for %d s (`bench/clients.lua`, a wrk thread per client); the provider allows 10 "
          "token calls in each second and answers 429 with `Retry-After` beyond that; tokens "
          "live %d s; "
          "the provider adds 50 ms per token."
          "\n" % (story["clients"], story["keys"], story["clients"] // story["keys"],
                  story["interval_s"], story["duration_s"], story["lifetime_s"]))
        w("| | client requests | ok | 429 | other errors | upstream calls (429 included) |\n"
          "|---|---|---|---|---|---|")
        for name, x in (("directly", d), ("via sidecar", s)):
            w("| %s | %d | %d | %d | %d | %d (%d ok, %d × 429) |"
              % (name, x["requests"], x["ok"], x["throttled_429"],
                 x["errors"] - x["throttled_429"], x["upstream_calls"].get("calls", 0),
                 x["upstream_calls"].get("issued", 0), x["upstream_calls"].get("throttled", 0)))
        w("\nExpected upstream calls through the sidecar: %d keys × (1 + ⌊%d s / (0.8 × %d s)⌋) "
          "= %d (refresh jitter can add one refresh per key near the end). Sidecar outcomes: %s.\n"
          % (story["keys"], story["duration_s"], story["lifetime_s"],
             story["expected_upstream_calls"],
             ", ".join("%s %d" % (k, v) for k, v in s["sidecar_outcomes"].items() if v)))

    if isinstance(burst, dict):
        w("\n## 4. The burst: a provider whose limit is below the cold-key burst\n")
        w("The story's load (`bench/clients.lua`: %d clients sharing %d credential sets, a "
          "token every %.0f s for %d s) against a provider that allows %d token calls in each "
          "second, fewer than the %d cold keys that all ask at once; beyond that it "
          "answers 429 with `Retry-After` (sent this run: %s); 50 ms per token, tokens live %d s. "
          "Three legs, each with its own provider: directly, through the sidecar with default "
          "settings (`absorb_hold` 5 s: a hold that ends in time is waited out with the callers "
          "waiting), and through the sidecar with `absorb_hold = \"0s\"` (`%s`: holds passed "
          "on as 429s).\n"
          % (burst["clients"], burst["keys"], burst["interval_s"], burst["duration_s"],
             burst["rate_limit"], burst["keys"],
             "; ".join("%s: %s" % (label, ", ".join("`Retry-After: %s` × %d" % kv
                                                     for kv in burst[leg]["retry_after"].items())
                                   or "none")
                       for label, leg in (("directly", "direct"), ("defaults", "absorb"),
                                          ("`0s`", "pass"))),
             burst["lifetime_s"], burst["pass"]["config"]))
        w("| | client requests | ok | 429 | other errors | slowest answer | provider calls "
          "(429 included) | sidecar `cooldown` answers | holds absorbed |\n"
          "|---|---|---|---|---|---|---|---|---|")
        for name, leg in (("directly", "direct"), ("via sidecar, defaults", "absorb"),
                          ("via sidecar, `absorb_hold = \"0s\"`", "pass")):
            x = burst[leg]
            w("| %s | %d | %d | %d | %d | %.0f ms | %d (%d ok, %d × 429) | %s | %s |"
              % (name, x["requests"], x["ok"], x["throttled_429"],
                 x["errors"] - x["throttled_429"], x["max_ms"] or 0,
                 x["upstream_calls"].get("calls", 0), x["upstream_calls"].get("issued", 0),
                 x["upstream_calls"].get("throttled", 0),
                 "%d" % x["sidecar_outcomes"]["cooldown"] if "sidecar_outcomes" in x else "—",
                 "%d" % x["holds_absorbed"] if "holds_absorbed" in x else "—"))
        w("\nA client 429 through the sidecar is either a `cooldown` refusal (no upstream call) "
          "or the throttled answer of the flight the caller was waiting on, passed on. What "
          "absorbing costs is time: the callers of a held key wait out its `Retry-After` (the "
          "slowest answer). Sidecar outcomes, defaults: %s; with `absorb_hold = \"0s\"`: %s. "
          "Client latency p50 / p99: directly %.1f / %.1f ms, defaults %.1f / %.1f ms, `0s` "
          "%.1f / %.1f ms.\n"
          % tuple([", ".join("%s %d" % (k, v) for k, v in burst[leg]["sidecar_outcomes"].items()
                             if v) for leg in ("absorb", "pass")]
                  + [burst[leg][k] or 0 for leg in ("direct", "absorb", "pass")
                     for k in ("p50_ms", "p99_ms")]))

    if isinstance(steady, dict):
        dr, el = steady["during_refresh"], steady["elsewhere"]
        w("\n## 5. Steady state with rotation\n")
        w("%d keep-alive connections in a closed loop over %d keys for %.0f s "
          "(`bench/clients.lua`, a wrk thread per connection); tokens live %d s, the provider adds "
          "50 ms. A request is "
          "\"during a refresh\" if it started between 20 ms before a background refresh reached "
          "the provider and 20 ms after its answer left (%d refresh windows, from the provider's "
          "call log); first calls per key and the first second are left out.\n"
          % (steady["connections"], steady["keys"], steady["duration_s"], steady["lifetime_s"],
             steady["refresh_windows"]))
        w("| | requests | p50 | p99 | max |\n|---|---|---|---|---|")
        w("| during refreshes | %d | %s ms | %s ms | %s ms |"
          % (dr["requests"], dr["p50_ms"], dr["p99_ms"], dr["max_ms"]))
        w("| elsewhere | %d | %s ms | %s ms | %s ms |"
          % (el["requests"], el["p50_ms"], el["p99_ms"], el["max_ms"]))
        w("\nUpstream calls per key (first fetch + refreshes): %s, mean %.2f, so %.2f refreshes "
          "per key against the issue's %.0f / (0.8 × %d) = %.1f (the design's 0–5 %% refresh "
          "jitter moves refreshes up to 0.5 s earlier). %d requests at %.0f req/s; statuses %s; "
          "sidecar outcomes: %s.\n"
          % (steady["upstream_calls_per_key"], steady["upstream_calls_per_key_mean"],
             steady["upstream_calls_per_key_mean"] - 1, steady["duration_s"],
             steady["lifetime_s"], steady["target_calls_per_key"],
             steady["requests"], steady["rps"],
             steady["statuses"],
             ", ".join("%s %d" % (k, v) for k, v in steady["sidecar_outcomes"].items() if v)))

    if isinstance(mem, dict):
        w("\n## 6. Memory and start\n")
        w("| | |\n|---|---|")
        w("| release binary (`target/release/token-sidecar`, stripped) | %d bytes (%.2f MiB) |"
          % (mem["binary_bytes"], mem["binary_bytes"] / 2**20))
        w("| exec → first `GET /readyz` 200 | median %.1f ms; all: %s ms |"
          % (mem["ready_ms_median"], ", ".join("%.1f" % x for x in mem["ready_ms"])))
        w("| idle RSS (0.5 s after ready) | %d KiB |" % mem["rss_idle_kib"])
        w("| RSS after 1 s of hits on 64 connections (baseline) | %d KiB |" % mem["rss_base_kib"])
        w("| RSS after caching %d distinct keys | %d KiB (%d cache entries, %d upstream calls) |"
          % (mem["keys"], mem["rss_full_kib"], mem["cache_entries"], mem["upstream_calls"]))
        w("| bytes per cached key ((full − baseline) / keys) | **%.0f** for a %d-byte token body "
          "(target ≤ %d) |" % (mem["bytes_per_entry"], mem["token_body_bytes"],
                               mem["token_body_bytes"] + 1024))
        f = mem["fill"]
        w("| cold misses against the ceiling as provider | %d keys in %.2f s (wrk: %.0f req/s, "
          "p99 %s, %d status errors) |"
          % (mem["keys"], mem["fill_wall_s"], f["rps"], us(f["p99_us"]), f["errors_status"]))
        w("")

    prof = results.get("profile")
    if isinstance(prof, dict):
        w("\n## Profile of the hit path\n")
        w("`perf record --call-graph dwarf` at 499 Hz on a symbolized build of the same source "
          "(`target/bench-profile`), %d s of the hit-path load (%.0f req/s under perf). Shares are "
          "of the sidecar's own CPU samples; inclusive shares nest and overlap.\n"
          % (prof["seconds"], prof["load"]["rps"]))
        w("| where (inclusive) | share |\n|---|---|")
        for label, share in prof["rows"]:
            w("| %s | %s |" % (label.replace("  ", "&nbsp;&nbsp;"),
                               "—" if share is None else "%.1f %%" % share))
        w("\nSelf time by object: %s. Top self-time symbols:\n"
          % ", ".join("%s %.1f %%" % (name, share) for share, name in prof["dso"]))
        w("| self | symbol |\n|---|---|")
        for share, name in prof["top_self"]:
            w("| %.1f %% | `%s` |" % (share, name))
        w("")

    w("\n## Exact commands\n")
    w("Every process this run started, in order of first use, identical repeats counted (ports "
      "were picked free at run time; `bench/out/*.toml` are the sidecar config files it "
      "wrote):\n")
    w("```")
    w("bash bench/run.sh%s" % (" " + " ".join(argv) if argv else ""))
    w("cargo build --release --bin token-sidecar")
    w("cargo build --release --example ceiling --example provider --example storm")
    if run.profile:
        w("CARGO_TARGET_DIR=target/bench-profile CARGO_PROFILE_RELEASE_STRIP=none "
          "CARGO_PROFILE_RELEASE_DEBUG=line-tables-only cargo build --release --bin token-sidecar")
    last = None
    for scenario, line, times in run.commands:
        if scenario != last:
            w("# %s" % scenario)
            last = scenario
        w(line + ("    # × %d" % times if times > 1 else ""))
    w("```")
    w("\nSidecar config used by every scenario (plus the flags above):\n")
    w("```toml\n[limits]\nmax_connections = 20000\n\n[token]\nmax_entries = 200000\n```")
    if isinstance(results.get("burst"), dict):
        w("\nThe burst's third sidecar adds `absorb_hold = \"0s\"` to its `[token]` table.")
    if isinstance(results.get("inject"), dict):
        w("\nThe injection scenario's sidecar takes no `--upstream` or `--listen`: its config "
          "adds two `[[routes]]` tables (`%s`, written by `scenario_inject`)."
          % results["inject"]["config"])
    if isinstance(results.get("passthrough"), dict):
        w("\nThe pass-through scenario's sidecar has one `[[routes]]` table (`%s`); nginx's "
          "config is `%s`, both written by `scenario_passthrough`."
          % (results["passthrough"]["config"], results["passthrough"]["nginx_config"]))
    for k, v in results.items():
        if not isinstance(v, dict):
            w("\n### %s failed to run\n\n```\n%s\n```" % (k, v))
    return "\n".join(out) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--only",
                        help="comma-separated scenarios "
                             "(hit,storm,story,burst,steady,fleet,fleetcold,inject,passthrough,memory,connmem)")
    args, _ = parser.parse_known_args()
    out = os.path.join(BENCH, "out")
    run = Run(args.quick, out, args.profile)
    names = ["hit", "storm", "story", "burst", "steady", "fleet", "fleetcold", "inject",
             "passthrough", "memory", "connmem"] + \
        (["profile"] if args.profile else [])
    scenarios = {"hit": scenario_hit, "storm": scenario_storm, "story": scenario_story,
                 "burst": scenario_burst, "steady": scenario_steady, "fleet": scenario_fleet,
                 "fleetcold": scenario_fleetcold, "connmem": scenario_connmem,
                 "inject": scenario_inject, "passthrough": scenario_passthrough,
                 "memory": scenario_memory,
                 "profile": scenario_profile}
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in scenarios]
        if unknown or not wanted:
            print("bench: unknown scenario(s) %s; known: %s"
                  % (", ".join(unknown) or "(none given)", ", ".join(scenarios)), file=sys.stderr)
            return 2
        names = [n for n in scenarios if n in wanted]
    check_binaries()
    info = machine()
    results = {}
    for name in names:
        run.scenario = name
        started = time.monotonic()
        print("bench: %s ..." % name, file=sys.stderr, flush=True)
        try:
            results[name] = scenarios[name](run)
            print("bench: %s done in %.1f s" % (name, time.monotonic() - started),
                  file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - reported, and the run exits non-zero
            results[name] = traceback.format_exc()
            print("bench: %s FAILED:\n%s" % (name, results[name]), file=sys.stderr, flush=True)
        finally:
            run.stop_all()
    with open("/proc/loadavg") as f:
        info["loadavg_end"] = " ".join(f.read().split()[:3])
    passed = [a for a in sys.argv[1:]]
    report = render(run, info, results, passed)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"machine": info, "results": results}, f, indent=1)
    target = os.path.join(out, "RESULTS.md") if args.quick or args.only else \
        os.path.join(BENCH, "RESULTS.md")
    with open(target, "w") as f:
        f.write(report)
    print("bench: wrote %s" % rel(target), file=sys.stderr)
    failed = [k for k, v in results.items() if not isinstance(v, dict)]
    if failed:
        print("bench: failed to run: %s" % ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
