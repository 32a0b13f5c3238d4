"""The chat service: the one pipeline from a chat request to an engine's answer.

The HTTP app, the notebook chat widget and the benchmark all go through it:

    service = ChatService(engine, settings)
    reply = service.start_request(protocol.parse_request(body))           # the app
    reply = service.start(turns, service.sampling_params(max_tokens=64))  # the widget, the benchmark
    for event in reply: ...        # TextDelta pieces (str) and ToolCallDelta pieces, then one Finished

It owns the request limits (each read from Settings, their one owner), the image intake (data URLs,
base64 or guarded URLs, decoded in memory, each image sized within its pixel budget) and the time
limit. The engine (serving.engines.base.Engine) sees only chat turns whose images are sized PIL
images, and SamplingParams.
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Iterator, Optional

from PIL import Image

from serving import limits, protocol, structured
from serving.intake import images
from serving.intake import video
from serving.errors import ImageError, InvalidRequest, NotReady, RequestTimeout
from serving.intake.membudget import MemoryBudget
from serving.jobs import Finished, SamplingParams, ToolCallDelta

RETRY_SECONDS = 5  # what a client told "not ready" should wait before trying again


class ChatService:
    def __init__(self, engine, settings, metrics=None):
        self.engine = engine  # None while the model loads (serving.web.app.attach_engine sets it)
        self.settings = settings
        self.metrics = metrics  # serving.web.metrics.Metrics, or None (the widget, the benchmark)
        self.decode_budget = MemoryBudget(settings.image_decode_mb * 2**20)  # images being decoded at once
        self.closing = False  # shutting down (begin_shutdown): no new answers
        self._replies: "weakref.WeakSet[Reply]" = weakref.WeakSet()  # answers being generated (end_all)
        self._replies_lock = threading.Lock()

    def ready_engine(self):
        """The engine, when it can answer now; NotReady otherwise."""
        engine = self.engine
        if self.closing:
            raise NotReady("the server is shutting down; try again shortly", code="shutting_down",
                           retry_after=RETRY_SECONDS)
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
                        stop=None, logprobs=None, top_logprobs=None, stream=False,
                        max_tokens_field: str = "max_tokens") -> SamplingParams:
        """SamplingParams within this server's limits. Value ranges (temperature 0..2, ...) are the
        request models' (serving.protocol); the limits that depend on settings are checked here.
        `max_tokens_field` is the request field max_tokens came from, for the error's param."""
        limit = self.settings.max_tokens_limit
        if max_tokens is not None and max_tokens > limit:
            raise InvalidRequest(f"{max_tokens_field} is {max_tokens}, more than this server's limit of {limit}",
                                 param=max_tokens_field, code="max_tokens_too_large")
        if top_logprobs is not None and not logprobs:
            raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
        return SamplingParams(
            max_tokens=max_tokens or self.settings.default_max_tokens, temperature=temperature, top_p=top_p,
            top_k=top_k, repetition_penalty=repetition_penalty, presence_penalty=presence_penalty or 0.0,
            frequency_penalty=frequency_penalty or 0.0, seed=seed, stop=list(stop or []),
            logprobs=bool(logprobs), top_logprobs=top_logprobs or 0, stream=bool(stream))

    def params_from_request(self, req: protocol.ChatCompletionRequest) -> SamplingParams:
        params = self._params_from_request(req)
        params.min_tokens, params.ignore_eos = req.min_tokens or 0, bool(req.ignore_eos)
        params.stop_token_ids, params.min_p = list(req.stop_token_ids or []), req.min_p or 0.0
        word_rules(params, req)
        # the deltas' token ids also count the tokens of vLLM's continuous_usage_stats
        params.return_token_ids = bool(req.return_token_ids) or protocol.continuous_usage(req.stream_options)
        if params.min_tokens > params.max_tokens:
            raise InvalidRequest(f"min_tokens ({params.min_tokens}) is more than max_tokens ({params.max_tokens})",
                                 param="min_tokens")
        params.continue_final, params.generation_prompt = prompt_ending(req)
        if req.prompt_logprobs is not None and req.stream:
            raise InvalidRequest("prompt_logprobs is not available when stream is true (as in vLLM)",
                                 param="prompt_logprobs")
        params.prompt_logprobs = req.prompt_logprobs
        return params

    def _params_from_request(self, req: protocol.ChatCompletionRequest) -> SamplingParams:
        return self.sampling_params(
            max_tokens=req.max_completion_tokens or req.max_tokens, temperature=req.temperature, top_p=req.top_p,
            top_k=req.top_k, repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty, seed=req.seed, stop=req.stop, logprobs=req.logprobs,
            top_logprobs=req.top_logprobs, stream=req.stream,
            max_tokens_field="max_completion_tokens" if req.max_completion_tokens else "max_tokens")

    # ------------------------------------------------------------------ images

    def load_images(self, turns: list, *, deadline: Optional[float] = None) -> list:
        """Turn every ImageRef of `turns` into a PIL image sized for the model and every VideoRef into a
        serving.intake.video.Video, in place; images and videos loaded already (the widget's uploads, sized by
        image_from_bytes / video_from_bytes) stay as they are. `deadline` (time.perf_counter()) bounds decoding."""
        s = self.settings
        count = sum(not isinstance(p, (str, protocol.VideoRef, video.Video)) for t in turns for p in t.parts)
        if count > s.max_images:
            raise InvalidRequest(f"the request has {count} images; this server takes at most {s.max_images}",
                                 param="messages", code="too_many_images")
        videos = sum(isinstance(p, (protocol.VideoRef, video.Video)) for t in turns for p in t.parts)
        if videos > s.max_videos:
            raise video.VideoError(f"the request has {videos} videos; this server takes at most {s.max_videos}",
                                   param="messages", code="too_many_videos")
        for turn in turns:
            for k, part in enumerate(turn.parts):
                if isinstance(part, protocol.ImageRef):
                    low, high = self.pixel_budget(part)
                    fetch_limit = _time_left(deadline, s.image_fetch_timeout)
                    try:
                        img = images.load_image(
                            part.source, param=part.param, allow_urls=s.allow_image_urls, timeout=fetch_limit,
                            max_bytes=s.max_image_bytes, pixel_limit=s.max_image_pixels,
                            allow_hosts=s.image_url_allow_hosts, target_pixels=high, budget=self.decode_budget,
                            deadline=deadline)
                    except ImageError as exc:
                        if deadline is not None and exc.code == "image_fetch_failed" and time.perf_counter() >= deadline:
                            raise _timeout(s.request_timeout, "fetching its images") from None
                        raise
                    if self.metrics is not None:
                        self.metrics.image_loaded(part.source)
                    turn.parts[k] = self.fit_image(img, param=part.param, budget=(low, high))
                elif isinstance(part, protocol.VideoRef):
                    turn.parts[k] = self.load_video(part, deadline=deadline)
        return turns

    # ------------------------------------------------------------------ videos

    def video_limits(self, options: Optional[dict] = None) -> video.VideoLimits:
        """The server's video sampling and limits, narrowed by a video part's own choices (fps, max_frames, ...)."""
        limits = video.VideoLimits.from_settings(self.settings)
        return limits.narrowed(**options) if options else limits

    def load_video(self, ref: protocol.VideoRef, *, deadline: Optional[float] = None) -> video.Video:
        """A video part -> its sampled frames, sized (a file through PyAV, or a list of images as its frames)."""
        s = self.settings
        limits = self.video_limits(ref.options)
        if isinstance(ref.source, list):
            if len(ref.source) > limits.max_frames:
                raise video.VideoError(f"the video has {len(ref.source)} frames; this server takes at most "
                                       f"{limits.max_frames}", param=ref.param, code="too_many_frames")

            def frames():
                for i, source in enumerate(ref.source):
                    if deadline is not None and time.perf_counter() > deadline:
                        raise RequestTimeout("reading the video's frames took longer than this server's time limit",
                                             code="request_timeout")
                    yield images.load_image(
                        source, param=f"{ref.param}.video[{i}]", allow_urls=s.allow_image_urls,
                        timeout=s.image_fetch_timeout, max_bytes=s.max_image_bytes, pixel_limit=s.max_image_pixels,
                        allow_hosts=s.image_url_allow_hosts, target_pixels=limits.max_pixels)

            clip = video.from_images(frames(), limits, count=len(ref.source), param=ref.param,
                                     fps=ref.options.get("fps"))
            label = "frames"
        else:
            data, mime = video.read_source(ref.source, param=ref.param, allow_urls=s.allow_image_urls,
                                           timeout=s.image_fetch_timeout, max_bytes=s.max_video_bytes,
                                           allow_hosts=s.image_url_allow_hosts)
            clip = video.decode(data, limits, param=ref.param, deadline=deadline, mime=mime)
            label = None
        if self.metrics is not None:
            self.metrics.video_loaded(label or ref.source, clip)
        return clip

    def video_from_bytes(self, data: bytes, *, param: str) -> video.Video:
        """An uploaded video file -> its sampled frames, sized (VideoError when it is not a usable video)."""
        return video.decode(bytes(data), self.video_limits(), param=param)

    def fit_image(self, img, *, param: Optional[str] = None, budget: Optional[tuple] = None):
        """A PIL image resized once to what the vision tower takes: sides multiples of 28, pixels within
        `budget` (min, max), by default the server's MIN_PIXELS..MAX_PIXELS."""
        low, high = budget or (self.settings.min_pixels, self.settings.max_pixels)
        original = img.info.get(images.ORIGINAL_SIZE, img.size)
        fitted = images.fit_pixels(img, low, high, param=param)
        fitted.info[images.ORIGINAL_SIZE] = original  # for image_sizes(): boxes map back to the image as sent
        return fitted

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
              time_limit: Optional[float] = None, n: int = 1) -> "Reply":
        """Load the turns' images and start the engine on them. `started` (time.perf_counter()) is when
        the request arrived, for time to first token and the time limit (seconds, None: none)."""
        engine = self.ready_engine()
        started = time.perf_counter() if started is None else started
        if engine.info.context_length:  # 0: not known here (an upstream that does not say); the upstream checks
            limits.check_prompt_chars(turns, engine.info.context_length)  # before any image is fetched
        deadline = started + time_limit if time_limit is not None else None
        turns = self.load_images(turns, deadline=deadline)
        if deadline is not None and time.perf_counter() >= deadline:
            raise _timeout(time_limit, "reading its images")
        engine = self.ready_engine()  # again: a shutdown may have begun meanwhile
        generation = engine.start(turns, params) if n == 1 else Choices(lambda p: engine.start(turns, p), params, n)
        return self._tracked(Reply(generation, started=started, time_limit=time_limit, metrics=self.metrics,
                                   image_sizes=image_sizes(turns), n=n))

    def _tracked(self, reply: "Reply") -> "Reply":
        """`reply`, among the answers being generated that a shutdown ends (end_all)."""
        with self._replies_lock:
            self._replies.add(reply)
        return reply

    def parse_request(self, body) -> protocol.ChatCompletionRequest:
        """A request's parsed JSON -> the request model, after the limits that must come before validating
        it: how many messages and content parts, and no invalid Unicode (serving.limits)."""
        limits.check_body(body, max_messages=self.settings.max_messages, max_parts=self.settings.max_content_parts)
        return protocol.parse_request(body)

    # ------------------------------------------------------------------ shutdown

    def begin_shutdown(self) -> None:
        """No new answers from now on (503 shutting_down); requests waiting for the engine are answered so
        too; answers already being generated go on (end_all ends them)."""
        self.closing = True
        refuse = getattr(self.engine, "refuse_waiting", None)
        if refuse is not None:
            refuse(NotReady("the server is shutting down; try again shortly", code="shutting_down",
                            retry_after=RETRY_SECONDS))

    def end_all(self, error: Exception) -> int:
        """End every answer still being generated with `error` (a stream's last event; a 503 before one
        started); how many there were."""
        with self._replies_lock:
            replies = [reply for reply in self._replies if not reply.done]
        for reply in replies:
            reply.abort(error)
        return len(replies)

    def start_request(self, req: protocol.ChatCompletionRequest, *, started: Optional[float] = None) -> "Reply":
        """A parsed API request, under REQUEST_TIMEOUT. Its limits are checked before any image is fetched."""
        engine = self.ready_engine()
        refuse_peer_fields(req)
        refuse_unsupported(req, engine, getattr(self.settings, "backend", "paddle"))
        params = self.params_from_request(req)
        params.extra = passed_on(req, engine)
        compile_output = getattr(engine, "compile_output", None)  # an engine that enforces the form itself
        if compile_output is not None:
            spec = structured.output_spec(req, max_tools=self.settings.max_tools,
                                          max_schema_bytes=self.settings.max_schema_bytes)
            if spec is not None:
                params.output = compile_output(spec)  # a 400 here, before any image is read or model work done
        if req.disable_chat_template:
            return self.start_ids(untemplated_prompt(req, engine), params, started=started, n=req.n)
        turns = protocol.normalise_messages(req)
        return self.start(turns, params, started=started, time_limit=self.settings.request_timeout, n=req.n)

    def start_ids(self, ids: list, params: SamplingParams, *, started: Optional[float] = None, n: int = 1) -> "Reply":
        """A prompt of token ids, as written (no chat template: disable_chat_template, /v1/completions), under
        REQUEST_TIMEOUT."""
        engine = self.ready_engine()
        started = time.perf_counter() if started is None else started
        generation = (engine.start_ids(ids, params) if n == 1
                      else Choices(lambda p: engine.start_ids(ids, p), params, n))
        return self._tracked(Reply(generation, started=started, time_limit=self.settings.request_timeout,
                                   metrics=self.metrics, n=n))


