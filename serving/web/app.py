"""The Flask app: routes, hooks (request ids, API keys, the log line) and errors as OpenAI bodies.

`create_app(settings, engine)` builds it; the engine may be attached later (`attach_engine`), so
the server can bind its port before the model has loaded. The work of a chat request is the chat
service's (serving.chat); its wire format is serving.web.responses'; which status each error gets is
serving.web.http_errors'. Nothing here imports Paddle.
"""

from __future__ import annotations

import functools
import logging
import re
import time
import uuid
from dataclasses import dataclass

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request

from serving import completions, limits, protocol
from serving.web import http_errors
from serving.web.http_errors import printable
from serving.intake import images
from serving.web import openapi
from serving.web import responses
from serving.web.admission import Admission
from serving.web.auth import check_api_key
from serving.web.disconnects import DisconnectWatch
from serving.chat import ChatService
from serving.errors import InvalidRequest, UnsupportedMediaType
from serving.web.metrics import Metrics

log = logging.getLogger(__name__)

ROOT_TEXT = "Qwen2.5-VL API服务正在运行"  # the tutorial's text, which its users check for
CHAT = "/v1/chat/completions"
_REQUEST_ID = re.compile(r"^[\w.:-]{1,128}$")

api = Blueprint("api", __name__)


@dataclass
class AppState:
    settings: object
    service: ChatService
    metrics: Metrics
    admission: Admission
    spec: dict
    started: int  # when the app was made (the model card's `created`)
    disconnects: DisconnectWatch  # answers whose client has gone are cancelled (serving.web.disconnects)


def create_app(settings, engine=None) -> Flask:
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.json.ensure_ascii = False
    metrics = Metrics()
    service = ChatService(engine, settings, metrics)
    admission = Admission(settings.max_queue)
    metrics.watch(in_flight=admission.in_flight, engine=lambda: service.engine)
    app.extensions["qwenvl"] = AppState(settings, service, metrics, admission, openapi.build_spec(settings),
                                        protocol.now(), DisconnectWatch())
    images.limit_pillow(settings.max_image_pixels)
    if settings.max_queue >= settings.threads:
        log.warning("MAX_QUEUE (%d) >= THREADS (%d): excess requests wait for a thread instead of getting 429",
                    settings.max_queue, settings.threads)
    app.register_blueprint(api)
    return app


def attach_engine(app: Flask, engine) -> None:
    app.extensions["qwenvl"].service.engine = engine


def _state() -> AppState:
    return current_app.extensions["qwenvl"]


# ---------------------------------------------------------------- hooks

@api.before_app_request
def _start():
    client_id = request.headers.get("X-Request-Id", "")
    g.request_id = client_id if _REQUEST_ID.match(client_id) else uuid.uuid4().hex
    g.started = time.perf_counter()
    settings = _state().settings
    if settings.allowed_hosts and _host_name(request.host) not in {h.lower() for h in settings.allowed_hosts}:
        raise InvalidRequest(f"this server does not answer for the host {printable(request.host)!r} (ALLOWED_HOSTS)",
                             code="host_not_allowed")
    if request.method == "OPTIONS" and _cors_origin(settings) and request.headers.get("Access-Control-Request-Method"):
        return Response(status=204, headers=_preflight_headers())  # a browser's preflight carries no API key
    keys = settings.api_key
    if (request.path.startswith("/v1/") or request.path in TOKENIZER_PATHS) and keys:
        check_api_key(request.headers.get("Authorization", ""), keys)


# CORS (CORS_ALLOW_ORIGINS; off by default): what a browser's preflight is told it may send
CORS_PREFLIGHT = {"Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                  "Access-Control-Allow-Headers": "Authorization, Content-Type, X-Request-Id",
                  "Access-Control-Max-Age": "600"}
