"""What a request hands the model worker, and what it gets back.

A Job carries a Prompt and its SamplingParams; the worker puts text deltas (TextDelta, a str
that may carry the logprobs of the tokens it covers), pieces of tool calls (ToolCallDelta) and then
one Finished (or an exception) on the job's queue, which the request iterates.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional


POLL_SECONDS = 0.05  # how often a reader looks for cancellation while no event arrives


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: Optional[float] = None  # None: the model's generation_config; 0: greedy
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    repetition_penalty: Optional[float] = None
    presence_penalty: float = 0.0  # OpenAI's, -2..2: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI's, -2..2: subtracted per occurrence in the answer so far
    seed: Optional[int] = None  # a generator of the request's own: its sample does not depend on companions
    stop: list = field(default_factory=list)
    logprobs: bool = False  # report each generated token's log probability
    top_logprobs: int = 0  # 0..20 most likely alternatives per token (needs logprobs)
    extra: dict = field(default_factory=dict)  # OpenAI fields passed on to engines whose info.features name them
    stream: bool = False  # the client reads the answer as it comes: its time to first token shows
    # the answer's required form (JSON, tool calls, logit_bias), compiled by an engine that enforces it itself
    # (serving.engines.builtin.grammar.CompiledOutput); None: free text
    output: Optional[object] = None
    # the peers' extensions (serving.engines.builtin.row_rules): no end before min_tokens, never an end, more ends
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list = field(default_factory=list)
    min_p: float = 0.0
    include_stop: bool = False  # include_stop_str_in_output: the stop string (or stop token's text) ends the text
    bad_words: list = field(default_factory=list)  # vLLM: strings the answer must never contain (as tokens)
    bad_words_token_ids: list = field(default_factory=list)  # FastDeploy: token ids the answer must never contain
    banned: list = field(default_factory=list)  # the engine's token sequences of the two above (row_rules)
    return_token_ids: bool = False  # deltas carry the token ids they cover
    continue_final: bool = False  # the last message is the assistant's answer so far: continue its text
    generation_prompt: bool = True  # open the assistant's turn after the last message (False: vLLM's option)
    # score the prompt too (vLLM's prompt_logprobs; /v1/completions' echo with logprobs): each prompt token's
    # logprob given the tokens before it, with this many most likely alternatives; None: not asked
    prompt_logprobs: Optional[int] = None


@dataclass
class TopLogprob:
    token: str
    logprob: float
    bytes: Optional[list]  # the token's UTF-8 bytes (a token may hold part of a character)
    # the token id (the built-in engine): names a token with no text in legacy logprobs; keyword-only, so
    # TokenLogprob(token, logprob, bytes, top_logprobs) keeps its positions
    id: Optional[int] = field(default=None, kw_only=True)
    rank: Optional[int] = field(default=None, kw_only=True)  # 1 + tokens more likely (prompt logprobs: vLLM's form)


@dataclass
class TokenLogprob(TopLogprob):
    top_logprobs: list = field(default_factory=list)  # TopLogprob, most likely first


class TextDelta(str):
    """A piece of the answer's text; `logprobs` holds a TokenLogprob for each token generated since the
    previous delta when the request asked for logprobs (a token's text may be held back, e.g. a
    half character or a possible stop string, so tokens and text pieces need not line up one to one)."""

    logprobs: tuple = ()
    token_ids: tuple = ()  # the ids of the tokens generated since the previous delta, when asked for

    def __new__(cls, text: str, logprobs=(), token_ids=()):
        obj = super().__new__(cls, text)
        obj.logprobs = tuple(logprobs)
        obj.token_ids = tuple(token_ids)
        return obj


@dataclass
class ToolCallDelta:
    """A piece of a tool call being generated, as OpenAI streams it (delta.tool_calls[]): the first piece of
    a call has its id and function name, later ones fragments of its arguments' JSON text."""

    index: int  # which call of the answer (0, 1, ...)
    id: Optional[str] = None
    name: Optional[str] = None
    arguments: str = ""

    def as_openai(self) -> dict:
        if self.id is not None:
            return {"index": self.index, "id": self.id, "type": "function",
                    "function": {"name": self.name, "arguments": self.arguments}}
        return {"index": self.index, "function": {"arguments": self.arguments}}


@dataclass
class Prompt:
    # numpy arrays for model.generate: input_ids, attention_mask, pixel_values, image_grid_thw, and for
    # videos pixel_values_videos, video_grid_thw, second_per_grid_ts
    arrays: dict
    prompt_tokens: int
    text: str  # the templated prompt, for logs and debugging
    image_count: int
    image_keys: tuple = ()  # content digests of the images, in prompt order (for the vision cache)
    video_keys: tuple = ()  # content digests of the videos' sampled frames, in prompt order


@dataclass
class Finished:
    finish_reason: str  # "stop", "length" or "tool_calls" (the model called tools)
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    tool_calls: Optional[list] = None  # OpenAI's message.tool_calls, when the model called tools
    cached_tokens: Optional[int] = None  # prompt tokens reused from earlier requests (None: the engine does not say)


@dataclass
class Completion:
    text: str
    finish: Finished


class Job:
    """One generation request, as the worker sees it."""

    def __init__(self, prompt: Prompt, params: SamplingParams):
        self.prompt = prompt
        self.prompt_tokens = prompt.prompt_tokens
        self.params = params
        self.events: queue.Queue = queue.Queue()  # str deltas, then a Finished or an Exception
        self.cancelled = threading.Event()
        self.created = time.perf_counter()
        # params.prompt_logprobs asked: one Optional[TokenLogprob] per prompt token (the first None), set by the
        # engine once the prompt is prefilled, before its first event goes out
        self.prompt_logprobs: Optional[list] = None

    def cancel(self) -> None:
        self.cancelled.set()

    def __iter__(self) -> Iterator:
        return self.until(None)

    def until(self, deadline: Optional[float]) -> Iterator:
        """Text deltas, then Finished. Ends early, without Finished, once the job is cancelled;
        raises TimeoutError when `deadline` (time.perf_counter()) passes first."""
        return read_events(self.events, self.cancelled, deadline)


def read_events(events: queue.Queue, cancelled: threading.Event, deadline: Optional[float]) -> Iterator:
    """A generation's events from its queue until Finished (an exception on the queue is raised); ends
    without Finished once `cancelled` is set; TimeoutError when `deadline` (time.perf_counter()) passes.
    Reads never block longer than a short poll, so a stuck engine cannot hold the reader past its deadline."""
    while True:
        wait = POLL_SECONDS
        if deadline is not None:
            wait = min(wait, deadline - time.perf_counter())
            if wait <= 0:
                raise TimeoutError("the generation's deadline passed")
        try:
            event = events.get(timeout=wait)
        except queue.Empty:
            if cancelled.is_set():
                return
            continue
        if isinstance(event, BaseException):
            raise event
        yield event
        if isinstance(event, Finished):
            return
