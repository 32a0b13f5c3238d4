"""The seam between the service and whatever generates text: the one protocol every engine implements.

The chat service (serving.chat) is the only caller. It hands an engine chat turns whose images
are already loaded and sized, and whose videos are already decoded and sampled (serving.intake.video.Video),
and reads back text deltas, then one Finished. The built-in engine
(serving.engines.builtin.engine.PaddleEngine) runs the model in this process; other engines (an upstream
OpenAI-compatible server, FastDeploy) implement the same five members.

Errors an engine raises are the domain errors of serving.errors (InvalidRequest for a prompt
that cannot run, for example); the HTTP layer alone decides what status each becomes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator, Optional, Protocol, runtime_checkable

from serving.jobs import SamplingParams


@dataclass(frozen=True)
class ModelInfo:
    """What /v1/models, /health and the logs say about the model an engine serves."""

    name: str  # the id responses carry
    source: str  # folder or hub id the weights came from (or the upstream's URL)
    is_demo: bool  # random weights: answers are meaningless text
    context_length: int  # prompt + answer tokens the model takes
    max_batch_size: int = 1  # most sequences decoded together
    # OpenAI request fields beyond sampling that this engine honours (e.g. "tools", "response_format",
    # "logit_bias"); the service refuses the others with 400 unsupported_parameter instead of dropping them
    features: frozenset = frozenset()
    # what else decides the answers (device, dtype, batch budgets, library versions...), as (name, value) pairs
    configuration: tuple = ()

    @property
    def fingerprint(self) -> str:
        """OpenAI's system_fingerprint: a digest of the model and the engine configuration, the same for every
        response of one server setup and different when something that changes answers changes."""
        parts = (self.name, self.source, self.context_length, self.max_batch_size, sorted(self.features),
                 sorted(self.configuration))
        return "fp_" + hashlib.blake2b(repr(parts).encode(), digest_size=6).hexdigest()


@runtime_checkable
class Generation(Protocol):
    """One running generation. Iterating yields TextDelta (a str) pieces, then exactly one Finished;
    an engine error is raised from the iterator. `until(deadline)` is the same with a deadline
    (time.perf_counter()): past it, TimeoutError. `cancel()` may be called from any thread at any
    time: the engine drops the work at its next step, and iteration ends without Finished."""

    prompt_tokens: int

    def __iter__(self) -> Iterator: ...

    def until(self, deadline: Optional[float]) -> Iterator: ...

    def cancel(self) -> None: ...


@runtime_checkable
class Engine(Protocol):
    info: ModelInfo

    def start(self, turns: list, params: SamplingParams) -> Generation:
        """Begin generating an answer to `turns` (protocol.ChatTurn: role, parts of str, PIL images
        already sized for the model, or serving.intake.video.Video: a video's sampled, sized frames with their
        rate and the file as received). Raises InvalidRequest when the prompt cannot run (too long
        for the context, badly ordered turns); never blocks on the model."""
        ...

    def count_tokens(self, text: str) -> int:
        """Tokens `text` takes in this model's vocabulary (for answers cut short by a cancel)."""
        ...

    def health(self) -> tuple:
        """(ready, reason): ready False when the engine cannot serve now, with a reason for /health."""
        ...

    def stats(self) -> dict:
        """Numbers the metrics read at scrape time. Keys any engine may give (absent ones are skipped):
        queue_depth (requests waiting), rows_running (sequences decoding now), steps (decoding steps
        run), step_seconds (their total time), prefill_tokens (prompt tokens prefilled), joined
        (requests admitted into a batch that was already decoding), prefilled_side_by_side (prompt
        prefill turns run beside another prompt's), preemptions (rows taken out of the batch for KV room and
        resumed later), kv_tokens (KV slots held now), caches ({name: {hits, misses, bytes}})."""
        ...

    def close(self, timeout: float = 30.0) -> None:
        """Stop after the work already started; release the model."""
        ...

    # Optional: engines in front of other servers (serving.engines.upstream) also have
    #     def upstreams(self) -> list: [{"url", "status": "ok" | "down", "reason", "in_flight"}, ...]
    # which /health shows, and stats()["upstreams"] ({url: {...}}), which the metrics label by upstream.
