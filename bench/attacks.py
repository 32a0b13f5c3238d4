"""Attacks a public deployment gets, each measured for what the server held (issue 11).

    python -m bench.attacks                   # every attack, on a demo server it starts on loopback (~5 min)
    python -m bench.attacks --quick           # the short run CI does (tests/test_attacks.py, under a minute)
    python -m bench.attacks --only idle,slowloris --json out.json
    python -m bench.attacks --url http://127.0.0.1:8080 --pid 1234   # a server of yours (loopback; some skipped)

While each attack runs, a prober asks for /health every 0.2 s and for a small chat (2 tokens) every
second. Printed per attack: the attack's own requests (sent, answered, by status), the probes'
statuses and latencies, the server's memory (RSS) before, at its peak and after, and whether the
server held: what "held" means is written beside each result. Exit status 1 when one did not hold.

The attacks: 1,000 idle connections; 100 slowloris connections (headers a byte a second); image URLs
whose server sends its headers a byte a second; a million one-letter messages and a 30 MB text;
megabytes of empty JSON objects, nested or flat; GIFs whose screen makes each tiny frame a huge picture;
1-bit 7000x7000 PNGs and truncated JPEGs declaring 7000x7000; client mistakes that used to be 500s;
`Expect: 100-continue` over the body limit; a browser's simple POSTs, a log line forged through the URL and a
request pipelined behind a stream; distinct 1000x1000 images for memory; clients that hang
up on long plain answers, a gateway before misbehaving upstreams, and SIGTERM while streams run and requests
wait (each on a server of its own).
"""

from __future__ import annotations

import argparse
import base64
import collections
import io
import json
import os
import resource
import selectors
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.load import Server, _is_loopback  # noqa: E402  (the server under test: started here or at a URL)
from bench.loopback import LoopbackServer  # noqa: E402
from bench.process import ServerProcess  # noqa: E402

CHAT = "/v1/chat/completions"
SMALL = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
LONG = {"messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 4000, "temperature": 1.0,
        "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0, "seed": 2}  # the demo model's long answer
HEALTH_TARGET = 2.0  # seconds: /health (and a small chat) must be answered within this during an attack

# the server this tool starts, and the sizes of each attack: full run / --quick
SERVER = dict(max_queue=16, threads=24, idle_timeout=5, header_timeout=3, body_timeout=10, image_fetch_timeout=3,
              request_timeout=60, max_tokens_limit=64, image_decode_mb=512, shutdown_grace=2)
SIZES = {
    "full": dict(idle=1000, idle_seconds=20, slowloris=100, slowloris_seconds=60, slow_images=16,
                 messages=1_000_000, messages_clients=4, bombs=4, memory_images=300, json_mb=6, json_clients=2,
                 video_bombs=4, hangups=16),
    "quick": dict(idle=300, idle_seconds=3, slowloris=40, slowloris_seconds=5, slow_images=8,
                  messages=1_000_000, messages_clients=2, bombs=2, memory_images=4, json_mb=3, json_clients=1,
                  video_bombs=1, hangups=4),
}
ATTACKS = ("idle", "slowloris", "slow_image", "costly", "json_shapes", "bombs", "video_bombs", "mistakes", "expect",
           "web", "memory", "hangups", "gateway", "shutdown")


# ---------------------------------------------------------------- what one attack reports

@dataclass
class Result:
    name: str
    what: str
    seconds: float = 0.0
    sent: int = 0
    by_status: collections.Counter = field(default_factory=collections.Counter)
    health: list = field(default_factory=list)  # (latency s, status or error name)
    chat: list = field(default_factory=list)
    rss: dict = field(default_factory=dict)  # before, peak, after (MB)
    checks: list = field(default_factory=list)  # (passed, text)
    figures: dict = field(default_factory=dict)

    def check(self, passed: bool, text: str) -> None:
        self.checks.append((bool(passed), text))

    @property
    def held(self) -> bool:
        return all(passed for passed, _ in self.checks)

    def as_dict(self) -> dict:
        return {"name": self.name, "what": self.what, "seconds": round(self.seconds, 2), "sent": self.sent,
                "answered": sum(v for k, v in self.by_status.items() if isinstance(k, int)),
                "by_status": {str(k): v for k, v in sorted(self.by_status.items(), key=str)},
                "health": _latencies(self.health), "chat": _latencies(self.chat), "rss_mb": self.rss,
                "checks": [{"passed": p, "text": t} for p, t in self.checks], "held": self.held,
                "figures": self.figures}

    def print(self) -> None:
        d = self.as_dict()
        print(f"\n== {self.name}: {self.what}  ({d['seconds']} s)")
        statuses = ", ".join(f"{k}: {v}" for k, v in d["by_status"].items()) or "-"
        print(f"   attack requests: {self.sent} sent, {d['answered']} answered; by status: {statuses}")
        for label, lat in (("/health", d["health"]), ("small chat", d["chat"])):
            if lat["n"]:
                print(f"   {label:10s} during it: {lat['n']} asked, statuses {lat['statuses']}, latency p50 "
                      f"{lat['p50']:.3f} s, max {lat['max']:.3f} s")
        if self.rss:
            print("   RSS: " + ", ".join(f"{k} {v:.0f} MB" for k, v in self.rss.items()))
        for key, value in self.figures.items():
            print(f"   {key}: {value}")
        for passed, text in self.checks:
            print(f"   [{'held' if passed else 'NOT HELD'}] {text}")


def _latencies(samples) -> dict:
    times = sorted(t for t, _ in samples)
    statuses = collections.Counter(str(s) for _, s in samples)
    if not times:
        return {"n": 0, "statuses": {}, "p50": None, "max": None}
    return {"n": len(times), "statuses": dict(statuses), "p50": statistics.median(times), "max": times[-1]}


# ---------------------------------------------------------------- probing while an attack runs

class Prober:
    """/health every 0.2 s and a small chat every second, from threads of their own; the server's RSS."""

    def __init__(self, server: Server, chat_body=SMALL):
        self.server, self.chat_body = server, chat_body
        self.health, self.chat, self.rss_peak = [], [], 0.0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(self._health, 0.2), daemon=True),
                         threading.Thread(target=self._loop, args=(self._chat, 1.0), daemon=True)]

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def _loop(self, fn, every):
        while not self._stop.is_set():
            started = time.monotonic()
            fn()
            try:
                self.rss_peak = max(self.rss_peak, self.server.rss_mb() or 0)
            except Exception:  # noqa: BLE001  (the process may be gone: the shutdown attack)
                pass
            self._stop.wait(max(0.0, every - (time.monotonic() - started)))

    def _health(self):
        self.health.append(_timed(lambda: requests.get(self.server.url + "/health", timeout=15)))

    def _chat(self):
        self.chat.append(_timed(lambda: requests.post(self.server.url + CHAT, json=self.chat_body,
                                                      headers=self.server.headers, timeout=30)))


