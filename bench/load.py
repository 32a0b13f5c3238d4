"""Load and fault run against a server on this machine (loopback only), bounded in count and time.

    python -m bench.load                                  # starts `api.py --model demo` itself, 200 requests
    python -m bench.load --requests 2000 --concurrency 16 --duration 1800
    python -m bench.load --url http://127.0.0.1:8080 --api-key KEY   # a server already running here

Concurrent clients mix streaming and non-streaming, text and image requests, bad inputs (each
must get its 4xx and error code) and streams they hang up on after the first chunk. A 429 from
a full queue counts as an expected failure. At the end: the server is healthy, nothing is still
in flight, the server counted every request sent, and its memory (RSS) grew less than the
bound. Exit status 1 on any unexpected failure, lost response or memory growth past the bound.
"""

from __future__ import annotations

import argparse
import base64
import collections
import io
import ipaddress
import json
import os
import random
import re
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import requests

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.process import ServerProcess, wait_ready  # noqa: E402

CHAT = "/v1/chat/completions"
GOOD = ("text", "text_stream", "image", "image_stream")
WEIGHTS = {"text": 3, "text_stream": 3, "image": 2, "image_stream": 2, "bad": 3, "disconnect": 1}


def main(argv=None) -> int:
    args = parse_args(argv)
    server = Server.spawn(args) if args.url is None else Server.existing(args)
    status = 1
    try:
        status = run(args, server)
        return status
    finally:
        server.stop()
        if server.log_path and status == 0:
            server.log_path.unlink(missing_ok=True)  # kept only when the run failed
        elif server.log_path:
            print(f"server log: {server.log_path}")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a server already running on this machine (default: start api.py --model demo)")
    p.add_argument("--api-key", default=os.environ.get("API_KEY", ""), help="bearer key for --url")
    p.add_argument("--pid", type=int, help="the --url server's process id, for its RSS (else read from /metrics)")
    p.add_argument("--requests", type=int, default=200, help="requests to send (default 200)")
    p.add_argument("--concurrency", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--duration", type=float, default=300, help="stop sending after this many seconds (default 300)")
    p.add_argument("--request-timeout", type=float, default=120, help="seconds one request may take (default 120)")
    p.add_argument("--max-tokens", type=int, default=8, help="max_tokens of each request (default 8)")
    p.add_argument("--warmup", type=int, default=40,
                   help="good requests sent (concurrently) before the first memory reading (default 40)")
    p.add_argument("--max-rss-growth-mb", type=float, default=256, help="allowed RSS growth (default 256 MB)")
    p.add_argument("--max-queue", type=int, default=6,
                   help="MAX_QUEUE of the started server (default 6: fewer than the clients, so some get 429)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the request mix (default 0)")
    args = p.parse_args(argv)
    if args.url and not _is_loopback(args.url):
        p.error("--url must be a loopback address (127.0.0.0/8, ::1 or localhost): this tool never loads other hosts")
    return args


# ---------------------------------------------------------------- the server


class Server:
    """The server under test: one this script started (`proc`, a ServerProcess) or one at --url."""

    def __init__(self, url, proc=None, pid=None, api_key=""):
        self.url, self.proc = url.rstrip("/"), proc
        self.pid = pid or (proc.process.pid if proc else None)
        self.log_path = proc.log_path if proc else None
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    @classmethod
    def spawn(cls, args):
        argv = [str(ROOT / "api.py"), "--model", "demo", "--host", "127.0.0.1",
                "--max-queue", str(args.max_queue), "--threads", str(max(args.max_queue + 8, args.concurrency + 4)),
                "--max-tokens-limit", str(max(64, args.max_tokens)), "--max-images", "4", "--log-level", "WARNING"]
        proc = ServerProcess("bench-load-server", argv, ROOT, "/health", Path(tempfile.mkdtemp(prefix="bench-load-")))
        server = cls(proc.url, proc)
        proc.wait_ready_or_exit(300)
        return server

    @classmethod
    def existing(cls, args):
        try:
            wait_ready(args.url.rstrip("/") + "/health", 60)
        except RuntimeError as exc:
            raise SystemExit(str(exc)) from None
        return cls(args.url, pid=args.pid, api_key=args.api_key)

    def log_tail(self, lines=30):
        return self.proc.log_tail(lines) if self.proc else ""

    def stop(self):
        if self.proc is not None:
            self.proc.stop()

    def rss_mb(self):
        if self.pid:
            import psutil

            return psutil.Process(self.pid).memory_info().rss / 2**20
        value = self.metric("process_resident_memory_bytes")
        return value / 2**20 if value is not None else None

    def metric(self, name, **labels):
        text = requests.get(self.url + "/metrics", timeout=10).text
        total = None
        for line in text.splitlines():
            match = re.match(r"^(\w+)(\{[^}]*\})? (\S+)$", line)
            if not match or match.group(1) != name:
                continue
            found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
            if all(found.get(k) == v for k, v in labels.items()):
                total = (total or 0) + float(match.group(3))
        return total


def _is_loopback(url) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------- the requests


def _png(size, color, fmt="PNG") -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return base64.b64encode(buf.getvalue()).decode()


def _bomb() -> str:
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return base64.b64encode(png).decode()


class Mix:
    """The request bodies, built once; `bad` pairs a body with the answers that count as expected.

    max_tokens: one value, or a tuple the good requests pick from at random.
    """

    def __init__(self, max_tokens):
        self.token_choices = tuple(max_tokens) if isinstance(max_tokens, (tuple, list)) else (max_tokens,)
        self.max_tokens = max(self.token_choices)
        self.images = [_png((64, 48), (200, 30, 30)), _png((320, 240), (20, 160, 90), "JPEG"),
                       _png((800, 600), (40, 40, 220), "JPEG")]
        tiny = self.images[0]
        image = lambda source: {"type": "image", "image": source}  # noqa: E731
        self.bad = [
            (b"{not json", 400, {"invalid_json"}),
            (json.dumps([1, 2]).encode(), 400, {"invalid_body"}),
            (self._body([{"role": "wizard", "content": "x"}]), 400, {"invalid_value"}),
            (self._body([{"role": "user", "content": [image("%%%")]}]), 400, {"invalid_image"}),
            (self._body([{"role": "user", "content": [image(base64.b64encode(b"not an image").decode())]}]), 400,
             {"invalid_image"}),
            (self._body([{"role": "user", "content": [image(tiny)] * 9}]), 400, {"too_many_images"}),
            (self._body([{"role": "user", "content": [image(_bomb())]}]), 400, {"image_too_many_pixels"}),
            (self._body([{"role": "user", "content": [image("/etc/passwd")]}]), 400, {"unsupported_image_source"}),
            (self._body([{"role": "user", "content": [{"type": "image_url", "image_url": {
                "url": "http://169.254.169.254/latest/meta-data/"}}]}]), 400,
             {"image_url_refused", "image_url_disabled"}),
            (self._body([{"role": "user", "content": "x"}], max_tokens=10**9), 400, {"max_tokens_too_large"}),
            (self._body([{"role": "user", "content": ""}]), 400, {"empty_content"}),
        ]

    def _body(self, messages, **extra) -> bytes:
        return json.dumps({"messages": messages, "max_tokens": self.max_tokens, **extra}).encode()

    def good(self, kind, rng) -> bytes:
        content = f"Question {rng.randrange(10**6)}: tell me something."
        if kind.startswith("image"):
            source = rng.choice(self.images)
            content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + source}},
                       {"type": "text", "text": content}]
        stream = kind.endswith("stream") or kind == "disconnect"
        return self._body([{"role": "user", "content": content}], stream=stream, temperature=0.7, top_k=20,
                          top_p=0.9, stream_options={"include_usage": True} if stream else None,
                          **self._tokens(rng))

    def _tokens(self, rng) -> dict:
        # drawn only for a real mix, so a one-value run keeps the random sequence it always had
        return {"max_tokens": rng.choice(self.token_choices)} if len(self.token_choices) > 1 else {}


