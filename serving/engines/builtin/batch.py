"""One request's place in the running batch: its sampler, its text so far, and how it ends.

The scheduler hands each row every token sampled for it; the row turns tokens into text deltas
for its client at once and decides when it is done (its own eos, stop string, max_tokens, or
a cancel), without waiting for any other row. A row with a required output form also advances its
grammar (serving.engines.builtin.grammar.RowConstraint), and a row that may call tools reads its calls
from the tokens (serving.tools.CallReader): they go out as ToolCallDelta pieces, not text.
"""

from __future__ import annotations

import time

from serving.engines.builtin.detokenize import IncrementalText
from serving.engines.builtin.row_rules import RowRules
from serving.errors import InternalError
from serving.jobs import Finished, Job, TextDelta


class Row:
    def __init__(self, job: Job, sampler, text: IncrementalText, eos_ids: set, constraint=None, calls=None):
        self.job, self.sampler, self.text = job, sampler, text
        params = job.params
        self.eos_ids = set(eos_ids) | set(params.stop_token_ids or ())  # stop_token_ids end it as eos does
        self.rules = RowRules.of(params, sampler, eos_ids)  # min_tokens, ignore_eos, min_p, bad words (or None)
        # include_stop_str_in_output: a stop_token_ids token's text stays in the answer (the model's own
        # end-of-turn tokens are special tokens: no text)
        self.keeps_stop_token = bool(params.include_stop) and bool(params.stop_token_ids)
        self.model_eos = set(eos_ids)
        self._ids: list = [] if params.return_token_ids else None  # ids not yet sent with a delta
        self.constraint = constraint  # RowConstraint, or None: free text
        self.calls = calls  # serving.tools.CallReader when the answer may call tools
        self.started = time.perf_counter()  # admitted: generation time, not queueing, goes into tokens/s
        self.count = 0
        self.tokens: list = []  # the answer's token ids so far (its KV goes to the prefix cache when it ends)
        self.prefix_key = None  # the prompt's serving.engines.builtin.prefix_cache.PrefixKey, once prefill starts
        self.cached_tokens = 0  # prompt tokens whose KV came from the prefix cache
        self.arrival = 0  # admission order (the scheduler's): younger rows are preempted first
        self.joined_step = 0  # the scheduler's step count when it (re)joined the running batch
        self.preemptions = 0  # times it left the batch to be resumed later (its KV recomputed)
        self.done = False
        self._logprobs: list = []  # TokenLogprob of tokens whose text is not released yet

    @property
    def demand(self) -> int:
        """KV slots this row may come to hold: its prompt and its whole answer."""
        return self.job.prompt.prompt_tokens + self.job.params.max_tokens

    @property
    def held(self) -> int:
        """KV slots it holds in the running batch: its prompt and its answer but the latest token (not fed yet)."""
        return self.job.prompt.prompt_tokens + max(0, len(self.tokens) - 1)

    def add(self, token: int, logprob=None) -> None:
        """One generated token (and its TokenLogprob when the request asked for logprobs)."""
        if self.done:
            return
        if self.job.cancelled.is_set():
            self.done = True
            return
        self.count += 1
        self.tokens.append(token)
        self.sampler.accept(token)
        if self.constraint is not None:
            problem = self.constraint.accept(token)
            if problem is not None:  # this row only; the batch goes on
                return self.fail(InternalError(f"the answer could not follow its required form: {problem}",
                                               code="grammar_error"))
        if self._ids is not None:
            self._ids.append(token)
        if token in self.eos_ids:
            if self.keeps_stop_token and token not in self.model_eos and not self.text.stopped:
                delta = self.text.add(token)
                if delta:
                    self.job.events.put(self._delta(delta))
            return self.finish("stop")
        if logprob is not None:
            self._logprobs.append(logprob)
        pieces = self.calls.add(token) if self.calls is not None else None
        if pieces is not None:  # a tool call's token: the text before it is complete
            tail = self.text.finish() if not self.text.stopped else ""
            if tail or self._logprobs or self._ids:
                self.job.events.put(self._delta(tail))
            for piece in pieces:
                self.job.events.put(piece)
        else:
            delta = self.text.add(token)
            if delta:
                self.job.events.put(self._delta(delta))
        if self.text.stopped:
            self.finish("stop")
        elif self.count >= self.job.params.max_tokens:
            self.finish("length")

    def _delta(self, text: str) -> TextDelta:
        """A text delta with the logprobs (and token ids, when asked for) of the tokens since the previous one."""
        delta = TextDelta(text, self._logprobs, self._ids or ())
        self._logprobs = []
        if self._ids is not None:
            self._ids = []
        return delta

    def adjuster(self):
        """This step's score adjustment of the row (its grammar and logit bias, then its RowRules), or None."""
        rules = self.rules if self.rules is not None and self.rules.shapes(self.count) else None
        grammar = None
        if self.constraint is not None and self.constraint.shapes:
            # a greedy row's argmax is tested against the grammar alone (RowConstraint.adjust_greedy); rules
            # after the grammar (no end yet) need the fully masked row
            greedy = self.sampler.greedy and rules is None
            grammar = self.constraint.adjust_greedy if greedy else self.constraint.adjust
        if rules is None:
            return grammar
        if grammar is None:
            return lambda scores: rules.adjust(scores, self.count, self.tokens)
        return lambda scores: rules.adjust(grammar(scores), self.count, self.tokens)

    def finish(self, reason: str) -> None:
        """Release the held-back text and tell the client now."""
        if self.done:
            return
        self.done = True
        tail = self.text.finish()
        if tail or self._logprobs or self._ids:
            self.job.events.put(self._delta(tail))
        if self.text.stopped:
            reason = "stop"
        calls = None
        if self.calls is not None:
            for piece in self.calls.finish():
                self.job.events.put(piece)
            calls = self.calls.tool_calls() or None
            if calls and reason == "stop":
                reason = "tool_calls"
        self.job.events.put(Finished(reason, self.job.prompt.prompt_tokens, self.count,
                                     time.perf_counter() - self.started, tool_calls=calls,
                                     cached_tokens=self.cached_tokens))

    def fail(self, error: BaseException) -> None:
        if not self.done:
            self.done = True
            self.job.events.put(error)