def _timed(call):
    started = time.monotonic()
    try:
        status = call().status_code
    except requests.RequestException as exc:
        status = type(exc).__name__
        _failures.append(f"{status}: {str(exc)[:160]}")
    return time.monotonic() - started, status


_failures: list = []  # what the failed probes said, printed at the end


def measured(server, result: Result, attack):
    """Run `attack()` under the prober; fill the result's probes, time and RSS."""
    result.rss["before"] = server.rss_mb() or 0
    started = time.monotonic()
    with Prober(server) as prober:
        attack()
    result.seconds = time.monotonic() - started
    result.health, result.chat = prober.health, prober.chat
    time.sleep(1.0)
    result.rss["peak"] = max(prober.rss_peak, result.rss["before"])
    result.rss["after"] = server.rss_mb() or 0
    slow = [t for t, s in prober.health if s != 200 or t > HEALTH_TARGET]
    result.check(not slow, f"/health answered 200 within {HEALTH_TARGET:g} s every time ({len(prober.health)} asked; "
                           f"{len(slow)} slower or failed)")
    return prober


def post_all(server, bodies, result: Result, timeout=60):
    """Send every body (a dict as JSON, bytes as they are) at once, a thread each; count statuses;
    return [(status, json or text, seconds)] in the bodies' order."""
    out = [None] * len(bodies)

    def send(k, body):
        started = time.monotonic()
        try:
            kwargs = {"data": body, "headers": {**server.headers, "Content-Type": "application/json"}} \
                if isinstance(body, bytes) else {"json": body, "headers": server.headers}
            r = requests.post(server.url + CHAT, timeout=timeout, **kwargs)
            try:
                payload = r.json()
            except ValueError:
                payload = r.text[:300]
            out[k] = (r.status_code, payload, time.monotonic() - started)
        except requests.RequestException as exc:
            out[k] = (type(exc).__name__, None, time.monotonic() - started)

    threads = [threading.Thread(target=send, args=(k, b), daemon=True) for k, b in enumerate(bodies)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 30)
    result.sent += len(bodies)
    for status, _, _ in out:
        result.by_status[status] += 1
    return out


def _code(payload):
    return payload.get("error", {}).get("code") if isinstance(payload, dict) else None


# ---------------------------------------------------------------- the attacks

def attack_idle(server, size, config) -> Result:
    n, hold = size["idle"], size["idle_seconds"]
    idle = config.get("idle_timeout")
    r = Result("idle", f"{n} TCP connections that send nothing, held open up to {hold} s or until the server "
                       "closes them")
    socks, lifetimes = [], []

    def attack():
        for _ in range(n):
            s = socket.create_connection(_addr(server), timeout=10)
            s.setblocking(False)
            socks.append((s, time.monotonic()))
        lifetimes.extend(_closed_by_server(socks, max(hold, (idle or 0) + 5)))

    measured(server, r, attack)
    if lifetimes:
        r.figures["closed by the server after"] = (f"{len(lifetimes)} of {n}: median {statistics.median(lifetimes):.1f}"
                                                   f" s, last {max(lifetimes):.1f} s after opening")
    if idle:
        r.check(len(lifetimes) == n and max(lifetimes) <= idle + 2.5,
                f"every idle connection closed by the server within IDLE_TIMEOUT ({idle:g} s) + 2.5 s")
    _chat_check(r)
    return r


def attack_slowloris(server, size, config) -> Result:
    n, duration = size["slowloris"], size["slowloris_seconds"]
    r = Result("slowloris", f"{n} connections sending their headers a byte a second for {duration} s "
                            "(reopened when closed)")
    lifetimes, opened = [], [0]

    def attack():
        sel = selectors.DefaultSelector()
        conns = {}

        def open_one():
            s = socket.create_connection(_addr(server), timeout=10)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
            s.setblocking(False)
            conns[s] = time.monotonic()
            sel.register(s, selectors.EVENT_READ)
            opened[0] += 1

        for _ in range(n):
            open_one()
        end = time.monotonic() + duration
        while time.monotonic() < end:
            for s in list(conns):
                try:
                    s.send(b"X")  # one more byte of a header line that never ends
                except OSError:
                    pass
            tick = time.monotonic() + 1.0
            while time.monotonic() < tick:
                for key, _ in sel.select(timeout=max(0.0, tick - time.monotonic())):
                    s = key.fileobj
                    try:
                        data = s.recv(4096)
                    except OSError:
                        data = b""
                    if not data:
                        lifetimes.append(time.monotonic() - conns.pop(s))
                        sel.unregister(s)
                        s.close()
                        if time.monotonic() < end:
                            open_one()
        for s in conns:
            s.close()

    measured(server, r, attack)
    header = config.get("header_timeout")
    r.figures["connections opened"] = opened[0]
    if lifetimes:
        r.figures["closed by the server after"] = (f"median {statistics.median(lifetimes):.1f} s, longest "
                                                   f"{max(lifetimes):.1f} s ({len(lifetimes)} closed)")
    if header:
        r.check(lifetimes and max(lifetimes) <= header + 2.5,
                f"every trickling connection cut off within HEADER_TIMEOUT ({header:g} s) + 2.5 s")
    _chat_check(r)
    return r


