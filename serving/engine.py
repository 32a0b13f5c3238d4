"""The engine: chat turns + images -> prompt tensors -> generated text, whole or streamed.

One model worker thread owns the model. Requests hand it jobs through a queue and read their
events (text deltas, then Finished) from a per-job queue. The worker is a small scheduler: it
takes the waiting jobs that can share a forward pass (same sampling settings, within the batch
and token budgets, waiting at most `batch_wait` for companions) and runs them as one batched,
left-padded generation; each job still ends on its own eos, stop string or max_tokens.

Image work is cached by image content and size: the preprocessed pixel patches, and the
vision tower's output (PaddleFormers' `get_image_features` is wrapped to consult the cache).
"""

from __future__ import annotations

import atexit
import collections
import hashlib
import logging
import os
import queue
import threading
import time
from typing import Iterator

import numpy as np

from . import vision_cache
from .batch import BatchStreamer, Row, StopWhen, collate
from .cache import ByteLRU
from .detokenize import IncrementalText
from .errors import InternalError, InvalidRequest
from .jobs import Completion, Finished, Job, Prompt, SamplingParams  # noqa: F401  (the engine's API)

log = logging.getLogger(__name__)

IMAGE_PAD = "<|image_pad|>"
MAX_CHARS_PER_TOKEN = 16  # no BPE token of Qwen's covers more characters than this on average