def one(server, mix, kind, rng, timeout):
    """Send one request; returns (outcome, detail): outcome is ok, expected or unexpected."""
    headers = {"Content-Type": "application/json", **server.headers}
    expected_bad = None
    if kind == "bad":
        body, status, codes = expected_bad = rng.choice(mix.bad)
    else:
        body = mix.good(kind, rng)
    stream = kind.endswith("stream") or kind == "disconnect"
    try:
        with requests.post(server.url + CHAT, data=body, headers=headers, stream=stream,
                           timeout=(10, timeout)) as r:
            if r.status_code == 429:
                if not r.headers.get("Retry-After"):
                    return "unexpected", "429 without Retry-After"
                return "expected", "busy 429"
            if expected_bad:
                code = _error_code(r)
                if r.status_code == status and code in codes:
                    return "expected", "bad input"
                return "unexpected", f"bad input got {r.status_code} {code}, wanted {status} {sorted(codes)}"
            if r.status_code != 200:
                return "unexpected", f"{kind} got {r.status_code} {_error_code(r)}"
            if kind == "disconnect":
                for line in r.iter_lines():
                    if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                        break
                return "expected", "disconnected"  # leaving the with-block closes the connection mid-stream
            return _check_answer(r, stream)
    except requests.RequestException as exc:
        return "lost", f"{kind}: {type(exc).__name__}"


