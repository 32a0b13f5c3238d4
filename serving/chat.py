"""The chat service: the one pipeline from a chat request to an engine's answer.

The HTTP app, the notebook chat widget and the benchmark all go through it:

    service = ChatService(engine, settings)
    reply = service.start_request(protocol.parse_request(body))           # the app
    reply = service.start(turns, service.sampling_params(max_tokens=64))  # the widget, the benchmark
    for event in reply: ...        # TextDelta pieces (str), then one Finished

It owns the request limits (each read from Settings, their one owner), the image intake (data URLs,
base64 or guarded URLs, decoded in memory, each image sized within its pixel budget) and the time
limit. The engine (serving.engine_api.Engine) sees only chat turns whose images are sized PIL
images, and SamplingParams.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

from . import images, protocol
from .errors import ImageError, InvalidRequest, NotReady, RequestTimeout
from .jobs import Finished, SamplingParams

RETRY_SECONDS = 5  # what a client told "not ready" should wait before trying again


class ChatService:
    def __init__(self, engine, settings, metrics=None):
        self.engine = engine  # None while the model loads (serving.app.attach_engine sets it)
        self.settings = settings
        self.metrics = metrics  # serving.metrics.Metrics, or None (the widget, the benchmark)

    def ready_engine(self):
        """The engine, when it can answer now; NotReady otherwise."""
        engine = self.engine
        if engine is None:
            raise NotReady("the model is still loading; try again shortly", code="model_loading",
                           retry_after=RETRY_SECONDS)
        ready, reason = engine.health()
        if not ready:
            raise NotReady(f"the model cannot answer now: {reason}", code="engine_unavailable",
                           retry_after=RETRY_SECONDS)
        return engine

    # ------------------------------------------------------------------ limits

    def sampling_params(self, *, max_tokens: Optional[int] = None, temperature=None, top_p=None, top_k=None,
                        repetition_penalty=None, presence_penalty=None, frequency_penalty=None, seed=None,
                        stop=None, logprobs=None, top_logprobs=None) -> SamplingParams:
        """SamplingParams within this server's limits. Value ranges (temperature 0..2, ...) are the
        request models' (serving.protocol); the limits that depend on settings are checked here."""
        limit = self.settings.max_tokens_limit
        if max_tokens is not None and max_tokens > limit:
            raise InvalidRequest(f"max_tokens is {max_tokens}, more than this server's limit of {limit}",
                                 param="max_tokens", code="max_tokens_too_large")
        if top_logprobs is not None and not logprobs:
            raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
        return SamplingParams(
            max_tokens=max_tokens or self.settings.default_max_tokens, temperature=temperature, top_p=top_p,
            top_k=top_k, repetition_penalty=repetition_penalty, presence_penalty=presence_penalty or 0.0,
            frequency_penalty=frequency_penalty or 0.0, seed=seed, stop=list(stop or []),
            logprobs=bool(logprobs), top_logprobs=top_logprobs or 0)

    def params_from_request(self, req: protocol.ChatCompletionRequest) -> SamplingParams:
        return self.sampling_params(
            max_tokens=req.max_completion_tokens or req.max_tokens, temperature=req.temperature, top_p=req.top_p,
            top_k=req.top_k, repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty, seed=req.seed, stop=req.stop, logprobs=req.logprobs,
            top_logprobs=req.top_logprobs)

    # ------------------------------------------------------------------ images

    def load_images(self, turns: list) -> list:
        """Turn every ImageRef of `turns` into a PIL image sized for the model, in place; images that
        are PIL images already (the widget's uploads, sized by image_from_bytes) stay as they are."""
        s = self.settings
        count = sum(not isinstance(p, str) for t in turns for p in t.parts)
        if count > s.max_images:
            raise InvalidRequest(f"the request has {count} images; this server takes at most {s.max_images}",
                                 param="messages", code="too_many_images")
        for turn in turns:
            for k, part in enumerate(turn.parts):
                if isinstance(part, protocol.ImageRef):
                    low, high = self.pixel_budget(part)
                    img = images.load_image(
                        part.source, param=part.param, allow_urls=s.allow_image_urls, timeout=s.image_fetch_timeout,
                        max_bytes=s.max_image_bytes, pixel_limit=s.max_image_pixels,
                        allow_hosts=s.image_url_allow_hosts, target_pixels=high)
                    if self.metrics is not None:
                        self.metrics.image_loaded(part.source)
                    turn.parts[k] = self.fit_image(img, param=part.param, budget=(low, high))
        return turns

    def fit_image(self, img, *, param: Optional[str] = None, budget: Optional[tuple] = None):
        """A PIL image resized once to what the vision tower takes: sides multiples of 28, pixels within
        `budget` (min, max), by default the server's MIN_PIXELS..MAX_PIXELS."""
        low, high = budget or (self.settings.min_pixels, self.settings.max_pixels)
        return images.fit_pixels(img, low, high, param=param)

    def pixel_budget(self, ref: protocol.ImageRef) -> tuple:
        """(min, max) pixels for one image: the part's own min_pixels / max_pixels, kept within the server's."""
        s = self.settings
        low = _within(ref.min_pixels, s.min_pixels, s.max_pixels, s.min_pixels)
        return low, max(low, _within(ref.max_pixels, s.min_pixels, s.max_pixels, s.max_pixels))

    def image_from_bytes(self, data: bytes, *, param: str):
        """An uploaded file -> a PIL image sized for the model (ImageError when it is not an image)."""
        s = self.settings
        if len(data) > s.max_image_bytes:
            raise ImageError(f"image is {len(data)} bytes, more than the limit of {s.max_image_bytes}",
                                    param=param, code="image_too_large")
        img = images.decode_image_bytes(data, param=param, pixel_limit=s.max_image_pixels, target_pixels=s.max_pixels)
        return self.fit_image(img, param=param)

    # ------------------------------------------------------------------ generation

    def start(self, turns: list, params: SamplingParams, *, started: Optional[float] = None,
              time_limit: Optional[float] = None) -> "Reply":
        """Load the turns' images and start the engine on them. `started` (time.perf_counter()) is when
        the request arrived, for time to first token and the time limit (seconds, None: none)."""
        engine = self.ready_engine()
        started = time.perf_counter() if started is None else started
        turns = self.load_images(turns)
        return Reply(engine.start(turns, params), started=started, time_limit=time_limit, metrics=self.metrics)

    def start_request(self, req: protocol.ChatCompletionRequest, *, started: Optional[float] = None) -> "Reply":
        """A parsed API request, under REQUEST_TIMEOUT. Its limits are checked before any image is fetched."""
        params = self.params_from_request(req)
        turns = protocol.normalise_messages(req)
        return self.start(turns, params, started=started, time_limit=self.settings.request_timeout)