@dataclass
class Answer:
    text: str
    finished: Optional[Finished]  # None when the generation was cancelled first
    logprobs: list = field(default_factory=list)  # serving.jobs.TokenLogprob per token, when asked for
    token_ids: list = field(default_factory=list)  # the answer's token ids, when asked for (return_token_ids)


class Reply:
    """One answer being generated. Iterating yields TextDelta pieces, then one Finished (nothing more
    once cancelled); past the time limit the generation is cancelled and RequestTimeout raised. The
    engine's reads never block longer than a short poll, so a stuck engine cannot hold a caller past it.
    With metrics, the time to first text and the token counts are recorded."""

    def __init__(self, generation, *, started: float, time_limit: Optional[float] = None, metrics=None,
                 image_sizes: Optional[list] = None, n: int = 1):
        self.generation = generation
        self.n = n  # choices (OpenAI's n): events carry their choice's index as `.choice` when n > 1
        self.finishes: dict = {}  # choice index -> its Finished
        self.prompt_tokens = generation.prompt_tokens
        self.image_sizes = image_sizes or []  # protocol.ImageSize of every image, in order (see image_sizes())
        self.started = started
        self.time_limit = time_limit
        self.metrics = metrics
        self.finished: Optional[Finished] = None
        self._seen_text = False
        self._aborted: Optional[Exception] = None
        self.done = False  # read to its end (or failed)

    def __iter__(self) -> Iterator:
        deadline = self.started + self.time_limit if self.time_limit is not None else None
        try:
            for event in self.generation.until(deadline):
                if self._aborted is not None:
                    break
                self._see(event)
                yield event
            if self._aborted is not None and self.finished is None:
                raise self._aborted
        except TimeoutError:
            self.cancel()
            raise RequestTimeout(f"the request took longer than this server's limit of {self.time_limit:g} seconds "
                                 "and was cancelled", code="request_timeout") from None
        finally:
            self.done = True

    def cancel(self) -> None:
        """Stop the generation (from any thread); the engine drops it at its next step."""
        self.generation.cancel()

    def abort(self, error: Exception) -> None:
        """Stop the generation (from any thread) and make its reader raise `error` (a shutdown)."""
        self._aborted = error
        self.generation.cancel()

    @property
    def prompt_token_ids(self) -> Optional[list]:
        """The prompt's token ids (engines that build the prompt here: the built-in one), else None."""
        prompt = getattr(self.generation, "prompt", None)
        return None if prompt is None else [int(t) for t in prompt.arrays["input_ids"][0]]

    @property
    def completion_tokens(self) -> Optional[int]:
        """All choices' generated tokens (what the log line counts), None before any choice finished."""
        return sum(f.completion_tokens for f in self.finishes.values()) if self.finishes else None

    def collect(self) -> Answer:
        return self.collect_choices()[0]

    def collect_choices(self) -> list:
        """An Answer per choice, in index order."""
        pieces = [[] for _ in range(self.n)]
        answers = [Answer("", None) for _ in range(self.n)]
        for event in self:
            i = choice_of(event)
            if isinstance(event, str):
                pieces[i].append(event)
                answers[i].logprobs.extend(getattr(event, "logprobs", ()))
                answers[i].token_ids.extend(getattr(event, "token_ids", ()))
        for i, answer in enumerate(answers):
            answer.text, answer.finished = "".join(pieces[i]), self.finishes.get(i)
        return answers

    def _see(self, event) -> None:
        if isinstance(event, (str, ToolCallDelta)):
            if not self._seen_text:
                self._seen_text = True
                if self.metrics is not None:
                    self.metrics.first_text(time.perf_counter() - self.started)
            return
        self.finished = event
        self.finishes[choice_of(event)] = event
        if self.metrics is not None:
            self.metrics.finished_generation(event.prompt_tokens, event.completion_tokens, event.seconds)