def attack_slow_image(server, size, config) -> Result:
    n = size["slow_images"]
    fetch = config.get("image_fetch_timeout", 10)
    r = Result("slow_image", f"{n} requests at once whose image URL's server sends its headers a byte a second")
    host = SlowHeaders()
    try:
        bodies = [{"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"{host.url}/cat{k}.png"}}, {"type": "text", "text": "?"}]}],
            "max_tokens": 2} for k in range(n)]
        out = []
        measured(server, r, lambda: out.extend(post_all(server, bodies, r, timeout=120)))
    finally:
        host.stop()
    times = [t for _, _, t in out]
    r.figures["each request answered after"] = f"median {statistics.median(times):.1f} s, longest {max(times):.1f} s"
    codes = collections.Counter(_code(p) for _, p, _ in out)
    r.figures["error codes"] = dict(codes)
    r.check(all((s, _code(p)) in ((400, "image_fetch_failed"), (429, "queue_full")) for s, p, _ in out),
            "each answered 400 image_fetch_failed (or 429 queue_full: MAX_QUEUE requests were in already)")
    r.check(max(times) <= fetch + 2, f"each within IMAGE_FETCH_TIMEOUT ({fetch:g} s) + 2 s, headers phase included")
    return r


def attack_costly(server, size, config) -> Result:
    n, clients = size["messages"], size["messages_clients"]
    r = Result("costly", f"{clients} requests of {n:,} one-letter messages (~{n * 31 / 1e6:.0f} MB each) and one of a "
                         "30 MB text, at once")
    many = json.dumps({"messages": [{"role": "user", "content": "a"}] * n, "max_tokens": 2},
                      separators=(",", ":")).encode()  # 30 bytes a message: under MAX_REQUEST_BYTES
    text = json.dumps({"messages": [{"role": "user", "content": "a" * 30_000_000}], "max_tokens": 2}).encode()
    out = []
    measured(server, r, lambda: out.extend(post_all(server, [many] * clients + [text], r)))
    r.figures["answers"] = [f"{s} {_code(p)} in {t:.2f} s" for s, p, t in out]
    r.check(all(s in (400, 413) for s, _, _ in out), "each refused with a 4xx naming the limit")
    r.check(max(t for _, _, t in out) < 5, "each refused within 5 s (before parsing, validating or tokenizing)")
    growth, bound = r.rss["peak"] - r.rss["before"], 120 * (clients + 1)
    r.check(growth < bound, f"RSS grew {growth:.0f} MB at its peak (less than {bound} MB: 120 MB a request, its "
                            "30 MB body buffered and read once)")
    _chat_check(r)
    return r


def attack_json_shapes(server, size, config) -> Result:
    mb, clients = size["json_mb"], size["json_clients"]
    r = Result("json_shapes", f"{clients} x {mb} MB of empty objects nested 900 deep and {clients} x {mb} MB of them "
                              "flat, in a field the server ignores, at once")
    count = mb * 2**20 // 3
    head = b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "x": '
    nested = head + b"[" * 900 + b",".join([b"{}"] * count) + b"]" * 900 + b"}"
    flat = head + b"[" + b",".join([b"{}"] * count) + b"]}"
    out = []
    measured(server, r, lambda: out.extend(post_all(server, [nested] * clients + [flat] * clients, r)))
    r.figures["answers"] = [f"{s} {_code(p)} in {t:.2f} s" for s, p, t in out]
    r.check(all(s == 400 and _code(p) in ("json_too_deep", "json_too_complex") for s, p, _ in out),
            "each refused 400 json_too_deep / json_too_complex")
    r.check(max(t for _, _, t in out) < 5, "each refused within 5 s (before the JSON is built)")
    growth, bound = r.rss["peak"] - r.rss["before"], 3 * 2 * clients * mb + 64
    r.check(growth < bound, f"RSS grew {growth:.0f} MB at its peak (less than {bound} MB: 3x the bodies + 64 MB; "
                            "3 MB of the nested kind used to take 2.7 GB)")
    _chat_check(r)
    return r


def attack_bombs(server, size, config) -> Result:
    k = size["bombs"]
    r = Result("bombs", f"{k} 1-bit 7000x7000 PNGs and {k} truncated JPEGs declaring 7000x7000, at once "
                        "(max_pixels 12544: what memory decoding takes, not the vision tower)")
    png, jpeg = _one_bit_png(7000), _truncated_jpeg(7000)
    bodies = [_image_body(png, max_pixels=12544)] * k + [_image_body(jpeg, max_pixels=12544)] * k
    out = []
    measured(server, r, lambda: out.extend(post_all(server, bodies, r, timeout=120)))
    r.figures["sizes"] = f"PNG {len(png):,} bytes, JPEG {len(jpeg):,} bytes"
    r.figures["answers"] = [f"{s} {_code(p) or ''} in {t:.2f} s" for s, p, t in out]
    r.check(all(s == 200 for s, _, _ in out[:k]), "the 1-bit PNGs are answered (decoded small)")
    r.check(all(s == 400 and _code(p) == "invalid_image" for s, p, _ in out[k:]),
            "the truncated JPEGs are refused 400 invalid_image")
    growth = r.rss["peak"] - r.rss["before"]
    r.check(growth < 400, f"RSS grew {growth:.0f} MB at its peak (less than 400 MB for {k} decoded at once)")
    return r


