#!/usr/bin/env python3
"""The soak's load and report for token-sidecar, started by bench/soak.sh. Python standard library
only: wrk (bench/clients.lua) does the talking, against the sidecar that bench/soak.sh started in
front of the project's provider (bench/provider.rs, with faults).

  soak.py load --sidecar H:P --admin H:P --provider H:P --pid PID --minutes M --out DIR
               --faults SPEC
      Drives steady load through the sidecar (C keep-alive clients over K credential sets, paced
      to a total rate), samples the sidecar's RSS and open fds from /proc every few seconds, then
      checks every token served against the provider's call log, and prints and writes a summary
      (DIR/summary.txt, DIR/summary.json).

Everything listens and connects on 127.0.0.1 only; every loop is bounded in count and in time.
"""

import argparse
import base64
import collections
import json
import os
import random
import sys
import time
import urllib.parse
import urllib.request

sys.dont_write_bytecode = True  # no __pycache__ in bench/
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import loads  # noqa: E402  (running wrk and reading the provider)

HOST = "127.0.0.1"
# Fault kinds after which the provider handed out no token (slow answers still do).
FAILING_FAULTS = ("429", "503", "500", "drop", "garbage")


def parse_faults(text):
    """`KIND=RATE,...` as bench/provider.rs takes it, for the estimate of upstream calls."""
    faults = {}
    for part in filter(None, text.split(",")):
        kind, _, rate = part.partition("=")
        faults[kind] = float(rate)
    return faults


def credentials(k):
    """Credential set `k`: (client id, authorization, body). Even sets authenticate with Basic,
    odd ones in the form body."""
    client_id = f"soak-client-{k:02d}"
    secret = f"soak-secret-{k:02d}-{random.Random(k).getrandbits(64):016x}"
    form = {"grant_type": "client_credentials", "scope": "read write"}
    authorization = ""
    if k % 2 == 0:
        basic = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
        authorization = f"Basic {basic}"
    else:
        form["client_id"] = client_id
        form["client_secret"] = secret
    return client_id, authorization, urllib.parse.urlencode(form)


