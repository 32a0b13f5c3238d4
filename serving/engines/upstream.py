"""The upstream engine: chat turns forwarded to OpenAI-compatible servers (--backend openai).

Any server that speaks OpenAI's chat completions API can be an upstream: FastDeploy, vLLM, or
other instances of this server. This process keeps everything in front of the model (its port,
the request formats, guarded image intake with pixel budgets, API keys, limits, metrics, request
ids, errors); the upstreams generate. It implements serving.engines.base.Engine:

- Images arrive here already taken in, checked and sized (serving.chat); each goes on as a data
  URL of exactly that size (PNG by default: lossless, so an upstream sees the very pixels it
  would have made itself, and greedy answers equal asking it directly).
- Videos arrive checked against this server's video limits (serving.intake.video.Video); each goes on as a
  `video_url` part holding the file as received (a list of frames: encoded as an mp4), and the
  upstream samples it itself (FastDeploy and vLLM take `video_url`).
- Every request is streamed from the upstream, whether or not the client streams: each upstream
  chunk becomes a TextDelta at once, usage comes from the upstream's last chunk.
- Balancing: the healthy replica with the fewest requests in flight (ties in turn).
- Health: every UPSTREAM_HEALTH_INTERVAL seconds each replica's GET /v1/models (which also names
  its model and context length); a replica that fails a check or a connection is taken out until
  a check passes again.
- A request that fails before anything reached the client (connection refused or reset, the
  upstream's 5xx or 429) is retried once on another replica; one that fails mid-answer ends with
  an error (the client has part of an answer already).
- cancel() (a client gone, a time limit) shuts the upstream connection down at once, even while
  waiting for the upstream's first byte, so the upstream stops generating.
- Upstream errors become this server's domain errors with a clean message: its 4xx stay 4xx (400,
  413, 429), its 5xx, malformed or cut-off answers become 502 (UpstreamError), none reachable 503.
  Its own credentials refused (401/403) or a wrong path (404) are this server's configuration,
  not the client's mistake: 502, with what to fix. No upstream traceback or body reaches a client.

Nothing here imports Paddle.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import logging
import math
import queue
import re
import socket
import struct
import threading
import time
import zlib
from typing import Callable, Iterator, Optional
from urllib.parse import urlsplit, urlunsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter

from serving.engines.base import ModelInfo
from serving.errors import InvalidRequest, NotReady, RequestTimeout, ServerBusy, ServiceError, UpstreamError
from serving.jobs import Finished, SamplingParams, TextDelta, TokenLogprob, TopLogprob, read_events
from serving.intake import images
from serving.intake.video import Video

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0  # seconds to open a connection to an upstream
CHECK_TIMEOUT = 5.0  # seconds a health check may take in all, its answer read to the end
MAX_MODELS_BYTES = 2**20  # the most of an upstream's /v1/models answer a health check reads
RETRY_SECONDS = 5  # Retry-After when no upstream can take a request
WAIT_LOG_SECONDS = 30.0  # while waiting for a first healthy upstream, how often to say so
ERROR_BODY_BYTES = 16384  # most of an upstream's error body read
DRAIN_SECONDS = 2.0  # after [DONE], how long the rest of the body may take in all (read so the connection is kept alive)
MAX_EVENT_BYTES = 8 * 2**20  # one server-sent event line from an upstream at most
IMAGE_PATCH_TOKENS = 28 * 28  # Qwen2.5-VL: one prompt token per 28x28 pixels (for estimates only)
# the answer-changing OpenAI features an upstream honours: the chat service passes their fields on as sent
# (SamplingParams.extra: response_format; tools, tool_choice, parallel_tool_calls...; logit_bias)
FEATURES = frozenset({"tools", "response_format", "logit_bias"})
FINISH_REASONS = ("stop", "length", "tool_calls", "content_filter")
RETRY_STATUSES = (429, 500, 502, 503, 504)  # answered before the first byte: try another replica


# ---------------------------------------------------------------- connections that cancel() can reach

_CALLER = threading.local()  # the UpstreamCall whose thread is sending a request now


class _TrackedHTTPConnection(urllib3.connection.HTTPConnection):
    """Hands itself to the call being sent, so cancel() can shut its socket down even while the
    request still waits for the upstream's first byte. `opened_sock`: its socket, kept after http.client lets
    go of it (with "Connection: close" the response alone holds it)."""

    opened_sock = None

    def connect(self):
        super().connect()
        self.opened_sock = self.sock

    def request(self, *args, **kwargs):
        call = getattr(_CALLER, "call", None)
        if call is not None:
            call._attach(self)
        return super().request(*args, **kwargs)


class _TrackedHTTPSConnection(urllib3.connection.HTTPSConnection):
    opened_sock = None

    def connect(self):
        super().connect()
        self.opened_sock = self.sock

    def request(self, *args, **kwargs):
        call = getattr(_CALLER, "call", None)
        if call is not None:
            call._attach(self)
        return super().request(*args, **kwargs)


class _TrackedHTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _TrackedHTTPConnection


class _TrackedHTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _TrackedHTTPSConnection


class _TrackingAdapter(HTTPAdapter):
    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _TrackedHTTPPool, "https": _TrackedHTTPSPool}


def _session(pool_size: int, tracked: bool) -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # an upstream is addressed as configured, never through a proxy from the environment
    adapter = (_TrackingAdapter if tracked else HTTPAdapter)(pool_connections=1, pool_maxsize=pool_size)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


# ---------------------------------------------------------------- one upstream server

def normalise_url(url: str) -> str:
    """A base URL: scheme, host, port and path, without a trailing '/' or '/v1'."""
    text = str(url).strip()
    parts = urlsplit(text if "://" in text else "http://" + text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"upstream {url!r} is not an http(s) URL")
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[:-3]
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def url_label(url: str) -> str:
    """The URL without credentials: what logs, /health and metrics show."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class Replica:
    """One upstream server: where it is, what it serves, whether it is healthy, what it is doing."""

    def __init__(self, url: str, pool_size: int):
        self.url = normalise_url(url)
        self.label = url_label(self.url)
        self.chat_url = self.url + "/v1/chat/completions"
        self.models_url = self.url + "/v1/models"
        self.session = _session(pool_size, tracked=True)
        self.check_session = _session(2, tracked=True)  # tracked: a check past its deadline is shut down
        self.healthy = False
        self.reason = "not checked yet"
        self.model: Optional[str] = None  # the id its /v1/models names (sent as each request's "model")
        self.context_length: Optional[int] = None
        self.is_demo = False
        self.in_flight = 0
        self.requests = 0  # requests sent to it
        self.failures = 0  # requests it failed (unreachable, 5xx, cut off)
        self.retried = 0  # requests that failed here and were sent to another replica
        self.checks_failed = 0

    def snapshot(self) -> dict:
        return {"url": self.label, "healthy": self.healthy, "reason": None if self.healthy else self.reason,
                "model": self.model, "in_flight": self.in_flight, "requests": self.requests,
                "failures": self.failures, "retried": self.retried, "checks_failed": self.checks_failed}


