#!/usr/bin/env python3
"""Soak test parts for token-sidecar, started by bench/soak.sh. Python standard library only.

  soak.py provider --port-file F [--lifetime 10] [--faults ...] [--max-seconds N]
      A fake OAuth 2.0 provider on 127.0.0.1:0 (the port is written to F). POST /oauth/token
      answers a client-credentials token with a short lifetime, or, at the configured rates, a
      fault: 429 + Retry-After: 1, 503, 500, a dropped connection, a slow answer, or garbage.
      GET /__stats returns its call counts as JSON.

  soak.py load --sidecar H:P --admin H:P --provider H:P --pid PID --minutes M --out DIR
      Drives steady load through the sidecar (C concurrent keep-alive clients over K credential
      sets, at a total rate), checks every token served, samples the sidecar's RSS and open fds
      from /proc, and prints and writes a summary (DIR/summary.txt, DIR/summary.json).

Everything listens and connects on 127.0.0.1 only; every loop is bounded in count and in time.
"""

import argparse
import asyncio
import base64
import collections
import json
import math
import os
import random
import signal
import sys
import time
import urllib.parse

HOST = "127.0.0.1"
TOKEN_PATH = "/oauth/token"
# Hard bounds that keep every loop finite whatever the arguments.
MAX_REQUESTS_PER_CONNECTION = 10_000_000
MAX_HEADERS = 100
MAX_CHUNKS = 10_000
IDLE_TIMEOUT_S = 120.0
DEFAULT_FAULTS = "429=0.03,503=0.02,500=0.03,drop=0.02,slow=0.03,garbage=0.02"
FAULT_KINDS = ("429", "503", "500", "drop", "slow", "garbage")
# Fault kinds after which the provider handed out no token (slow answers still do).
FAILING_FAULTS = ("429", "503", "500", "drop", "garbage")


# ------------------------------------------------------------------------------------------------
# Minimal HTTP/1.1 framing (Content-Length and chunked bodies; nothing else is needed here)
# ------------------------------------------------------------------------------------------------


class Closed(Exception):
    """The peer closed the connection between messages."""


