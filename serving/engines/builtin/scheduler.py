"""Continuous batching: the model worker's loop, scheduled at every decoding step.

Each turn of the loop:
1. takes the requests that arrived (without waiting when rows are decoding);
2. admits waiting requests, oldest first, while the budgets allow: at most `max_rows` rows
   decoding or prefilling, and at most `max_kv_tokens` KV slots as the rows hold them now, with room
   for a few more steps (rows x the longest row, since the cache is one left-padded block); the
   cache grows as rows decode, and when it would outgrow the budget, or a short request finds no room,
   the youngest long row is preempted (see `Scheduler._preempt`) and later resumes where it stopped;
3. prefills admitted prompts, streamed ones first (see `prefill_rank`), at most `prefill_tokens`
   prompt tokens per turn while others are decoding (a prompt's vision tower counts as its image
   and video tokens and, for new images, goes a few blocks per turn: a long image prompt is spread
   over several turns instead of stalling every stream; with nobody decoding the whole prompt goes
   at once); on a CPU, several prompts are worked on side by side, each lane with its own budget
   (serving.engines.builtin.lanes); a prompt starts after the longest prefix the prefix cache holds
   for it (serving.engines.builtin.prefix_cache), and its KV goes into that cache once done; a
   finished prefill sends its first token at once and joins the running batch at the end of the turn;
4. runs one decoding step for every running row, samples each row's token with its own
   settings (and, for a row with a required output form, its grammar's mask), and drops finished and
   cancelled rows at once (a finished row's prompt and answer KV into the prefix cache first).
A request never waits for another request's whole answer, only for steps: rows reserve what they hold,
not their whole max_tokens, and a request whose whole answer fits one row's share of the budget
(prompt + max_tokens <= max_kv_tokens / max_rows) preempts long rows when it finds no room. Requests with
longer answers queue oldest first among themselves (a preempted row keeps its place: it may preempt long
rows that came after it), so none starves.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import queue
import threading
import time
from typing import Optional, Union

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
# Decoding steps a resumed row runs before a newcomer may preempt it again: it makes progress between
# preemptions (no livelock) and each resume's prefill is spread over at least this many tokens. A row never
# preempted may go at any step: it has made progress since it started.
QUANTUM = 16
# Steps of growth an admission leaves room for, so that a row admitted now is not preempted at once.
HEADROOM = 4


class _Prefilling:
    def __init__(self, row: Row, prefill: Prefill, rank: int):
        self.row, self.prefill, self.rank = row, prefill, rank
        self.key = None  # the prefix-cache key of what it computes: the prompt (a resumed row's: + its answer)

    @property
    def tokens(self) -> int:
        """KV slots the row holds once prefilled (a resumed row: its prompt and answer so far)."""
        return self.row.job.prompt.prompt_tokens + len(self.row.tokens)


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
        self._prompt_done = False  # a prompt of this prefill turn is done (see _others_waiting)
        self.stopped = None  # the error every job gets once the loop itself has failed (fail_everyone)
        # numbers for the metrics (read from other threads: plain ints and floats)
        self.steps = 0
        self.step_seconds = 0.0
        self.prefill_tokens_done = 0
        self.joined = 0  # admitted while other rows were decoding
        self.side_by_side = 0  # prompts worked on in a turn with more than one prefill lane
        self.batches = 0  # times the batch started from empty
        self.requests_run = 0
        self.preempted = 0  # rows taken out of the batch to be resumed later
        self.kv_tokens = 0  # KV slots the running batch held at its latest step (rows x length)
        self.kv_peak = 0  # the most it held at any step
        self.admitted = 0  # prompts admitted so far: their prefill order, and each row's arrival
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
            item = self.waiting.popleft()
            if isinstance(item, Row):  # a preempted row waiting to resume
                item.fail(error)
            else:
                item.events.put(error)
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
        running; rows already prefilling or decoding go on (a shutdown's grace period), and so do preempted
        rows waiting to resume (their answers are under way). The worker acts on
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
        self.waiting = collections.deque(item for item in self.waiting if not _job(item).cancelled.is_set())
        self.prefilling = [p for p in self.prefilling if not p.row.job.cancelled.is_set()]
        keep = [i for i, row in enumerate(self.batch.rows) if not (row.done or row.job.cancelled.is_set())]
        self.batch.keep(keep)

    def _admit(self) -> None:
        """Admit waiting requests (and resume preempted rows), oldest first, while there is room or it can be
        made (see `_make_room`). A short request (its whole answer within one row's share of the budget) may
        pass a long one that must wait; nothing passes a short one, and long ones never pass each other, so
        none starves."""
        if self.refusing is not None:  # preempted rows waiting to resume are under way: they go on
            for item in self.waiting:
                if isinstance(item, Job):
                    item.events.put(self.refusing)
            self.waiting = collections.deque(item for item in self.waiting if isinstance(item, Row))
        long_waits = False  # a long request waits: later long ones wait behind it
        for item in list(self.waiting):
            short = self._demand(item) <= self._share()
            if long_waits and not short:
                continue
            preempted = self.preempted
            if not self._make_room(item, short):
                if short:  # it waits for short rows or QUANTUM steps, not a long answer: nobody passes it
                    break
                long_waits = True
                continue
            long_waits = long_waits or self.preempted > preempted  # the rows it preempted wait now
            self.waiting.remove(item)
            if isinstance(item, Row):
                self._resume(item)
            else:
                self._start(item)

    def _start(self, job: Job) -> None:
        if len(self.batch):
            self.joined += 1
        elif not self.prefilling:
            self.batches += 1
        self.requests_run += 1
        engine = self.engine
        try:
            sampler = sampling.RowSampler(job.params, engine.defaults, job.prompt.arrays["input_ids"][0].tolist())
            text = IncrementalText(engine.tokenizer, job.params.stop, keep_stop=job.params.include_stop)
            row = Row(job, sampler, text, engine.eos_set, *engine.output_state(job.params.output))
        except Exception as exc:  # this request only; everyone else goes on
            _report(job, exc)
            return
        row.arrival = self.admitted
        rank = prefill_rank(self.admitted, job.params.stream, self.max_rows)
        self.admitted += 1
        self.prefilling.append(_Prefilling(row, None, rank))  # its vision work runs in _prefill, within the budget
        self.prefilling.sort(key=lambda item: item.rank)

    def _resume(self, row: Row) -> None:
        """A preempted row back in: its prompt and answer so far are prefilled (from the prefix cache when it
        kept them), then it samples its next token with its own sampler, as its next decoding step would have."""
        rank = prefill_rank(row.arrival, row.job.params.stream, self.max_rows)
        self.prefilling.append(_Prefilling(row, None, rank))
        self.prefilling.sort(key=lambda item: item.rank)

    # ------------------------------------------------------------------ the KV budget

    def _share(self) -> int:
        """One row's share of the KV budget: a request whose whole answer fits it is short."""
        return self.max_kv_tokens // self.max_rows

    @staticmethod
    def _demand(item: Union[Job, Row]) -> int:
        job = _job(item)
        return job.prompt.prompt_tokens + job.params.max_tokens

    def _fits(self, rows: list, tokens: int) -> bool:
        """A new row holding `tokens` fits beside `rows` of the batch and every prompt being prefilled, with
        HEADROOM steps of growth: the block is rows x the longest row (left padding)."""
        count = len(rows) + len(self.prefilling) + 1
        if count > self.max_rows:
            return False
        if count == 1:  # alone, it always runs (check_fits bounds it by the model's context)
            return True
        longest = max([row.held for row in rows] + [item.tokens for item in self.prefilling] + [tokens])
        return count * (longest + HEADROOM) <= self.max_kv_tokens

    def _make_room(self, item: Union[Job, Row], short: bool) -> bool:
        """True when `item` fits now, or once some running rows are preempted (done here): only long rows
        (prompt + max_tokens beyond one row's share), not resumed within the last QUANTUM steps, the
        youngest first, and, for a long newcomer, only rows younger than itself (a preempted row regaining its
        place; a long request that has not started is younger than every long row)."""
        tokens = _job(item).prompt.prompt_tokens + (len(item.tokens) if isinstance(item, Row) else 0)
        rows = list(self.batch.rows)
        if self._fits(rows, tokens):
            return True
        if not short and not isinstance(item, Row):
            return False
        share = self._share()
        victims = sorted((row for row in rows
                          if row.demand > share and (not row.preemptions or self.steps - row.joined_step >= QUANTUM)
                          and (short or row.arrival > item.arrival)), key=lambda row: -row.arrival)
        for count, victim in enumerate(victims, 1):
            rows.remove(victim)
            if self._fits(rows, tokens):
                self._preempt(victims[:count])
                return True
        return False

    def _keep_within_budget(self) -> None:
        """Before a step: while the grown block would pass the budget, preempt the youngest long row (the
        youngest row when none is long); a row alone always goes on."""
        share = self._share()
        while len(self.batch) > 1 and len(self.batch) * (self.batch.length + 1) > self.max_kv_tokens:
            rows = self.batch.rows
            long_rows = [row for row in rows if row.demand > share]
            self._preempt([max(long_rows or rows, key=lambda row: row.arrival)])

    def _preempt(self, victims: list) -> None:
        """Take `victims` out of the running batch, each with its state (sampler and its generator, text,
        grammar, tool calls), back to the waiting queue after older preempted rows and before everyone not yet
        started. Its KV goes to the prefix cache first: resuming then prefills one token; when the cache cannot
        keep it, the prompt and answer so far are prefilled again, which computes the same KV."""
        rows = self.batch.rows
        indices = [rows.index(victim) for victim in victims]
        for index in indices:
            self._keep_kv(index, rows[index])
        self.batch.keep([i for i in range(len(rows)) if i not in indices])
        for victim in victims:
            victim.preemptions += 1
            self.preempted += 1
            at = next((i for i, item in enumerate(self.waiting)
                       if not isinstance(item, Row) or item.arrival > victim.arrival), len(self.waiting))
            self.waiting.insert(at, victim)
        log.debug("preempted %d row(s) for room in the KV budget; they resume where they stopped", len(victims))

    def _prefill(self) -> None:
        """One turn of prefill work, in prefill order, within the budget (each lane its own share of
        it); finished prompts join the running batch."""
        budget = self.prefill_tokens if len(self.batch) else None  # nobody waits on an idle batch
        self._prompt_done = False
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
                row.joined_step = self.steps
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
                item.prefill = self._start_prefill(item)
                if not item.prefill.vision_blocks_left:  # it ran at once: one token per image or video token
                    spent += item.prefill.media_tokens
            if item.prefill.vision_blocks_left:  # each block costs its share of the image tokens
                cost = TOWER_TOKENS * item.prefill.media_tokens / item.prefill.tower_blocks
                left = item.prefill.vision_blocks_left
                blocks = left if allowance is None else min(left, max(1, int((allowance - spent) // cost)))
                item.prefill.advance_vision(blocks)
                spent += int(round(blocks * cost))
            if item.prefill.vision_blocks_left or (allowance is not None and spent >= allowance):
                return spent, None
            tokens = item.prefill.remaining if allowance is None else min(item.prefill.remaining, allowance - spent)
            before = item.prefill.done
            result = item.prefill.run(tokens, cancelled=job.cancelled.is_set,
                                      pause=self._others_waiting if allowance is None else lambda: False)
            spent += item.prefill.done - before
        except Exception as exc:
            item.row.fail(_internal(exc))
            return spent, _FAILED
        if result is None:
            return spent, None
        self._prompt_done = True
        if result.prompt_logprobs is not None:  # before the first token's event: its reader finds them set
            job.prompt_logprobs = result.prompt_logprobs
        token = self._first_token(item.row, result)
        if token is not None:  # after the first token is out: the client does not wait for this copy
            self._keep_prompt(item.key, result)
        return spent, (_FAILED if token is None else (result, token))

    def _others_waiting(self) -> bool:
        """An unbudgeted prefill (the batch idle) stops at its next forward pass when a request has arrived
        or another prompt of this turn is done: the newcomer is admitted and prefilled beside it, a prompt
        done starts decoding, and from then on the long prompt goes on within the budget between decoding
        steps. Before, a request arriving during a long prompt's prefill waited for all of it (minutes for
        a long prompt on a CPU)."""
        return self._prompt_done or not self.inbox.empty()

    def _start_prefill(self, item: _Prefilling) -> Prefill:
        """The prompt's prefill, starting after the longest prefix the prefix cache holds for it. A resumed
        row's prompt is its request's prompt followed by its answer so far (text tokens: their rope positions
        follow on as its decoding steps' did)."""
        engine, row = self.engine, item.row
        prompt = row.job.prompt
        top = row.job.params.prompt_logprobs
        scoring = None  # a resumed row scored its prompt at its first prefill
        if top is not None and not row.tokens:
            def scoring(rows, targets):
                return sampling.prompt_token_logprobs(rows, targets, top, engine.tokenizer)
        if row.tokens:  # a preempted row resuming
            ids = np.concatenate([prompt.arrays["input_ids"], np.asarray([row.tokens], dtype=np.int64)], axis=1)
            prompt = dataclasses.replace(prompt, arrays={**prompt.arrays, "input_ids": ids},
                                         prompt_tokens=int(ids.shape[1]))
            item.key = None if row.prefix_key is None else row.prefix_key.extended(row.tokens)
            hit = engine.prefix_cache.lookup(item.key)
        else:
            row.prefix_key = item.key = engine.prefix_key(prompt)
            # a row scoring its prompt needs the logits of every prompt position: it takes no prefix-cache hit
            # (the positions a hit skips have none) and prefills the whole prompt; its KV still goes into the cache
            hit = None if scoring is not None else engine.prefix_cache.lookup(row.prefix_key)
            row.cached_tokens = hit.length if hit is not None else 0
        try:
            return Prefill(self.model, prompt.arrays, engine.set_image_keys, vision_cache=engine.vision_cache,
                           image_keys=prompt.image_keys, video_keys=prompt.video_keys, reuse=hit,
                           score_prompt=scoring)
        finally:
            engine.set_image_keys(())

    def _keep_prompt(self, key, result) -> None:
        """The prompt's KV into the prefix cache (a copy: the running batch goes on with its own)."""
        cache = self.engine.prefix_cache
        if cache.enabled and key is not None:
            with _not_fatal("keeping a prompt's KV"):
                cache.insert(key,
                             [(layer.keys.clone(), layer.values.clone()) for layer in result.cache.layers])

    def _keep_answers(self, rows: list) -> None:
        """Rows that ended this step: their prompt and answer's KV into the prefix cache, so a conversation's
        next turn (that prompt, that answer and a new message) reuses all of it. The KV holds every token but
        the last one sampled (never fed back); cancelled rows are left out."""
        cache = self.engine.prefix_cache
        if not cache.enabled:
            return
        for index, row in enumerate(rows):
            if row.done and not row.job.cancelled.is_set():
                self._keep_kv(index, row)

    def _keep_kv(self, index: int, row: Row) -> None:
        """Row `index`'s prompt and answer KV into the prefix cache (every token but the latest one sampled)."""
        cache = self.engine.prefix_cache
        if not cache.enabled or row.prefix_key is None:
            return
        with _not_fatal("keeping an answer's KV"):
            layers, length = self.batch.row_kv(index)
            answer = length - len(row.prefix_key)
            if 0 <= answer <= len(row.tokens):
                cache.insert(row.prefix_key.extended(row.tokens[:answer]), layers)

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
        self._keep_within_budget()
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
        self.kv_peak = max(self.kv_peak, self.batch.kv_tokens())
        for row, token, logprob in zip(rows, tokens, logprobs):
            row.add(token, logprob)
        self._keep_answers(rows)
        self.batch.keep([i for i, row in enumerate(rows) if not row.done])
        self.kv_tokens = self.batch.kv_tokens()
        self.steps += 1
        self.step_seconds += time.perf_counter() - started


@contextlib.contextmanager
def _not_fatal(what: str):
    """The prefix cache is an optimisation: failing to fill it (out of device memory, say) is logged, and
    the rows, the batch and the loop go on."""
    try:
        yield
    except Exception:
        log.warning("prefix cache: %s failed", what, exc_info=True)


def _adjusters(rows) -> Optional[list]:
    """Each row's grammar mask, logit bias and peer rules for this step (Row.adjuster), None when no row has one."""
    found = [row.adjuster() for row in rows]
    return found if any(fn is not None for fn in found) else None


def _internal(exc: Exception) -> Exception:
    log.error("generation failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
    error = InternalError(f"generation failed ({type(exc).__name__}); the server is still up")
    error.__cause__ = exc  # for the engine's own checks (its warm-up); clients see only the message
    return error


def _job(item: Union[Job, Row]) -> Job:
    """The job of a waiting item: a request not yet started, or a preempted row waiting to resume."""
    return item.job if isinstance(item, Row) else item


def _report(job: Job, exc: Exception) -> None:
    job.events.put(_internal(exc))