# ---------------------------------------------------------------- the engine

class _CheckWatch:
    """A health check's connection (handed over as the request is sent), shut down when its time is up."""

    def __init__(self):
        self.conn, self.expired = None, False
        self._lock = threading.Lock()

    def _attach(self, conn) -> None:
        with self._lock:
            self.conn = conn

    def expire(self) -> None:
        with self._lock:
            self.expired = True
            sock = getattr(self.conn, "opened_sock", None)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def _read_capped(response, limit: int) -> bytes:
    """A response's body, at most `limit` bytes (_CheckFailed beyond)."""
    body = bytearray()
    for block in response.iter_content(65536):
        body += block
        if len(body) > limit:
            raise _CheckFailed(f"its /v1/models answer is larger than {limit} bytes")
    return bytes(body)


class UpstreamEngine:
    """serving.engines.base.Engine over OpenAI-compatible servers."""

    def __init__(self, urls, *, api_key: str = "", served_model_name: str = "", health_interval: float = 5.0,
                 image_format: str = "png", read_timeout: float = 300.0, pool_size: int = 32,
                 tokenizer_file: Optional[str] = None, source: Optional[str] = None):
        urls = [u for u in (urls or ()) if str(u).strip()]
        if not urls:
            raise ValueError("--backend openai needs at least one upstream URL (--upstream URL[,URL...])")
        self.replicas = [Replica(u, pool_size) for u in urls]
        labels = [r.label for r in self.replicas]
        if len(set(labels)) != len(labels):
            raise ValueError(f"the same upstream is listed twice: {', '.join(labels)}")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.served_model_name = served_model_name
        self.health_interval = max(0.2, float(health_interval))
        self.image_format = image_format
        self.read_timeout = read_timeout
        self.source = source or ", ".join(labels)
        self.tokenizer = _load_tokenizer(tokenizer_file)
        self._lock = threading.Lock()
        self._turn = 0  # round-robin among equally loaded replicas
        self._closed = threading.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(self.replicas),
                                                           thread_name_prefix="upstream-check")
        self._checkers: list = []  # one thread per replica: a slow upstream delays only its own checks
        self.info = ModelInfo(name=served_model_name or "upstream", source=self.source, is_demo=False,
                              context_length=0, features=FEATURES)

    @classmethod
    def from_settings(cls, settings, urls=None, **kwargs) -> "UpstreamEngine":
        """The engine of --backend openai, once an upstream answers (waits for one, however long)."""
        from serving.model.loader import ModelLoadError

        try:
            engine = cls(settings.upstream if urls is None else urls, api_key=settings.upstream_api_key,
                         served_model_name=settings.served_model_name, health_interval=settings.upstream_health_interval,
                         image_format=settings.upstream_image_format, read_timeout=settings.request_timeout,
                         pool_size=max(8, settings.threads), **kwargs)
        except ValueError as exc:  # no or bad URLs: one clear line at start-up
            raise ModelLoadError(str(exc)) from None
        log.info("forwarding to %d upstream(s): %s", len(engine.replicas), engine.source)
        engine.start_checks(wait=True)
        return engine

    # ------------------------------------------------------------------ health

    def start_checks(self, wait: bool = True, timeout: Optional[float] = None) -> None:
        """Check every replica now; with `wait`, until one is healthy (TimeoutError after `timeout`
        seconds); then keep checking in the background."""
        started = last_said = time.monotonic()
        self.check_all()
        while wait and not any(r.healthy for r in self.replicas):
            if self._closed.is_set():
                raise RuntimeError("the upstream engine was closed while waiting for an upstream")
            now = time.monotonic()
            if timeout is not None and now - started > timeout:
                raise TimeoutError("no upstream became healthy within %.0f s: %s" % (timeout, self.describe_down()))
            if now - last_said >= WAIT_LOG_SECONDS:
                log.warning("still waiting for an upstream to answer: %s", self.describe_down())
                last_said = now
            self._closed.wait(min(self.health_interval, 2.0))
            self.check_all()
        self._refresh_info()
        if not self._checkers:
            self._checkers = [threading.Thread(target=self._check_loop, args=(replica,), daemon=True,
                                               name=f"upstream-health-{k}") for k, replica in enumerate(self.replicas)]
            for thread in self._checkers:
                thread.start()

    def check_all(self) -> None:
        list(self._pool.map(self.check, self.replicas))

    def check(self, replica: Replica) -> bool:
        """One active health check: GET /v1/models answers 200 with at least one model, whole within
        CHECK_TIMEOUT (a watchdog shuts the connection down then: an upstream trickling a byte every 2 s
        held the checks of every upstream) and within MAX_MODELS_BYTES (a 200 MB answer was read whole)."""
        watch = _CheckWatch()
        timer = threading.Timer(CHECK_TIMEOUT, watch.expire)
        timer.daemon = True
        timer.start()
        _CALLER.call = watch
        try:
            # a new connection each time: a kept-alive one the upstream has just closed would fail the check
            with replica.check_session.get(replica.models_url, headers={**self.headers, "Connection": "close"},
                                           timeout=(CONNECT_TIMEOUT, CHECK_TIMEOUT), stream=True) as response:
                body = _read_capped(response, MAX_MODELS_BYTES)
            if response.status_code != 200:
                message, _, _ = parse_error_body(body[:ERROR_BODY_BYTES])
                raise _CheckFailed(f"HTTP {response.status_code}" + (f": {message}" if message else ""))
            try:
                card = json.loads(body)["data"][0]
                model = str(card["id"])
            except (ValueError, KeyError, IndexError, TypeError):
                raise _CheckFailed("its /v1/models answer names no model") from None
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError, _CheckFailed) as exc:
            replica.checks_failed += 1
            if watch.expired:
                reason = f"its /v1/models answer took longer than {CHECK_TIMEOUT:g} s"
            else:
                reason = describe_exception(exc) if isinstance(exc, requests.RequestException) else str(exc)
            self._mark_down(replica, reason)
            return False
        finally:
            _CALLER.call = None
            timer.cancel()
        replica.model = model
        length = card.get("max_model_len")
        replica.context_length = int(length) if isinstance(length, int) and length > 0 else None
        replica.is_demo = card.get("demo") is True
        if not replica.healthy:
            log.info("upstream %s is healthy (model %s)", replica.label, model)
        replica.healthy, replica.reason = True, "ok"
        return True

    def _mark_down(self, replica: Replica, reason: str) -> None:
        if replica.healthy or replica.reason == "not checked yet":
            log.warning("upstream %s is down: %s", replica.label, reason)
        replica.healthy, replica.reason = False, reason

    def _check_loop(self, replica: Replica) -> None:
        while not self._closed.wait(self.health_interval):
            self.check(replica)

    def _refresh_info(self) -> None:
        healthy = [r for r in self.replicas if r.healthy] or self.replicas
        models = sorted({r.model for r in healthy if r.model})
        if len(models) > 1:
            log.warning("the upstreams serve differently named models (%s); each request names the one its "
                        "upstream serves", ", ".join(models))
        lengths = [r.context_length for r in healthy if r.context_length]
        name = self.served_model_name or (models[0] if models else self.info.name)
        self.info = ModelInfo(name=name, source=self.source, is_demo=any(r.is_demo for r in healthy),
                              context_length=min(lengths) if lengths else 0, max_batch_size=self.info.max_batch_size,
                              features=FEATURES)

    def describe_down(self) -> str:
        return "; ".join(f"{r.label}: {r.reason}" for r in self.replicas if not r.healthy)

    def health(self) -> tuple:
        up = sum(r.healthy for r in self.replicas)
        if up == 0:
            return False, f"no upstream is healthy ({self.describe_down()})"
        if up < len(self.replicas):
            return True, f"{up} of {len(self.replicas)} upstreams healthy; down: {self.describe_down()}"
        return True, "ok"

    def upstreams(self) -> list:
        """Each replica's state, for /health."""
        return [{"url": r.label, "status": "ok" if r.healthy else "down", "reason": None if r.healthy else r.reason,
                 "in_flight": r.in_flight} for r in self.replicas]

    def stats(self) -> dict:
        return {"upstreams": {r.label: r.snapshot() for r in self.replicas}}

    # ------------------------------------------------------------------ balancing

    def pick(self, exclude=()) -> Optional[Replica]:
        """The healthy replica with the fewest requests in flight, not in `exclude`; None when there is none."""
        with self._lock:
            candidates = [r for r in self.replicas if r.healthy and r not in exclude]
            if not candidates:
                return None
            fewest = min(r.in_flight for r in candidates)
            tied = [r for r in candidates if r.in_flight == fewest]
            replica = tied[self._turn % len(tied)]
            self._turn += 1
            replica.in_flight += 1
            replica.requests += 1
            return replica

    def release(self, replica: Replica) -> None:
        with self._lock:
            replica.in_flight -= 1

    # ------------------------------------------------------------------ requests

    def start(self, turns: list, params: SamplingParams) -> "UpstreamCall":
        payload = self.payload(turns, params)
        return UpstreamCall(self, payload, prompt_estimate=self._estimate_prompt(turns))

    def payload(self, turns: list, params: SamplingParams) -> dict:
        """The chat completion request an upstream gets (its "model" is set per replica)."""
        body = {"messages": [self._message(t) for t in turns], "max_tokens": params.max_tokens, "stream": True,
                "stream_options": {"include_usage": True}}
        for name in ("temperature", "top_p", "top_k", "repetition_penalty", "seed"):
            value = getattr(params, name)
            if value is not None:
                body[name] = value
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(params, name):
                body[name] = getattr(params, name)
        if params.stop:
            body["stop"] = list(params.stop)
        if params.logprobs:
            body["logprobs"] = True
            if params.top_logprobs:
                body["top_logprobs"] = params.top_logprobs
        body.update(params.extra or {})
        return body

    def _message(self, turn) -> dict:
        parts = []
        for k, part in enumerate(turn.parts):
            if isinstance(part, str):
                parts.append({"type": "text", "text": part})
            elif isinstance(part, Video):  # checked within this server's video limits; the upstream samples it
                parts.append({"type": "video_url", "video_url": {"url": part.data_url()}})
            elif hasattr(part, "save") and hasattr(part, "size"):  # a PIL image, sized by the chat service
                parts.append({"type": "image_url", "image_url": {"url": self.data_url(part)}})
            else:
                raise InvalidRequest(f"this backend cannot pass on a {type(part).__name__} part", param="messages")
        if all(p["type"] == "text" for p in parts):
            content = "".join(p["text"] for p in parts)
            if not content and getattr(turn, "tool_calls", None):
                content = None  # an earlier answer that only called tools
        else:
            content = parts
        message = {"role": turn.role, "content": content}
        for name in ("name", "tool_calls", "tool_call_id"):  # OpenAI's tool-use fields, when a turn carries them
            value = getattr(turn, name, None)
            if value is not None:
                message[name] = value
        return message

    def data_url(self, img) -> str:
        """The image as the upstream gets it: the bytes as sent when intake changed nothing (the same
        pixels, and no encoding work here or decoding of a larger file there), else encoded at its size."""
        passed = passed_on_bytes(img)
        if passed is not None:
            return passed
        if self.image_format == "jpeg":
            buf = io.BytesIO()
            img.convert("RGB").save(buf, "JPEG", quality=95, subsampling=0)
            return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
        return "data:image/png;base64," + base64.b64encode(fast_png(img)).decode("ascii")

    def count_tokens(self, text: str) -> int:
        """With the model's tokenizer.json (FastDeploy: the model folder), exact; otherwise an estimate
        (about 4 bytes of UTF-8 per token)."""
        if self.tokenizer is not None:
            return len(self.tokenizer.encode(text, add_special_tokens=False).ids)
        return math.ceil(len(text.encode("utf-8")) / 4)

    def _estimate_prompt(self, turns) -> int:
        """Prompt tokens when an upstream gives no usage: the text's tokens, one per 28x28 pixels of each
        image (Qwen2.5-VL), and the chat template's few per turn."""
        total = 0
        for turn in turns:
            total += 5
            for part in turn.parts:
                if isinstance(part, str):
                    total += self.count_tokens(part)
                elif isinstance(part, Video):  # as this server samples it (the upstream's own sampling may differ)
                    total += len(part.frames) // 2 * (part.height // 28) * (part.width // 28) + 2
                elif hasattr(part, "size"):
                    width, height = part.size
                    total += max(1, width * height // IMAGE_PATCH_TOKENS) + 2
        return total + 3

    def close(self, timeout: float = 30.0) -> None:
        self._closed.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        for replica in self.replicas:
            replica.session.close()
            replica.check_session.close()


class _CheckFailed(Exception):
    pass


class _Retry(Exception):
    """A failure before anything reached the client: another replica may take the request."""

    def __init__(self, error: ServiceError):
        super().__init__(error.message)
        self.error = error


# ---------------------------------------------------------------- one request

class UpstreamCall:
    """One generation on an upstream (serving.engines.base.Generation), read by a thread of its own
    into a queue: TextDelta pieces, then one Finished (or an error)."""

    def __init__(self, engine: UpstreamEngine, payload: dict, *, prompt_estimate: int = 0):
        self.engine = engine
        self.payload = payload
        self.prompt_tokens = 0  # known when the upstream's usage arrives (Finished carries it)
        self.prompt_estimate = prompt_estimate
        self.events: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()
        self.started = time.perf_counter()
        self._conn = None  # the connection the current attempt uses, while it does (for cancel)
        self._conn_lock = threading.Lock()
        self._reused = False  # that connection was kept alive from an earlier request
        self._delivered = False  # an event reached the caller: no retry from here on
        self._finished = False  # Finished was delivered: cancel() has nothing left to stop
        self._thread = threading.Thread(target=self._run, name="upstream-call", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------- the Generation protocol

    def __iter__(self) -> Iterator:
        return self.until(None)

    def until(self, deadline: Optional[float]) -> Iterator:
        return read_events(self.events, self.cancelled, deadline)

    def cancel(self) -> None:
        """Stop now: the upstream connection is shut down, so the upstream sees the client leave."""
        with self._conn_lock:
            if self._finished:
                return  # the answer is complete; its connection may be kept for the next request
            self.cancelled.set()
            _shutdown(self._conn)

    def _attach(self, conn) -> None:
        """Called by the connection about to send this call's request (in this call's thread)."""
        with self._conn_lock:
            self._conn = conn
            self._reused = conn.sock is not None
            if self.cancelled.is_set():
                _shutdown(conn)

    def _detach(self) -> None:
        with self._conn_lock:
            self._conn = None

    # -------------------------------------------------------------- the reading thread

    def _run(self) -> None:
        engine, tried, error = self.engine, [], None
        try:
            for _attempt in range(2):
                replica = engine.pick(exclude=tried)
                if replica is None:
                    break
                tried.append(replica)
                try:
                    self._attempt(replica)
                    return
                except _Retry as retry:
                    error = retry.error
                    if self.cancelled.is_set():
                        return
                    replica.retried += 1
                    log.warning("upstream %s failed before answering (%s); %s", replica.label, error.message,
                                "trying another" if _attempt == 0 else "not retrying again")
                finally:
                    engine.release(replica)
            if error is None:
                _, reason = engine.health()
                error = NotReady(f"no upstream server can take the request now: {reason}",
                                 code="upstream_unavailable", retry_after=RETRY_SECONDS)
            raise error
        except BaseException as exc:  # handed to the reader, never lost in this thread
            if self.cancelled.is_set():
                return
            if not isinstance(exc, ServiceError):
                log.error("upstream call failed", exc_info=exc)
                exc = UpstreamError(f"the upstream call failed ({type(exc).__name__})")
            self.events.put(exc)

    def _attempt(self, replica: Replica) -> None:
        body = dict(self.payload, model=replica.model or self.engine.info.name)
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream", **self.engine.headers}
        response = None
        for fresh in (False, True):
            try:
                response = self._send(replica, data, headers)
                break
            except requests.RequestException as exc:
                self._detach()
                if self.cancelled.is_set():
                    return
                if self._reused and not fresh and not isinstance(exc, requests.Timeout):
                    # a kept-alive connection the upstream had just closed: once more, on a new connection
                    for adapter in replica.session.adapters.values():
                        adapter.poolmanager.clear()  # the other idle ones may be as stale (in-use ones carry on)
                    continue
                replica.failures += 1
                reason = describe_exception(exc)
                self.engine._mark_down(replica, reason)
                raise _Retry(NotReady(f"the upstream server {replica.label} cannot be reached ({reason})",
                                      code="upstream_unavailable", retry_after=RETRY_SECONDS)) from None
        try:
            if response.status_code != 200:
                self._refused(replica, response)
            self._read(response)
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError, ValueError, AttributeError) as exc:
            # the connection broke (or was shut down by cancel()) while reading
            if self.cancelled.is_set() or self._finished:
                return
            replica.failures += 1
            reason = describe_exception(exc)
            if not self._delivered:
                self.engine._mark_down(replica, reason)
                raise _Retry(UpstreamError(f"the upstream server {replica.label} stopped before answering ({reason})",
                                           code="upstream_interrupted")) from None
            raise UpstreamError(f"the upstream server stopped in the middle of the answer ({reason})",
                                code="upstream_interrupted") from None
        finally:
            self._detach()  # before the connection can go back to the pool and serve another call
            response.close()

    def _send(self, replica: Replica, data: bytes, headers: dict):
        _CALLER.call = self
        try:
            return replica.session.post(replica.chat_url, data=data, headers=headers, stream=True,
                                        timeout=(CONNECT_TIMEOUT, self.engine.read_timeout))
        finally:
            _CALLER.call = None

    def _refused(self, replica: Replica, response) -> None:
        """An answer other than 200, before any text: the error it maps to (_Retry when another replica may do)."""
        try:
            body = response.raw.read(ERROR_BODY_BYTES, decode_content=True) or b""
        except Exception:  # noqa: BLE001 - the body only improves the message
            body = b""
        error = error_for_status(response.status_code, body, replica.label, response.headers.get("Retry-After"))
        if response.status_code >= 500:
            replica.failures += 1
            log.warning("upstream %s answered HTTP %d: %s", replica.label, response.status_code,
                        sanitise(body.decode("utf-8", "replace"), 500) or "(no body)")
        if response.status_code == 503:
            message, _, _ = parse_error_body(body)
            self.engine._mark_down(replica, "HTTP 503" + (f": {message}" if message else ""))
        if response.status_code in RETRY_STATUSES:
            raise _Retry(error)
        raise error

    def _read(self, response) -> None:
        finish_reason, usage, chunks, pieces, tool_calls = None, None, 0, [], {}
        restore = None
        drain_until = []  # after [DONE]: when reading the rest must end (one item)

        def drained_too_long() -> bool:
            return bool(drain_until) and time.monotonic() > drain_until[0]

        for data in sse_events(response, stop=drained_too_long):
            if self.cancelled.is_set():
                return
            if self._finished:
                continue  # after [DONE]: read to the end of the body, so the connection can be kept alive
            if data == "[DONE]":
                self._finish(finish_reason, usage, chunks, pieces, tool_calls)
                # read the rest (the chunked body's end) so the connection is kept alive, for at most DRAIN_SECONDS
                # in all (an upstream sending comments after [DONE] held a thread per answer, without end);
                # a body that ends when the connection closes cannot be kept: stop here
                restore = self._bound_reads(DRAIN_SECONDS)
                if restore is None:
                    break
                drain_until.append(time.monotonic() + DRAIN_SECONDS)
                continue
            try:
                event = json.loads(data)
            except ValueError:
                raise UpstreamError("the upstream server sent an event that is not JSON",
                                    code="upstream_bad_response") from None
            if not isinstance(event, dict):
                continue
            if "error" in event:
                raise error_from_event(event["error"])
            if isinstance(event.get("usage"), dict):
                usage = event["usage"]
            for choice in event.get("choices") or ():
                if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                    continue
                delta = choice.get("delta") or {}
                text = delta.get("content") or ""
                if not isinstance(text, str):  # passed on as it was, a dict became its Python repr
                    raise UpstreamError("the upstream server sent content that is not text",
                                        code="upstream_bad_response")
                tokens = _logprobs(choice.get("logprobs"))
                for call in delta.get("tool_calls") or ():
                    _merge_tool_call(tool_calls, call)
                if text or tokens:
                    chunks += 1
                    pieces.append(text)
                    self._deliver(TextDelta(text, tokens))
                if choice.get("finish_reason"):
                    finish_reason = choice["finish_reason"]
        if not self._finished and not self.cancelled.is_set():  # the body ended without [DONE]
            self._finish(finish_reason, usage, chunks, pieces, tool_calls)
        elif drained_too_long():
            with self._conn_lock:
                _shutdown(self._conn)  # its body was not read to the end: the connection is not kept
        elif restore is not None:
            restore()

    def _bound_reads(self, seconds: float):
        """Give the current connection's reads a timeout of `seconds`; returns what puts the old one back (None
        when the connection is no longer this call's to keep: it closes with the response)."""
        with self._conn_lock:
            sock = getattr(self._conn, "sock", None)
        if sock is None:
            return None
        old = sock.gettimeout()
        sock.settimeout(seconds)
        return lambda: sock.settimeout(old)

    def _finish(self, finish_reason, usage, chunks, pieces, tool_calls) -> None:
        if finish_reason is None:
            raise requests.exceptions.ChunkedEncodingError("the answer ended without a finish_reason")
        prompt_tokens = _int(usage, "prompt_tokens")
        completion_tokens = _int(usage, "completion_tokens")
        if prompt_tokens is None:
            prompt_tokens = self.prompt_estimate
        if completion_tokens is None:
            completion_tokens = self.engine.count_tokens("".join(pieces)) if self.engine.tokenizer else chunks
        self.prompt_tokens = prompt_tokens
        details = usage.get("prompt_tokens_details") if isinstance(usage, dict) else None
        finished = Finished(finish_reason if finish_reason in FINISH_REASONS else "stop", prompt_tokens,
                            completion_tokens, time.perf_counter() - self.started,
                            tool_calls=[tool_calls[k] for k in sorted(tool_calls)] or None,
                            cached_tokens=_int(details, "cached_tokens"))  # the upstream's reuse, as it says

        with self._conn_lock:
            if self.cancelled.is_set():
                return
            self._finished = True
        self._deliver(finished)

    def _deliver(self, event) -> None:
        self._delivered = True
        self.events.put(event)


def passed_on_bytes(img) -> Optional[str]:
    """A data URL of the bytes the image was decoded from, when it is still exactly that picture."""
    source = img.info.get(images.SOURCE)
    if source is None or img.mode != "RGB" or tuple(source[2]) != tuple(img.size):
        return None
    fmt, data, _ = source
    return f"data:{images.PASSABLE_FORMATS[fmt]};base64," + base64.b64encode(data).decode("ascii")


def fast_png(img) -> bytes:
    """A lossless PNG of an RGB image, made fast: each row with PNG's Sub filter (each byte minus the one a pixel
    to its left), zlib level 1.

    About 50 ms a megapixel. It used to be stored uncompressed (7 ms, 3 bytes a pixel, ~4 MB of base64 a
    megapixel), so a valid 7.3 MB request became larger than its upstream takes; photos now take ~1-2 bytes a
    pixel, smooth pictures far less (a 1000x1000 upscaled photo: 0.46 MB instead of 3.0 MB). UPSTREAM_IMAGE_FORMAT
    =jpeg is smaller still.
    """
    import numpy as np

    pixels = np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
    height, width = pixels.shape[:2]
    flat = pixels.reshape(height, width * 3)
    rows = np.empty((height, width * 3 + 1), np.uint8)
    rows[:, 0] = 1  # filter type Sub on every row
    rows[:, 1:4] = flat[:, :3]
    np.subtract(flat[:, 3:], flat[:, :-3], out=rows[:, 4:], dtype=np.uint8, casting="unsafe")  # modulo 256

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, RGB, deflate, no interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 1))
            + chunk(b"IEND", b""))


