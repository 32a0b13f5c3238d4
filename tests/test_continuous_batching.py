"""Continuous batching on the real Paddle model (demo checkpoint): greedy answers are the same token for
token whether a request runs alone, joins a batch that is already decoding, is prefilled in chunks,
or is compared with PaddleFormers' own `generate`; rows with different settings share steps."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from serving.engines.builtin import speedups
from serving.engines.builtin.lanes import PrefillLanes
from serving.jobs import Finished, SamplingParams
from serving.protocol import ChatTurn

N = 14


def image(color=(10, 200, 10), size=(84, 56)):
    return Image.new("RGB", size, color)


CASES = {
    "text": [ChatTurn("user", ["Hello there, how are you today?"])],
    "one image": [ChatTurn("user", [image(), "What is in this picture?"])],
    "two images": [ChatTurn("user", [image((200, 20, 20)).rotate(90, expand=True), image(), "Compare them."])],
    "multi-turn, image later": [
        ChatTurn("system", ["Be brief."]),
        ChatTurn("user", ["Hi."]),
        ChatTurn("assistant", ["Hello! How can I help?"]),
        ChatTurn("user", [image((30, 30, 220), (112, 84)), "And this one?"]),
    ],
}


def greedy(max_tokens=N, **more):
    return SamplingParams(max_tokens=max_tokens, temperature=0, **more)


def collect(job):
    pieces, finish = [], None
    for event in job:
        if isinstance(event, Finished):
            finish = event
        else:
            pieces.append(event)
    return "".join(pieces), finish


def reference(engine, prompt, max_tokens=N) -> tuple:
    """(text, tokens) from PaddleFormers' own generate on the same prompt, greedy, the same eos and penalty."""
    import paddle

    wait_idle(engine)  # generate runs in this thread: the worker must not be using the model meanwhile
    inputs = {k: paddle.to_tensor(v) for k, v in prompt.arrays.items()}
    with speedups.library_code(engine.model), paddle.no_grad():  # PaddleFormers' own code, not the engine's
        ids, _ = engine.model.generate(**inputs, max_new_tokens=max_tokens, decode_strategy="greedy_search",
                                       eos_token_id=engine.eos_token_ids, pad_token_id=engine.pad_token_id,
                                       repetition_penalty=float(engine.defaults["repetition_penalty"] or 1.0),
                                       use_cache=True)
    tokens = []
    for t in ids.numpy()[0].tolist():
        tokens.append(t)
        if t in engine.eos_set:
            break
    text_ids = [t for t in tokens if t not in engine.eos_set]
    return engine.tokenizer.decode(text_ids, skip_special_tokens=True), len(tokens)


def wait_idle(engine, timeout=10.0):
    deadline = time.time() + timeout
    while (engine.stats()["rows_running"] or engine.stats()["queue_depth"]) and time.time() < deadline:
        time.sleep(0.01)
    assert not engine.stats()["rows_running"], "the engine did not become idle"


@pytest.fixture(scope="module")
def prompts(engine):
    return {name: engine.build_prompt(turns) for name, turns in CASES.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_alone_equals_paddleformers_generate(engine, prompts, case):
    text, finish = collect(engine.submit(prompts[case], greedy()))
    ref_text, ref_count = reference(engine, prompts[case])
    assert (text, finish.completion_tokens) == (ref_text, ref_count)


def test_joining_a_running_batch_mid_way_changes_no_token(engine, prompts):
    alone = {name: collect(engine.submit(p, greedy())) for name, p in prompts.items()}
    joined_before = engine.stats()["joined"]
    long_job = engine.submit(prompts["text"], greedy(max_tokens=200, stop=[]))
    events = iter(long_job)
    for _ in range(3):  # the long answer is decoding before the others arrive
        next(events)
    jobs = {}
    for name, p in prompts.items():
        jobs[name] = engine.submit(p, greedy())
        time.sleep(0.05)  # arrive at different steps
    together = {name: collect(job) for name, job in jobs.items()}
    long_job.cancel()
    assert engine.stats()["joined"] - joined_before >= len(prompts), "the requests should join the running batch"
    for name in prompts:
        assert together[name][0] == alone[name][0], name
        assert together[name][1].completion_tokens == alone[name][1].completion_tokens, name


def test_chunked_prefill_changes_no_token(engine, prompts, no_prefix_cache):
    scheduler = engine.scheduler
    alone = collect(engine.submit(prompts["two images"], greedy()))
    blocker = engine.submit(prompts["text"], greedy(max_tokens=200))
    events = iter(blocker)
    next(events)  # something is decoding, so the prefill budget applies
    saved = scheduler.prefill_tokens
    scheduler.prefill_tokens = 7
    try:
        chunked = collect(engine.submit(prompts["two images"], greedy()))
    finally:
        scheduler.prefill_tokens = saved
        blocker.cancel()
    assert prompts["two images"].prompt_tokens > 7 * 3
    assert chunked[0] == alone[0] and chunked[1].completion_tokens == alone[1].completion_tokens


def test_prompts_prefilled_side_by_side_change_no_token(engine, prompts, no_prefix_cache):
    """On a CPU, prompts waiting together are prefilled in parallel lanes, one math thread each
    (serving.engines.builtin.lanes): the same tokens as each alone, for every kind of prompt."""
    scheduler = engine.scheduler
    alone = {name: collect(engine.submit(p, greedy())) for name, p in prompts.items()}
    wait_idle(engine)
    saved_lanes, saved_budget = scheduler.lanes, scheduler.prefill_tokens
    scheduler.lanes = PrefillLanes(2)  # two lanes whatever this machine's core count
    before = engine.stats()["prefilled_side_by_side"]
    blocker = engine.submit(prompts["text"], greedy(max_tokens=200, stop=[]))
    next(iter(blocker))  # decoding: the budget applies, so the prompts below take turns, all of them waiting
    scheduler.prefill_tokens = 9
    try:
        jobs = {name: engine.submit(p, greedy()) for name, p in prompts.items()}
        together = {name: collect(job) for name, job in jobs.items()}
    finally:
        scheduler.prefill_tokens = saved_budget
        blocker.cancel()
        wait_idle(engine)
        scheduler.lanes = saved_lanes
    assert engine.stats()["prefilled_side_by_side"] - before >= 2 * len(prompts)
    for name in prompts:
        assert together[name][0] == alone[name][0], name
        assert together[name][1].completion_tokens == alone[name][1].completion_tokens, name


def test_rows_with_different_settings_share_steps(engine, prompts):
    settings = [greedy(max_tokens=24), SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, seed=1),
                SamplingParams(max_tokens=24, temperature=1.3, top_k=20, presence_penalty=1.0, seed=2),
                greedy(max_tokens=24, frequency_penalty=0.5)]
    steps_before = engine.stats()["steps"]
    jobs = [engine.submit(prompts["text"], params) for params in settings]
    results = [collect(job) for job in jobs]
    steps = engine.stats()["steps"] - steps_before
    generated = sum(f.completion_tokens for _, f in results)
    assert all(f is not None for _, f in results)
    assert steps < generated - 8, f"{steps} steps for {generated} tokens: the rows did not share steps"