def attack_video_bombs(server, size, config) -> Result:
    k = size["video_bombs"]
    r = Result("video_bombs", f"{k} GIFs with a 7000x7000 screen and 200 1x1 frames and {k} with a 5000x5000 screen "
                              "and 400, sent as videos, at once")
    huge, costly = _gif_bomb(7000, 200), _gif_bomb(5000, 400)
    bodies = [_video_body(huge)] * k + [_video_body(costly)] * k
    out, cpu = [], {"before": _cpu_seconds(server)}
    measured(server, r, lambda: out.extend(post_all(server, bodies, r, timeout=120)))
    cpu["after"] = _cpu_seconds(server)
    r.figures["sizes"] = f"{len(huge):,} and {len(costly):,} bytes"
    r.figures["answers"] = [f"{s} {_code(p)} in {t:.2f} s" for s, p, t in out]
    if cpu["before"] is not None and cpu["after"] is not None:
        spent = cpu["after"] - cpu["before"]
        r.figures["server CPU seconds during the attack"] = f"{spent:.1f}"
        r.check(spent < 3 + k, f"the server spent {spent:.1f} CPU seconds (less than {3 + k}: nothing decoded; each "
                               "used to decode until its deadline)")
    r.check(all(s == 400 and _code(p) in ("video_too_many_pixels", "video_too_costly") for s, p, _ in out),
            "each refused 400 video_too_many_pixels / video_too_costly")
    r.check(max(t for _, _, t in out) < 5, "each refused within 5 s (before decoding)")
    _chat_check(r)
    return r


MISTAKES = [
    # (name, body or raw bytes, status, code, words the message must hold)
    ("seed 2^64", {**SMALL, "seed": 2**64}, 400, "invalid_value", "seed"),
    ("seed 10^100", {**SMALL, "seed": 10**100}, 400, "invalid_value", "seed"),
    ("seed -1 (a valid int64)", {**SMALL, "seed": -1, "temperature": 1.0}, 200, None, None),
    ("top_k 2^63", {**SMALL, "top_k": 2**63}, 400, "invalid_value", "top_k"),
    ("lone surrogate", b'{"messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 2}', 400,
     "invalid_value", "surrogate"),
    ("lone surrogate, streamed", b'{"messages": [{"role": "user", "content": "a\\udfffb"}], "max_tokens": 2, '
                                 b'"stream": true}', 400, "invalid_value", "surrogate"),
    ("surrogate pair (valid)", b'{"messages": [{"role": "user", "content": "a\\ud83d\\ude00"}], "max_tokens": 2}', 200,
     None, None),
    ("5 stop strings", {**SMALL, "stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_value", "at most 4"),
    ("upper-case DATA: URL", "DATA_URL", 200, None, None),
    ("damaged base64 JPEG", "BAD_JPEG", 400, "invalid_image", "base64"),
    ("image declaring 400 MP", "HUGE_HEADER", 400, "image_too_many_pixels", "MAX_IMAGE_PIXELS"),
    ("max_pixels 3136 on a 199:1 image", "THIN", 400, "invalid_image_size", "max_pixels"),
    ("max_pixels 50000 on a 166:1 image", "THIN166", 400, "invalid_image_size", "max_pixels"),
    ("repetition_penalty 1e309", b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, '
                                 b'"repetition_penalty": 1e309}', 400, "invalid_value", "finite"),
    ("tool_calls on a user message", {"messages": [{"role": "user", "content": "Hi", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}], "max_tokens": 2}, 400,
     "invalid_value", "only assistant messages"),
    ("a DDS image", "DDS", 400, "invalid_image", "JPEG, PNG"),
    ("an SVG sent as a video", "SVG_VIDEO", 400, "invalid_video", "no decoder"),
    ("a frame list at fps 5e-324", "TINY_FPS", 400, "video_too_long", "limit"),
]


def attack_mistakes(server, size, config) -> Result:
    r = Result("mistakes", f"{len(MISTAKES)} client mistakes that used to be 500s or unclear answers")
    bodies = [_mistake_body(body) for _, body, *_ in MISTAKES]
    out = []
    measured(server, r, lambda: out.extend(post_all(server, bodies, r)))
    for (name, _, status, code, words), (got, payload, _) in zip(MISTAKES, out):
        message = payload.get("error", {}).get("message", "") if isinstance(payload, dict) else ""
        ok = got == status and _code(payload) == code and (words is None or words in message)
        r.check(ok, f"{name}: {got} {_code(payload) or ''} {message[:110]}")
    r.check(not any(isinstance(s, int) and s >= 500 for s in r.by_status), "no 5xx")
    return r


def attack_expect(server, size, config) -> Result:
    r = Result("expect", "Expect: 100-continue with a Content-Length over MAX_REQUEST_BYTES")
    answer = {}

    def attack():
        started = time.monotonic()
        with socket.create_connection(_addr(server), timeout=10) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Expect: 100-continue\r\nContent-Length: 999999999\r\n\r\n")
            s.settimeout(10)
            try:
                answer["head"] = s.recv(4096).split(b"\r\n", 1)[0].decode(errors="replace")
            except OSError as exc:
                answer["head"] = type(exc).__name__
        answer["seconds"] = time.monotonic() - started
        r.sent += 1
        r.by_status[answer["head"].split(" ")[1] if answer["head"].startswith("HTTP/") else answer["head"]] += 1

    measured(server, r, attack)
    r.figures["answer"] = f"{answer['head']!r} after {answer['seconds']:.2f} s"
    r.check(" 413 " in answer["head"] + " " and answer["seconds"] < 3, "413 at once, without waiting for the body")
    return r


FORGED = "request 0 POST /v1/chat/completions status=200 latency=0.001s"  # a log line in the server's format


def attack_web(server, size, config) -> Result:
    """What a web page or a crafted URL can do: a browser's simple POST (text/plain, a form: no CORS preflight),
    a forged log line through %0a in the path, and a request pipelined behind a stream."""
    r = Result("web", "a browser's text/plain and form POSTs, a log line forged with %0a in the URL path, a request "
                      "pipelined behind a stream")
    out = {}

    def attack():
        body = json.dumps(SMALL)
        for kind in ("text/plain;charset=UTF-8", "application/x-www-form-urlencoded"):
            resp = requests.post(server.url + CHAT, data=body, headers={**server.headers, "Content-Type": kind},
                                 timeout=30)
            out[kind] = (resp.status_code, _code(resp.json()))
            r.by_status[resp.status_code] += 1
        resp = requests.get(server.url + "/x%0a" + FORGED.replace(" ", "%20"), timeout=30)
        out["forged"] = (resp.status_code, resp.json()["error"]["message"])
        r.by_status[resp.status_code] += 1
        out["pipelined"] = _pipelined(server)
        r.sent += 4

    measured(server, r, attack)
    for kind in ("text/plain;charset=UTF-8", "application/x-www-form-urlencoded"):
        r.check(out[kind] == (415, "unsupported_media_type"), f"a {kind.split(';')[0]} POST: {out[kind][0]} "
                                                               f"{out[kind][1]} (a browser sends it with no preflight)")
    status, message = out["forged"]
    r.check(status == 404 and "\n" not in message and "\\x0a" in message,
            f"a path with %0a: {status}, the newline escaped in the answer ({message[:60]}...)")
    log_path = getattr(server, "log_path", None)
    if log_path:
        forged_lines = [line for line in Path(log_path).read_text(errors="replace").splitlines()
                        if line.startswith(FORGED)]
        r.check(not forged_lines, f"no forged line in the server's log ({len(forged_lines)} found)")
    statuses, closed = out["pipelined"]
    r.figures["pipelined"] = f"statuses {statuses}, connection {'closed' if closed else 'kept open'}"
    r.check(statuses == [200, 200], "a request pipelined behind a stream is answered on the same connection")
    return r


def _pipelined(server) -> tuple:
    """A stream and a plain request sent back to back on one connection: (the statuses read, closed early?)."""
    def request(body):
        payload = json.dumps(body).encode()
        return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + b"".join(f"{k}: {v}\r\n".encode() for k, v in server.headers.items())
                + b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)

    data, closed = b"", False
    with socket.create_connection(_addr(server), timeout=10) as sock:
        sock.sendall(request(dict(SMALL, stream=True)) + request(SMALL))
        sock.settimeout(0.5)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (data.count(b"HTTP/1.1 ") >= 2 and data.rstrip().endswith(b"}")):
            try:
                block = sock.recv(65536)
            except socket.timeout:
                continue
            if not block:
                closed = True
                break
            data += block
    statuses = [int(part.split(b" ", 1)[0]) for part in data.split(b"HTTP/1.1 ")[1:] if part[:3].isdigit()]
    return statuses, closed