def _shutdown(conn) -> None:
    """Shut a connection's socket down (wakes a thread blocked reading it); harmless when already closed."""
    sock = getattr(conn, "sock", None)
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


# ---------------------------------------------------------------- the wire

def sse_events(response, stop: Optional[Callable[[], bool]] = None) -> Iterator[str]:
    """The data of each server-sent event of a streamed response, as it arrives (no buffering). Linear in the
    bytes (a 20 MB line without its newline took 1.6 s: each block was appended by copying and searched from
    the start); a line longer than MAX_EVENT_BYTES is an UpstreamError. `stop()`, asked after each block read,
    ends the events early."""
    buffer = bytearray()
    lines: list = []
    for block in _blocks(response.raw):
        searched = len(buffer)  # the newline, if any, is in the new bytes
        buffer += block
        start = 0
        while True:
            end = buffer.find(b"\n", max(start, searched))
            if end < 0:
                break
            line, start = bytes(buffer[start:end]).rstrip(b"\r"), end + 1
            if not line:
                if lines:
                    yield "\n".join(lines)
                    lines = []
            elif line.startswith(b"data:"):
                lines.append(line[5:].lstrip(b" ").decode("utf-8", "replace"))
        del buffer[:start]
        if len(buffer) > MAX_EVENT_BYTES:
            raise UpstreamError(f"the upstream server sent an event line longer than {MAX_EVENT_BYTES} bytes",
                                code="upstream_bad_response")
        if stop is not None and stop():
            return
    if lines:
        yield "\n".join(lines)