class Engine:
    def __init__(self, loaded, *, default_max_tokens: int = 512, max_tokens_limit: int = 4096,
                 max_batch_size: int = 8, max_batch_tokens: int = 16384, batch_wait: float = 0.01,
                 image_cache_bytes: int = 256 * 2**20, cpu_threads: int = 0):
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
        self.cpu_threads = cpu_threads or available_cores()
        self.max_batch_size = max(1, max_batch_size)
        self.max_batch_tokens = max_batch_tokens
        self.batch_wait = batch_wait
        self.batches_run = 0
        self.batched_jobs = 0
        self.pixel_cache = ByteLRU(image_cache_bytes // 2, "pixels")
        self.vision_cache = ByteLRU(image_cache_bytes // 2, "vision")
        self._batch_image_keys: list = []
        vision_cache.install(self.model, self.vision_cache, lambda: self._batch_image_keys)
        self._jobs: queue.Queue = queue.Queue()
        self._held: collections.deque = collections.deque()  # taken from the queue, not yet scheduled
        self._worker = threading.Thread(target=self._work, name="model-worker", daemon=True)
        self._worker.start()
        atexit.register(self.close, 5.0)  # Paddle can abort the process if it exits mid-step

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
        chars = sum(len(p) for turn in turns for p in turn.parts if isinstance(p, str))
        if chars > self.context_length * MAX_CHARS_PER_TOKEN:  # surely too long: refuse before tokenizing
            raise InvalidRequest(f"the prompt is {chars} characters, far more than the model's context of "
                                 f"{self.context_length} tokens", param="messages", code="context_length_exceeded")
        if messages and messages[-1]["role"] == "assistant":
            raise InvalidRequest("the last message must not be an assistant message", param="messages")
        _ensure_dynamic_mode()
        with self._template_lock:
            text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        pixels, grids, keys = [], [], []
        for img in images:
            key, (pv, grid) = self._preprocess_image(img)
            pixels.append(pv)
            grids.append(grid)
            keys.append(key)
        # What the processor does for the text: each image placeholder becomes one token per
        # merged 2x2 patch group of that image.
        merge = int(self.processor.image_processor.merge_size) ** 2
        pieces = text.split(IMAGE_PAD)
        if len(pieces) - 1 != len(images):
            raise InvalidRequest("the number of image placeholders does not match the images", param="messages")
        expanded = pieces[0]
        for grid, piece in zip(grids, pieces[1:]):
            expanded += IMAGE_PAD * (int(np.prod(grid)) // merge) + piece
        with self._template_lock:
            ids = self.tokenizer(expanded, add_special_tokens=False)["input_ids"]
        arrays = {"input_ids": np.asarray([ids], dtype=np.int64),
                  "attention_mask": np.ones((1, len(ids)), dtype=np.int64)}
        if images:
            arrays["pixel_values"] = np.concatenate(pixels, axis=0)
            arrays["image_grid_thw"] = np.concatenate(grids, axis=0).astype(np.int64)
        return Prompt(arrays=arrays, prompt_tokens=len(ids), text=text, image_count=len(images),
                      image_keys=tuple(keys))

    def _preprocess_image(self, img):
        """(key, (pixel patches, grid)) for one image, from the cache when the same image was seen."""
        digest = hashlib.blake2b(img.tobytes(), digest_size=16)
        digest.update(f"{img.size}{img.mode}".encode())
        key = digest.hexdigest()
        entry = self.pixel_cache.get(key)
        if entry is None:
            with self._template_lock:
                out = self.processor.image_processor(images=[img], return_tensors="pd")
            entry = (out["pixel_values"].numpy(), out["image_grid_thw"].numpy().reshape(1, 3))
            self.pixel_cache.put(key, entry, entry[0].nbytes)
        return key, entry

    def sampling_params(self, *, max_tokens=None, temperature=None, top_p=None, top_k=None,
                        repetition_penalty=None, seed=None, stop=None, max_tokens_limit=None) -> SamplingParams:
        """`max_tokens_limit` overrides the engine's own, for an app whose settings differ."""
        limit = max_tokens_limit or self.max_tokens_limit
        if max_tokens is not None and max_tokens > limit:
            raise InvalidRequest(f"max_tokens is {max_tokens}, more than this server's limit of {limit}",
                                 param="max_tokens", code="max_tokens_too_large")
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

    def close(self, timeout: float = 30.0) -> None:
        """Stop the model worker after the jobs already queued (an interpreter exiting with the
        worker still inside Paddle can abort)."""
        if self._worker.is_alive():
            self._jobs.put(None)
            self._worker.join(timeout)

    def queue_depth(self) -> int:
        """Jobs waiting for the model (not counting the batch running now)."""
        return self._jobs.qsize() + len(self._held)

    def cache_stats(self) -> dict:
        return {"pixels": self.pixel_cache.stats(), "vision": self.vision_cache.stats()}

    def _work(self) -> None:
        _ensure_dynamic_mode()
        if self.loaded.device == "cpu":
            # Paddle sets OMP_NUM_THREADS=1 when imported: the model would use one core of many
            from paddle.base import core

            core.set_num_threads(self.cpu_threads)
            log.info("model worker: %d CPU math threads", self.cpu_threads)
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._run(batch)
            except Exception as exc:  # keep the worker alive for everyone else
                log.exception("generation failed")
                for job in batch:
                    job.events.put(InternalError(f"generation failed: {type(exc).__name__}: {exc}"))

    def _next_batch(self):
        """The oldest live job, plus the waiting jobs that can share its forward pass."""
        head = self._held.popleft() if self._held else self._jobs.get()
        if head is None:
            return None
        if head.cancelled.is_set():
            return []
        batch = [head]
        if head.params.seed is not None:
            return batch  # a seeded sample must not depend on its companions
        key = self._batch_key(head)
        deadline = head.created + self.batch_wait
        skipped = collections.deque()
        while len(batch) < self.max_batch_size:
            if self._held:
                job = self._held.popleft()
            else:
                try:
                    job = self._jobs.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
            if job is None:
                skipped.append(job)
                break
            if job.cancelled.is_set():
                continue
            longest = max(j.prompt.prompt_tokens for j in batch + [job])
            if (job.params.seed is None and self._batch_key(job) == key
                    and longest * (len(batch) + 1) <= self.max_batch_tokens):
                batch.append(job)
            else:
                skipped.append(job)
        self._held.extendleft(reversed(skipped))  # they go first next time, in arrival order
        return batch

    def _batch_key(self, job: Job):
        kwargs = self._generate_kwargs(job.params)
        return tuple(sorted((k, v) for k, v in kwargs.items() if k not in ("max_new_tokens", "eos_token_id")))

    def _run(self, batch: list) -> None:
        if not batch:
            return
        import paddle
        from paddleformers.generation.stopping_criteria import StoppingCriteriaList

        started = time.perf_counter()
        kwargs = self._generate_kwargs(batch[0].params)
        kwargs["max_new_tokens"] = max(job.params.max_tokens for job in batch)
        rows = [Row(job, IncrementalText(self.tokenizer, job.params.stop), started) for job in batch]
        streamer = BatchStreamer(rows, set(self.eos_token_ids))
        inputs = {k: paddle.to_tensor(v) for k, v in collate(batch, self.pad_token_id).items()}
        self._batch_image_keys = [key for job in batch for key in job.prompt.image_keys]
        self.batches_run += 1
        self.batched_jobs += len(batch)
        try:
            with paddle.no_grad():
                if batch[0].params.seed is not None:
                    paddle.seed(batch[0].params.seed)
                self.model.generate(
                    **inputs, **kwargs, streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([StopWhen(streamer.all_done)]),
                )
        finally:
            self._batch_image_keys = []
        for row in rows:
            row.finish("length")  # rows that were still going ran out of tokens

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


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _ensure_dynamic_mode() -> None:
    """Paddle keeps its eager/static mode per thread, and a server thread that existed before
    paddle was imported starts in static mode, where the processor's tensors cannot be read."""
    import paddle

    if not paddle.in_dynamic_mode():
        paddle.disable_static()


