"""Load clients for the benchmark scenarios wrk cannot express, on 127.0.0.1 only. Stdlib asyncio.

  storm   N connections opened first, then one cold token request on each, all at once.
  story   C clients, each fetching a token every INTERVAL seconds for DURATION seconds (also the
          `burst` scenario's load); keeps each answer's latency.
  steady  closed-loop load over K keys for DURATION seconds, with every request's latency kept,
          then split into "during a refresh" and "elsewhere" using the provider's call log.

Every mode prints one JSON object on stdout. Every loop is bounded in count and in time.
"""

import argparse
import asyncio
import collections
import json
import random
import sys
import time
import urllib.request


def form(key):
    return ("grant_type=client_credentials&client_id=svc-%d&client_secret=secret-%d&scope=read"
            % (key, key)).encode()


def request_bytes(host, path, body):
    return (
        "POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        "Content-Length: %d\r\n\r\n" % (path, host, len(body))
    ).encode() + body


def outcome(cache_status):
    """Sidecar Cache-Status → hit | miss | coalesced | stale | cooldown | other | none."""
    if not cache_status:
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


async def read_response(reader):
    """(status, cache-status, body) of one response; raises on a closed or broken connection."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length, chunked, cache_status, close = 0, False, "", False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name, value = name.strip().lower(), value.strip()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
        elif name == "cache-status":
            cache_status = value
        elif name == "connection" and value.lower() == "close":
            close = True
    if chunked:
        body = bytearray()
        for _ in range(1_000_000):
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            body += await reader.readexactly(size + 2)
        body = bytes(body)
    else:
        body = await reader.readexactly(length)
    return status, cache_status, body, close


def percentile(values, p):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, int(round(p / 100.0 * len(values) + 0.5)) - 1))]


def ms(x):
    return None if x is None else round(x * 1000.0, 3)


class StormConn(asyncio.Protocol):
    """One storm connection: sends its request when told, parses exactly one response."""

    def __init__(self, results):
        self.results = results
        self.transport = None
        self.buf = bytearray()
        self.need = None  # total bytes of the response once its head is parsed
        self.status = self.cache_status = None
        self.sent_at = None
        self.done = False

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.buf += data
        if self.need is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
            self.status = int(lines[0].split(" ", 2)[1])
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value)
                elif name == "cache-status":
                    self.cache_status = value.strip()
            self.need = end + 4 + length
        if len(self.buf) >= self.need and not self.done:
            self.done = True
            self.results.append((time.monotonic() - self.sent_at, self.status,
                                 outcome(self.cache_status)))

    def connection_lost(self, exc):
        if not self.done:
            self.done = True
            self.results.append((None, None, type(exc).__name__ if exc else "closed"))


async def storm(args):
    host, port = args.target.rsplit(":", 1)
    payload = request_bytes(args.target, "/oauth/token", form(args.key))
    loop = asyncio.get_running_loop()
    results = []
    conns = []
    t0 = time.monotonic()
    connect_failures = 0
    for start in range(0, args.n, args.connect_batch):
        batch = [loop.create_connection(lambda: StormConn(results), host, int(port))
                 for _ in range(start, min(args.n, start + args.connect_batch))]
        for result in await asyncio.gather(*batch, return_exceptions=True):
            if isinstance(result, BaseException):
                connect_failures += 1
            else:
                conns.append(result[1])
    connected = time.monotonic() - t0

    # Write every request before reading any answer, so they are all in flight together.
    start = time.monotonic()
    for conn in conns:
        conn.sent_at = start
        conn.transport.write(payload)
    sent = time.monotonic() - start
    deadline = start + args.timeout
    while len(results) < len(conns) and time.monotonic() < deadline:
        await asyncio.sleep(0.001)
    wall = time.monotonic() - start
    for conn in conns:
        conn.transport.close()

    statuses, outcomes, errors, latencies = (collections.Counter(), collections.Counter(),
                                             collections.Counter(), [])
    for latency, status, kind in results:
        if latency is None:
            errors[kind] += 1
            continue
        latencies.append(latency)
        statuses[status] += 1
        outcomes[kind] += 1
    errors["timeout"] += len(conns) - len(results)
    errors = {k: v for k, v in errors.items() if v}
    ok = statuses.get(200, 0)
    return {
        "requests": args.n,
        "connect_s": round(connected, 3),
        "connect_failures": connect_failures,
        "send_s": round(sent, 3),
        "wall_s": round(wall, 3),
        "ok": ok,
        "failures": args.n - ok,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "outcomes": dict(outcomes),
        "errors": errors,
        "p50_ms": ms(percentile(latencies, 50)),
        "p99_ms": ms(percentile(latencies, 99)),
        "max_ms": ms(max(latencies) if latencies else None),
    }


class Conn:
    """One keep-alive client connection that reconnects when the server closes it."""

    def __init__(self, target):
        self.host, self.port = target.rsplit(":", 1)
        self.reader = self.writer = None

    async def request(self, payload, timeout):
        for attempt in range(2):
            try:
                if self.writer is None:
                    self.reader, self.writer = await asyncio.wait_for(
                        asyncio.open_connection(self.host, int(self.port)), timeout)
                self.writer.write(payload)
                status, cache_status, body, close = await asyncio.wait_for(
                    read_response(self.reader), timeout)
                if close:
                    self.close()
                return status, cache_status, body
            except (asyncio.IncompleteReadError, ConnectionError) as e:
                self.close()
                if attempt == 1:
                    raise e
        raise RuntimeError("unreachable")

    def close(self):
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def story(args):
    statuses, outcomes, errors = collections.Counter(), collections.Counter(), collections.Counter()
    latencies = []  # seconds from sending to the whole answer, every answered request
    start = time.monotonic()
    deadline = start + args.duration

    async def client(i):
        key = i % args.keys
        payload = request_bytes(args.target, "/oauth/token", form(key))
        conn = Conn(args.target)
        ticks = int(args.duration / args.interval)
        for tick in range(ticks):
            due = start + tick * args.interval + random.uniform(0, args.jitter)
            if due >= deadline:
                break
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            try:
                sent = time.monotonic()
                status, cache_status, _ = await conn.request(payload, args.timeout)
                latencies.append(time.monotonic() - sent)
                statuses[status] += 1
                outcomes[outcome(cache_status)] += 1
            except Exception as e:  # noqa: BLE001 - counted as a client-side error
                errors[type(e).__name__] += 1
                conn.close()
        conn.close()

    await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(args.clients))),
                           args.duration + 2 * args.timeout + 5)
    total = sum(statuses.values()) + sum(errors.values())
    ok = statuses.get(200, 0)
    return {
        "clients": args.clients,
        "keys": args.keys,
        "duration_s": args.duration,
        "interval_s": args.interval,
        "requests": total,
        "ok": ok,
        "throttled_429": statuses.get(429, 0),
        "errors": total - ok,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "outcomes": dict(outcomes),
        "transport_errors": dict(errors),
        "p50_ms": ms(percentile(latencies, 50)),
        "p99_ms": ms(percentile(latencies, 99)),
        "max_ms": ms(max(latencies) if latencies else None),
        "elapsed_s": round(time.monotonic() - start, 3),
    }


async def steady(args):
    starts, lats, outs = [], [], []
    statuses, errors = collections.Counter(), collections.Counter()
    start = time.monotonic()
    deadline = start + args.duration
    payloads = [request_bytes(args.target, "/oauth/token", form(k)) for k in range(args.keys)]

    async def worker(w):
        conn = Conn(args.target)
        for j in range(10_000_000):
            t = time.monotonic()
            if t >= deadline:
                break
            try:
                status, cache_status, _ = await conn.request(payloads[(w + j) % args.keys],
                                                             args.timeout)
            except Exception as e:  # noqa: BLE001 - counted as a client-side error
                errors[type(e).__name__] += 1
                conn.close()
                continue
            starts.append(t)
            lats.append(time.monotonic() - t)
            outs.append(outcome(cache_status))
            statuses[status] += 1
        conn.close()

    await asyncio.wait_for(asyncio.gather(*(worker(w) for w in range(args.connections))),
                           args.duration + 2 * args.timeout + 5)
    elapsed = time.monotonic() - start

    with urllib.request.urlopen("http://%s/stats" % args.provider, timeout=10) as answer:
        stats = json.load(answer)
    calls = collections.defaultdict(list)
    for arrival, done, client_id, status in stats["calls"]:
        calls[client_id].append((arrival, done, status))
    # A refresh moment: from just before a background call reaches the provider until a little
    # after its answer, when the new token is swapped in. First calls per key are cold misses.
    windows = sorted((a - args.margin, d + args.margin)
                     for rows in calls.values() for (a, d, _) in sorted(rows)[1:])
    warm_from = start + args.warmup
    during, elsewhere = [], []
    wi = 0
    order = sorted(range(len(starts)), key=starts.__getitem__)
    for i in order:
        t = starts[i]
        if t < warm_from:
            continue
        while wi < len(windows) and windows[wi][1] < t:
            wi += 1
        inside = any(lo <= t <= hi for lo, hi in windows[wi:wi + 4])
        (during if inside else elsewhere).append(lats[i])
    per_key = sorted(len(rows) for rows in calls.values())
    return {
        "connections": args.connections,
        "keys": args.keys,
        "duration_s": round(elapsed, 3),
        "requests": len(lats),
        "rps": round(len(lats) / elapsed, 1),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "outcomes": dict(collections.Counter(outs)),
        "transport_errors": dict(errors),
        "upstream_calls": len(stats["calls"]),
        "upstream_calls_per_key": per_key,
        "upstream_calls_per_key_mean": round(sum(per_key) / max(1, len(per_key)), 2),
        "refresh_windows": len(windows),
        "during_refresh": {"requests": len(during), "p50_ms": ms(percentile(during, 50)),
                           "p99_ms": ms(percentile(during, 99)),
                           "max_ms": ms(max(during) if during else None)},
        "elsewhere": {"requests": len(elsewhere), "p50_ms": ms(percentile(elsewhere, 50)),
                      "p99_ms": ms(percentile(elsewhere, 99)),
                      "max_ms": ms(max(elsewhere) if elsewhere else None)},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("storm")
    p.add_argument("--target", required=True)
    p.add_argument("-n", type=int, default=10_000)
    p.add_argument("--key", type=int, default=0)
    p.add_argument("--connect-batch", type=int, default=500)
    p.add_argument("--timeout", type=float, default=60.0)
    p = sub.add_parser("story")
    p.add_argument("--target", required=True)
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--keys", type=int, default=5)
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--jitter", type=float, default=0.05)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--timeout", type=float, default=10.0)
    p = sub.add_parser("steady")
    p.add_argument("--target", required=True)
    p.add_argument("--provider", required=True)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--keys", type=int, default=10)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--margin", type=float, default=0.02)
    p.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()
    result = asyncio.run({"storm": storm, "story": story, "steady": steady}[args.mode](args))
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