def attack_memory(server, size, config) -> Result:
    n = size["memory_images"]
    r = Result("memory", f"{n} requests with distinct 1000x1000 images (4 at a time): where RSS goes")
    caches = {}

    def attack():
        caches["before"] = _cache_mb(server)
        import numpy as np

        rng = np.random.default_rng(0)
        for start in range(0, n, 4):
            bodies = [_image_body(_noise_jpeg(rng), max_tokens=1) for _ in range(min(4, n - start))]
            post_all(server, bodies, r, timeout=120)
        caches["after"] = _cache_mb(server)

    measured(server, r, attack)
    growth = r.rss["after"] - r.rss["before"]
    r.figures["RSS growth"] = f"{growth:.0f} MB, of which image caches {caches['after'] - caches['before']:.0f} MB " \
                              f"(IMAGE_CACHE_MB bounds them)"
    apart = growth - (caches["after"] - caches["before"])
    r.figures["RSS growth apart from the caches"] = f"{apart:.0f} MB"
    r.check(r.by_status.get(200, 0) == n, "every request answered 200")
    r.check(apart < 256, f"RSS grew {apart:.0f} MB apart from the image caches (less than 256 MB; it was ~1,450 MB "
                         "after 120 images before serving.engines.builtin.memory)")
    return r


def attack_hangups(size, log_dir: Path) -> Result:
    """MAX_QUEUE clients ask for long plain (not streamed) answers and hang up after 50 ms (a server of its own,
    whose MAX_QUEUE is that many and max_tokens may be long)."""
    n = size["hangups"]
    r = Result("hangups", f"{n} clients (MAX_QUEUE {n}) ask for 4,000-token plain answers and hang up after 50 ms")
    server = spawn(log_dir, {"max_queue": n, "max_tokens_limit": 4096}, name="attack-hangups")
    try:
        payload = json.dumps(LONG).encode()
        request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
        r.rss["before"] = server.rss_mb()
        socks = [socket.create_connection(_addr(server), timeout=10) for _ in range(n)]
        for s in socks:
            s.sendall(request)
        time.sleep(0.05)
        for s in socks:
            s.close()
        r.sent = n
        hung_up = time.monotonic()
        held = [server.metric("qwenvl_requests_in_flight")]
        while held[-1] and time.monotonic() - hung_up < 60:
            time.sleep(0.1)
            held.append(server.metric("qwenvl_requests_in_flight"))
        freed = time.monotonic() - hung_up
        out = post_all(server, [SMALL] * n, Result("probe", ""), timeout=30)  # every place taken again at once
        r.rss["after"] = server.rss_mb()
    finally:
        server.stop()
    r.figures["places held after the hang-ups"] = f"{held[0]:.0f} of {n}, all free after {freed:.1f} s"
    r.figures["then"] = f"{n} small chats at once: " + ", ".join(f"{s}" for s, _, _ in out)
    r.check(freed < 3, f"every place free within 3 s of the hang-up ({freed:.1f} s; it used to be held for the whole "
                       "answer: 214-240 s)")
    r.check(all(s == 200 for s, _, _ in out), f"then {n} small chats at once all answered 200 (no 429)")
    return r