def choice_of(event) -> int:
    """The index of the choice an event belongs to (0 when the request asked for one)."""
    return getattr(event, "choice", 0)


class Choices:
    """OpenAI's n: n generations of one prompt, read as one. Choice i samples with seed + i (when seeded).
    Choices 1..n-1 start once choice 0's first event is out: by then its prompt's KV is in the built-in engine's
    prefix cache (serving.engines.builtin.scheduler keeps it before taking new requests), so they prefill
    nothing but the last token; each is then its own row in the running batch. Events go out tagged with
    their choice (`.choice`), as each choice's generation produces them; Finished once every choice ended."""

    def __init__(self, start, params: SamplingParams, n: int):
        import copy
        import queue

        self._queue: "queue.Queue" = queue.Queue()
        self._params = []
        for i in range(n):
            mine = copy.copy(params)
            mine.seed = None if params.seed is None else params.seed + i
            if i:  # the prompt is scored once, by choice 0 (the others then reuse its KV from the prefix cache)
                mine.prompt_logprobs = None
            self._params.append(mine)
        self._start, self.n = start, n  # start(params) -> a generation of the prompt
        self._generations = [start(self._params[0])]  # errors in the prompt: raised here
        self.prompt_tokens = self._generations[0].prompt_tokens
        self.prompt = getattr(self._generations[0], "prompt", None)
        self._cancelled = threading.Event()
        self._lock = threading.Lock()
        threading.Thread(target=self._pump, args=(0, self._generations[0]), daemon=True,
                         name="choice-0").start()

    @property
    def prompt_logprobs(self) -> Optional[list]:
        """The prompt's scores (serving.jobs.Job.prompt_logprobs), computed by choice 0."""
        return getattr(self._generations[0], "prompt_logprobs", None)

    def _start_others(self) -> None:
        for i in range(1, self.n):
            try:
                generation = self._start(self._params[i])
            except Exception as exc:
                self._queue.put((i, exc))
                continue
            with self._lock:
                self._generations.append(generation)
                if self._cancelled.is_set():
                    generation.cancel()
            threading.Thread(target=self._pump, args=(i, generation), daemon=True, name=f"choice-{i}").start()

    def _pump(self, index: int, generation) -> None:
        first = index == 0
        try:
            for event in generation:
                if first:
                    first = False
                    self._start_others()
                self._queue.put((index, event))
        except Exception as exc:
            self._queue.put((index, exc))
        finally:
            if first and index == 0 and not self._cancelled.is_set():
                self._start_others()  # choice 0 ended without an event: the others still run (or fail)
            self._queue.put((index, None))

    def cancel(self) -> None:
        with self._lock:
            self._cancelled.set()
            for generation in self._generations:
                generation.cancel()

    def __iter__(self):
        return self.until(None)

    def until(self, deadline: Optional[float]):
        from serving.jobs import read_events  # the same polled read as one generation's

        ended = 0
        for index, event in read_events(self._queue, self._cancelled, deadline):
            if event is None:
                ended += 1
                if ended == self.n:
                    return
                continue
            if isinstance(event, BaseException):
                self.cancel()
                raise event
            event.choice = index
            yield event


