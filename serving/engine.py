"""The engine: chat turns + images -> prompt tensors -> generated text, whole or streamed.

One model worker thread owns the model and runs one generation at a time; requests hand it
jobs through a queue and read their events from a per-job queue. (The batching scheduler
replaces the worker loop; the Job contract stays.)
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

from .detokenize import IncrementalText
from .errors import InternalError, InvalidRequest

log = logging.getLogger(__name__)


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: Optional[float] = None  # None: the model's generation_config; 0: greedy
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    repetition_penalty: Optional[float] = None
    seed: Optional[int] = None
    stop: list = field(default_factory=list)


@dataclass
class Prompt:
    arrays: dict  # numpy arrays for model.generate: input_ids, attention_mask, pixel_values, image_grid_thw
    prompt_tokens: int
    text: str  # the templated prompt, for logs and debugging
    image_count: int


@dataclass
class Finished:
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    seconds: float


@dataclass
class Completion:
    text: str
    finish: Finished


class Job:
    """One generation request, as the worker sees it."""

    def __init__(self, prompt: Prompt, params: SamplingParams):
        self.prompt = prompt
        self.params = params
        self.events: queue.Queue = queue.Queue()  # str deltas, then a Finished or an Exception
        self.cancelled = threading.Event()
        self.created = time.perf_counter()

    def cancel(self) -> None:
        self.cancelled.set()

    def __iter__(self) -> Iterator:
        while True:
            event = self.events.get()
            if isinstance(event, BaseException):
                raise event
            yield event
            if isinstance(event, Finished):
                return


class Engine:
    def __init__(self, loaded, *, default_max_tokens: int = 512, max_tokens_limit: int = 4096):
        self.loaded = loaded
        self.model = loaded.model
        self.processor = loaded.processor
        self.tokenizer = loaded.processor.tokenizer
        self.default_max_tokens = default_max_tokens
        self.max_tokens_limit = max_tokens_limit
        text_config = getattr(self.model.config, "text_config", self.model.config)
        self.context_length = int(getattr(text_config, "max_position_embeddings", 32768))
        gen = getattr(self.model, "generation_config", None)
        self.defaults = {
            "temperature": getattr(gen, "temperature", None),
            "top_p": getattr(gen, "top_p", None),
            "top_k": getattr(gen, "top_k", None),
            "repetition_penalty": getattr(gen, "repetition_penalty", None),
        }
        self.eos_token_ids = self._eos_ids()
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.eos_token_ids[-1]
        self._template_lock = threading.Lock()  # HF fast tokenizers are not safe to share across threads
        self._jobs: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="model-worker", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ prompts

    def build_prompt(self, turns) -> Prompt:
        """turns: ChatTurn-like objects whose parts are str or PIL images, in order."""
        messages, images = [], []
        for turn in turns:
            content = []
            for part in turn.parts:
                if isinstance(part, str):
                    content.append({"type": "text", "text": part})
                else:
                    content.append({"type": "image"})
                    images.append(part)
            if all(c["type"] == "text" for c in content):
                content = "".join(c["text"] for c in content)  # plain string, as the template expects
            messages.append({"role": turn.role, "content": content})
        if messages and messages[-1]["role"] == "assistant":
            raise InvalidRequest("the last message must not be an assistant message", param="messages")
        _ensure_dynamic_mode()
        with self._template_lock:
            text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            batch = self.processor(text=[text], images=images or None, return_tensors="pd")
        arrays = {k: v.numpy() for k, v in batch.items()}  # the worker makes its own tensors
        prompt_tokens = int(arrays["input_ids"].shape[-1])
        return Prompt(arrays=arrays, prompt_tokens=prompt_tokens, text=text, image_count=len(images))

    def sampling_params(self, *, max_tokens=None, temperature=None, top_p=None, top_k=None,
                        repetition_penalty=None, seed=None, stop=None) -> SamplingParams:
        if max_tokens is not None and max_tokens > self.max_tokens_limit:
            raise InvalidRequest(f"max_tokens is {max_tokens}, more than this server's limit of "
                                 f"{self.max_tokens_limit}", param="max_tokens", code="max_tokens_too_large")
        return SamplingParams(max_tokens=max_tokens or self.default_max_tokens, temperature=temperature,
                              top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
                              seed=seed, stop=list(stop or []))

    def check_fits(self, prompt: Prompt, params: SamplingParams) -> None:
        room = self.context_length - prompt.prompt_tokens
        if room < 1:
            raise InvalidRequest(f"the prompt is {prompt.prompt_tokens} tokens, more than the model's context of "
                                 f"{self.context_length}", param="messages", code="context_length_exceeded")
        params.max_tokens = min(params.max_tokens, room)

    # ------------------------------------------------------------------ generation

    def submit(self, prompt: Prompt, params: SamplingParams) -> Job:
        self.check_fits(prompt, params)
        job = Job(prompt, params)
        self._jobs.put(job)
        return job

    def generate(self, prompt: Prompt, params: SamplingParams) -> Completion:
        pieces, finish = [], None
        for event in self.submit(prompt, params):
            if isinstance(event, Finished):
                finish = event
            else:
                pieces.append(event)
        return Completion("".join(pieces), finish)

    def stream(self, prompt: Prompt, params: SamplingParams) -> Iterator:
        """Yield text deltas, then one Finished. Closing the iterator cancels the generation."""
        job = self.submit(prompt, params)
        try:
            yield from job
        finally:
            job.cancel()

    # ------------------------------------------------------------------ the worker

    def _work(self) -> None:
        _ensure_dynamic_mode()
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():
                continue
            try:
                self._run(job)
            except Exception as exc:  # keep the worker alive for everyone else
                log.exception("generation failed")
                job.events.put(InternalError(f"generation failed: {type(exc).__name__}: {exc}"))

    def _run(self, job: Job) -> None:
        import paddle
        from paddleformers.generation.stopping_criteria import StoppingCriteriaList

        params, started = job.params, time.perf_counter()
        kwargs = self._generate_kwargs(params)
        streamer = _JobStreamer(job, IncrementalText(self.tokenizer, params.stop), self.eos_token_ids)
        inputs = {k: paddle.to_tensor(v) for k, v in job.prompt.arrays.items()}
        with paddle.no_grad():
            if params.seed is not None:
                paddle.seed(params.seed)
            self.model.generate(
                **inputs, **kwargs, streamer=streamer,
                stopping_criteria=StoppingCriteriaList([_StopWhen(streamer.should_stop)]),
            )
        tail = streamer.text.finish()
        if tail:
            job.events.put(tail)
        reason = "stop" if streamer.saw_eos or streamer.text.stopped else "length"
        job.events.put(Finished(reason, job.prompt.prompt_tokens, streamer.count, time.perf_counter() - started))

    def _generate_kwargs(self, params: SamplingParams) -> dict:
        def pick(name):
            value = getattr(params, name)
            return value if value is not None else self.defaults[name]

        temperature = pick("temperature")
        kwargs = {
            "max_new_tokens": params.max_tokens,
            "eos_token_id": self.eos_token_ids,
            "pad_token_id": self.pad_token_id,
            "use_cache": True,
        }
        penalty = pick("repetition_penalty")
        if penalty is not None:
            kwargs["repetition_penalty"] = float(penalty)
        if temperature is None or temperature > 0:
            top_k = pick("top_k")
            kwargs.update(decode_strategy="sampling",
                          temperature=float(temperature if temperature is not None else 1.0),
                          top_p=float(pick("top_p") or 1.0),
                          top_k=int(top_k) if top_k and top_k > 0 else 0)
        else:
            kwargs["decode_strategy"] = "greedy_search"
        return kwargs

    def _eos_ids(self) -> list:
        ids = []
        gen = getattr(self.model, "generation_config", None)
        for source in (getattr(gen, "eos_token_id", None), self.tokenizer.eos_token_id,
                       self.tokenizer.convert_tokens_to_ids("<|im_end|>"),
                       self.tokenizer.convert_tokens_to_ids("<|endoftext|>")):
            for value in (source if isinstance(source, (list, tuple)) else [source]):
                if isinstance(value, int) and value >= 0 and value not in ids:
                    ids.append(value)
        return ids

    def count_tokens(self, text: str) -> int:
        with self._template_lock:
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def _ensure_dynamic_mode() -> None:
    """Paddle keeps its eager/static mode per thread, and a server thread that existed before
    paddle was imported starts in static mode, where the processor's tensors cannot be read."""
    import paddle

    if not paddle.in_dynamic_mode():
        paddle.disable_static()


class _JobStreamer:
    """Receives token ids from model.generate (in the worker) and queues text deltas for the job."""

    def __init__(self, job: Job, text: IncrementalText, eos_ids: list):
        self.job, self.text, self.eos_ids = job, text, set(eos_ids)
        self.prompt_seen = False
        self.count = 0
        self.saw_eos = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt itself
            self.prompt_seen = True
            return
        if self.saw_eos or self.text.stopped:
            return
        token = int(np.asarray(value).reshape(-1)[0])
        self.count += 1
        if token in self.eos_ids:
            self.saw_eos = True
            return
        delta = self.text.add(token)
        if delta:
            self.job.events.put(delta)

    def end(self) -> None:
        pass

    def should_stop(self) -> bool:
        return self.saw_eos or self.text.stopped or self.job.cancelled.is_set()


class _StopWhen:
    """A stopping criterion from a callable. generate() deep-copies its criteria: share, don't copy."""

    def __init__(self, predicate):
        self.predicate = predicate

    def __call__(self, input_ids, scores, **kwargs) -> bool:
        return bool(self.predicate())

    def __deepcopy__(self, memo):
        return self