def attack_gateway(size, log_dir: Path) -> Result:
    """A gateway (--backend openai, a process of its own) in front of two misbehaving upstreams run here on
    loopback: one trickles its /v1/models a byte every 0.5 s; the other answers chats as the question asks
    ("hang": nothing at all; "nan": a NaN logprob; "comments": SSE comments for 30 s after [DONE]; else "ok")."""
    r = Result("gateway", "a gateway before an upstream trickling its health answer and one that hangs, sends NaN "
                          "logprobs, or keeps sending comments after [DONE]")
    good, slow = FakeUpstream(), FakeUpstream(trickle_models=True)
    server, started = None, time.monotonic()
    try:
        server = spawn(log_dir, {"backend": "openai", "upstream": f"{good.url},{slow.url}",
                                 "upstream_health_interval": 0.5, "request_timeout": 30}, name="attack-gateway")
        r.rss["before"] = server.rss_mb()
        hits = good.model_checks
        time.sleep(4)
        checks = good.model_checks - hits
        r.figures["health checks of the sound upstream in 4 s"] = checks
        r.check(checks >= 4, f"the sound upstream was checked {checks} times in 4 s (every 0.5 s) while the other "
                             "trickled its answer (the checks used to wait for the slowest)")

        def ask(text, **extra):
            body = {"messages": [{"role": "user", "content": text}], "max_tokens": 2, **extra}
            return requests.post(server.url + CHAT, json=body, timeout=60)

        payload = json.dumps({"messages": [{"role": "user", "content": "hang"}], "max_tokens": 2}).encode()
        with socket.create_connection(_addr(server), timeout=10) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
            good.arrived.wait(10)
            time.sleep(0.3)
        left = time.monotonic()
        shut = good.hang_closed.wait(10)
        r.sent += 1
        r.figures["upstream connection closed after the client left"] = \
            f"{time.monotonic() - left:.1f} s" if shut else "not within 10 s"
        r.check(shut and time.monotonic() - left < 2, "a client gone before the upstream's first byte: the upstream "
                                                      "connection is shut within 2 s (it was REQUEST_TIMEOUT)")
        nan = ask("nan", logprobs=True)
        r.sent += 1
        r.by_status[nan.status_code] += 1
        r.check(nan.status_code == 502 and b"NaN" not in nan.content and _code(nan.json()) == "upstream_bad_response",
                f"a NaN logprob upstream: {nan.status_code} {_code(nan.json())}, no bare NaN written")
        threads = _threads(server)
        answers = post_all(server, [{"messages": [{"role": "user", "content": "comments"}], "max_tokens": 2}] * 8,
                           r, timeout=60)
        done = time.monotonic()
        while (server.metric("qwenvl_upstream_in_flight") or 0) > 0 and time.monotonic() - done < 30:
            time.sleep(0.1)
        drained = time.monotonic() - done
        r.figures["in-flight upstream calls back to 0 after"] = f"{drained:.1f} s (threads {threads} before, " \
                                                                 f"{_threads(server)} after)"
        r.check(all(s == 200 for s, _, _ in answers) and drained < 2 + 2,
                f"8 answers whose upstream sends comments after [DONE]: 200, and let go of {drained:.1f} s later "
                "(at most 2 s of draining; they used to be held 30 s and more)")
        r.rss["after"] = server.rss_mb()
        r.seconds = time.monotonic() - started
    finally:
        if server is not None:
            server.stop()
        good.stop()
        slow.stop()
    return r


class FakeUpstream(LoopbackServer):
    """An OpenAI-compatible upstream on 127.0.0.1 that misbehaves on purpose (see attack_gateway)."""

    def __init__(self, trickle_models=False):
        import http.server

        fake = self
        self.model_checks = 0
        self.arrived, self.hang_closed = threading.Event(), threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                fake.model_checks += 1
                if trickle_models:
                    self._trickle()
                    return
                self._send(200, json.dumps({"object": "list", "data": [{"id": "fake", "object": "model"}]}).encode())

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                text = body["messages"][-1]["content"]
                text = text if isinstance(text, str) else " ".join(p.get("text", "") for p in text)
                if text == "hang":
                    fake.arrived.set()
                    self.connection.settimeout(30)
                    try:
                        while self.connection.recv(1024):
                            pass
                    except OSError:
                        pass
                    fake.hang_closed.set()
                    self.close_connection = True
                    return
                logprobs = {"content": [{"token": "a", "logprob": float("nan"), "bytes": [97], "top_logprobs": []}]}
                events = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": "a"},
                                        "logprobs": logprobs if text == "nan" else None, "finish_reason": None}]},
                          {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}]
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    for data in [b"data: " + json.dumps(e).encode() + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]:
                        self._chunk(data)
                    if text == "comments":
                        for _ in range(60):
                            self._chunk(b": ping\n\n")
                            time.sleep(0.5)
                    self.wfile.write(b"0\r\n\r\n")
                except OSError:
                    self.close_connection = True

            def _chunk(self, data):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

            def _send(self, status, data):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _trickle(self):
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                try:
                    for _ in range(120):
                        self.wfile.write(b" ")
                        self.wfile.flush()
                        time.sleep(0.5)
                except OSError:
                    pass
                self.close_connection = True

            def log_message(self, *args):
                pass

        super().__init__(Handler)


def _threads(server):
    try:
        import psutil

        return psutil.Process(server.pid).num_threads()
    except Exception:  # noqa: BLE001  (no psutil, or the process is gone)
        return None