def image_sizes(turns: list) -> list:
    """protocol.ImageSize of every image in `turns` (loaded: PIL images), in order: as sent and as the model sees it."""
    sizes = []
    for turn in turns:
        for part in turn.parts:
            if isinstance(part, Image.Image):
                width, height = part.info.get(images.ORIGINAL_SIZE, part.size)
                sizes.append(protocol.ImageSize(width=width, height=height, model_width=part.width,
                                                model_height=part.height))
    return sizes


def prompt_ending(req: protocol.ChatCompletionRequest) -> tuple:
    """(continue the final message, open an assistant turn) for `req`. A conversation that ends with an
    assistant message is continued (llama.cpp's prefill; vLLM's continue_final_message), unless the request
    says add_generation_prompt: true (vLLM: a new assistant turn after it); vLLM's two fields are honoured."""
    last_is_assistant = req.messages[-1].role == "assistant"
    go_on, open_turn = req.continue_final_message, req.add_generation_prompt
    if go_on and open_turn:
        raise InvalidRequest("continue_final_message and add_generation_prompt cannot both be true",
                             param="continue_final_message")
    if go_on and not last_is_assistant:
        raise InvalidRequest("continue_final_message needs the last message to be an assistant message",
                             param="continue_final_message")
    if go_on is None:
        go_on = last_is_assistant and open_turn is not True
    if go_on and req.messages[-1].tool_calls:
        raise InvalidRequest("an assistant message with tool_calls cannot be continued; end the conversation "
                             "with a tool message or send add_generation_prompt: true",
                             param=f"messages[{len(req.messages) - 1}].tool_calls")
    return bool(go_on), (not go_on) and open_turn is not False