TOKENIZER_PATHS = ("/tokenize", "/detokenize")
# header names as RFC 9110 spells them (a token), comma-separated: anything else is not echoed back
_HEADER_NAMES = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+(\s*,\s*[!#$%&'*+.^_`|~0-9A-Za-z-]+)*")


def _preflight_headers() -> dict:
    """The preflight's answer. Allow-Headers also names the headers the page asked for: OpenAI's JavaScript SDK
    sends its own (x-stainless-os, x-stainless-retry-count, ...) with every request, which a fixed list refused.
    The origin check is the guard; no credentials are allowed (the key travels in Authorization, not cookies)."""
    asked = request.headers.get("Access-Control-Request-Headers", "").strip()
    headers = dict(CORS_PREFLIGHT, Vary="Access-Control-Request-Headers")  # _finish adds Origin
    if asked and len(asked) <= 2048 and _HEADER_NAMES.fullmatch(asked):
        names = headers["Access-Control-Allow-Headers"].split(", ")
        known = {name.lower() for name in names}
        names += [name for name in (part.strip() for part in asked.split(",")) if name.lower() not in known]
        headers["Access-Control-Allow-Headers"] = ", ".join(names)
    return headers


def _cors_origin(settings):
    """The request's Origin when CORS_ALLOW_ORIGINS allows it (None otherwise)."""
    origin = request.headers.get("Origin")
    allowed = settings.cors_allow_origins
    if not origin or not allowed:
        return None
    return origin if "*" in allowed or origin in allowed else None


@api.after_app_request
def _finish(response):
    response.headers["X-Request-Id"] = g.get("request_id", "")
    origin = _cors_origin(_state().settings)
    if origin is not None:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = "X-Request-Id, Retry-After"
        response.headers.add("Vary", "Origin")
    if not response.is_streamed:  # a stream is recorded when it ends
        # a 503 while the model loads (or the server stops) is normal operation, not a server error: logged at INFO
        loading = response.status_code == 503 and (_state().service.engine is None or _state().service.closing)
        _record(response.status_code, error=g.get("error"), completion_tokens=g.get("completion_tokens"),
                expected=loading, **_request_context())
    return response


@api.app_errorhandler(Exception)
def _error(exc: Exception):
    state = _state()
    problem = http_errors.problem(exc, g.get("request_id"), state.settings.max_request_bytes)
    g.error = problem
    state.metrics.rejected.labels(problem.reason).inc()
    return jsonify(problem.body()), problem.status, problem.headers


# ---------------------------------------------------------------- routes

@api.get("/")
def root():
    return Response(ROOT_TEXT, content_type="text/plain; charset=utf-8")  # mimetype= would add a second charset


@api.get("/health")
def health():
    state = _state()
    engine = state.service.engine
    if state.service.closing:  # a load balancer stops sending here
        body = protocol.Health(status="unavailable", model=state.settings.model_name, reason="the server is shutting down")
        return jsonify(body.model_dump(exclude_none=True)), 503
    if engine is None:
        body = protocol.Health(status="loading", model=state.settings.model_name, reason="the model is loading")
        return jsonify(body.model_dump(exclude_none=True)), 503
    ready, reason = engine.health()
    upstreams = engine.upstreams() if hasattr(engine, "upstreams") else None  # the upstream backends
    if not ready:
        body = protocol.Health(status="unavailable", model=engine.info.name, reason=reason, upstreams=upstreams)
        return jsonify(body.model_dump(exclude_none=True)), 503
    body = protocol.Health(status="ok", model=engine.info.name, demo=engine.info.is_demo,
                           reason=None if reason == "ok" else reason, upstreams=upstreams)
    return jsonify(body.model_dump(exclude_none=True))


@api.get("/metrics")
def prometheus():
    body, content_type = _state().metrics.render()
    return Response(body, content_type=content_type)


@api.get("/openapi.json")
def openapi_json():
    return jsonify(_state().spec)


@api.get("/v1/models")
def models():
    state = _state()
    info = state.service.ready_engine().info
    description = ("DEMO model with random weights: its answers are meaningless text"
                   if info.is_demo else "Qwen2.5-VL served with PaddlePaddle")
    # root is the id too, never info.source: a folder path tells a caller about this machine's disk
    card = protocol.ModelCard(id=info.name, created=state.started, root=info.name,
                              max_model_len=info.context_length or None, demo=info.is_demo, description=description)
    return jsonify(protocol.ModelList(data=[card]).model_dump())


@api.post(CHAT)
def chat_completions():
    state = _state()
    state.service.ready_engine()  # 503 while loading, before taking a place in the queue
    slot = state.admission.enter()  # 429 when MAX_QUEUE requests are in already
    try:
        response = _chat(state, slot)
    except BaseException:
        slot.release()
        raise
    if response.is_streamed:
        response.call_on_close(slot.release)  # also when the stream is never iterated
    else:
        slot.release()
    return response


def _chat(state: AppState, slot) -> Response:
    req = state.service.parse_request(_json_body())  # the limits that come before validation, then the models
    if req.model_extra:
        log.info("request %s: ignoring unknown fields %s", g.request_id, sorted(req.model_extra)[:10])
    reply = state.service.start_request(req, started=g.started)
    # a client that hangs up while its answer is generated: the answer is cancelled (499), its place freed
    unwatch = state.disconnects.watch(request.environ.get("waitress.client_disconnected"), reply)
    g.prompt_tokens = reply.prompt_tokens
    info = state.service.engine.info
    model, logprobs, fingerprint = info.name, bool(req.logprobs), info.fingerprint
    if req.stream:
        options = req.stream_options
        on_end = functools.partial(_stream_ended, state.metrics, slot, _request_context())
        try:
            body = responses.stream(reply, model=model, logprobs=logprobs, request_id=g.request_id, on_end=on_end,
                                    fingerprint=fingerprint, token_ids=bool(req.return_token_ids),
                                    include_usage=bool(options and options.include_usage),
                                    continuous_usage=protocol.continuous_usage(options))
        except BaseException:
            unwatch()
            raise
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Request-Id": g.request_id}
        response = Response(body, mimetype="text/event-stream", headers=headers)
        response.call_on_close(reply.cancel)  # also when the stream is never iterated
        response.call_on_close(unwatch)
        return response
    try:
        completion = responses.completion(reply, model=model, logprobs=logprobs, fingerprint=fingerprint,
                                          token_ids=bool(req.return_token_ids))
    finally:
        reply.cancel()
        unwatch()
    g.completion_tokens = completion["usage"]["completion_tokens"]
    g.prompt_tokens = completion["usage"]["prompt_tokens"]  # an upstream engine knows it only at the end
    return jsonify(completion)


@api.post("/v1/completions")
def text_completions():
    state = _state()
    state.service.ready_engine()
    slot = state.admission.enter()
    try:
        response = _completion(state)
    except BaseException:
        slot.release()
        raise
    if response.is_streamed:
        response.call_on_close(slot.release)
    else:
        slot.release()
    return response


def _completion(state: AppState) -> Response:
    req = completions.parse_completion(_json_body())
    reply, echo = completions.start(state.service, req, started=g.started)
    unwatch = state.disconnects.watch(request.environ.get("waitress.client_disconnected"), reply)
    g.prompt_tokens = reply.prompt_tokens
    info = state.service.engine.info
    options = dict(model=info.name, logprobs=req.logprobs is not None, fingerprint=info.fingerprint,
                   token_ids=bool(req.return_token_ids))
    if req.stream:
        stream_options = req.stream_options
        include_usage = bool(stream_options and stream_options.include_usage)
        options["continuous_usage"] = protocol.continuous_usage(stream_options)
        request_id, context = g.request_id, _request_context()

        def body():
            status, problem = 200, None
            try:
                for event in completions.stream_events(reply, echo, include_usage=include_usage, **options):
                    yield responses._event(event)
            except GeneratorExit:
                status = 499  # the client went away
                raise
            except Exception as exc:  # the stream has started: the error is its last event
                problem = http_errors.problem(exc, request_id)
                status = problem.status
                yield responses._event(problem.body())
            finally:
                reply.cancel()
                unwatch()
                # a stream is logged when it ends (the after-request hook skips streams), all choices counted
                _record(status, error=problem, completion_tokens=reply.completion_tokens, stream=True, **context)
            yield "data: [DONE]\n\n"

        return Response(body(), mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        out = completions.completion(reply, echo, **options)
    finally:
        reply.cancel()
        unwatch()
    g.completion_tokens = out["usage"]["completion_tokens"]
    return jsonify(out)


@api.post("/tokenize")
def tokenize():
    return jsonify(completions.tokenize(_state().service, _json_body()))


@api.post("/detokenize")
def detokenize():
    return jsonify(completions.detokenize(_state().service, _json_body()))


def _stream_ended(metrics, slot, context, status, problem, completion_tokens) -> None:
    if problem is not None:
        metrics.rejected.labels(problem.reason).inc()
    slot.release()
    _record(status, error=problem, completion_tokens=completion_tokens, stream=True, **context)


# ---------------------------------------------------------------- helpers

def _json_body():
    if request.mimetype != "application/json":
        # a web page can make a visitor's browser POST text/plain or a form to a server on their machine without
        # asking first; application/json needs the browser to ask (CORS preflight), which this server allows
        # only to the origins of CORS_ALLOW_ORIGINS
        raise UnsupportedMediaType(f"the request body must be sent as JSON with 'Content-Type: application/json' "
                                   f"(it was {printable(request.mimetype) or 'not declared'})",
                                   code="unsupported_media_type")
    data = request.get_data(cache=False)
    settings = _state().settings
    limits.check_raw_body(data, max_messages=settings.max_messages, max_parts=settings.max_content_parts)
    text = limits.json_text(data)
    del data  # the bytes are not needed beside their text: memory for the body and its parse, not three copies
    return limits.parse_json(text, max_tokens=limits.max_json_tokens(settings.max_messages, settings.max_content_parts))


def _host_name(host: str) -> str:
    """The Host header's name without its port, lower case ("[::1]:8080" -> "::1")."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _request_context() -> dict:
    """What the log line and the metrics say about the request (read while the request is current)."""
    # the route, not the raw path, so metrics labels stay few
    endpoint = request.url_rule.rule if request.url_rule is not None else "unmatched"
    return dict(request_id=g.get("request_id"), method=request.method, endpoint=endpoint,
                path=http_errors.printable(request.path),
                started=g.get("started", time.perf_counter()), prompt_tokens=g.get("prompt_tokens"),
                metrics=_state().metrics)


POLLED_ENDPOINTS = ("/health", "/metrics")  # health checks and Prometheus scrapes


def _record(status, *, request_id, method, endpoint, path, started, metrics, prompt_tokens=None,
            completion_tokens=None, error=None, stream=False, expected=False) -> None:
    """The one log line and the metrics of a finished request (`expected`: an answer of normal operation,
    such as 503 while the model loads, logged at INFO whatever its status)."""
    seconds = time.perf_counter() - started
    metrics.requests.labels(endpoint, str(status)).inc()
    metrics.latency.labels(endpoint).observe(seconds)
    if endpoint in POLLED_ENDPOINTS and (expected or status < 400):
        level = logging.DEBUG  # a platform polls these every few seconds: at INFO they would bury everything else
    else:
        level = (logging.INFO if expected or status < 400 or status == 499 else logging.WARNING if status < 500
                 else logging.ERROR)
    log.log(level, "request %s %s %s status=%s latency=%.3fs prompt_tokens=%s completion_tokens=%s%s%s",
            request_id, method, path, status, seconds, prompt_tokens, completion_tokens,
            " stream" if stream else "", f" error={error.code}: {error.message}" if error else "")