def attack_shutdown(size, log_dir: Path) -> Result:
    """SIGTERM on a server of its own while 2 streams run and 2 requests wait; grace 1 s."""
    r = Result("shutdown", "SIGTERM while 2 long streams run and 2 more requests wait (MAX_BATCH_SIZE 2, "
                           "SHUTDOWN_GRACE 1 s)")
    server = spawn(log_dir, {"shutdown_grace": 1, "max_batch_size": 2, "max_tokens_limit": 4096}, name="attack-shutdown")
    out, threads = {}, []
    try:
        r.rss["before"] = server.rss_mb()

        def stream(k):
            with requests.post(server.url + CHAT, json=dict(LONG, stream=True), stream=True, timeout=60) as resp:
                out[f"stream{k}"] = (resp.status_code, [x[6:] for x in resp.iter_lines() if x.startswith(b"data: ")])

        def plain(k):
            resp = requests.post(server.url + CHAT, json=LONG, timeout=60)
            out[f"waiting{k}"] = (resp.status_code, resp.json())

        for k in range(2):
            threads.append(threading.Thread(target=stream, args=(k,), daemon=True))
            threads[-1].start()
        time.sleep(0.5)
        for k in range(2):
            threads.append(threading.Thread(target=plain, args=(k,), daemon=True))
            threads[-1].start()
        time.sleep(0.5)
        started = time.monotonic()
        server.proc.process.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        code = server.proc.process.wait(60)
        r.seconds = time.monotonic() - started
    finally:
        server.stop()
    r.sent = 4
    for key, (status, payload) in sorted(out.items()):
        r.by_status[status] += 1
        if key.startswith("stream"):
            last = payload[-2] if len(payload) > 1 else b""
            ended = "error" in last.decode() and payload[-1] == b"[DONE]"
            finished = payload and payload[-1] == b"[DONE]" and b'"finish_reason": "' in last
            r.figures[key] = "ended with an error event and [DONE]" if ended else \
                "finished within the grace period" if finished else f"cut: {payload[-1:]}"
            r.check(ended or finished, f"{key}: ends with [DONE] (finished, or an error event first)")
        else:
            r.figures[key] = f"{status} {_code(payload)}"
            r.check(status == 503 and _code(payload) == "shutting_down", f"{key}: 503 shutting_down")
    r.figures["exit status"] = code
    r.check(code == 0, f"the process exited 0 ({code}) {r.seconds:.1f} s after SIGTERM")
    r.check(r.seconds < 1 + 10, "within the grace period + 10 s")
    return r


# ---------------------------------------------------------------- helpers

class SlowHeaders:
    """An HTTP server on 127.0.0.1 that sends its response headers a byte a second."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self._stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn):
        with conn:
            try:
                conn.recv(4096)
                for byte in b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nX-Padding: " + b"x" * 600:
                    if self._stop.is_set():
                        return
                    conn.send(bytes([byte]))
                    time.sleep(1.0)
            except OSError:
                return

    def stop(self):
        self._stop.set()
        self.sock.close()


def _addr(server):
    from urllib.parse import urlsplit

    parts = urlsplit(server.url)
    return parts.hostname, parts.port


def _closed_by_server(socks, wait_until: float) -> list:
    """Watch the sockets (at most `wait_until` s from the first opened) for the server closing them; how long
    after its opening each closed one lasted. Closes them all at the end."""
    sel = selectors.DefaultSelector()
    for s, opened in socks:
        sel.register(s, selectors.EVENT_READ, opened)
    lifetimes = []
    first = min((o for _, o in socks), default=time.monotonic())
    while len(lifetimes) < len(socks) and time.monotonic() < first + wait_until:
        for key, _ in sel.select(timeout=0.5):
            try:
                data = key.fileobj.recv(1024)
            except OSError:
                data = b""
            if not data:
                lifetimes.append(time.monotonic() - key.data)
                sel.unregister(key.fileobj)
    for s, _ in socks:
        s.close()
    return lifetimes


def _chat_check(r: Result) -> None:
    slow = [t for t, s in r.chat if s != 200 or t > HEALTH_TARGET]
    r.check(not slow, f"a small chat answered 200 within {HEALTH_TARGET:g} s every time ({len(r.chat)} asked; "
                      f"{len(slow)} slower or failed)")


def _image_body(data: bytes, max_tokens=2, **part) -> dict:
    image = {"type": "image", "image": base64.b64encode(data).decode(), **part}
    return {"messages": [{"role": "user", "content": [image, {"type": "text", "text": "What is it?"}]}],
            "max_tokens": max_tokens}


def _gif_bomb(side: int, frames: int) -> bytes:
    """A few KB of GIF: a side x side screen and `frames` 1x1 frames 10 ms apart (FFmpeg paints the whole screen
    for each)."""
    import struct

    out = io.BytesIO()
    out.write(b"GIF89a" + struct.pack("<HHBBB", side, side, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff")
    for k in range(frames):
        out.write(b"!\xf9\x04\x00\x01\x00\x00\x00" + b"," + struct.pack("<HHHHB", k % side, 0, 1, 1, 0)
                  + b"\x02\x02\x44\x01\x00")
    return out.getvalue() + b";"


def _video_body(data: bytes) -> dict:
    part = {"type": "video", "video": "data:image/gif;base64," + base64.b64encode(data).decode()}
    return {"messages": [{"role": "user", "content": [part, {"type": "text", "text": "What happens?"}]}],
            "max_tokens": 2}


def _cpu_seconds(server):
    """The server process's CPU seconds (user + system), or None when it cannot be read."""
    try:
        if server.pid:
            import psutil

            times = psutil.Process(server.pid).cpu_times()
            return times.user + times.system
        return server.metric("process_cpu_seconds_total")
    except Exception:  # noqa: BLE001  (a server of another machine's user, or no /metrics)
        return None