def untemplated_prompt(req: protocol.ChatCompletionRequest, engine) -> list:
    """FastDeploy's disable_chat_template: the token ids of the request's one message's text, as written (the
    client wrote the template's markup itself). 400 when there is more than that one text message to send."""
    if len(req.messages) != 1:
        raise InvalidRequest(f"disable_chat_template needs exactly one message (its text is the whole prompt); the "
                             f"request has {len(req.messages)}", param="disable_chat_template")
    for name in ("tools", "functions", "continue_final_message", "add_generation_prompt"):
        if getattr(req, name) is not None:
            raise InvalidRequest(f"{name} needs the chat template: it cannot be combined with disable_chat_template",
                                 param=name)
    content = req.messages[0].content
    if isinstance(content, list):
        if not all(isinstance(part, protocol.TextPart) for part in content):
            raise InvalidRequest("disable_chat_template takes text only: images and videos need the chat template",
                                 param="messages[0].content")
        content = "".join(part.text for part in content)
    if not content:
        raise InvalidRequest("messages[0] has no text", param="messages[0].content", code="empty_content")
    return engine.encode(content)


def word_rules(params: SamplingParams, req) -> None:
    """The peers' stop-string and bad-word fields of a chat or completion request `req`, onto `params` (the
    engine turns the words into token sequences: serving.engines.builtin.row_rules)."""
    params.include_stop = bool(req.include_stop_str_in_output)
    params.bad_words = list(req.bad_words or [])
    params.bad_words_token_ids = list(req.bad_words_token_ids or [])