def _error_code(response):
    try:
        return response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def _check_answer(r, stream):
    if not stream:
        data = r.json()
        ok = data["object"] == "chat.completion" and data["choices"][0]["finish_reason"] in ("stop", "length")
        return ("ok", "answer") if ok else ("unexpected", "malformed completion")
    events = [line[6:] for line in r.iter_lines() if line.startswith(b"data: ")]
    if not events or events[-1] != b"[DONE]":
        return "lost", "stream ended without [DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    if len(finals) != 1 or chunks[-1].get("usage") is None:
        return "unexpected", "stream without one finish_reason and a usage chunk"
    return "ok", "answer"


# ---------------------------------------------------------------- the run


def drive(server, mix, plan, args):
    """Send the planned kinds from `args.concurrency` clients until done or `args.duration` is up."""
    results, problems, lock, cursor = collections.Counter(), [], threading.Lock(), iter(plan)
    deadline = time.time() + args.duration

    def client(worker):
        local = random.Random(args.seed * 1000 + worker)
        while time.time() < deadline:
            with lock:
                kind = next(cursor, None)
            if kind is None:
                return
            outcome, detail = one(server, mix, kind, local, args.request_timeout)
            with lock:
                results[(outcome, kind if outcome == "ok" else detail)] += 1
                if outcome in ("unexpected", "lost"):
                    problems.append(detail)
            if detail == "busy 429":
                time.sleep(local.uniform(0.2, 1.0))  # back off, as a client told Retry-After should

    threads = [threading.Thread(target=client, args=(w,), daemon=True) for w in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.duration + args.request_timeout + 30)
    return results, problems


def _cache_mb(server) -> float:
    """Bytes held by the engine's image caches (bounded by IMAGE_CACHE_MB), from /metrics."""
    images = sum(server.metric("qwenvl_image_cache_bytes", cache=c) or 0 for c in ("pixels", "vision"))
    return (images + (server.metric("qwenvl_prefix_cache_bytes") or 0)) / 2**20  # the prefix cache fills by design too


