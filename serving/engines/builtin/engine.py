"""The built-in engine: chat turns + images -> prompt tensors -> generated text, with PaddlePaddle.

It implements serving.engines.base.Engine. One model worker thread owns the model and runs the
continuous-batching loop of serving.engines.builtin.scheduler: requests join the running batch at any decoding
step and leave it as soon as they end, each with its own sampling settings.

Earlier prompts' KV (and finished answers') is kept in a prefix cache (serving.engines.builtin.prefix_cache):
a prompt that starts as an earlier one did, a conversation's next turn above all, prefills only the rest.

Image and video work is cached by content and size: the preprocessed pixel patches, and the
vision tower's output (PaddleFormers' `get_image_features` and `get_video_features` are wrapped to
consult the cache). Videos arrive sampled and sized (serving.intake.video.Video); PaddleFormers' video
processor patches their frames, and their seconds per temporal patch go to the model's time positions.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import re
import threading
from typing import Iterator, Optional

import numpy as np

from serving import tools as tool_format
from serving.engines.builtin import cpu_math, grammar, sampling, speedups
from serving.engines.builtin import prefix_cache, row_rules, vision_cache
from serving.engines.builtin.detokenize import IncrementalText
from serving.engines.builtin.prefix_cache import PrefixCache
from serving.intake.video import Video
from serving.engines.builtin.cache import ByteLRU
from serving.engines.base import ModelInfo
from serving.errors import InternalError, InvalidRequest
from serving.jobs import Completion, Finished, Job, Prompt, SamplingParams, TextDelta  # noqa: F401  (the engine's API)
from serving.engines.builtin.scheduler import Scheduler

log = logging.getLogger(__name__)

IMAGE_PAD = "<|image_pad|>"
# the OpenAI fields this engine honours beyond sampling (serving.chat refuses the others): enforced by grammars
OUTPUT_FEATURES = frozenset({"response_format", "tools", "logit_bias"})
# the peers' extensions it honours whatever the tokenizer (serving.chat.PEER_FIELDS)
BASE_FEATURES = frozenset({"prompt_ending", "peer_sampling", "prompt_logprobs"})
VIDEO_PAD = "<|video_pad|>"
MAX_CHARS_PER_TOKEN = 16  # no BPE token of Qwen's covers more characters than this on average

# Budgets when the settings say 0 (auto), by device. A CPU step costs about the same per row as
# on its own (2 cores are compute-bound), so few rows keep each stream quick; a GPU step costs
# nearly the same for 1 or 32 rows (measured: an eager loop is launch-bound), so it takes many.
# KV tokens: Qwen2.5-VL-3B holds 36 KiB per token in bf16 (36 layers x 2 x 2 heads x 128 x 2 B),
# so 65,536 slots are 2.3 GiB of a GPU; on a CPU the slots are RAM and cost step time too.
AUTO_BUDGETS = {
    "cpu": {"max_batch_size": 8, "max_batch_tokens": 16384, "prefill_chunk_tokens": 256},
    "gpu": {"max_batch_size": 32, "max_batch_tokens": 65536, "prefill_chunk_tokens": 2048},
}


class PaddleEngine:
    """serving.engines.base.Engine on PaddleFormers' Qwen2.5-VL, in this process."""

    def __init__(self, loaded, *, max_batch_size: int = 0, max_batch_tokens: int = 0, prefill_chunk_tokens: int = 0,
                 image_cache_bytes: int = 256 * 2**20, cpu_threads: int = 0, prefix_cache_bytes: int = -1,
                 grammar_cache_size: int = 64, json_whitespace: str = "compact"):
        self.loaded = loaded
        self.model = loaded.model
        self.processor = loaded.processor
        self.tokenizer = loaded.processor.tokenizer
        text_config = getattr(self.model.config, "text_config", self.model.config)
        self.context_length = int(getattr(text_config, "max_position_embeddings", 32768))
        # the ids the model can write: its embedding rows, which outnumber the tokenizer's entries (Qwen2.5-VL:
        # 151,936 rows, 151,665 tokens); an id it wrote must be accepted back (prompt, stop ids, /detokenize)
        self.vocab_size = max(int(getattr(text_config, "vocab_size", 0) or 0), len(self.tokenizer))
        self.defaults = sampling.generation_defaults(getattr(self.model, "generation_config", None))
        auto = AUTO_BUDGETS["cpu" if loaded.device == "cpu" else "gpu"]
        self.max_batch_size = max_batch_size or auto["max_batch_size"]
        self.max_batch_tokens = max_batch_tokens or auto["max_batch_tokens"]
        self.prefill_chunk_tokens = prefill_chunk_tokens or auto["prefill_chunk_tokens"]
        self.eos_token_ids = self._eos_ids()
        self.eos_set = set(self.eos_token_ids)
        self.grammar = self._grammar_compiler(grammar_cache_size, json_whitespace)
        self.info = ModelInfo(name=loaded.name, source=loaded.source, is_demo=loaded.is_demo,
                              context_length=self.context_length, max_batch_size=self.max_batch_size,
                              features=BASE_FEATURES | (OUTPUT_FEATURES if self.grammar is not None else frozenset()),
                              configuration=self._configuration(json_whitespace))
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.eos_token_ids[-1]
        self._template_lock = threading.Lock()  # HF fast tokenizers are not safe to share across threads
        self.cpu_threads = cpu_threads or available_cores()
        self.pixel_cache = ByteLRU(image_cache_bytes // 2, "pixels")
        self.vision_cache = ByteLRU(image_cache_bytes // 2, "vision")
        if prefix_cache_bytes < 0:  # auto, by device
            prefix_cache_bytes = prefix_cache.AUTO_MB["cpu" if loaded.device == "cpu" else "gpu"] * 2**20
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self._media_keys = threading.local()  # per model thread: prompts are prefilled side by side (lanes)
        speedups.install(self.model, loaded.device)  # ours only: the tutorial's server keeps the library's code
        vision_cache.install(self.model, self.vision_cache, lambda: getattr(self._media_keys, "images", []),
                             lambda: getattr(self._media_keys, "videos", []))
        self.scheduler = Scheduler(self, max_rows=self.max_batch_size, max_kv_tokens=self.max_batch_tokens,
                                   prefill_tokens=self.prefill_chunk_tokens)
        self._worker = threading.Thread(target=self._work, name="model-worker", daemon=True)
        self._worker.start()
        atexit.register(self.close, 5.0)  # Paddle can abort the process if it exits mid-step
        log.info("continuous batching: up to %d rows, %d KV tokens, %d prompt tokens prefilled per step",
                 self.max_batch_size, self.max_batch_tokens, self.prefill_chunk_tokens)
        log.info("prefix cache: %s", f"{prefix_cache_bytes / 2**20:g} MB" if prefix_cache_bytes else "off")

    def _configuration(self, json_whitespace: str) -> tuple:
        """What decides this engine's answers beside the model's name (for system_fingerprint)."""
        import paddle
        import paddleformers

        return (("device", str(self.loaded.device)), ("dtype", str(self.loaded.dtype)),
                ("max_batch_tokens", self.max_batch_tokens), ("prefill_chunk_tokens", self.prefill_chunk_tokens),
                ("json_whitespace", json_whitespace), ("paddle", paddle.__version__),
                ("paddleformers", getattr(paddleformers, "__version__", "?")), ("eos", tuple(self.eos_token_ids)))

    # ------------------------------------------------------------------ prompts

    def build_prompt(self, turns, tools: Optional[list] = None, *, continue_final: bool = False,
                     generation_prompt: bool = True) -> Prompt:
        """turns: ChatTurn-like objects whose parts are str, PIL images or serving.intake.video.Video, in order
        (an assistant turn may carry tool_calls, a "tool" turn is a call's result); `tools`: OpenAI tool
        definitions the answer may call, written into the system turn (serving.tools). `continue_final`: the
        last turn is the assistant's answer so far, which the answer continues (llama.cpp's prefill, vLLM's
        continue_final_message); `generation_prompt` False: the prompt ends after the last turn, no assistant
        turn opened (vLLM's add_generation_prompt)."""
        messages, images, videos = [], [], []
        for turn in turns:
            content = []
            for part in turn.parts:
                if isinstance(part, str):
                    content.append({"type": "text", "text": part})
                elif isinstance(part, Video):
                    content.append({"type": "video"})
                    videos.append(part)
                else:
                    content.append({"type": "image"})
                    images.append(part)
            if all(c["type"] == "text" for c in content):
                content = "".join(c["text"] for c in content)  # plain string, as the template expects
            message = {"role": turn.role, "content": content}
            if getattr(turn, "tool_calls", None):
                message["tool_calls"] = tool_format.template_calls(turn.tool_calls)
            messages.append(message)
        chars = sum(len(p) for turn in turns for p in turn.parts if isinstance(p, str))
        if chars > self.context_length * MAX_CHARS_PER_TOKEN:  # surely too long: refuse before tokenizing
            raise InvalidRequest(f"the prompt is {chars} characters, far more than the model's context of "
                                 f"{self.context_length} tokens", param="messages", code="context_length_exceeded")
        continued = ""  # the final assistant message's text, which the answer continues (a prefill)
        if continue_final:
            if not messages or messages[-1]["role"] != "assistant" or "tool_calls" in messages[-1]:
                raise InvalidRequest("continuing the final message needs a last assistant message without "
                                     "tool_calls", param="continue_final_message")
            continued = messages.pop()["content"]
            generation_prompt = True  # the assistant's turn is opened, then its text so far follows
        _ensure_dynamic_mode()
        extra = {}
        if tools or any(m["role"] == "tool" or "tool_calls" in m for m in messages):
            if tool_format.template_knows_tools(self._chat_template()):
                extra = {"tools": tools} if tools else {}
            else:  # the published Qwen2.5-VL template has no tools section: write Qwen2.5's text ourselves
                messages = tool_format.render_messages(messages, tools or [])
        with self._template_lock:
            text = self.processor.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=generation_prompt, **extra)
        text += continued  # the template opens an assistant turn as "<|im_start|>assistant\n": its text goes on
        pixels, grids, keys = [], [], []
        for img in images:
            key, (pv, grid) = self._preprocess_image(img)
            pixels.append(pv)
            grids.append(grid)
            keys.append(key)
        video_pixels, video_grids = [], []
        for clip in videos:
            pv, grid = self._preprocess_video(clip)
            video_pixels.append(pv)
            video_grids.append(grid)
        # What the processor does for the text: each image or video placeholder becomes one token per
        # merged 2x2 patch group of that image (of each pair of frames of that video).
        merge = int(self.processor.image_processor.merge_size) ** 2
        pieces = re.split(f"({re.escape(IMAGE_PAD)}|{re.escape(VIDEO_PAD)})", text)
        pads = pieces[1::2]
        if pads.count(IMAGE_PAD) != len(images) or pads.count(VIDEO_PAD) != len(videos):
            raise InvalidRequest("the number of image or video placeholders does not match the images and videos",
                                 param="messages")
        expanded, queues = pieces[0], {IMAGE_PAD: iter(grids), VIDEO_PAD: iter(video_grids)}
        for pad, piece in zip(pads, pieces[2::2]):
            expanded += pad * (int(np.prod(next(queues[pad]))) // merge) + piece
        ids = self.encode(expanded)
        arrays = {"input_ids": np.asarray([ids], dtype=np.int64),
                  "attention_mask": np.ones((1, len(ids)), dtype=np.int64)}
        if images:
            arrays["pixel_values"] = np.concatenate(pixels, axis=0)
            arrays["image_grid_thw"] = np.concatenate(grids, axis=0).astype(np.int64)
        if videos:
            arrays["pixel_values_videos"] = np.concatenate(video_pixels, axis=0)
            arrays["video_grid_thw"] = np.concatenate(video_grids, axis=0).astype(np.int64)
            arrays["second_per_grid_ts"] = np.asarray([clip.seconds_per_grid for clip in videos], dtype=np.float32)
        return Prompt(arrays=arrays, prompt_tokens=len(ids), text=text, image_count=len(images),
                      image_keys=tuple(keys), video_keys=tuple(clip.key for clip in videos))

    def _preprocess_image(self, img):
        """(key, (pixel patches, grid)) for one image, from the cache when the same image was seen."""
        digest = hashlib.blake2b(img.tobytes(), digest_size=16)
        digest.update(f"{img.size}{img.mode}".encode())
        key = digest.hexdigest()
        entry = self.pixel_cache.get(key)
        if entry is None:  # no lock: the image processor keeps no state between calls (tested from many threads)
            out = self.processor.image_processor(images=[img], return_tensors="pd")
            entry = (out["pixel_values"].numpy(), out["image_grid_thw"].numpy().reshape(1, 3))
            self.pixel_cache.put(key, entry, entry[0].nbytes)
        return key, entry

    def _preprocess_video(self, clip: Video):
        """(pixel patches, grid) for one video's sampled frames (already sized: the processor only
        normalises and patches them), from the cache when the same frames were seen."""
        entry = self.pixel_cache.get(clip.key)
        if entry is None:
            with self._template_lock:
                out = self.processor.video_processor(videos=[clip.frames], do_resize=False, do_sample_frames=False,
                                                     return_tensors="pd")
            entry = (out["pixel_values_videos"].numpy(), out["video_grid_thw"].numpy().reshape(1, 3))
            self.pixel_cache.put(clip.key, entry, entry[0].nbytes)
        return entry

    def prefix_key(self, prompt: Prompt):
        """The prompt's key in the prefix cache: its ids with each image's and video's placeholders keyed by the
        item's content digest and grid (and a video's seconds per temporal patch); None when not cacheable."""
        config = self.model.config
        return prefix_cache.prompt_key(prompt.arrays, prompt.image_keys, prompt.video_keys,
                                       int(config.image_token_id), int(config.video_token_id),
                                       int(self.processor.image_processor.merge_size) ** 2)

    def check_token_ids(self, ids, param: str) -> None:
        """InvalidRequest naming `param` when an id is not one the model can write (its vocabulary)."""
        size = self.vocab_size
        bad = [i for i in ids if not 0 <= int(i) < size]
        if bad:
            raise InvalidRequest(f"{param}: token id {bad[0]} is not in the model's vocabulary of {size} ids "
                                 f"(0..{size - 1})",
                                 param=param, code="invalid_value")

    def check_rule_tokens(self, params: SamplingParams) -> None:
        """The token ids of the peers' rules in the vocabulary (400 otherwise), and the bad words as the token
        sequences the rows ban (serving.engines.builtin.row_rules)."""
        self.check_token_ids(params.stop_token_ids, "stop_token_ids")
        self.check_token_ids(params.bad_words_token_ids, "bad_words_token_ids")
        if params.bad_words or params.bad_words_token_ids:
            try:
                params.banned = row_rules.bad_word_sequences(self.encode, params.bad_words, params.bad_words_token_ids)
            except ValueError as exc:
                raise InvalidRequest(str(exc), param="bad_words", code="invalid_value") from None

    def check_fits(self, prompt: Prompt, params: SamplingParams) -> None:
        room = self.context_length - prompt.prompt_tokens
        if room < 1:
            raise InvalidRequest(f"the prompt is {prompt.prompt_tokens} tokens, more than the model's context of "
                                 f"{self.context_length}", param="messages", code="context_length_exceeded")
        params.max_tokens = min(params.max_tokens, room)

    # ------------------------------------------------------------------ generation

    def _chat_template(self) -> Optional[str]:
        template = getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        return template if isinstance(template, str) else None

    def start(self, turns, params: SamplingParams) -> Job:
        """The engine protocol's entry (serving.engines.base.Engine): prompt, then a queued job."""
        tools = params.output.tools if params.output is not None else None
        self.check_rule_tokens(params)
        return self.submit(self.build_prompt(turns, tools, continue_final=params.continue_final,
                                             generation_prompt=params.generation_prompt), params)

    def start_ids(self, ids: list, params: SamplingParams) -> Job:
        """A raw prompt of token ids (no chat template: /v1/completions), then a queued job."""
        self.check_rule_tokens(params)
        arrays = {"input_ids": np.asarray([ids], dtype=np.int64), "attention_mask": np.ones((1, len(ids)), dtype=np.int64)}
        return self.submit(Prompt(arrays=arrays, prompt_tokens=len(ids), text="", image_count=0), params)

    # ------------------------------------------------------------------ structured output

    def _grammar_compiler(self, cache_size: int, whitespace: str):
        """The llguidance compiler of this checkpoint's vocabulary; None (and no structured output) when the
        tokenizer has no tokenizer.json to build it from."""
        text_config = getattr(self.model.config, "text_config", self.model.config)
        vocab = int(getattr(text_config, "vocab_size", 0) or len(self.tokenizer))
        try:
            return grammar.GrammarCompiler(self.tokenizer, vocab, self.eos_token_ids, cache_size=cache_size,
                                           whitespace=whitespace)
        except (ImportError, ValueError) as exc:
            log.warning("structured output and tool calls are off: %s", exc)
            return None

    def compile_output(self, spec) -> "grammar.CompiledOutput":
        """A request's serving.structured.OutputSpec -> its compiled grammar (called before the request is
        queued: a schema that cannot be enforced is a 400 before any model work)."""
        return self.grammar.compile(spec)

    def output_state(self, compiled) -> tuple:
        """(RowConstraint or None, serving.tools.CallReader or None) for a new row of a request."""
        if compiled is None or self.grammar is None:
            return None, None
        calls = None
        if compiled.tool_call_ids is not None:
            calls = tool_format.CallReader(*compiled.tool_call_ids, lambda: IncrementalText(self.tokenizer))
        return self.grammar.row(compiled), calls

    def warm_up(self, max_tokens: int = 2) -> None:
        """A few greedy tokens of a text-only prompt before the engine is reported ready, so that a model
        that loads but cannot compute here (a kernel this device lacks) fails the start with one line
        (ModelLoadError: exit 2) instead of passing /health and answering every request with a 500."""
        from serving.model.loader import ModelLoadError
        from serving.protocol import ChatTurn

        try:
            prompt = self.build_prompt([ChatTurn("user", ["Hi"])])
            self.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0, repetition_penalty=1.0))
        except Exception as exc:
            self.close(5.0)
            cause = exc.__cause__ or exc  # the model's own error behind the scheduler's InternalError
            reason = " ".join(f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}".split())
            raise ModelLoadError(f"the model loaded but cannot generate on {self.loaded.device} as "
                                 f"{self.loaded.dtype}: {reason[:300]}") from exc

    def health(self) -> tuple:
        if not self._worker.is_alive():
            return False, "the model worker has stopped"
        return True, "ok"

    def stats(self) -> dict:
        s = self.scheduler
        return {"queue_depth": s.queue_depth(), "rows_running": s.rows_running(), "steps": s.steps,
                "step_seconds": s.step_seconds, "prefill_tokens": s.prefill_tokens_done, "joined": s.joined,
                "prefilled_side_by_side": s.side_by_side, "batches": s.batches, "batched_requests": s.requests_run,
                "preemptions": s.preempted, "kv_tokens": s.kv_tokens,
                "caches": self.cache_stats(), "prefix_cache": self.prefix_cache.stats(),
                **self._grammar_stats()}

    def _grammar_stats(self) -> dict:
        if self.grammar is None:
            return {}
        g = self.grammar.stats
        return {"constrained_rows": g.constrained_rows, "grammar_compiles": g.compiles,
                "grammar_compile_seconds": g.compile_seconds, "grammar_cache_hits": g.cache_hits,
                "grammar_masks": g.masks, "grammar_mask_seconds": g.mask_seconds}

    def submit(self, prompt: Prompt, params: SamplingParams) -> Job:
        self.check_fits(prompt, params)
        job = Job(prompt, params)
        self.scheduler.submit(job)
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
            self.scheduler.stop()
            self._worker.join(timeout)

    def refuse_waiting(self, error: Exception) -> None:
        """Jobs not yet running (waiting now or submitted later) end with `error`; running ones go on.
        For a shutdown: serving.web.shutdown answers the waiting requests at once and lets the running finish."""
        self.scheduler.refuse_waiting(error)

    def queue_depth(self) -> int:
        """Jobs waiting for the model (not counting the rows running now)."""
        return self.scheduler.queue_depth()

    def cache_stats(self) -> dict:
        return {"pixels": self.pixel_cache.stats(), "vision": self.vision_cache.stats()}

    def set_image_keys(self, keys, video_keys=()) -> None:
        """The content keys of the images and videos the vision tower is about to see in this thread (for its cache)."""
        self._media_keys.images = list(keys)
        self._media_keys.videos = list(video_keys)

    def _work(self) -> None:
        _ensure_dynamic_mode()
        if self.loaded.device == "cpu":
            # Paddle sets OMP_NUM_THREADS=1 when imported: the model would use one core of many
            cpu_math.use_threads(self.cpu_threads)
            log.info("model worker: %d CPU math threads", self.cpu_threads)
        try:
            self.scheduler.run()
        except BaseException as exc:  # the loop itself failed: tell everyone waiting instead of leaving them hanging
            log.exception("the model worker stopped")
            self.scheduler.fail_everyone(InternalError(
                f"the model worker stopped ({type(exc).__name__}); the server must be restarted"))
            raise

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
        return len(self.encode(text))

    def encode(self, text: str) -> list:
        """Token ids of `text`, without special tokens. The Rust tokenizer's encode_batch is safe to call
        from many threads at once (nothing here changes its settings) and releases the GIL while it works,
        so a long prompt holds up neither other prompts nor the HTTP server's threads; the template lock
        is only for tokenizers without it."""
        backend = getattr(self.tokenizer, "_tokenizer", None)
        if backend is not None and hasattr(backend, "encode_batch"):
            return backend.encode_batch([text], add_special_tokens=False)[0].ids
        with self._template_lock:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]


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