# The peers' fields this server does not honour: refused by name (400 unsupported_parameter) when they ask for
# something (a value other than the neutral ones listed), never dropped. name -> (source, neutral values).
PEER_REFUSED = {
    "echo": ("vLLM", (False,)), "best_of": ("vLLM", (1,)),
    "use_beam_search": ("vLLM", (False,)), "length_penalty": ("vLLM", (1, 1.0)),
    "skip_special_tokens": ("vLLM", (True,)),
    "spaces_between_special_tokens": ("vLLM", (True,)), "truncate_prompt_tokens": ("vLLM", ()),
    "chat_template": ("vLLM", ()), "chat_template_kwargs": ("vLLM", ({},)), "mm_processor_kwargs": ("vLLM", ({},)),
    "allowed_token_ids": ("vLLM", ()), "logits_processors": ("vLLM", ([],)),
    "guided_decoding_backend": ("vLLM", ()), "guided_whitespace_pattern": ("vLLM", ()),
    "return_tokens_as_token_ids": ("vLLM", (False,)), "documents": ("vLLM", ([],)),
    "media_io_kwargs": ("vLLM", ({},)), "prompt_embeds": ("vLLM", ([],)), "logprob_token_ids": ("vLLM", ()),
    "typical_p": ("vLLM, llama.cpp", (1, 1.0)), "top_n_sigma": ("llama.cpp", (-1, -1.0, 0)),
    "mirostat": ("llama.cpp", (0,)), "tfs_z": ("llama.cpp", (1, 1.0)), "dry_multiplier": ("llama.cpp", (0, 0.0)),
    "xtc_probability": ("llama.cpp", (0, 0.0)), "dynatemp_range": ("llama.cpp", (0, 0.0)),
    "n_probs": ("llama.cpp", (0,)), "samplers": ("llama.cpp", ()), "n_predict": ("llama.cpp", (-1,)),
    "repeat_penalty": ("llama.cpp", (1, 1.0)), "repeat_last_n": ("llama.cpp", ()),
    "post_sampling_probs": ("llama.cpp", (False,)), "reasoning_max_tokens": ("FastDeploy", ()),
    "enable_thinking": ("FastDeploy", (False,)), "prompt_token_ids": ("FastDeploy", ()),
    "completion_token_ids": ("FastDeploy", ([],)), "response_max_tokens": ("FastDeploy", ()),
}


