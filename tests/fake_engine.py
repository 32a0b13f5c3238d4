"""An engine without a model, implementing serving.engines.base.Engine: for tests of the HTTP layer
alone (shaping, errors, time limits), never to prove a feature of the model. Imports no Paddle."""

from __future__ import annotations

import time
from dataclasses import replace

from serving.engines.base import ModelInfo
from serving.jobs import Finished, TextDelta, TokenLogprob, TopLogprob


def token(text: str, logprob: float, *alternatives) -> TokenLogprob:
    """A TokenLogprob whose alternatives are (text, logprob) pairs, most likely first."""
    return TokenLogprob(text, logprob, list(text.encode()),
                        [TopLogprob(t, lp, list(t.encode())) for t, lp in alternatives])


# "Hello!" in three tokens and two deltas; the alternatives include the chosen token, as a model's would
SCRIPT = (
    TextDelta("Hel", [token("Hel", -0.1, ("Hel", -0.1), ("He", -2.5), ("H", -4.0))]),
    TextDelta("lo!", [token("lo", -0.2, ("lo", -0.2), ("p", -1.9), ("l", -3.0)),
                      token("!", -0.3, ("!", -0.3), (".", -1.5), ("?", -2.0))]),
    Finished("stop", prompt_tokens=7, completion_tokens=3, seconds=0.01),
)


class FakeGeneration:
    def __init__(self, events, prompt_tokens: int, step_seconds: float = 0.0):
        self.events = list(events)
        self.prompt_tokens = prompt_tokens
        self.step_seconds = step_seconds
        self.cancelled = False

    def __iter__(self):
        return self.until(None)

    def until(self, deadline):
        for event in self.events:
            ready_at = time.perf_counter() + self.step_seconds
            while True:  # a slow model: wait in short polls, as a real engine's reader does
                if self.cancelled:
                    return
                now = time.perf_counter()
                if deadline is not None and now > deadline:
                    raise TimeoutError("the deadline passed")
                if now >= ready_at:
                    break
                time.sleep(0.01)
            if isinstance(event, BaseException):
                raise event
            yield event

    def cancel(self) -> None:
        self.cancelled = True


class FakeEngine:
    """Answers every request with `script`; logprobs only when asked, cut to top_logprobs like a real engine."""

    def __init__(self, script=SCRIPT, *, step_seconds: float = 0.0, health=(True, "ok"), stats=None,
                 start_error: BaseException | None = None):
        self.info = ModelInfo(name="fake", source="nowhere", is_demo=True, context_length=4096, max_batch_size=4)
        self.script = script
        self.step_seconds = step_seconds
        self.health_answer = health
        self.stats_answer = {"queue_depth": 0} if stats is None else stats
        self.start_error = start_error
        self.started = []  # (turns, params) of every start
        self.generations = []

    def start(self, turns, params):
        if self.start_error is not None:
            raise self.start_error
        self.started.append((turns, params))
        events = [self._as_asked(e, params) if isinstance(e, TextDelta) else e for e in self.script]
        generation = FakeGeneration(events, prompt_tokens=7, step_seconds=self.step_seconds)
        self.generations.append(generation)
        return generation

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def health(self) -> tuple:
        return self.health_answer

    def stats(self) -> dict:
        return dict(self.stats_answer)

    def close(self, timeout: float = 30.0) -> None:
        pass

    @staticmethod
    def _as_asked(delta: TextDelta, params) -> TextDelta:
        if not params.logprobs:
            return TextDelta(str(delta))
        return TextDelta(str(delta), [replace(t, top_logprobs=t.top_logprobs[:params.top_logprobs])
                                      for t in delta.logprobs])
