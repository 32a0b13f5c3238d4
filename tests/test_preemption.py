"""KV reserved as rows hold it, and preemption (issue 21, Medium 3), on the real Paddle model (demo checkpoint).

Rows reserve the KV they hold, not their whole max_tokens; when long answers fill the budget (or every row),
a short request preempts the youngest long row and starts within a few steps, and the preempted row later
resumes where it stopped: its answer is token for token what it is alone, greedy or seeded, constrained by a
grammar or not, its KV from the prefix cache or recomputed."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager

import pytest
from PIL import Image

from serving import protocol, structured
from serving.engines.builtin.batch import Row
from serving.engines.builtin.scheduler import QUANTUM
from serving.jobs import Finished, SamplingParams
from serving.protocol import ChatTurn
from test_continuous_batching import collect

LONG = 100  # max_tokens of the long answers; these prompts' greedy answers run to it on the demo model
LONG_TEXTS = ["Hello there, how are you today?", "Write a poem about the sea.", "Tell me a long story."]


@contextmanager
def budgets(engine, *, rows: int, kv_tokens: int):
    scheduler = engine.scheduler
    saved = scheduler.max_rows, scheduler.max_kv_tokens
    scheduler.max_rows, scheduler.max_kv_tokens = rows, kv_tokens
    scheduler.kv_peak = 0
    try:
        yield scheduler
    finally:
        scheduler.max_rows, scheduler.max_kv_tokens = saved


def wait_steps(scheduler, count: int, timeout: float = 30.0) -> None:
    start, deadline = scheduler.steps, time.time() + timeout
    while scheduler.steps - start < count:
        assert time.time() < deadline, "the long answers did not decode"
        time.sleep(0.002)


@pytest.fixture(scope="module")
def long_prompts(engine):
    return [engine.build_prompt([ChatTurn("user", [text])]) for text in LONG_TEXTS]


def greedy(max_tokens: int = LONG) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, stop=[])


@pytest.mark.parametrize("full", ["kv budget", "rows"])
def test_a_short_request_starts_within_steps_while_long_answers_fill_the_batch(engine, long_prompts, full):
    alone = [collect(engine.submit(p, greedy())) for p in long_prompts]
    assert all(f.completion_tokens == LONG for _, f in alone), "the long prompts must run to max_tokens"
    short = engine.build_prompt([ChatTurn("user", ["Hi."])])
    longest = max(p.prompt_tokens for p in long_prompts) + LONG
    # "kv budget": three long rows fit to the end, a fourth row (padded to the longest) does not once they are
    # past QUANTUM + 60 tokens; "rows": every row is taken. Either way the short request's whole answer is
    # within one row's share of the budget, and the long ones are not.
    rows, kv_tokens = (4, 3 * longest + 10) if full == "kv budget" else (3, 3 * longest - 15)
    with budgets(engine, rows=rows, kv_tokens=kv_tokens) as scheduler:
        assert short.prompt_tokens + 4 <= kv_tokens // rows < longest
        preempted = scheduler.preempted
        jobs = [engine.submit(p, greedy()) for p in long_prompts]
        wait_steps(scheduler, QUANTUM + 60)
        assert not scheduler._fits(scheduler.batch.rows, short.prompt_tokens), "it would get in without preempting"
        steps = scheduler.steps
        events = iter(engine.submit(short, SamplingParams(max_tokens=4, temperature=0)))
        next(events)
        waited = scheduler.steps - steps
        assert all(not isinstance(e, Finished) for e in list(jobs[0].events.queue)), "a long answer ended first"
        list(events)
        together = [collect(job) for job in jobs]
        assert scheduler.kv_peak <= kv_tokens
    # it is admitted and prefilled at the next turn (1-2 steps); the rest is this thread waking late on a busy
    # machine. Before, it waited for a whole long answer: the 20-odd steps the long ones had left.
    assert waited <= 8, f"the short request's first token came {waited} decoding steps after it arrived"
    assert scheduler.preempted > preempted, "a long row should have made room"
    assert [t for t, _ in together] == [t for t, _ in alone], "a preempted row's answer changed"
    assert [f.completion_tokens for _, f in together] == [LONG] * 3


STORY = {"type": "object", "properties": {"story": {"type": "string", "minLength": 60, "maxLength": 80}},
         "required": ["story"], "additionalProperties": False}


def json_spec():
    body = {"messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "story", "schema": STORY}}}
    return structured.output_spec(protocol.parse_request(body), max_tools=64, max_schema_bytes=65536)


@pytest.mark.parametrize("kv", ["from the prefix cache", "recomputed"])
def test_preempted_rows_answer_as_alone_greedy_seeded_constrained_and_with_an_image(engine, long_prompts, kv, request,
                                                                                     monkeypatch):
    if kv == "recomputed":
        request.getfixturevalue("no_prefix_cache")  # resuming prefills the prompt and the answer so far again
    compiled = engine.compile_output(json_spec())
    sample = dict(temperature=1.0, top_p=1.0, top_k=0, stop=[])
    cases = [(long_prompts[0], greedy()),  # the oldest first: the youngest rows are preempted first
             (long_prompts[2], SamplingParams(max_tokens=LONG, temperature=0, repetition_penalty=1.2, stop=[])),
             (long_prompts[1], SamplingParams(max_tokens=LONG, seed=3, **sample)),
             (engine.build_prompt([ChatTurn("user", [Image.new("RGB", (84, 56), (10, 200, 10)), "Describe it."])]),
              greedy()),
             (engine.build_prompt([ChatTurn("user", ["Answer in JSON."])]),
              SamplingParams(max_tokens=LONG, seed=5, output=compiled, **sample))]
    alone = [collect(engine.submit(p, params)) for p, params in cases]
    longest = max(p.prompt_tokens for p, _ in cases) + LONG
    scheduler = engine.scheduler
    preempted = []  # the jobs of the rows preempted
    monkeypatch.setattr(scheduler, "_preempt", lambda victims, real=scheduler._preempt: (
        preempted.extend(victim.job for victim in victims), real(victims)))
    with budgets(engine, rows=5, kv_tokens=2 * longest):  # all five start; room for two whole answers
        jobs = [engine.submit(p, params) for p, params in cases]
        together = [collect(job) for job in jobs]
        assert scheduler.kv_peak <= 2 * longest
    assert all(job in preempted for job in jobs[2:]), "the seeded, image and grammar rows should have been preempted"
    assert together[-1][1].finish_reason == "stop"
    json.loads(together[-1][0])  # the grammar held across its row's preemptions
    for (text, finish), (text_alone, finish_alone) in zip(together, alone):
        assert (text, finish.completion_tokens, finish.finish_reason) == \
            (text_alone, finish_alone.completion_tokens, finish_alone.finish_reason)


def test_a_preempted_row_cancelled_while_it_waits_is_dropped(engine, long_prompts):
    longest = max(p.prompt_tokens for p in long_prompts) + LONG
    with budgets(engine, rows=4, kv_tokens=longest + 20) as scheduler:  # about one whole answer at a time
        jobs = [engine.submit(p, greedy()) for p in long_prompts]
        deadline = time.time() + 30
        while not [item for item in list(scheduler.waiting) if isinstance(item, Row)]:
            assert time.time() < deadline, "no row was preempted"
            time.sleep(0.002)
        gone = next(item for item in list(scheduler.waiting) if isinstance(item, Row)).job
        gone.cancel()
        rest = [collect(job) for job in jobs if job is not gone]
        deadline = time.time() + 10
        while (scheduler.waiting or engine.stats()["rows_running"]) and time.time() < deadline:
            time.sleep(0.01)
        assert not scheduler.waiting and engine.stats()["rows_running"] == 0
    assert [f.completion_tokens for _, f in rest] == [LONG, LONG]