def _blocks(raw) -> Iterator[bytes]:
    """Bytes as they arrive: chunk by chunk for chunked answers, else whatever one read returns."""
    if raw.chunked and raw.supports_chunked_reads():
        yield from raw.read_chunked(decode_content=True)
        return
    while True:
        block = raw.read1(65536)
        if not block:
            return
        yield block


def _logprobs(value) -> tuple:
    content = value.get("content") if isinstance(value, dict) else None
    if not content:
        return ()
    out = []
    for item in content:
        if not isinstance(item, dict):
            continue
        tops = [TopLogprob(str(t.get("token", "")), _logprob(t), _bytes(t))
                for t in item.get("top_logprobs") or () if isinstance(t, dict)]
        out.append(TokenLogprob(str(item.get("token", "")), _logprob(item), _bytes(item), tops))
    return tuple(out)


def _logprob(item: dict) -> float:
    """An upstream's logprob, checked: a number, not NaN, at most 0 (-inf is written as OpenAI does, -9999). A NaN
    was passed on and written as bare NaN: not JSON."""
    value = item.get("logprob", 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value > 1e-6:
        raise UpstreamError("the upstream server sent a logprob that is not a log-probability",
                            code="upstream_bad_response")
    return float(value)


def _bytes(item: dict):
    value = item.get("bytes")
    ok = isinstance(value, list) and all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b < 256 for b in value)
    return value if ok else None