def _one_bit_png(side: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (side, side), 1).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def _truncated_jpeg(side: int) -> bytes:
    """A 3 KB JPEG whose header declares side x side, its scan cut short and closed with an end marker."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side // 10, side // 10), (120, 30, 40)).resize((side, side)).save(buf, "JPEG", quality=90)
    return buf.getvalue()[:3000] + b"\xff\xd9"


def _noise_jpeg(rng) -> bytes:
    from PIL import Image

    small = rng.integers(0, 255, size=(250, 250, 3), dtype="uint8")
    buf = io.BytesIO()
    Image.fromarray(small).resize((1000, 1000)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png(size, mode="RGB") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, 0).save(buf, "PNG")
    return buf.getvalue()


def _header_only_png(width, height) -> bytes:
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _mistake_body(body):
    if body == "DATA_URL":
        return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "DATA:IMAGE/PNG;BASE64," + base64.b64encode(_png((56, 56))).decode()}}]}], "max_tokens": 2}
    if body == "BAD_JPEG":
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (64, 64)).save(buf, "JPEG")
        damaged = base64.b64encode(buf.getvalue()).decode()[:-30] + "@@@@"  # starts with /9j/, like a path
        return {"messages": [{"role": "user", "content": [{"type": "image", "image": damaged}]}], "max_tokens": 2}
    if body == "DDS":
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (64, 64)).save(buf, "DDS")
        return _image_body(buf.getvalue())
    if body == "SVG_VIDEO":
        return _video_body(b'<svg xmlns="http://www.w3.org/2000/svg" width="100" height="100"><rect width="50"/></svg>')
    if body == "TINY_FPS":
        frame = base64.b64encode(_png((56, 56))).decode()
        return {"messages": [{"role": "user", "content": [{"type": "video", "video": [frame] * 4, "fps": 5e-324}]}],
                "max_tokens": 2}
    if body == "HUGE_HEADER":
        return _image_body(_header_only_png(20000, 20000))
    if body in ("THIN", "THIN166"):
        size, budget = ((28 * 199, 28), 3136) if body == "THIN" else ((5000, 30), 50000)
        part = {"type": "image", "image": base64.b64encode(_png(size)).decode(), "max_pixels": budget}
        return {"messages": [{"role": "user", "content": [part]}], "max_tokens": 2}
    return body


def _cache_mb(server) -> float:
    images = sum(server.metric("qwenvl_image_cache_bytes", cache=c) or 0 for c in ("pixels", "vision"))
    return (images + (server.metric("qwenvl_prefix_cache_bytes") or 0)) / 2**20  # the prefix cache fills by design too


def _raise_file_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


def spawn(log_dir: Path, changes=None, name="attack-server") -> Server:
    config = dict(SERVER, **(changes or {}))
    argv = [str(ROOT / "api.py"), "--model", "demo", "--host", "127.0.0.1", "--image-url-allow-hosts", "127.0.0.1",
            "--log-level", "WARNING"]
    for key, value in config.items():
        argv += ["--" + key.replace("_", "-"), str(value)]
    proc = ServerProcess(name, argv, ROOT, "/health", log_dir)
    proc.wait_ready_or_exit(300)
    return Server(proc.url, proc)


# ---------------------------------------------------------------- main

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller attacks, for CI")
    p.add_argument("--only", default="", help=f"comma-separated attacks: {', '.join(ATTACKS)}")
    p.add_argument("--url", help="a server already running on this machine (loopback only; the attacks that need "
                                 "servers of their own are skipped: hangups, gateway, shutdown)")
    p.add_argument("--pid", type=int, help="the --url server's process id, for its RSS (else read from /metrics)")
    p.add_argument("--api-key", default=os.environ.get("API_KEY", ""), help="bearer key for --url")
    p.add_argument("--json", help="write the results to this file")
    p.add_argument("--memory-images", type=int, help="requests of the memory attack (default 300; --quick 4)")
    args = p.parse_args(argv)
    if args.url and not _is_loopback(args.url):
        p.error("--url must be a loopback address: this tool attacks only servers on this machine")
    args.attacks = [a.strip() for a in args.only.split(",") if a.strip()] or list(ATTACKS)
    unknown = set(args.attacks) - set(ATTACKS)
    if unknown:
        p.error(f"unknown attacks: {', '.join(sorted(unknown))}")
    return args


RUNNERS = {"idle": attack_idle, "slowloris": attack_slowloris, "slow_image": attack_slow_image,
           "costly": attack_costly, "json_shapes": attack_json_shapes, "bombs": attack_bombs,
           "video_bombs": attack_video_bombs,
           "mistakes": attack_mistakes, "expect": attack_expect, "web": attack_web,
           "memory": attack_memory}


OWN_SERVER = {"hangups": attack_hangups, "gateway": attack_gateway, "shutdown": attack_shutdown}  # own servers


def run_attacks(server, *, names=ATTACKS, size="quick", config=None, log_dir=None, show=True) -> list:
    """Run the named attacks on `server` (anything with .url, .headers, .rss_mb(), .metric(): this module's
    Server or bench.load's) and return their Results. `config`: the server's settings that the checks
    judge by (idle_timeout, header_timeout, image_fetch_timeout; an unknown one is not judged). "hangups",
    "gateway" and "shutdown" start servers of their own (in `log_dir`) and are skipped without one. `size`:
    "quick", "full" or a dict."""
    size = dict(SIZES[size]) if isinstance(size, str) else size
    _raise_file_limit(size["idle"] + size["slowloris"] + 512)
    results = []
    for name in names:
        if name in OWN_SERVER:
            if log_dir is None:
                continue
            results.append(OWN_SERVER[name](size, Path(log_dir)))
        else:
            results.append(RUNNERS[name](server, size, config or {}))
        if show:
            results[-1].print()
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    size = dict(SIZES["quick" if args.quick else "full"])
    if args.memory_images:
        size["memory_images"] = args.memory_images
    log_dir = Path(tempfile.mkdtemp(prefix="bench-attacks-"))
    own = args.url is None
    server = spawn(log_dir) if own else Server(args.url, pid=args.pid, api_key=args.api_key)
    config = SERVER if own else {}
    try:
        results = run_attacks(server, names=args.attacks, size=size, config=config, log_dir=log_dir if own else None)
    finally:
        server.stop()
    held = all(r.held for r in results)
    for failure in _failures[:10]:
        print("probe failure:", failure)
    print(f"\n{sum(r.held for r in results)} of {len(results)} attacks held" + ("" if held else
          f"; not held: {', '.join(r.name for r in results if not r.held)} (server logs in {log_dir})"))
    if args.json:
        Path(args.json).write_text(json.dumps({"quick": args.quick, "server": config if own else args.url,
                                               "attacks": [r.as_dict() for r in results]}, indent=1, default=str))
    return 0 if held else 1


if __name__ == "__main__":
    sys.exit(main())
