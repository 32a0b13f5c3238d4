"""Continuous batching: the model worker's loop, scheduled at every decoding step.

Each turn of the loop:
1. takes the requests that arrived (without waiting when rows are decoding);
2. admits waiting requests, oldest first, while the budgets allow: at most `max_rows` rows
   decoding or prefilling, and at most `max_kv_tokens` KV slots even when every row reaches its
   max_tokens (rows x the longest prompt + answer, since the cache is one left-padded block);
3. prefills admitted prompts, streamed ones first (see `prefill_rank`), at most `prefill_tokens`
   prompt tokens per turn while others are decoding (a prompt's vision tower counts as its image
   and video tokens and, for new images, goes a few blocks per turn: a long image prompt is spread
   over several turns instead of stalling every stream; with nobody decoding the whole prompt goes
   at once); on a CPU, several prompts are worked on side by side, each lane with its own budget
   (serving.engines.builtin.lanes); a finished prefill sends its first token at once and joins
   the running batch at the end of the turn;
4. runs one decoding step for every running row, samples each row's token with its own
   settings (and, for a row with a required output form, its grammar's mask), and drops finished and
   cancelled rows at once.
A request never waits for another request's whole answer, only for steps.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from typing import Optional

import numpy as np

from serving.engines.builtin import memory, sampling
from serving.engines.builtin.batch import Row
from serving.engines.builtin.decode import Prefill, RunningBatch
from serving.engines.builtin.detokenize import IncrementalText
from serving.engines.builtin.lanes import UNTOUCHED, PrefillLanes
from serving.errors import InternalError
from serving.jobs import Job

log = logging.getLogger(__name__)
_WAKE = object()  # put on the inbox to make an idle worker look at its state
_FAILED = object()  # a prompt whose prefill failed (its row has the error)
# Prompt tokens' worth of prefill time one image token of a new image's tower block by block costs:
# measured on demo-bench, a 448x448 image's tower (256 image tokens) 227 ms, a 290-token prefill 127 ms.
TOWER_TOKENS = 2


class _Prefilling:
    def __init__(self, row: Row, prefill: Prefill, rank: int):
        self.row, self.prefill, self.rank = row, prefill, rank


def prefill_rank(admitted: int, stream: bool, lead: int) -> int:
    """Prefill order (lowest first): admission order, with a streamed prompt counted as admitted `lead`
    places earlier. A streaming client sees its first token; a non-streamed one only the whole answer,
    which one prefill more ahead of it hardly changes. A prompt is overtaken by at most `lead` later
    ones, so none starves."""
    return admitted - (lead if stream else 0)


class Scheduler:
    def __init__(self, engine, *, max_rows: int, max_kv_tokens: int, prefill_tokens: int):
        self.engine = engine
        self.model = engine.model
        self.max_rows = max(1, max_rows)
        self.max_kv_tokens = max_kv_tokens
        self.prefill_tokens = max(1, prefill_tokens)
        self.inbox: queue.Queue = queue.Queue()
        self.waiting: collections.deque = collections.deque()
        self.prefilling: list[_Prefilling] = []
        self.batch = RunningBatch(self.model)
        # on a CPU, prompts are prefilled side by side, the math threads shared among them
        self.lanes = PrefillLanes(engine.cpu_threads if engine.loaded.device == "cpu" else 1)
        self._sampling = threading.Lock()
        self.closing = False
        self.refusing = None  # an error every job not yet admitted gets instead (refuse_waiting)
        self.stopped = None  # the error every job gets once the loop itself has failed (fail_everyone)
        # numbers for the metrics (read from other threads: plain ints and floats)
        self.steps = 0
        self.step_seconds = 0.0
        self.prefill_tokens_done = 0
        self.joined = 0  # admitted while other rows were decoding
        self.side_by_side = 0  # prompts worked on in a turn with more than one prefill lane
        self.batches = 0  # times the batch started from empty
        self.requests_run = 0
        self.admitted = 0  # prompts admitted so far: their prefill order
        self.last_prefill_tokens = 0  # prompt tokens prefilled in the latest turn

    # ------------------------------------------------------------------ from other threads

    def submit(self, job: Job) -> None:
        self.inbox.put(job)
        if self.stopped is not None:  # no loop will take it (the check after the put: none slips between)
            self._fail_inbox()

    def fail_everyone(self, error: Exception) -> None:
        """The loop itself failed: every request it holds, and any submitted later, ends with `error`."""
        self.stopped = error
        for row in list(self.batch.rows) + [item.row for item in self.prefilling]:
            row.fail(error)
        while self.waiting:
            self.waiting.popleft().events.put(error)
        self._fail_inbox()

    def _fail_inbox(self) -> None:
        while True:
            try:
                job = self.inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(job, Job):
                job.events.put(self.stopped)

    def stop(self) -> None:
        self.inbox.put(None)

    def refuse_waiting(self, error: Exception) -> None:
        """From now on, jobs not yet admitted (waiting now or submitted later) end with `error` instead of
        running; rows already prefilling or decoding go on (a shutdown's grace period). The worker acts on
        it at its next turn (an idle one wakes for the marker put here)."""
        self.refusing = error
        self.inbox.put(_WAKE)

    def queue_depth(self) -> int:
        return self.inbox.qsize() + len(self.waiting)

    def rows_running(self) -> int:
        return len(self.batch) + len(self.prefilling)

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        import paddle

        with paddle.no_grad():
            try:
                while True:
                    busy = bool(len(self.batch) or self.prefilling or self.waiting)
                    if not self._take(block=not busy):
                        return
                    self._drop_cancelled()
                    self._admit()
                    self._prefill()
                    if len(self.batch):
                        self._decode()
            finally:
                self.lanes.close()

    def _take(self, block: bool) -> bool:
        """Move arrived jobs to `waiting`; False when closing and no work is left."""
        while True:
            try:
                job = self.inbox.get(block=block and not self.closing, timeout=None)
            except queue.Empty:
                break
            block = False
            if job is None:
                self.closing = True
                continue
            if job is _WAKE:
                continue
            self.waiting.append(job)
        if self.closing and not (len(self.batch) or self.prefilling or self.waiting):
            return False
        return True

    def _drop_cancelled(self) -> None:
        self.waiting = collections.deque(j for j in self.waiting if not j.cancelled.is_set())
        self.prefilling = [p for p in self.prefilling if not p.row.job.cancelled.is_set()]
        keep = [i for i, row in enumerate(self.batch.rows) if not (row.done or row.job.cancelled.is_set())]
        self.batch.keep(keep)

    def _admit(self) -> None:
        if self.refusing is not None:
            while self.waiting:
                self.waiting.popleft().events.put(self.refusing)
        while self.waiting and self.rows_running() < self.max_rows:
            job = self.waiting[0]
            reserves = [r.reserve for r in self.batch.rows] + [p.row.reserve for p in self.prefilling]
            mine = job.prompt.prompt_tokens + job.params.max_tokens
            if reserves and (len(reserves) + 1) * max(reserves + [mine]) > self.max_kv_tokens:
                break  # oldest first: later requests do not overtake it
            self.waiting.popleft()
            if len(self.batch):
                self.joined += 1
            elif not self.prefilling:
                self.batches += 1
            self.requests_run += 1
            engine = self.engine
            try:
                sampler = sampling.RowSampler(job.params, engine.defaults,
                                              job.prompt.arrays["input_ids"][0].tolist())
                row = Row(job, sampler, IncrementalText(engine.tokenizer, job.params.stop), engine.eos_set,
                          *engine.output_state(job.params.output))
            except Exception as exc:  # this request only; everyone else goes on
                _report(job, exc)
                continue
            rank = prefill_rank(self.admitted, job.params.stream, self.max_rows)
            self.admitted += 1
            self.prefilling.append(_Prefilling(row, None, rank))  # its vision work runs in _prefill, within the budget
            self.prefilling.sort(key=lambda item: item.rank)

    def _prefill(self) -> None:
        """One turn of prefill work, in prefill order, within the budget (each lane its own share of
        it); finished prompts join the running batch."""
        budget = self.prefill_tokens if len(self.batch) else None  # nobody waits on an idle batch
        items = self.prefilling
        lanes = self.lanes.count(len(items))
        outcomes = self.lanes.run(items, budget, self._advance, lanes)
        if lanes > 1:
            self.side_by_side += sum(outcome is not UNTOUCHED for outcome in outcomes)
        still, ready, spent = [], [], 0
        for item, outcome in zip(items, outcomes):
            if outcome is UNTOUCHED:
                still.append(item)
                continue
            used, done = outcome
            spent += used
            if done is None:
                still.append(item)
            elif done is not _FAILED:
                ready.append((item.row, *done))
        self.prefilling = still
        for row, result, first_token in ready:  # their first tokens are out; now they join the running batch
            if not row.done:
                self.batch.add(row, result, first_token)
        if ready:  # a prefill's large short-lived buffers (the vision tower's above all) are free now
            memory.give_back()
        self.prefill_tokens_done += spent
        self.last_prefill_tokens = spent

    def _advance(self, item: _Prefilling, allowance: Optional[int]) -> tuple:
        """Work on one prompt within `allowance` prompt tokens (None: to the end): its vision tower (at
        once, or block by block), then its prefill; runs in a prefill lane. Returns (tokens spent, outcome):
        None while not done, _FAILED when it failed (the row has its error), or (PrefillResult, first
        token) when done, the first token already sent."""
        spent = 0
        job = item.row.job
        try:
            if item.prefill is None:  # the vision tower runs now (or starts, block by block)
                item.prefill = self._start_prefill(job)
                if not item.prefill.vision_blocks_left:  # it ran at once: one token per image or video token
                    spent += _media_tokens(job.prompt.arrays)
            if item.prefill.vision_blocks_left:  # each block costs its share of the image tokens
                cost = TOWER_TOKENS * _media_tokens(job.prompt.arrays) / item.prefill.tower_blocks
                left = item.prefill.vision_blocks_left
                blocks = left if allowance is None else min(left, max(1, int((allowance - spent) // cost)))
                item.prefill.advance_vision(blocks)
                spent += int(round(blocks * cost))
            if item.prefill.vision_blocks_left or (allowance is not None and spent >= allowance):
                return spent, None
            tokens = item.prefill.remaining if allowance is None else min(item.prefill.remaining, allowance - spent)
            spent += tokens
            result = item.prefill.run(tokens)
        except Exception as exc:
            item.row.fail(_internal(exc))
            return spent, _FAILED
        if result is None:
            return spent, None
        token = self._first_token(item.row, result)
        return spent, (_FAILED if token is None else (result, token))

    def _start_prefill(self, job: Job) -> Prefill:
        engine = self.engine
        try:
            return Prefill(self.model, job.prompt.arrays,
                           lambda p=job.prompt: engine.set_image_keys(p.image_keys, p.video_keys),
                           vision_cache=engine.vision_cache, image_keys=job.prompt.image_keys)
        finally:
            engine.set_image_keys(())

    def _first_token(self, row: Row, result) -> Optional[int]:
        """Sample the prompt's first token and send it at once (from the lane that finished the prompt:
        the client need not wait for the rest of the turn); None when that failed (the row has the error)."""
        try:
            with self._sampling:  # unseeded rows share Paddle's generator
                tokens, logprobs = sampling.next_tokens(result.logits, [row.sampler], self.engine.tokenizer,
                                                        adjust=_adjusters([row]))
        except Exception as exc:
            row.fail(_internal(exc))
            return None
        row.add(tokens[0], logprobs[0])
        return tokens[0]

    def _decode(self) -> None:
        started = time.perf_counter()
        rows = self.batch.rows
        try:
            logits = self.batch.step()
            tokens, logprobs = sampling.next_tokens(logits, [row.sampler for row in rows], self.engine.tokenizer,
                                                    adjust=_adjusters(rows))
        except Exception as exc:  # the batch is lost; the worker and later requests are not
            log.exception("decoding step failed")
            for row in rows:
                row.fail(_internal(exc))
            self.batch.keep([])
            return
        self.batch.set_next(tokens)
        for row, token, logprob in zip(rows, tokens, logprobs):
            row.add(token, logprob)
        self.batch.keep([i for i, row in enumerate(rows) if not row.done])
        self.steps += 1
        self.step_seconds += time.perf_counter() - started


def _adjusters(rows) -> Optional[list]:
    """Each row's grammar mask and logit bias for this step (RowConstraint.adjust), None when no row has one."""
    found = [row.constraint.adjust if row.constraint is not None and row.constraint.shapes else None for row in rows]
    return found if any(fn is not None for fn in found) else None


def _media_tokens(arrays: dict) -> int:
    """Prompt tokens that stand for image or video patches (each covers a 2x2 group of patches)."""
    grids = [arrays[k] for k in ("image_grid_thw", "video_grid_thw") if k in arrays]
    return sum(int(np.prod(grid, axis=-1).sum()) // 4 for grid in grids)


def _internal(exc: Exception) -> Exception:
    log.error("generation failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
    return InternalError(f"generation failed ({type(exc).__name__}); the server is still up")


def _report(job: Job, exc: Exception) -> None:
    job.events.put(_internal(exc))
