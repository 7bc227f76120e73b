"""The story, run once for the plots: the demo provider, first directly, then through the sidecar.

`token-sidecar demo --serve` (the release binary) runs the demo's throttling provider and a
sidecar in front of it with default settings, both on free loopback ports. The load is the bench
story's (bench/README.md, scenario 3): 100 clients sharing 5 credential sets (here 5 scopes of
the demo client: 5 cache keys), each asking for a token once a second (plus up to 50 ms of jitter)
for 30 s, on a keep-alive connection each; the provider allows 10 token calls per second and
issues 10-s tokens. Every answer's status is recorded with its time. During the sidecar leg the
admin `/metrics` is scraped once a second (from a few seconds before the load to a few seconds
after it) and parsed with prometheus_client's OpenMetrics parser.

Everything stays on 127.0.0.1; every loop is bounded in time; the demo process is stopped by its
pid (SIGTERM, then SIGKILL after 5 s) whatever happens. The result is one JSON document.
"""

import http.client
import json
import os
import random
import re
import signal
import subprocess
import threading
import time
import urllib.request

from prometheus_client.openmetrics.parser import text_string_to_metric_families

CLIENTS, KEYS, INTERVAL_S, JITTER_S = 100, 5, 1.0, 0.05
RATE, LIFETIME_S = 10, 10
LEAD_S, TAIL_S = 3.0, 6.0  # scraped idle time before and after the sidecar's load
SCRAPE_S = 1.0
TIMEOUT_S = 10.0


class Demo:
    """`token-sidecar demo --serve` on free ports; its addresses read from what it prints."""

    def __init__(self, binary, log_path):
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [binary, "demo", "--serve", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
             "--rate", str(RATE), "--lifetime", "%ds" % LIFETIME_S],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=dict(os.environ, RUST_LOG="info"))
        try:
            self.provider, self.sidecar, self.admin = self.addresses(log_path)
        except BaseException:
            self.stop()
            raise

    def addresses(self, log_path):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("the demo exited with %s; see %s" % (self.proc.returncode,
                                                                       log_path))
            with open(log_path) as f:
                text = f.read()
            provider = re.search(r"^demo provider: http://(\S+)", text, re.M)
            sidecar = re.search(r"^sidecar: +http://(\S+) \(admin http://([^)]+)\)", text, re.M)
            if provider and sidecar:
                return provider.group(1), sidecar.group(1), sidecar.group(2)
            time.sleep(0.05)
        raise RuntimeError("the demo did not print its addresses in 10 s; see %s" % log_path)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


def form(key):
    return ("grant_type=client_credentials&client_id=demo-app&client_secret=demo-secret"
            "&scope=story-%d" % key)


def client(address, key, start, ticks, answers):
    """One client: a token request at each tick on one keep-alive connection (a new one after a
    failure); appends (seconds since `start`, status or None for a failure) to `answers`."""
    host, port = address.rsplit(":", 1)
    body = form(key)
    conn = None
    for tick in range(ticks):
        due = start + tick * INTERVAL_S + random.uniform(0, JITTER_S)
        time.sleep(max(0.0, due - time.monotonic()))
        sent = time.monotonic() - start
        try:
            if conn is None:
                conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT_S)
            conn.request("POST", "/oauth/token", body,
                         {"Content-Type": "application/x-www-form-urlencoded"})
            response = conn.getresponse()
            response.read()
            answers.append((sent, response.status))
        except (OSError, http.client.HTTPException):
            answers.append((sent, None))
            conn.close()
            conn = None
    if conn is not None:
        conn.close()


def herd(address, seconds):
    """CLIENTS clients over KEYS keys for `seconds`; returns the answers, time-ordered."""
    answers = []  # list.append is atomic: the threads share it without a lock
    start = time.monotonic() + 0.2  # every thread is up before the first tick
    ticks = int(seconds / INTERVAL_S)
    threads = [threading.Thread(target=client, args=(address, i % KEYS, start, ticks, answers),
                                daemon=True) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 2 * TIMEOUT_S + 5)
        if thread.is_alive():
            raise RuntimeError("a client did not finish in time")
    if len(answers) != CLIENTS * ticks:
        raise RuntimeError("%d answers recorded, %d expected" % (len(answers), CLIENTS * ticks))
    return sorted(answers, key=lambda a: a[0]), start


def scrape(admin):
    """The admin `/metrics` samples: [(name, labels, value)]."""
    with urllib.request.urlopen("http://%s/metrics" % admin, timeout=2) as response:
        text = response.read().decode()
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text)
            for s in family.samples]


class Scraper(threading.Thread):
    """Scrapes every SCRAPE_S until stopped; each scrape's time is relative to `origin`."""

    def __init__(self, admin, origin):
        super().__init__(daemon=True)
        self.admin, self.origin = admin, origin
        self.scrapes, self.error = [], None
        self.done = threading.Event()

    def run(self):
        next_at = time.monotonic()
        try:
            for _ in range(3600):  # bounded: an hour of scrapes at most
                if self.done.is_set():
                    return
                t = time.monotonic()
                self.scrapes.append((t - self.origin, scrape(self.admin)))
                next_at += SCRAPE_S
                self.done.wait(max(0.0, next_at - time.monotonic()))
        except Exception as e:  # noqa: BLE001 - reported by stop()
            self.error = e

    def stop(self):
        self.done.set()
        self.join(10)
        if self.error is not None or self.is_alive():
            raise RuntimeError("scraping /metrics failed: %r" % (self.error,))
        return self.scrapes


def run(binary, out_dir, seconds):
    """The whole run; returns (and writes to out_dir/story-run.json) its JSON document."""
    os.makedirs(out_dir, exist_ok=True)
    demo = Demo(binary, os.path.join(out_dir, "story-demo.log"))
    scraper = None
    try:
        print("plots: the story directly against the demo provider (%d s)" % seconds, flush=True)
        direct, _ = herd(demo.provider, seconds)
        time.sleep(1.0)  # the provider's rate window is a whole second: start the next leg fresh
        origin = time.monotonic() + LEAD_S
        scraper = Scraper(demo.admin, origin)
        scraper.start()
        time.sleep(LEAD_S - 0.2)
        print("plots: the story through the sidecar (%d s), scraping /metrics" % seconds,
              flush=True)
        via, start = herd(demo.sidecar, seconds)
        # The herd's clock starts at its first tick: keep the scrapes on the same one.
        shift = start - origin
        time.sleep(TAIL_S)
        scrapes = [(t - shift, samples) for t, samples in scraper.stop()]
    finally:
        if scraper is not None:
            scraper.done.set()
        demo.stop()
    document = {
        "params": {"clients": CLIENTS, "keys": KEYS, "interval_s": INTERVAL_S,
                   "jitter_s": JITTER_S, "seconds": seconds, "rate": RATE,
                   "lifetime_s": LIFETIME_S, "scrape_s": SCRAPE_S, "lead_s": LEAD_S,
                   "tail_s": TAIL_S},
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "direct": direct,
        "via_sidecar": via,
        "scrapes": scrapes,
    }
    with open(os.path.join(out_dir, "story-run.json"), "w") as f:
        json.dump(document, f)
    return document
