"""The continuous-batching scheduler and the image caches, on the real model."""

from PIL import Image

from serving.engines.builtin.engine import Finished
from serving.jobs import SamplingParams
from serving.protocol import ChatTurn


def collect(job):
    text, finish = [], None
    for event in job:
        if isinstance(event, Finished):
            finish = event
        else:
            text.append(event)
    return "".join(text), finish


def prompts(engine):
    img = Image.new("RGB", (84, 56), (10, 200, 10))
    return [
        engine.build_prompt([ChatTurn("user", ["Hello there."])]),
        engine.build_prompt([ChatTurn("user", [img, "What is in this picture?"])]),
        engine.build_prompt([ChatTurn("system", ["Be brief."]), ChatTurn("user", ["A much longer question, "
                                                                                   "with many more words in it?"])]),
        engine.build_prompt([ChatTurn("user", [img.rotate(90, expand=True), img, "Compare them."])]),
    ]


def test_greedy_answers_identical_batched_and_alone(engine):
    ps = prompts(engine)
    alone = [collect(engine.submit(p, SamplingParams(max_tokens=12, temperature=0))) for p in ps]
    before = engine.stats()
    jobs = [engine.submit(p, SamplingParams(max_tokens=12, temperature=0)) for p in ps]
    together = [collect(job) for job in jobs]
    after = engine.stats()
    steps = after["steps"] - before["steps"]
    assert after["batched_requests"] - before["batched_requests"] == 4
    assert steps < sum(f.completion_tokens for _, f in together) - 4, "the four requests should share steps"
    assert [t for t, _ in together] == [t for t, _ in alone]
    for (_, f_alone), (_, f_batch) in zip(alone, together):
        assert (f_alone.finish_reason, f_alone.completion_tokens) == (f_batch.finish_reason, f_batch.completion_tokens)
        assert f_alone.prompt_tokens == f_batch.prompt_tokens


def test_each_request_keeps_its_own_limits(engine):
    ps = prompts(engine)
    full, _ = collect(engine.submit(ps[1], SamplingParams(max_tokens=20, temperature=0)))
    stop = full[4:7]
    jobs = [
        engine.submit(ps[0], SamplingParams(max_tokens=2, temperature=0, repetition_penalty=1.05)),
        engine.submit(ps[1], SamplingParams(max_tokens=20, temperature=0, stop=[stop])),
        engine.submit(ps[2], SamplingParams(max_tokens=9, temperature=0)),
    ]
    results = [collect(job) for job in jobs]
    assert results[0][1].completion_tokens <= 2
    assert results[1][0] == full[:full.index(stop)] and results[1][1].finish_reason == "stop"
    assert results[2][1].completion_tokens <= 9
    for _, finish in results:
        if finish.finish_reason == "length":
            assert finish.completion_tokens in (2, 9)


def test_cancelled_job_frees_its_row(engine):
    ps = prompts(engine)
    long_job = engine.submit(ps[0], SamplingParams(max_tokens=400, temperature=1.0, top_k=0, top_p=1.0))
    short_job = engine.submit(ps[2], SamplingParams(max_tokens=400, temperature=1.0, top_k=0, top_p=1.0))
    next(iter(long_job))
    long_job.cancel()
    short_job.cancel()
    # the worker is free again soon: a new request completes
    text, finish = collect(engine.submit(ps[0], SamplingParams(max_tokens=3, temperature=0)))
    assert finish.completion_tokens <= 3


def test_repeated_image_hits_both_caches(engine, no_prefix_cache):
    img = Image.effect_noise((120, 90), 60).convert("RGB")
    pixels_before = engine.pixel_cache.stats()
    vision_before = engine.vision_cache.stats()
    first = engine.build_prompt([ChatTurn("user", [img, "Describe."])])
    a = engine.generate(first, SamplingParams(max_tokens=6, temperature=0))
    second = engine.build_prompt([ChatTurn("user", [img.copy(), "Describe."])])
    b = engine.generate(second, SamplingParams(max_tokens=6, temperature=0))
    assert engine.pixel_cache.stats()["hits"] > pixels_before["hits"]
    assert engine.vision_cache.stats()["hits"] > vision_before["hits"]
    assert first.image_keys == second.image_keys
    assert a.text == b.text  # cached vision output gives the same answer as computing it


def test_cache_is_bounded_lru():
    from serving.engines.builtin.cache import ByteLRU

    cache = ByteLRU(100)
    cache.put("a", 1, 40)
    cache.put("b", 2, 40)
    assert cache.get("a") == 1  # a is now the most recently used
    cache.put("c", 3, 40)  # over 100 bytes: b goes
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3
    assert cache.bytes <= 100
    cache.put("huge", 4, 1000)
    assert cache.get("huge") is None
    stats = cache.stats()
    assert stats["hits"] == 3 and stats["misses"] == 2


def test_streamed_prompts_prefill_first_and_nobody_starves():
    from serving.engines.builtin.scheduler import prefill_rank

    streams = [False, True, False] + [True] * 20  # two non-streamed prompts, then a flood of streamed ones
    ranks = [prefill_rank(i, stream, lead=8) for i, stream in enumerate(streams)]
    order = sorted(range(len(streams)), key=lambda i: ranks[i])  # stable, as the scheduler's sort
    assert order.index(1) < order.index(0)  # a streamed prompt goes before an earlier non-streamed one
    assert order.index(0) <= 8 and order.index(2) <= 10  # each overtaken by at most 8 later prompts
    assert [i for i in order if streams[i]] == sorted(i for i in order if streams[i])  # streamed: in order


def test_the_stream_flag_reaches_the_engine(settings):
    from serving import protocol
    from serving.chat import ChatService

    service = ChatService(None, settings)
    for stream in (True, False):
        req = protocol.ChatCompletionRequest(model="demo", stream=stream, messages=[{"role": "user", "content": "Hi"}])
        assert service.params_from_request(req).stream is stream


def test_a_failed_worker_loop_ends_every_request_instead_of_leaving_it_hanging(settings):
    """A bug in the loop itself (not in one request) stops the model worker: the requests it holds and
    any sent afterwards get an internal error at once, and health says the worker stopped."""
    import pytest

    from serving.errors import InternalError
    from serving.web.server import build_engine

    engine = build_engine(settings)  # its own engine: this one's worker is meant to die
    prompt = engine.build_prompt([ChatTurn("user", ["Hello there."])])
    running = engine.submit(prompt, SamplingParams(max_tokens=200, temperature=0, stop=[]))
    next(iter(running))  # decoding

    def broken(*args):
        raise RuntimeError("a bug in the scheduler")

    engine.scheduler._admit = broken
    waiting = engine.submit(prompt, SamplingParams(max_tokens=4, temperature=0))
    for job in (running, waiting):
        with pytest.raises(InternalError, match="model worker stopped"):
            collect(job)
    engine._worker.join(10)  # it has told everyone; now it ends
    assert engine.health() == (False, "the model worker has stopped")
    with pytest.raises(InternalError, match="model worker stopped"):
        collect(engine.submit(prompt, SamplingParams(max_tokens=4, temperature=0)))
