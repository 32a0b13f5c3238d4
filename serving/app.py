"""The Flask app: routes, auth, limits, OpenAI-shaped errors, SSE streaming, metrics, OpenAPI.

`create_app(settings, engine)` builds it; the engine may be attached later (`attach_engine`)
so the server can bind its port before the model has loaded.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from . import images, openapi, protocol
from .admission import Admission, TimedEvents
from .errors import APIError, AuthenticationError, InternalError, InvalidRequest, ServiceUnavailable
from .metrics import Metrics, image_source

log = logging.getLogger(__name__)

ROOT_TEXT = "Qwen2.5-VL API服务正在运行"  # the tutorial's text, which its users check for
CHAT = "/v1/chat/completions"
_REQUEST_ID = re.compile(r"^[\w.:-]{1,128}$")


def create_app(settings, engine=None) -> Flask:
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.config["JSON_AS_ASCII"] = False
    app.json.ensure_ascii = False
    metrics, admission = Metrics(), Admission(settings.max_queue)
    app.extensions["qwenvl"] = state = {"settings": settings, "engine": engine, "started": protocol.now(),
                                        "metrics": metrics, "admission": admission}
    metrics.watch(queue_depth=lambda: _queue_depth(state["engine"]), in_flight=admission.in_flight,
                  engine=lambda: state["engine"])
    images.limit_pillow(settings.max_image_pixels)
    spec = openapi.build_spec(settings)
    if settings.max_queue >= settings.threads:
        log.warning("MAX_QUEUE (%d) >= THREADS (%d): excess requests wait for a thread instead of getting 429",
                    settings.max_queue, settings.threads)

    def ready_engine():
        if state["engine"] is None:
            raise ServiceUnavailable("the model is still loading; try again shortly", code="model_loading",
                                     headers={"Retry-After": "5"})
        return state["engine"]

    def record(status, *, request_id, method, endpoint, path, started, prompt_tokens=None,
               completion_tokens=None, error=None, stream=False):
        """The one log line and the metrics of a finished request."""
        seconds = time.perf_counter() - started
        metrics.requests.labels(endpoint, str(status)).inc()
        metrics.latency.labels(endpoint).observe(seconds)
        level = logging.INFO if status < 400 or status == 499 else logging.WARNING if status < 500 else logging.ERROR
        log.log(level, "request %s %s %s status=%s latency=%.3fs prompt_tokens=%s completion_tokens=%s%s%s",
                request_id, method, path, status, seconds, prompt_tokens, completion_tokens,
                " stream" if stream else "", f" error={error.code}: {error.message}" if error else "")

    @app.before_request
    def _start():
        client_id = request.headers.get("X-Request-Id", "")
        g.request_id = client_id if _REQUEST_ID.match(client_id) else uuid.uuid4().hex
        g.started = time.perf_counter()
        if request.path.startswith("/v1/") and settings.api_key:
            _check_key(settings.api_key)

    @app.after_request
    def _finish(response):
        response.headers["X-Request-Id"] = g.get("request_id", "")
        if not response.is_streamed:
            record(response.status_code, request_id=g.get("request_id"), method=request.method,
                   endpoint=_endpoint(), path=request.path, started=g.get("started", time.perf_counter()),
                   prompt_tokens=g.get("prompt_tokens"), completion_tokens=g.get("completion_tokens"),
                   error=g.get("error"))
        return response

    @app.get("/")
    def root():
        return Response(ROOT_TEXT, mimetype="text/plain; charset=utf-8")

    @app.get("/health")
    def health():
        engine = state["engine"]
        if engine is None:
            body = protocol.Health(status="loading", model=settings.model_name, reason="the model is loading")
            return jsonify(body.model_dump(exclude_none=True)), 503
        body = protocol.Health(status="ok", model=engine.loaded.name, demo=engine.loaded.is_demo)
        return jsonify(body.model_dump(exclude_none=True))

    @app.get("/metrics")
    def prometheus():
        body, content_type = metrics.render()
        return Response(body, content_type=content_type)

    @app.get("/openapi.json")
    def openapi_json():
        return jsonify(spec)

    @app.get("/v1/models")
    def models():
        loaded = ready_engine().loaded
        description = ("DEMO model with random weights: its answers are meaningless text"
                       if loaded.is_demo else "Qwen2.5-VL served with PaddlePaddle")
        card = protocol.ModelCard(id=loaded.name, created=state["started"], root=loaded.source,
                                  demo=loaded.is_demo, description=description)
        return jsonify(protocol.ModelList(data=[card]).model_dump())

    @app.post(CHAT)
    def chat_completions():
        engine = ready_engine()
        slot = admission.enter()  # 429 when MAX_QUEUE requests are in already
        try:
            response = chat(engine, slot)
        except BaseException:
            slot.release()
            raise
        if response.is_streamed:
            response.call_on_close(slot.release)  # also when the stream is never iterated
        else:
            slot.release()
        return response

    def chat(engine, slot):
        req = protocol.parse_request(_json_body())
        if req.model_extra:
            log.info("request %s: ignoring unknown fields %s", g.request_id, sorted(req.model_extra)[:10])
        # checked before any image is fetched or decoded
        params = engine.sampling_params(
            max_tokens=req.max_completion_tokens or req.max_tokens or settings.default_max_tokens,
            max_tokens_limit=settings.max_tokens_limit, temperature=req.temperature, top_p=req.top_p,
            top_k=req.top_k, repetition_penalty=req.repetition_penalty, seed=req.seed, stop=req.stop)
        turns = _load_images(protocol.normalise_messages(req))
        prompt = engine.build_prompt(turns)
        g.prompt_tokens = prompt.prompt_tokens
        job = engine.submit(prompt, params)  # checks the prompt against the context
        events = TimedEvents(job, g.started + settings.request_timeout, settings.request_timeout)
        tracker = _Tracker(metrics, g.started)
        completion_id, created = protocol.new_completion_id(), protocol.now()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return stream(engine, events, tracker, slot, completion_id, created, include_usage)
        pieces = []
        try:
            for event in events:
                tracker.see(event)
                if isinstance(event, str):
                    pieces.append(event)
        finally:
            events.close()
        finished = tracker.finished
        if finished is None:
            raise InternalError("the generation ended without a result")
        g.completion_tokens = finished.completion_tokens
        completion = protocol.ChatCompletion(
            id=completion_id, created=created, model=engine.loaded.name,
            choices=[protocol.Choice(message=protocol.ResponseMessage(content="".join(pieces)),
                                     finish_reason=finished.finish_reason)],
            usage=protocol.usage(finished.prompt_tokens, finished.completion_tokens))
        return jsonify(completion.model_dump())

    def stream(engine, events, tracker, slot, completion_id, created, include_usage):
        iterator = iter(events)
        try:  # errors before the first event become a plain JSON error, not a broken stream
            first = next(iterator)
        except BaseException:
            events.close()
            raise
        tracker.see(first)
        name = engine.loaded.name
        context = dict(request_id=g.request_id, method=request.method, endpoint=_endpoint(), path=request.path,
                       started=g.started, prompt_tokens=g.prompt_tokens, stream=True)

        def chunk(delta=None, finish=None, usage=None, choices=True) -> str:
            body = protocol.ChatCompletionChunk(
                id=completion_id, created=created, model=name,
                choices=[protocol.ChunkChoice(delta=delta or protocol.Delta(), finish_reason=finish)]
                if choices else [],
                usage=usage)
            return "data: " + json.dumps(body.model_dump(exclude_none=False), ensure_ascii=False) + "\n\n"

        def sse():
            status, error = 200, None
            try:
                yield chunk(protocol.Delta(role="assistant", content=""))
                if isinstance(first, str):
                    yield chunk(protocol.Delta(content=first))
                for event in iterator:
                    tracker.see(event)
                    if isinstance(event, str):
                        yield chunk(protocol.Delta(content=event))
                finished = tracker.finished
                if finished is None:
                    raise InternalError("the generation ended without a result")
                yield chunk(finish=finished.finish_reason)
                if include_usage:
                    yield chunk(usage=protocol.usage(finished.prompt_tokens, finished.completion_tokens),
                                choices=False)
                yield "data: [DONE]\n\n"
            except GeneratorExit:
                status = 499  # the client went away; closing `events` cancels the generation
                raise
            except Exception as exc:  # after the stream started, the error travels in the stream
                error = _internal(exc, context["request_id"])
                status = error.status
                metrics.rejected.labels(error.code or error.type).inc()
                yield "data: " + json.dumps(error.body(), ensure_ascii=False) + "\n\n"
            finally:
                events.close()
                slot.release()
                done = tracker.finished
                record(status, completion_tokens=done.completion_tokens if done else None, error=error, **context)

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Request-Id": g.request_id}
        return Response(sse(), mimetype="text/event-stream", headers=headers)

    def _load_images(turns):
        count = sum(isinstance(p, protocol.ImageRef) for t in turns for p in t.parts)
        if count > settings.max_images:
            raise InvalidRequest(f"the request has {count} images; this server takes at most {settings.max_images}",
                                 param="messages", code="too_many_images")
        for turn in turns:
            for k, part in enumerate(turn.parts):
                if isinstance(part, protocol.ImageRef):
                    low = _within(part.min_pixels, settings.min_pixels, settings.max_pixels, settings.min_pixels)
                    high = max(low, _within(part.max_pixels, settings.min_pixels, settings.max_pixels,
                                            settings.max_pixels))
                    img = images.load_image(
                        part.source, param=part.param, allow_urls=settings.allow_image_urls,
                        timeout=settings.image_fetch_timeout, max_bytes=settings.max_image_bytes,
                        pixel_limit=settings.max_image_pixels, allow_hosts=settings.image_url_allow_hosts,
                        target_pixels=high)
                    metrics.images.labels(image_source(part.source)).inc()
                    turn.parts[k] = images.fit_pixels(img, low, high, param=part.param)
        return turns

    @app.errorhandler(APIError)
    def _api_error(exc: APIError):
        g.error = exc
        metrics.rejected.labels(exc.code or exc.type).inc()
        return jsonify(exc.body()), exc.status, exc.headers

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        if isinstance(exc, RequestEntityTooLarge):
            error = APIError(f"the request body is larger than this server's limit of {settings.max_request_bytes} "
                             "bytes", status=413, code="request_too_large")
        else:
            kind = "not_found" if exc.code == 404 else "invalid_request_error"
            error = APIError(f"{exc.name}: {request.method} {request.path}", status=exc.code, type=kind,
                             code=exc.name.lower().replace(" ", "_"))
        return _api_error(error)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        return _api_error(_internal(exc, g.get("request_id")))

    return app


def attach_engine(app: Flask, engine) -> None:
    app.extensions["qwenvl"]["engine"] = engine


class _Tracker:
    """Time to first text, and token counts, of one generation, into the metrics."""

    def __init__(self, metrics: Metrics, started: float):
        self.metrics, self.started = metrics, started
        self.first_text = False
        self.finished = None

    def see(self, event) -> None:
        if isinstance(event, str):
            if not self.first_text:
                self.first_text = True
                self.metrics.ttft.observe(time.perf_counter() - self.started)
            return
        self.finished = event
        self.metrics.prompt_tokens.inc(event.prompt_tokens)
        self.metrics.finished_generation(event.completion_tokens, event.seconds)


def _internal(exc: Exception, request_id) -> APIError:
    if isinstance(exc, APIError):
        return exc
    log.error("request %s: internal error", request_id, exc_info=exc)
    return InternalError(f"internal error ({type(exc).__name__}); the server is still up")


def _json_body():
    try:
        return json.loads(request.get_data(cache=False))
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        raise InvalidRequest("the request body is not valid JSON", code="invalid_json") from None


def _endpoint() -> str:
    """The route, not the raw path, so metrics labels stay few."""
    return request.url_rule.rule if request.url_rule is not None else "unmatched"


def _queue_depth(engine) -> int:
    depth = getattr(engine, "queue_depth", None)
    return depth() if depth is not None else 0


def _check_key(keys) -> None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    # "token" is how AI Studio's gateway and its clients send access tokens
    if scheme.lower() not in ("bearer", "token") or not token:
        raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
    token_bytes = token.strip().encode()
    # compare against every key, in constant time, so timing tells nothing about which was close
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(token_bytes, key.encode())
    if not matched:
        raise AuthenticationError("invalid API key", code="invalid_api_key")


def _within(value, low, high, default):
    return default if value is None else max(low, min(high, value))