def run(args, server) -> int:
    mix = Mix(args.max_tokens)
    rng = random.Random(args.seed)
    # warm up with the same concurrency: the model's allocator settles before memory is measured
    drive(server, mix, [rng.choice(GOOD) for _ in range(args.warmup)], args)
    rss_before = server.rss_mb()
    caches_before = _cache_mb(server)
    counted_before = server.metric("qwenvl_requests_total", endpoint=CHAT) or 0
    kinds = [k for k, w in WEIGHTS.items() for _ in range(w)]
    started = time.time()
    results, problems = drive(server, mix, [rng.choice(kinds) for _ in range(args.requests)], args)
    elapsed = time.time() - started
    sent = sum(results.values())
    healthy = _healthy(server)
    in_flight = int(_settle(lambda: server.metric("qwenvl_requests_in_flight"), 0) or 0)
    counted = _settle(lambda: (server.metric("qwenvl_requests_total", endpoint=CHAT) or 0) - counted_before, sent)
    rss_after = server.rss_mb()
    caches_growth = _cache_mb(server) - caches_before
    # the image and prefix caches are bounded (IMAGE_CACHE_MB, PREFIX_CACHE_MB) and fill by design: what else grew is the question
    growth = rss_after - rss_before - caches_growth if rss_before is not None and rss_after is not None else 0.0

    def total(outcome):
        return sum(n for (o, _), n in results.items() if o == outcome)

    def detail(outcome):
        parts = [f"{d} {n}" for (o, d), n in sorted(results.items()) if o == outcome]
        return f"  ({', '.join(parts)})" if parts else ""

    print(f"load: {sent} requests in {elapsed:.1f} s, {args.concurrency} clients, server {server.url}"
          + (f" (pid {server.pid})" if server.pid else ""))
    print(f"  succeeded            {total('ok'):5d}{detail('ok')}")
    print(f"  failed as expected   {total('expected'):5d}{detail('expected')}")
    print(f"  failed unexpectedly  {total('unexpected'):5d}{detail('unexpected')}")
    print(f"  lost responses       {total('lost'):5d}{detail('lost')}")
    print(f"  server RSS: {_mb(rss_before)} before, {_mb(rss_after)} after; image caches grew "
          f"{caches_growth:+.1f} MB; the rest {growth:+.1f} MB (bound {args.max_rss_growth_mb:g} MB)")
    print(f"  server counted {counted:g} of {sent} requests; in flight afterwards: {in_flight}; "
          f"healthy: {healthy}")
    failures = []
    if total("unexpected") or total("lost"):
        failures.append(f"{total('unexpected')} unexpected, {total('lost')} lost: {problems[:5]}")
    if sent < min(args.requests, 1):
        failures.append("no request was sent")
    if counted != sent:
        failures.append(f"the server counted {counted:g} requests, {sent} were sent")
    if in_flight:
        failures.append(f"{in_flight} requests still in flight")
    if not healthy:
        failures.append("the server is not healthy afterwards")
    if growth > args.max_rss_growth_mb:
        failures.append(f"RSS grew {growth:.1f} MB, more than {args.max_rss_growth_mb:g} MB")
    for failure in failures:
        print("FAIL:", failure)
    if failures and server.log_path:
        print("server log (tail):\n" + server.log_tail())
    print("result:", "FAIL" if failures else "PASS")
    return 1 if failures else 0


def rss_after_requests(server, checkpoints, *, token_mix=(8,), concurrency=8, seed=0, request_timeout=120,
                       duration=3600, on_reading=lambda reading: None) -> dict:
    """The load mix (good, bad, hung-up-on) sent in segments that end at each count in `checkpoints`;
    the server's RSS read between segments, while nothing is in flight (each reading also goes to
    `on_reading`, for progress)."""
    mix = Mix(token_mix)
    rng = random.Random(seed)
    kinds = [k for k, w in WEIGHTS.items() for _ in range(w)]
    plan = [rng.choice(kinds) for _ in range(max(checkpoints))]
    deadline = time.time() + duration
    readings, outcomes, problems, sent = [], collections.Counter(), [], 0
    for segment, count in enumerate(sorted(checkpoints)):
        args = argparse.Namespace(concurrency=concurrency, request_timeout=request_timeout,
                                  seed=seed * 100 + segment, duration=max(0.0, deadline - time.time()))
        results, found = drive(server, mix, plan[sent:count], args)
        sent += sum(results.values())
        for (outcome, _), n in results.items():
            outcomes[outcome] += n
        problems += found
        readings.append({"requests": sent, "rss_mb": round(server.rss_mb() or 0.0, 1),
                         "cache_mb": round(_cache_mb(server), 1),  # image and prefix caches: bounded, fill by design
                         "prefix_cache_mb": round((server.metric("qwenvl_prefix_cache_bytes") or 0) / 2**20, 1)})
        on_reading(readings[-1])
    return {"readings": readings, "outcomes": dict(outcomes), "problems": problems[:5],
            "token_mix": list(mix.token_choices), "clients": concurrency}


def _healthy(server) -> bool:
    try:
        return requests.get(server.url + "/health", timeout=10).status_code == 200
    except requests.RequestException:
        return False


def _settle(read, want, seconds=15.0):
    """Poll `read()` until it gives `want` (streams are counted once the server sees the hang-up)."""
    deadline = time.time() + seconds
    value = read()
    while value != want and time.time() < deadline:
        time.sleep(0.25)
        value = read()
    return value


def _mb(value):
    return "?" if value is None else f"{value:.1f} MB"


if __name__ == "__main__":
    sys.exit(main())