def refuse_peer_fields(req) -> None:
    """400 unsupported_parameter for the first field of PEER_REFUSED the request sets to something not neutral."""
    for name, value in (req.model_extra or {}).items():
        known = PEER_REFUSED.get(name)
        if known is None or value is None or any(_same(value, neutral) for neutral in known[1]):
            continue
        raise InvalidRequest(f"{name} (an extension of {known[0]}) is not supported by this server; docs/api.md lists "
                             "the extensions it honours", param=name, code="unsupported_parameter")


def _same(value, neutral) -> bool:
    """value == neutral, without True counting as 1 (a number equals a number whatever its type)."""
    if isinstance(value, bool) or isinstance(neutral, bool):
        return value is neutral
    return value == neutral


# OpenAI request fields that change the answer. An engine honours one only when its info.features names it
# (the built-in Paddle engine enforces all three with grammars: serving.engines.builtin.grammar). Sent to an
# engine that does not, they are refused (400 unsupported_parameter) rather than dropped: a client asking for
# JSON or tool calls must not get prose.
FEATURES = ("response_format", "tools", "logit_bias", "prompt_ending", "peer_sampling", "prompt_logprobs")
_ELSEWHERE = ("to serve it, use --backend openai (an OpenAI-compatible upstream that supports it, such as vLLM) "
              "or --backend fastdeploy")


