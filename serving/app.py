"""The Flask app: routes, auth, body-size limit, OpenAI-shaped errors, SSE streaming.

`create_app(settings, engine)` builds it; the engine may be attached later (`attach_engine`)
so the server can bind its port before the model has loaded.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from . import images, protocol
from .errors import APIError, AuthenticationError, InternalError, InvalidRequest, ServiceUnavailable

log = logging.getLogger(__name__)

ROOT_TEXT = "Qwen2.5-VL API服务正在运行"  # the tutorial's text, which its users check for


def create_app(settings, engine=None) -> Flask:
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.config["JSON_AS_ASCII"] = False
    app.json.ensure_ascii = False
    app.extensions["qwenvl"] = {"settings": settings, "engine": engine, "started": protocol.now()}

    def state():
        return app.extensions["qwenvl"]

    def ready_engine():
        engine = state()["engine"]
        if engine is None:
            raise ServiceUnavailable("the model is still loading; try again shortly", code="model_loading",
                                     headers={"Retry-After": "5"})
        return engine

    @app.before_request
    def _start():
        g.request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        g.started = time.perf_counter()
        if request.path.startswith("/v1/") and settings.api_key:
            _check_key(settings.api_key)

    @app.after_request
    def _finish(response):
        response.headers["X-Request-Id"] = g.get("request_id", "")
        if not response.is_streamed:
            _log_request(response.status_code)
        return response

    @app.get("/")
    def root():
        return Response(ROOT_TEXT, mimetype="text/plain; charset=utf-8")

    @app.get("/health")
    def health():
        engine = state()["engine"]
        if engine is None:
            return jsonify({"status": "loading", "model": settings.model_name}), 503
        return jsonify({"status": "ok", "model": engine.loaded.name, "demo": engine.loaded.is_demo})

    @app.get("/v1/models")
    def models():
        engine = ready_engine()
        loaded = engine.loaded
        description = ("DEMO model with random weights: its answers are meaningless text"
                       if loaded.is_demo else "Qwen2.5-VL served with PaddlePaddle")
        card = protocol.ModelCard(id=loaded.name, created=state()["started"], root=loaded.source,
                                  demo=loaded.is_demo, description=description)
        return jsonify(protocol.ModelList(data=[card]).model_dump())

    @app.post("/v1/chat/completions")
    def chat_completions():
        engine = ready_engine()
        body = request.get_json(force=True, silent=True)
        if body is None:
            raise InvalidRequest("the request body is not valid JSON", code="invalid_json")
        req = protocol.parse_request(body)
        if req.model_extra:
            log.info("request %s: ignoring unknown fields %s", g.request_id, sorted(req.model_extra))
        turns = protocol.normalise_messages(req)
        turns = _load_images(turns, settings)
        prompt = engine.build_prompt(turns)
        params = engine.sampling_params(
            max_tokens=req.max_completion_tokens or req.max_tokens, temperature=req.temperature,
            top_p=req.top_p, top_k=req.top_k, repetition_penalty=req.repetition_penalty,
            seed=req.seed, stop=req.stop)
        g.prompt_tokens = prompt.prompt_tokens
        completion_id, created = protocol.new_completion_id(), protocol.now()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _stream_response(engine, prompt, params, completion_id, created, include_usage)
        result = engine.generate(prompt, params)
        g.completion_tokens = result.finish.completion_tokens
        completion = protocol.ChatCompletion(
            id=completion_id, created=created, model=engine.loaded.name,
            choices=[protocol.Choice(message=protocol.ResponseMessage(content=result.text),
                                     finish_reason=result.finish.finish_reason)],
            usage=protocol.usage(result.finish.prompt_tokens, result.finish.completion_tokens))
        return jsonify(completion.model_dump())

    def _stream_response(engine, prompt, params, completion_id, created, include_usage):
        events = engine.stream(prompt, params)
        first = next(events)  # errors before the first token become a plain JSON error, not a broken stream
        request_id = g.request_id
        name = engine.loaded.name

        def chunk(delta=None, finish=None, usage=None, choices=True) -> str:
            body = protocol.ChatCompletionChunk(
                id=completion_id, created=created, model=name,
                choices=[protocol.ChunkChoice(delta=delta or protocol.Delta(), finish_reason=finish)] if choices else [],
                usage=usage)
            return "data: " + json.dumps(body.model_dump(exclude_none=False), ensure_ascii=False) + "\n\n"

        def sse():
            status, finished = 200, None
            try:
                yield chunk(protocol.Delta(role="assistant", content=""))
                for event in _chain(first, events):
                    if isinstance(event, str):
                        yield chunk(protocol.Delta(content=event))
                    else:
                        finished = event
                yield chunk(finish=finished.finish_reason)
                if include_usage:
                    yield chunk(usage=protocol.usage(finished.prompt_tokens, finished.completion_tokens),
                                choices=False)
                yield "data: [DONE]\n\n"
            except APIError as exc:  # after the stream started, the error travels in the stream
                status = exc.status
                yield "data: " + json.dumps(exc.body(), ensure_ascii=False) + "\n\n"
            except GeneratorExit:
                status = 499  # the client went away; closing `events` cancels the generation
                raise
            finally:
                events.close()
                _log_line(request_id, "POST", "/v1/chat/completions", status, time.perf_counter() - g_started,
                          prompt.prompt_tokens, finished.completion_tokens if finished else None, stream=True)

        g_started = g.started
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Request-Id": request_id}
        return Response(sse(), mimetype="text/event-stream", headers=headers)

    @app.errorhandler(APIError)
    def _api_error(exc: APIError):
        level = logging.ERROR if exc.status >= 500 else logging.WARNING
        log.log(level, "request %s: %s %s -> %d %s", g.get("request_id"), request.method, request.path,
                exc.status, exc.message)
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
        log.exception("request %s: internal error", g.get("request_id"))
        return _api_error(InternalError(f"internal error ({type(exc).__name__}); the server is still up"))

    return app


def attach_engine(app: Flask, engine) -> None:
    app.extensions["qwenvl"]["engine"] = engine


def _chain(first, rest):
    yield first
    yield from rest


def _check_key(keys) -> None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
    token_bytes = token.strip().encode()
    # compare against every key, in constant time, so timing tells nothing about which was close
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(token_bytes, key.encode())
    if not matched:
        raise AuthenticationError("invalid API key", code="invalid_api_key")


def _load_images(turns, settings):
    count = sum(isinstance(p, protocol.ImageRef) for t in turns for p in t.parts)
    if count > settings.max_images:
        raise InvalidRequest(f"the request has {count} images; this server takes at most {settings.max_images}",
                             param="messages", code="too_many_images")
    for turn in turns:
        for k, part in enumerate(turn.parts):
            if isinstance(part, protocol.ImageRef):
                img = images.load_image(part.source, param=part.param, allow_urls=settings.allow_image_urls,
                                        timeout=settings.image_fetch_timeout)
                min_pixels = _within(part.min_pixels, settings.min_pixels, settings.max_pixels, settings.min_pixels)
                max_pixels = _within(part.max_pixels, settings.min_pixels, settings.max_pixels, settings.max_pixels)
                turn.parts[k] = images.fit_pixels(img, min_pixels, max(min_pixels, max_pixels), param=part.param)
    return turns


def _within(value, low, high, default):
    return default if value is None else max(low, min(high, value))


def _log_request(status: int) -> None:
    _log_line(g.get("request_id"), request.method, request.path, status, time.perf_counter() - g.get("started", 0),
              g.get("prompt_tokens"), g.get("completion_tokens"))


def _log_line(request_id, method, path, status, seconds, prompt_tokens=None, completion_tokens=None,
              stream=False) -> None:
    log.info("request %s %s %s status=%s latency=%.3fs prompt_tokens=%s completion_tokens=%s%s",
             request_id, method, path, status, seconds, prompt_tokens, completion_tokens,
             " stream" if stream else "")