def _merge_tool_call(calls: dict, delta) -> None:
    """Streamed tool-call pieces (OpenAI's delta.tool_calls) into whole calls, by index."""
    if not isinstance(delta, dict):
        return
    call = calls.setdefault(delta.get("index", len(calls)), {"id": None, "type": "function",
                                                             "function": {"name": "", "arguments": ""}})
    if delta.get("id"):
        call["id"] = delta["id"]
    if delta.get("type"):
        call["type"] = delta["type"]
    function = delta.get("function") or {}
    if function.get("name"):
        call["function"]["name"] += function["name"]
    if function.get("arguments"):
        call["function"]["arguments"] += function["arguments"]


MAX_USAGE_TOKENS = 2**31 - 1  # an upstream's token count above this is not believed (10^30 reached /metrics)


def _int(usage, key) -> Optional[int]:
    value = usage.get(key) if isinstance(usage, dict) else None
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_USAGE_TOKENS
    return value if ok else None


# ---------------------------------------------------------------- errors

_CODE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_INTERNALS = re.compile(r"Traceback|File \"|\bat 0x[0-9a-f]+|<html", re.IGNORECASE)


def sanitise(text, limit: int = 300) -> str:
    """An upstream's message as this server may repeat it: one line, printable, short, no traceback."""
    text = " ".join(str(text or "").split())
    text = "".join(c for c in text if c.isprintable())
    if not text or _INTERNALS.search(text):
        return ""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def parse_error_body(body: bytes) -> tuple:
    """(message, code, param) from an error body in any of the shapes servers use: OpenAI's
    {"error": {...}}, {"error": "..."}, FastAPI's {"detail": ...} (FastDeploy), vLLM's older
    {"object": "error", "message": ...}, or plain text."""
    try:
        obj = json.loads(body.decode("utf-8", "replace")) if body else None
    except ValueError:
        return sanitise(body.decode("utf-8", "replace"), 200), None, None
    return _parse_error_obj(obj)