def unsupported_fields(req: protocol.ChatCompletionRequest) -> list:
    """(feature, param, what) for each answer-changing field of `req` that needs an engine feature."""
    found = []
    fmt = req.response_format
    if fmt is not None and fmt.type != "text":
        found.append(("response_format", "response_format", f"response_format {fmt.type!r}"))
    if req.tools and req.tool_choice != "none":
        found.append(("tools", "tools", "tools (with tool_choice other than 'none')"))
    if req.functions and req.function_call != "none":
        found.append(("tools", "functions", "functions (the deprecated form of tools)"))
    for i, message in enumerate(req.messages):
        if message.role == "tool":
            found.append(("tools", f"messages[{i}].role", "messages with role 'tool'"))
        elif message.role == "assistant" and message.tool_calls:
            found.append(("tools", f"messages[{i}].tool_calls", "assistant messages with tool_calls"))
    if req.logit_bias:
        found.append(("logit_bias", "logit_bias", "logit_bias"))
    for param, _kind, _value in structured.peer_forms(req):
        found.append(("response_format", param, param))
    for name in ("min_tokens", "ignore_eos", "stop_token_ids", "min_p", "return_token_ids",
                 "include_stop_str_in_output", "bad_words", "bad_words_token_ids"):
        if getattr(req, name):
            found.append(("peer_sampling", name, name))
    if req.prompt_logprobs is not None:
        found.append(("prompt_logprobs", "prompt_logprobs", "prompt_logprobs (vLLM's)"))
    if req.disable_chat_template:
        found.append(("prompt_ending", "disable_chat_template", "disable_chat_template"))
    go_on, open_turn = prompt_ending(req)
    if go_on:
        found.append(("prompt_ending", "continue_final_message" if req.continue_final_message else "messages",
                      "a conversation ending with an assistant message (continued)"))
    elif not open_turn:
        found.append(("prompt_ending", "add_generation_prompt", "add_generation_prompt: false"))
    return found


def refuse_unsupported(req: protocol.ChatCompletionRequest, engine, backend: str = "paddle") -> None:
    """InvalidRequest (400 unsupported_parameter) for the first field of `req` that changes the answer and
    that `engine` does not honour (its info.features does not name it); `backend` is the --backend serving."""
    features = getattr(engine.info, "features", frozenset())
    for feature, param, what in unsupported_fields(req):
        if feature not in features:
            where = ("the built-in Paddle engine (--backend paddle) here: structured output is off (see the log)"
                     if backend == "paddle"
                     else f"this server's --backend {backend} (its engine does not declare {feature!r})")
            raise InvalidRequest(f"{what} is not supported by {where}; {_ELSEWHERE}", param=param,
                                 code="unsupported_parameter")


# request field -> the engine feature under which it is passed on, as sent, in SamplingParams.extra
# (the upstream engines forward these to their servers; the built-in engine declares none)
PASSED_ON = {"response_format": "response_format", "tools": "tools", "tool_choice": "tools", "functions": "tools",
             "function_call": "tools", "parallel_tool_calls": "tools", "logit_bias": "logit_bias"}


def passed_on(req: protocol.ChatCompletionRequest, engine) -> dict:
    """The fields of `req` the client sent whose feature `engine` honours, as plain JSON values."""
    features = getattr(engine.info, "features", frozenset())
    sent = req.model_fields_set | set(req.model_extra or ())
    out = {}
    for name, feature in PASSED_ON.items():
        if feature in features and name in sent:
            value = getattr(req, name, None)
            if value is not None:
                out[name] = _plain(value)
    return out


def _plain(value):
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json", by_alias=True, exclude_unset=True)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _time_left(deadline: Optional[float], limit: float) -> float:
    """`limit` seconds, or fewer when the request's deadline (time.perf_counter()) comes first."""
    if deadline is None:
        return limit
    left = deadline - time.perf_counter()
    if left <= 0:
        raise _timeout(None, "reading its images")
    return min(limit, left)


def _timeout(limit: Optional[float], doing: str) -> RequestTimeout:
    what = f"this server's limit of {limit:g} seconds" if limit else "this server's time limit"
    return RequestTimeout(f"the request took longer than {what} while {doing} (REQUEST_TIMEOUT) and was cancelled",
                          code="request_timeout")


def _within(value, low, high, default):
    return default if value is None else max(low, min(high, value))