def test_a_seeded_sample_does_not_depend_on_its_companions(engine, prompts):
    params = dict(max_tokens=20, temperature=1.0, top_p=0.95, top_k=0, seed=1234)
    alone = collect(engine.submit(prompts["one image"], SamplingParams(**params)))[0]
    others = [engine.submit(prompts["text"], SamplingParams(max_tokens=40, temperature=1.0, top_k=0, seed=s)) for s in (5, 6)]
    together = collect(engine.submit(prompts["one image"], SamplingParams(**params)))[0]
    other = collect(engine.submit(prompts["one image"], SamplingParams(**{**params, "seed": 99})))[0]
    for job in others:
        job.cancel()
    assert together == alone
    assert other != alone


def test_a_cancelled_row_leaves_at_once(engine, prompts):
    job = engine.submit(prompts["text"], greedy(max_tokens=400))
    events = iter(job)
    next(events)
    job.cancel()
    deadline = time.time() + 5
    while engine.stats()["rows_running"] and time.time() < deadline:
        time.sleep(0.01)
    assert engine.stats()["rows_running"] == 0


def test_kv_budget_bounds_the_kv_held(engine, prompts):
    """Rows reserve what they hold (not their whole max_tokens): more of them start than whole answers fit,
    and the block never passes the budget (tests/test_preemption.py: the rows preempted meanwhile)."""
    scheduler = engine.scheduler
    prompt = prompts["text"]
    per_row = prompt.prompt_tokens + 30
    saved = scheduler.max_kv_tokens
    scheduler.max_kv_tokens = per_row * 2  # room for two whole answers
    scheduler.kv_peak = 0
    seen = []
    try:
        jobs = [engine.submit(prompt, greedy(max_tokens=30, stop=[])) for _ in range(4)]
        deadline = time.time() + 60
        while not all(_finished(j) for j in jobs) and time.time() < deadline:
            seen.append(engine.stats()["rows_running"])
            time.sleep(0.002)
        results = [collect(j) for j in jobs]
    finally:
        scheduler.max_kv_tokens = saved
    assert max(seen) > 2, "rows should start on the KV they hold, not on their whole answers"
    assert 0 < scheduler.kv_peak <= per_row * 2
    assert len({r[0] for r in results}) == 1  # the same greedy answer whenever each was admitted


def _finished(job) -> bool:
    return any(isinstance(e, Finished) for e in list(job.events.queue))


def test_the_models_shared_rope_deltas_are_never_used(engine, prompts):
    import paddle

    sentinel = paddle.to_tensor([[12345]], dtype="int64")
    engine.model.model.rope_deltas = sentinel
    try:
        collect(engine.submit(prompts["one image"], greedy(max_tokens=4)))
        assert engine.model.model.rope_deltas is sentinel
    finally:
        engine.model.model.rope_deltas = None


def test_logprobs_come_with_the_text(engine, prompts):
    params = greedy(max_tokens=8, logprobs=True, top_logprobs=3, repetition_penalty=1.0)
    deltas, finish = [], None
    for event in engine.submit(prompts["text"], params):
        if isinstance(event, Finished):
            finish = event
        else:
            deltas.append(event)
    entries = [lp for d in deltas for lp in d.logprobs]
    # one entry per generated token, except an eos (which has no text)
    assert finish.completion_tokens - 1 <= len(entries) <= finish.completion_tokens
    for lp in entries:
        assert lp.logprob <= 0 and len(lp.top_logprobs) == 3
        assert lp.top_logprobs[0].logprob >= lp.top_logprobs[-1].logprob
        assert np.isclose(lp.logprob, lp.top_logprobs[0].logprob, atol=1e-5)  # greedy takes the most likely
    text = b"".join(bytes(lp.bytes) for lp in entries).decode("utf-8", errors="replace")
    assert text == "".join(deltas)