def _parse_error_obj(obj) -> tuple:
    if isinstance(obj, dict):
        for key in ("error", "detail"):
            if key in obj and obj[key] not in (None, ""):
                return _parse_error_obj(obj[key])
        message = obj.get("message") or obj.get("msg") or ""
        code, param = obj.get("code"), obj.get("param")
        return (sanitise(message), code if isinstance(code, str) and _CODE.match(code) else None,
                param if isinstance(param, str) and len(param) <= 100 else None)
    if isinstance(obj, list) and obj:  # FastAPI's validation errors: [{"loc": [...], "msg": ...}, ...]
        first = obj[0]
        if isinstance(first, dict):
            where = ".".join(str(p) for p in (first.get("loc") or ()) if p != "body")
            message = sanitise(first.get("msg") or "")
            return (f"{where}: {message}" if where and message else message), None, where or None
    if isinstance(obj, str):
        return sanitise(obj), None, None
    return "", None, None


def error_for_status(status: int, body: bytes, label: str, retry_after=None) -> ServiceError:
    """An upstream's answer other than 200 as this server's error."""
    message, code, param = parse_error_body(body)
    if status in (401, 403):
        return UpstreamError(f"the upstream server {label} refused this server's credentials (HTTP {status}); "
                             "check UPSTREAM_API_KEY", code="upstream_auth_failed")
    if status == 404:
        return UpstreamError(f"the upstream server {label} has no /v1/chat/completions or does not serve the model "
                             "(HTTP 404); check UPSTREAM", code="upstream_error")
    if status == 408:
        return RequestTimeout(message or "the upstream server timed out the request", code="request_timeout")
    if status == 429:
        seconds = int(retry_after) if str(retry_after or "").isdigit() else RETRY_SECONDS
        return ServerBusy(message or "the upstream server is busy; try again shortly", code=code or "queue_full",
                          retry_after=seconds)
    if status == 413:  # the upstream's own words would say "this server's limit": not this server's
        said = f" (it said: {message})" if message else ""
        return InvalidRequest(f"the request, as sent on to the upstream server {label} (images re-encoded), is larger "
                              f"than that server takes{said}", param=param, code="request_too_large")
    if 400 <= status < 500:
        return InvalidRequest(message or f"the upstream server refused the request (HTTP {status})",
                              param=param, code=code or "invalid_value")
    if status == 503:
        return NotReady(f"the upstream server {label} cannot answer now (HTTP 503"
                        + (f": {message})" if message else ")"), code="upstream_unavailable", retry_after=RETRY_SECONDS)
    return UpstreamError(f"the upstream server {label} failed (HTTP {status})", code="upstream_error")