@dataclass
class Answer:
    text: str
    finished: Optional[Finished]  # None when the generation was cancelled first
    logprobs: list = field(default_factory=list)  # serving.jobs.TokenLogprob per token, when asked for


class Reply:
    """One answer being generated. Iterating yields TextDelta pieces, then one Finished (nothing more
    once cancelled); past the time limit the generation is cancelled and RequestTimeout raised. The
    engine's reads never block longer than a short poll, so a stuck engine cannot hold a caller past it.
    With metrics, the time to first text and the token counts are recorded."""

    def __init__(self, generation, *, started: float, time_limit: Optional[float] = None, metrics=None):
        self.generation = generation
        self.prompt_tokens = generation.prompt_tokens
        self.started = started
        self.time_limit = time_limit
        self.metrics = metrics
        self.finished: Optional[Finished] = None
        self._seen_text = False

    def __iter__(self) -> Iterator:
        deadline = self.started + self.time_limit if self.time_limit is not None else None
        try:
            for event in self.generation.until(deadline):
                self._see(event)
                yield event
        except TimeoutError:
            self.cancel()
            raise RequestTimeout(f"the request took longer than this server's limit of {self.time_limit:g} seconds "
                                 "and was cancelled", code="request_timeout") from None

    def cancel(self) -> None:
        """Stop the generation (from any thread); the engine drops it at its next step."""
        self.generation.cancel()

    def collect(self) -> Answer:
        pieces, logprobs = [], []
        for event in self:
            if isinstance(event, str):
                pieces.append(event)
                logprobs.extend(getattr(event, "logprobs", ()))
        return Answer("".join(pieces), self.finished, logprobs)

    def _see(self, event) -> None:
        if isinstance(event, str):
            if not self._seen_text:
                self._seen_text = True
                if self.metrics is not None:
                    self.metrics.first_text(time.perf_counter() - self.started)
            return
        self.finished = event
        if self.metrics is not None:
            self.metrics.finished_generation(event.prompt_tokens, event.completion_tokens, event.seconds)


def _within(value, low, high, default):
    return default if value is None else max(low, min(high, value))