def proc_sample(pid):
    sample = {"rss_kb": None, "hwm_kb": None, "threads": None, "fds": None}
    names = {"VmRSS": "rss_kb", "VmHWM": "hwm_kb", "Threads": "threads"}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in names:
                    sample[names[key]] = int(value.split()[0])
        sample["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        pass
    return sample


def call_kind(call, slow_s):
    """What the provider answered a call: ok, slow, garbage (a 200 without a token), drop (no
    answer), or the status."""
    if call["status"] is None:
        return "drop"
    if call["status"] != 200:
        return str(call["status"])
    if call["access_token"] is None:
        return "garbage"
    return "slow" if call["answered"] - call["arrived"] >= 0.9 * slow_s else "ok"


def check_tokens(seen, calls, client_ids, lifetime):
    """Every token a client was served, against the call that issued it: it must be that
    client's, never served past its lifetime, and never with an `expires_in` that outlives it.
    `seen` is clients.lua's {wrk thread: {token: [last sighting, latest expiry claimed]}}; thread
    i is client i, with credential set (i - 1) mod len(client_ids). Counted per token."""
    issued = {call["access_token"]: call for call in calls if call["access_token"]}
    anomalies = collections.Counter()
    for client, tokens in seen.items():
        for token, (last, expiry) in tokens.items():
            call = issued.get(token)
            if call is None:
                anomalies["token_not_in_the_call_log"] += 1
                continue
            if call["client_id"] != client_ids[(int(client) - 1) % len(client_ids)]:
                anomalies["token_of_another_client"] += 1
            if last > call["answered"] + lifetime + 0.05:
                anomalies["expired_token_served"] += 1
            if expiry > call["answered"] + lifetime + 1:
                anomalies["expires_in_overstated"] += 1
    return dict(anomalies)


def sidecar_requests(admin):
    """Token requests the sidecar has answered so far (the sum of its outcome counter)."""
    with urllib.request.urlopen(f"http://{HOST}:{admin}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("token_sidecar_token_requests_total{")))


class Load:
    def __init__(self, args):
        self.args = args
        self.creds = [credentials(k) for k in range(args.keys)]
        self.samples = []

    def start_wrk(self):
        args = self.args
        requests = loads.write_requests(os.path.join(args.out, "requests.txt"),
                                        [(auth, body) for _, auth, body in self.creds])
        every = args.clients / args.rate if args.rate > 0 else 0
        seconds = max(1, round(args.minutes * 60))
        argv = loads.clients_argv(f"http://{HOST}:{args.sidecar_port}/oauth/token", args.clients,
                                  seconds, timeout_s=args.request_timeout, requests=requests,
                                  every=every, spread=every, lifetime=args.lifetime)
        print("load: " + " ".join(argv), flush=True)
        return loads.start_wrk(argv, stderr=open(os.path.join(args.out, "wrk.log"), "ab"))

    def sample(self, started):
        now = time.monotonic()
        sample = {"t": round(now - started, 1), **proc_sample(self.args.pid)}
        try:
            sample["upstream_calls"] = loads.provider_stats(f"{HOST}:{self.args.provider_port}")["calls"]
            sample["requests"] = sidecar_requests(self.args.admin_port)
        except (OSError, ValueError, KeyError):
            sample["upstream_calls"] = sample["requests"] = None
        self.samples.append(sample)
        return sample

    def run(self):
        args = self.args
        print(f"load: {args.clients} clients over {args.keys} credential sets, "
              f"{args.rate or 'unlimited'} req/s, {args.minutes} min", flush=True)
        started = time.monotonic()
        wrk = self.start_wrk()
        # The last sample is taken a second before wrk's end, while the load still runs.
        last_at = started + max(1, round(args.minutes * 60)) - 1
        last_print = 0.0
        for _ in range(int(args.minutes * 60 / args.sample_seconds) + 10):
            if wrk.poll() is not None:
                break
            sample = self.sample(started)
            now = time.monotonic()
            if now - last_print >= 60 or now >= last_at:
                last_print = now
                print(f"  t={sample['t']:6.0f}s requests={sample['requests']} "
                      f"upstream={sample['upstream_calls']} rss={sample['rss_kb']} KiB "
                      f"fds={sample['fds']}", flush=True)
            if now >= last_at:
                break
            time.sleep(min(args.sample_seconds, max(0.0, last_at - now)))
        result = loads.wrk_summary(wrk, args.request_timeout + 30)
        elapsed = time.monotonic() - started
        provider = f"{HOST}:{args.provider_port}"
        calls = loads.provider_calls(provider)
        stats = loads.provider_stats(provider)
        with urllib.request.urlopen(f"http://{HOST}:{args.admin_port}/metrics", timeout=10) as m:
            metrics = m.read().decode()
        return self.summary(elapsed, result, calls, stats, metrics)

    def summary(self, elapsed, result, calls, stats, metrics):
        args = self.args
        answered = loads.answers(result)
        samples = [s for s in self.samples if s["rss_kb"] is not None]
        # Drift is measured from the end of warm-up (caches, pools and connections filled):
        # the first sample after a tenth of the run, at most a minute in.
        warm_up = min(60.0, elapsed / 10)
        cold = samples[0]
        first = next((s for s in samples if s["t"] >= warm_up), samples[0])
        mid, last = samples[len(samples) // 2], samples[-1]
        half = samples[len(samples) // 2:]
        slope = least_squares_slope([(s["t"] / 60, s["rss_kb"]) for s in half])
        faults = parse_faults(args.faults)
        p_fail = sum(faults.get(k, 0.0) for k in FAILING_FAULTS)
        brief = args.keys * elapsed / (0.8 * args.lifetime)
        # The sidecar refreshes at refresh_at - refresh_jitter × U (defaults 0.8 - 0.05 × U, mean
        # 0.775 of the lifetime); each failed call costs one more call.
        share = args.refresh_at - args.refresh_jitter / 2
        model = args.keys * elapsed / (share * args.lifetime) / (1 - p_fail)
        provider = {
            "calls": len(calls), "calls_counted": stats["calls"],
            "by_kind": dict(collections.Counter(call_kind(c, args.slow_seconds) for c in calls)),
            "by_client": dict(collections.Counter(c["client_id"] for c in calls)),
            "connections": stats["connections"], "max_in_flight": stats["most_in_progress"],
        }
        per_client = sorted(provider["by_client"].values())
        anomalies = dict(result["anomalies"])
        for kind, n in check_tokens(result["tokens"], calls, [c[0] for c in self.creds],
                                    args.lifetime).items():
            anomalies[kind] = anomalies.get(kind, 0) + n
        rss_drift = last["rss_kb"] - first["rss_kb"]
        rss_second_half = last["rss_kb"] - mid["rss_kb"]
        fd_drift = last["fds"] - first["fds"]
        flat = abs(rss_second_half) <= max(1024, 0.05 * mid["rss_kb"]) and abs(last["fds"] - mid["fds"]) <= 5
        wanted = ("token_sidecar_token_requests_total", "token_sidecar_upstream_token_calls_total", "token_sidecar_cache_evictions_total")
        latency = result["latency_us"]
        data = {
            "duration_s": round(elapsed, 1),
            "clients": args.clients,
            "credential_sets": args.keys,
            "target_rate": args.rate,
            "lifetime_s": args.lifetime,
            "faults": faults,
            "requests": answered["requests"],
            "requests_per_s": round(answered["requests"] / elapsed, 1),
            "statuses": answered["statuses"],
            "client_errors": answered["transport_errors"],
            "token_anomalies": anomalies,
            "tokens_checked": sum(len(t) for t in result["tokens"].values()),
            "latency_ms": {q: round(latency[k] / 1000, 3) for q, k in (("p50", "p50"), ("p99", "p99"), ("p999", "p999"), ("max", "max"))},
            "upstream": provider,
            "upstream_expected_brief": round(brief),
            "upstream_expected_model": round(model),
            "upstream_per_client_min_max": [per_client[0], per_client[-1]] if per_client else None,
            "warm_up_s": warm_up,
            "rss_kb": {"cold": cold["rss_kb"], "start": first["rss_kb"], "middle": mid["rss_kb"], "end": last["rss_kb"], "peak_hwm": last["hwm_kb"]},
            "rss_drift_kb": rss_drift,
            "rss_second_half_kb": rss_second_half,
            "rss_second_half_slope_kb_per_min": round(slope, 1),
            "fds": {"cold": cold["fds"], "start": first["fds"], "middle": mid["fds"], "end": last["fds"]},
            "fd_drift": fd_drift,
            "threads": {"start": first["threads"], "end": last["threads"]},
            "verdict": "flat" if flat else "DRIFT",
            "sidecar_metrics": [line for line in metrics.splitlines() if line.startswith(wanted)],
            "samples": self.samples,
        }
        min_max = data["upstream_per_client_min_max"] or [None, None]
        lines = [
            f"duration           {data['duration_s']} s, {args.clients} clients, {args.keys} credential sets, target {args.rate or 'unlimited'} req/s",
            f"requests           {data['requests']} ({data['requests_per_s']}/s)",
            f"statuses           {data['statuses']}",
            f"client errors      {data['client_errors'] or 'none'}",
            f"token anomalies    {data['token_anomalies'] or 'none'} ({data['tokens_checked']} distinct tokens checked)",
            f"latency            p50 {data['latency_ms']['p50']} ms, p99 {data['latency_ms']['p99']} ms, p99.9 {data['latency_ms']['p999']} ms, max {data['latency_ms']['max']} ms (wrk)",
            f"upstream calls     {provider['calls']} by kind {provider['by_kind']}",
            f"expected           ≈{data['upstream_expected_brief']} (keys×T/(0.8×L)), ≈{data['upstream_expected_model']} (keys×T/({share:.3f}×L)/(1−{p_fail:.2f} failing faults)); observed/model {provider['calls'] / model:.2f}",
            f"per client         min {min_max[0]}, max {min_max[1]}; provider max in flight {provider['max_in_flight']}, connections {provider['connections']}",
            f"RSS KiB            cold {cold['rss_kb']}; start (t={first['t']:.0f}s) {first['rss_kb']}, middle (t={mid['t']:.0f}s) {mid['rss_kb']}, end (t={last['t']:.0f}s) {last['rss_kb']}, peak {last['hwm_kb']}; drift {rss_drift:+}, second half {rss_second_half:+} ({slope:+.1f} KiB/min)",
            f"open fds           cold {cold['fds']}; start {first['fds']}, middle {mid['fds']}, end {last['fds']}; drift {fd_drift:+}",
            f"threads            start {first['threads']}, end {last['threads']}",
            f"verdict            {data['verdict']} (second-half RSS change within max(1 MiB, 5%), fds within 5)",
        ]
        lines += ["sidecar metrics:"] + [f"  {line}" for line in data["sidecar_metrics"]]
        return data, "\n".join(lines)


def least_squares_slope(points):
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0


def host_port(text):
    host, _, port = text.rpartition(":")
    if host != HOST:
        raise argparse.ArgumentTypeError(f"{text}: only {HOST} is allowed")
    return int(port)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    l = sub.add_parser("load")
    l.add_argument("--sidecar", type=host_port, dest="sidecar_port", required=True)
    l.add_argument("--admin", type=host_port, dest="admin_port", required=True)
    l.add_argument("--provider", type=host_port, dest="provider_port", required=True)
    l.add_argument("--pid", type=int, required=True)
    l.add_argument("--minutes", type=float, default=10)
    l.add_argument("--clients", type=int, default=50)
    l.add_argument("--keys", type=int, default=20)
    l.add_argument("--rate", type=float, default=2000, help="total requests per second; 0 = as fast as possible")
    l.add_argument("--lifetime", type=int, default=10, help="the provider's expires_in")
    l.add_argument("--faults", required=True, help="the provider's fault rates, for the estimate")
    l.add_argument("--slow-seconds", type=float, default=2.0, help="the provider's slow answers")
    l.add_argument("--refresh-at", type=float, default=0.8)
    l.add_argument("--refresh-jitter", type=float, default=0.05)
    l.add_argument("--request-timeout", type=int, default=35)
    l.add_argument("--sample-seconds", type=float, default=5.0)
    l.add_argument("--out", required=True)
    args = parser.parse_args()
    if not (0 < args.minutes <= 24 * 60 and 1 <= args.clients <= 1000 and 1 <= args.keys <= args.clients):
        parser.error("need 0 < minutes ≤ 1440 and 1 ≤ keys ≤ clients ≤ 1000")
    os.makedirs(args.out, exist_ok=True)
    data, text = Load(args).run()
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(data, f, indent=1)
    with open(os.path.join(args.out, "summary.txt"), "w") as f:
        f.write(text + "\n")
    print(text, flush=True)
    return 0 if data["verdict"] == "flat" and not data["token_anomalies"] else 1


if __name__ == "__main__":
    sys.exit(main())