def error_from_event(error) -> ServiceError:
    """An error event inside an upstream's stream (after its first chunk) as this server's error."""
    message, code, param = _parse_error_obj(error)
    kind = error.get("type") if isinstance(error, dict) else None
    if kind == "invalid_request_error":
        return InvalidRequest(message or "the upstream server refused the request", param=param,
                              code=code or "invalid_value")
    if kind == "timeout_error":
        return RequestTimeout(message or "the upstream server timed out the request", code="request_timeout")
    return UpstreamError("the upstream server failed during the answer" + (f": {message}" if message else ""),
                         code="upstream_error")


def describe_exception(exc: BaseException) -> str:
    """A short reason for a connection failure, without the library's nested reprs."""
    text = str(exc)
    for pattern, reason in (("Connection refused", "connection refused"), ("timed out", "timed out"),
                            ("Name or service not known", "unknown host"), ("nodename nor servname", "unknown host"),
                            ("Connection reset", "connection reset"), ("RemoteDisconnected", "connection closed"),
                            ("Connection aborted", "connection closed"), ("IncompleteRead", "answer cut off"),
                            ("without a finish_reason", "the answer ended early")):
        if pattern in text:
            return reason
    if isinstance(exc, requests.Timeout):
        return "timed out"
    return type(exc).__name__


def _load_tokenizer(path: Optional[str]):
    if not path:
        return None
    try:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - token counts then fall back to estimates
        log.warning("could not read the tokenizer %s (%s); token counts are estimates", path, exc)
        return None