async def read_message(reader, timeout):
    """Reads one request or response: (start line, lower-cased headers, body)."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            raise Closed() from None
        raise
    lines = head.decode("latin-1").split("\r\n")
    if len(lines) > MAX_HEADERS + 3:
        raise ValueError("too many headers")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), timeout)
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        body = await asyncio.wait_for(read_chunked(reader), timeout)
    else:
        body = b""
    return lines[0], headers, body


async def read_chunked(reader):
    body = bytearray()
    for _ in range(MAX_CHUNKS):
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
        if size == 0:
            # Trailers, bounded like headers.
            for _ in range(MAX_HEADERS):
                if await reader.readuntil(b"\r\n") == b"\r\n":
                    return bytes(body)
            raise ValueError("too many trailers")
        body += await reader.readexactly(size)
        await reader.readexactly(2)
    raise ValueError("too many chunks")


def response_bytes(status, reason, body, headers=()):
    head = [f"HTTP/1.1 {status} {reason}", f"content-length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


# ------------------------------------------------------------------------------------------------
# The fake provider
# ------------------------------------------------------------------------------------------------


def parse_faults(text):
    faults = {}
    for part in filter(None, text.split(",")):
        kind, _, rate = part.partition("=")
        if kind not in FAULT_KINDS:
            raise SystemExit(f"unknown fault {kind!r}; use {', '.join(FAULT_KINDS)}")
        faults[kind] = float(rate)
    if sum(faults.values()) >= 1.0:
        raise SystemExit("fault rates must add up to less than 1")
    return faults


def client_of(headers, body):
    """The client id of a token request: Basic first, then the form."""
    auth = headers.get("authorization", "")
    if auth.lower().startswith("basic "):
        try:
            raw = base64.b64decode(auth[6:].strip()).decode()
            return urllib.parse.unquote_plus(raw.partition(":")[0])
        except ValueError:
            return "?"
    form = urllib.parse.parse_qs(body.decode("utf-8", "replace"))
    return form.get("client_id", ["?"])[0]


class Provider:
    def __init__(self, lifetime, faults, slow_s, seed):
        self.lifetime = lifetime
        self.faults = faults
        self.slow_s = slow_s
        self.random = random.Random(seed)
        self.calls = collections.Counter()  # by outcome kind: ok, 429, 503, ...
        self.by_client = collections.Counter()
        self.connections = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.issued = 0
        self.started = time.time()

    def pick(self):
        roll = self.random.random()
        for kind, rate in self.faults.items():
            if roll < rate:
                return kind
            roll -= rate
        return "ok"

    def token(self, client):
        self.issued += 1
        issued_ms = int(time.time() * 1000)
        return json.dumps(
            {
                "access_token": f"tok-{client}-{self.issued}-{issued_ms}",
                "token_type": "bearer",
                "expires_in": self.lifetime,
                "scope": "read write",
            }
        ).encode()

    def stats(self):
        return {
            "calls": sum(self.calls.values()),
            "by_kind": dict(self.calls),
            "by_client": dict(self.by_client),
            "connections": self.connections,
            "max_in_flight": self.max_in_flight,
            "uptime_s": round(time.time() - self.started, 1),
        }

    async def serve(self, reader, writer):
        self.connections += 1
        try:
            for _ in range(MAX_REQUESTS_PER_CONNECTION):
                try:
                    start, headers, body = await read_message(reader, IDLE_TIMEOUT_S)
                except (Closed, asyncio.TimeoutError, ConnectionError):
                    return
                method, path = (start.split(" ") + ["", ""])[:2]
                if method == "GET" and path == "/__stats":
                    out = json.dumps(self.stats()).encode()
                    writer.write(response_bytes(200, "OK", out, [("content-type", "application/json")]))
                elif method == "POST" and path == TOKEN_PATH:
                    if not await self.token_call(headers, body, writer):
                        return
                else:
                    writer.write(response_bytes(404, "Not Found", b"not found\n"))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return
        finally:
            writer.close()

    async def token_call(self, headers, body, writer):
        """Answers one token call; False when the fault is a dropped connection."""
        client = client_of(headers, body)
        kind = self.pick()
        self.calls[kind] += 1
        self.by_client[client] += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            json_type = [("content-type", "application/json"), ("cache-control", "no-store")]
            if kind == "drop":
                return False
            if kind == "429":
                out = b'{"error":"temporarily_unavailable"}'
                writer.write(response_bytes(429, "Too Many Requests", out, json_type + [("retry-after", "1")]))
            elif kind == "503":
                out = b'{"error":"temporarily_unavailable"}'
                writer.write(response_bytes(503, "Service Unavailable", out, json_type))
            elif kind == "500":
                writer.write(response_bytes(500, "Internal Server Error", b'{"error":"server_error"}', json_type))
            elif kind == "garbage":
                writer.write(response_bytes(200, "OK", b"<html>upstream proxy error</html>", json_type))
            else:
                if kind == "slow":
                    await asyncio.sleep(self.slow_s)
                writer.write(response_bytes(200, "OK", self.token(client), json_type))
            return True
        finally:
            self.in_flight -= 1


async def provider_main(args):
    provider = Provider(args.lifetime, parse_faults(args.faults), args.slow_seconds, args.seed)
    server = await asyncio.start_server(provider.serve, HOST, 0, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    tmp = args.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{port}\n")
    os.replace(tmp, args.port_file)
    print(f"provider on {HOST}:{port}, lifetime {args.lifetime}s, faults {args.faults}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), args.max_seconds)
    except asyncio.TimeoutError:
        print("provider: --max-seconds reached", flush=True)
    server.close()
    print("provider stats: " + json.dumps(provider.stats()), flush=True)


# ------------------------------------------------------------------------------------------------
# The load generator and sampler
# ------------------------------------------------------------------------------------------------


class Credentials:
    """One credential set: even ones authenticate with Basic, odd ones in the form body."""

    def __init__(self, k):
        self.client_id = f"soak-client-{k:02d}"
        self.secret = f"soak-secret-{k:02d}-{random.Random(k).getrandbits(64):016x}"
        form = {"grant_type": "client_credentials", "scope": "read write"}
        headers = [f"host: {HOST}", "content-type: application/x-www-form-urlencoded"]
        if k % 2 == 0:
            basic = base64.b64encode(f"{self.client_id}:{self.secret}".encode()).decode()
            headers.append(f"authorization: Basic {basic}")
        else:
            form["client_id"] = self.client_id
            form["client_secret"] = self.secret
        body = urllib.parse.urlencode(form).encode()
        headers.append(f"content-length: {len(body)}")
        self.request = (f"POST {TOKEN_PATH} HTTP/1.1\r\n" + "\r\n".join(headers) + "\r\n\r\n").encode() + body


class Latency:
    """A fixed log-scale histogram, so memory stays flat however long the soak runs."""

    def __init__(self):
        self.buckets = [0] * 64  # bucket i holds latencies up to 2**(i/2) * 10 µs

    def add(self, seconds):
        i = 0 if seconds <= 1e-5 else min(63, math.ceil(2 * math.log2(seconds / 1e-5)))
        self.buckets[i] += 1

    def quantile(self, q):
        total = sum(self.buckets)
        if total == 0:
            return 0.0
        seen = 0
        for i, n in enumerate(self.buckets):
            seen += n
            if seen >= q * total:
                return 1e-5 * 2 ** (i / 2)
        return float("inf")


class Load:
    def __init__(self, args):
        self.args = args
        self.creds = [Credentials(k) for k in range(args.keys)]
        self.statuses = collections.Counter()
        self.errors = collections.Counter()  # client-side: connect, reset, timeout, ...
        self.anomalies = collections.Counter()  # 200s that are wrong: wrong key, expired, ...
        self.latency = Latency()
        self.requests = 0
        self.connects = 0
        self.samples = []

    async def client(self, n, deadline):
        creds = self.creds[n % len(self.creds)]
        interval = self.args.clients / self.args.rate if self.args.rate > 0 else 0.0
        # Spread the clients' first requests over one interval.
        next_at = time.monotonic() + interval * n / self.args.clients
        reader = writer = None
        max_requests = int(self.args.rate * self.args.minutes * 60 * 2) + 1 if self.args.rate > 0 else 10**9
        for _ in range(max_requests):
            now = time.monotonic()
            if now >= deadline:
                break
            if interval:
                if next_at > now:
                    await asyncio.sleep(min(next_at - now, deadline - now))
                next_at = max(next_at + interval, time.monotonic() - interval)
            try:
                if writer is None:
                    self.connects += 1
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(HOST, self.args.sidecar_port), 5
                    )
                started = time.monotonic()
                writer.write(creds.request)
                await writer.drain()
                start, headers, body = await read_message(reader, self.args.request_timeout)
                self.latency.add(time.monotonic() - started)
                self.requests += 1
                status = int(start.split(" ")[1])
                self.statuses[status] += 1
                if status == 200:
                    self.check_token(creds, body)
                if headers.get("connection", "").lower() == "close":
                    writer.close()
                    writer = None
            except (Closed, asyncio.IncompleteReadError, ConnectionError, OSError, asyncio.TimeoutError, ValueError) as e:
                kind = {"Closed": "closed", "TimeoutError": "timeout"}.get(type(e).__name__, type(e).__name__)
                self.errors[kind] += 1
                if writer is not None:
                    writer.close()
                writer = None
                await asyncio.sleep(0.1)
        if writer is not None:
            writer.close()

    def check_token(self, creds, body):
        try:
            token = json.loads(body)
            access = token["access_token"]
            expires_in = token["expires_in"]
        except (ValueError, KeyError, TypeError):
            self.anomalies["not_a_token"] += 1
            return
        if not access.startswith(f"tok-{creds.client_id}-"):
            self.anomalies["token_of_another_client"] += 1
            return
        issued_ms = int(access.rsplit("-", 1)[1])
        age_s = time.time() - issued_ms / 1000
        if age_s > self.args.lifetime + 0.05:
            self.anomalies["expired_token_served"] += 1
        if not isinstance(expires_in, int) or not 1 <= expires_in <= self.args.lifetime:
            self.anomalies["expires_in_out_of_range"] += 1
        elif expires_in > self.args.lifetime - age_s + 1:
            self.anomalies["expires_in_overstated"] += 1

    async def http_get(self, port, path):
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 5)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n\r\n".encode())
            await writer.drain()
            _, _, body = await read_message(reader, 10)
            return body
        finally:
            writer.close()

    def proc(self):
        pid = self.args.pid
        sample = {"rss_kb": None, "hwm_kb": None, "threads": None, "fds": None}
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key in ("VmRSS", "VmHWM", "Threads"):
                        sample[{"VmRSS": "rss_kb", "VmHWM": "hwm_kb", "Threads": "threads"}[key]] = int(value.split()[0])
            sample["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            pass
        return sample

    async def sampler(self, started, deadline):
        every = self.args.sample_seconds
        last_print = 0.0
        for _ in range(int(self.args.minutes * 60 / every) + 3):
            now = time.monotonic()
            sample = {"t": round(now - started, 1), "requests": self.requests, **self.proc()}
            try:
                stats = json.loads(await self.http_get(self.args.provider_port, "/__stats"))
                sample["upstream_calls"] = stats["calls"]
            except (OSError, ValueError, asyncio.TimeoutError, Closed, asyncio.IncompleteReadError):
                sample["upstream_calls"] = None
            self.samples.append(sample)
            if now - last_print >= 60 or now >= deadline:
                last_print = now
                print(
                    f"  t={sample['t']:6.0f}s requests={self.requests} upstream={sample['upstream_calls']} "
                    f"rss={sample['rss_kb']} KiB fds={sample['fds']} statuses={dict(self.statuses)} "
                    f"errors={dict(self.errors)}",
                    flush=True,
                )
            if now >= deadline:
                return
            await asyncio.sleep(min(every, max(0.0, deadline - time.monotonic())))

    async def run(self):
        args = self.args
        started = time.monotonic()
        deadline = started + args.minutes * 60
        print(
            f"load: {args.clients} clients over {args.keys} credential sets, "
            f"{args.rate or 'unlimited'} req/s, {args.minutes} min",
            flush=True,
        )
        tasks = [asyncio.create_task(self.client(n, deadline)) for n in range(args.clients)]
        await self.sampler(started, deadline)
        await asyncio.wait_for(asyncio.gather(*tasks), args.request_timeout + 10)
        elapsed = time.monotonic() - started
        provider = json.loads(await self.http_get(args.provider_port, "/__stats"))
        metrics = (await self.http_get(args.admin_port, "/metrics")).decode()
        return self.summary(elapsed, provider, metrics)

    def summary(self, elapsed, provider, metrics):
        args = self.args
        samples = [s for s in self.samples if s["rss_kb"] is not None]
        # Drift is measured from the end of warm-up (caches, pools and connections filled):
        # the first sample after a tenth of the run, at most a minute in.
        warm_up = min(60.0, elapsed / 10)
        cold = samples[0]
        first = next((s for s in samples if s["t"] >= warm_up), samples[0])
        mid, last = samples[len(samples) // 2], samples[-1]
        half = samples[len(samples) // 2 :]
        slope = least_squares_slope([(s["t"] / 60, s["rss_kb"]) for s in half])
        faults = parse_faults(args.faults)
        p_fail = sum(faults.get(k, 0.0) for k in FAILING_FAULTS)
        brief = args.keys * elapsed / (0.8 * args.lifetime)
        # The sidecar refreshes at refresh_at - refresh_jitter × U (defaults 0.8 - 0.05 × U, mean
        # 0.775 of the lifetime); each failed call costs one more call.
        share = args.refresh_at - args.refresh_jitter / 2
        model = args.keys * elapsed / (share * args.lifetime) / (1 - p_fail)
        per_client = sorted(provider["by_client"].values())
        rss_drift = last["rss_kb"] - first["rss_kb"]
        rss_second_half = last["rss_kb"] - mid["rss_kb"]
        fd_drift = last["fds"] - first["fds"]
        flat = abs(rss_second_half) <= max(1024, 0.05 * mid["rss_kb"]) and abs(last["fds"] - mid["fds"]) <= 5
        wanted = ("token_sidecar_token_requests_total", "token_sidecar_upstream_token_calls_total", "token_sidecar_cache_evictions_total")
        data = {
            "duration_s": round(elapsed, 1),
            "clients": args.clients,
            "credential_sets": args.keys,
            "target_rate": args.rate,
            "lifetime_s": args.lifetime,
            "faults": faults,
            "requests": self.requests,
            "requests_per_s": round(self.requests / elapsed, 1),
            "client_connects": self.connects,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "client_errors": dict(self.errors),
            "token_anomalies": dict(self.anomalies),
            "latency_ms": {q: round(self.latency.quantile(v) * 1000, 3) for q, v in (("p50", 0.5), ("p99", 0.99), ("p999", 0.999), ("max_bucket", 1.0))},
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
        lines = [
            f"duration           {data['duration_s']} s, {args.clients} clients, {args.keys} credential sets, target {args.rate or 'unlimited'} req/s",
            f"requests           {self.requests} ({data['requests_per_s']}/s), client connects {self.connects}",
            f"statuses           {data['statuses']}",
            f"client errors      {data['client_errors'] or 'none'}",
            f"token anomalies    {data['token_anomalies'] or 'none'}",
            f"latency            p50 {data['latency_ms']['p50']} ms, p99 {data['latency_ms']['p99']} ms, p99.9 {data['latency_ms']['p999']} ms (histogram upper bounds)",
            f"upstream calls     {provider['calls']} by kind {provider['by_kind']}",
            f"expected           ≈{data['upstream_expected_brief']} (keys×T/(0.8×L)), ≈{data['upstream_expected_model']} (keys×T/({share:.3f}×L)/(1−{p_fail:.2f} failing faults)); observed/model {provider['calls'] / model:.2f}",
            f"per client         min {data['upstream_per_client_min_max'][0]}, max {data['upstream_per_client_min_max'][1]}; provider max in flight {provider['max_in_flight']}, connections {provider['connections']}",
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


async def load_main(args):
    data, text = await Load(args).run()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(data, f, indent=1)
    with open(os.path.join(args.out, "summary.txt"), "w") as f:
        f.write(text + "\n")
    print(text, flush=True)
    return 0 if data["verdict"] == "flat" and not data["token_anomalies"] else 1


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("provider")
    p.add_argument("--port-file", required=True)
    p.add_argument("--lifetime", type=int, default=10)
    p.add_argument("--faults", default=DEFAULT_FAULTS)
    p.add_argument("--slow-seconds", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-seconds", type=float, default=3600)
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
    l.add_argument("--faults", default=DEFAULT_FAULTS, help="the provider's fault rates, for the estimate")
    l.add_argument("--refresh-at", type=float, default=0.8)
    l.add_argument("--refresh-jitter", type=float, default=0.05)
    l.add_argument("--request-timeout", type=float, default=35.0)
    l.add_argument("--sample-seconds", type=float, default=5.0)
    l.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.command == "provider":
        asyncio.run(provider_main(args))
        return 0
    if not (0 < args.minutes <= 24 * 60 and 1 <= args.clients <= 10_000 and 1 <= args.keys <= args.clients):
        parser.error("need 0 < minutes ≤ 1440 and 1 ≤ keys ≤ clients ≤ 10000")
    return asyncio.run(load_main(args))


if __name__ == "__main__":
    sys.exit(main())
