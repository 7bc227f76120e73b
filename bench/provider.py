"""A fake OAuth 2.0 identity provider for the benchmark, on 127.0.0.1 only.

One asyncio process, stdlib only. It answers `POST <any path>` with a fresh client-credentials
token (a new `access_token` on every call, so the sidecar never sees "the same token again"), and
can be told to be slow (`--latency-ms`), short-lived (`--lifetime`), large (`--token-bytes`) or
throttled (`--rate-limit N`: at most N token calls in any one-second window; beyond that it answers
429 with `Retry-After` in whole seconds, rounded up, never less than 1).

`GET /stats` returns what it saw as JSON: counts, the `Retry-After` values it sent (value → how
many times), and one `[arrival, done, client_id, status]` row per token call, with times from `time.monotonic()` (CLOCK_MONOTONIC, comparable across processes on
this machine). The listening address is printed on stdout as `listening on HOST:PORT`.
"""

import argparse
import asyncio
import collections
import json
import math
import signal
import sys
import time
from urllib.parse import parse_qsl


def token_body(serial, token_bytes, lifetime):
    """The token JSON; `access_token` is `token_bytes` long and unique per `serial`."""
    head = "%016x" % serial
    access = (head + "x" * max(0, token_bytes - len(head)))[: max(token_bytes, len(head))]
    return (
        '{"access_token":"%s","token_type":"Bearer","expires_in":%d,"scope":"read"}'
        % (access, lifetime)
    ).encode()


class Provider:
    def __init__(self, args):
        self.args = args
        self.serial = 0
        self.window = collections.deque()  # arrival times of admitted calls in the last second
        self.calls = []  # [arrival, done, client_id, status]
        self.counts = collections.Counter()
        self.retry_after = collections.Counter()  # Retry-After value sent → times

    def admit(self, now):
        """None if the call may proceed, else the Retry-After to send (seconds)."""
        limit = self.args.rate_limit
        if limit <= 0:
            return None
        while self.window and self.window[0] <= now - 1.0:
            self.window.popleft()
        if len(self.window) < limit:
            self.window.append(now)
            return None
        return max(1, math.ceil(self.window[0] + 1.0 - now))

    def token_call(self, body):
        """Returns (status, headers, body, row) for one token POST."""
        now = time.monotonic()
        form = dict(parse_qsl(body.decode("latin-1"), keep_blank_values=True))
        client_id = form.get("client_id", "")
        row = [now, now, client_id, 200]
        self.calls.append(row)
        self.counts["calls"] += 1
        retry_after = self.admit(now)
        if retry_after is not None:
            self.counts["throttled"] += 1
            self.retry_after[retry_after] += 1
            row[3] = 429
            payload = b'{"error":"rate_limited","error_description":"slow down"}'
            return 429, [("Retry-After", str(retry_after))], payload, row
        self.serial += 1
        self.counts["ok"] += 1
        return 200, [], token_body(self.serial, self.args.token_bytes, self.args.lifetime), row

    def stats(self):
        return json.dumps({"counts": dict(self.counts),
                           "retry_after": {str(k): v for k, v in sorted(self.retry_after.items())},
                           "calls": self.calls}).encode()


REASONS = {200: "OK", 404: "Not Found", 429: "Too Many Requests"}


class Http(asyncio.Protocol):
    """Minimal HTTP/1.1 server side: keep-alive, Content-Length bodies, no pipelining tricks."""

    def __init__(self, provider):
        self.provider = provider
        self.buf = bytearray()
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
            try:
                method, path, _ = head[0].split(" ", 2)
            except ValueError:
                self.transport.close()
                return
            length, close = 0, False
            for line in head[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value.strip() or 0)
                elif name == "connection" and value.strip().lower() == "close":
                    close = True
            if len(self.buf) < end + 4 + length:
                return
            body = bytes(self.buf[end + 4 : end + 4 + length])
            del self.buf[: end + 4 + length]
            self.dispatch(method, path, body, close)

    def dispatch(self, method, path, body, close):
        if method == "GET" and path == "/stats":
            self.send(200, [("Content-Type", "application/json")], self.provider.stats(), close)
            return
        if method != "POST":
            self.send(404, [], b"not found\n", close)
            return
        status, headers, payload, row = self.provider.token_call(body)
        headers = [("Content-Type", "application/json"), ("Cache-Control", "no-store")] + headers
        delay = self.provider.args.latency_ms / 1000.0
        if delay > 0 and status == 200:
            asyncio.get_running_loop().call_later(
                delay, self.send, status, headers, payload, close, row
            )
        else:
            self.send(status, headers, payload, close, row)

    def send(self, status, headers, payload, close, row=None):
        if row is not None:
            row[1] = time.monotonic()
        if self.transport.is_closing():
            return
        lines = ["HTTP/1.1 %d %s" % (status, REASONS.get(status, "X"))]
        lines += ["%s: %s" % h for h in headers]
        lines.append("Content-Length: %d" % len(payload))
        if close:
            lines.append("Connection: close")
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
        if close:
            self.transport.close()


async def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--lifetime", type=int, default=3600, help="expires_in, seconds")
    parser.add_argument("--token-bytes", type=int, default=1024)
    parser.add_argument("--rate-limit", type=int, default=0, help="token calls per second, 0 = none")
    parser.add_argument("--max-seconds", type=float, default=1800, help="exit after this long")
    args = parser.parse_args()

    provider = Provider(args)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Http(provider), "127.0.0.1", args.port, backlog=4096, reuse_address=True
    )
    host, port = server.sockets[0].getsockname()[:2]
    print("listening on %s:%d" % (host, port), flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), args.max_seconds)
    except asyncio.TimeoutError:
        print("provider: --max-seconds reached, exiting", file=sys.stderr)
    server.close()


if __name__ == "__main__":
    asyncio.run(main())
