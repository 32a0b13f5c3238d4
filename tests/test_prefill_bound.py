"""A long prompt is prefilled in forward passes of at most decode.FORWARD_TOKENS tokens, even on an
idle engine: the attention scores of one pass (heads x new tokens x all tokens) stay bounded. A
9,000-token prompt in one pass took 17 GB on the demo model before (a MemoryError under a limit)."""

from serving.engines.builtin import decode
from serving.jobs import Job, SamplingParams
from serving.protocol import ChatTurn


def _answer_and_pass_sizes(engine, monkeypatch, forward_tokens: int):
    sizes, arange = [], decode._paddle().arange

    def counting_arange(start, end=None, *args, **kwargs):  # a forward pass's cache_position
        if end is not None:
            sizes.append(int(end) - int(start))
        return arange(start, end, *args, **kwargs)

    monkeypatch.setattr(decode, "FORWARD_TOKENS", forward_tokens)
    monkeypatch.setattr(decode._paddle(), "arange", counting_arange)
    prompt = engine.build_prompt([ChatTurn("user", [" ".join(f"word{i}" for i in range(300))])])
    done = engine.generate(prompt, SamplingParams(max_tokens=6, temperature=0))
    monkeypatch.setattr(decode._paddle(), "arange", arange)
    return done.text, prompt.prompt_tokens, sizes


def test_a_long_prompt_goes_through_bounded_forward_passes(no_prefix_cache, monkeypatch):
    engine = no_prefix_cache
    whole, tokens, whole_sizes = _answer_and_pass_sizes(engine, monkeypatch, 10 ** 6)
    bounded, _, bounded_sizes = _answer_and_pass_sizes(engine, monkeypatch, 64)
    assert tokens > 256 and max(whole_sizes) >= tokens  # unbounded: the whole prompt in one pass
    assert max(bounded_sizes) <= 64 and sum(s for s in bounded_sizes if s > 1) >= tokens - 1
    assert bounded == whole  # the same greedy answer


def test_a_request_given_up_stops_its_prefill_within_one_pass(no_prefix_cache, monkeypatch):
    """On an idle engine a prompt's whole prefill is one scheduler turn; a request cancelled during it (its
    client gone, its time limit) stops after the pass under way, and the engine goes on serving. Before, an
    80,000-token prompt ran on for minutes after its client left, and the next request waited behind it."""
    import time

    engine = no_prefix_cache
    monkeypatch.setattr(decode, "FORWARD_TOKENS", 16)
    passes, job_box = [], []

    def count_pass(layer, inputs):
        passes.append(1)
        if len(passes) == 3:
            job_box[0].cancel()  # the client goes away during the third pass

    prompt = engine.build_prompt([ChatTurn("user", [" ".join(f"word{i}" for i in range(300))])])
    assert prompt.prompt_tokens > 16 * 10
    hook = engine.model.model.language_model.register_forward_pre_hook(count_pass)
    job_box.append(Job(prompt, SamplingParams(max_tokens=4, temperature=0)))  # before its first pass
    engine.scheduler.submit(job_box[0])
    deadline = time.monotonic() + 60
    while (not passes or engine.scheduler.rows_running()) and time.monotonic() < deadline:
        time.sleep(0.02)
    hook.remove()
    assert len(passes) == 3 and not engine.scheduler.rows_running()  # not the ~20 passes of the whole prompt
    short = engine.build_prompt([ChatTurn("user", ["Hello"])])
    assert engine.generate(short, SamplingParams(max_tokens=4, temperature=0)).finish is not None


def test_a_request_arriving_during_a_long_prefill_on_an_idle_engine_is_not_held_behind_it(no_prefix_cache,
                                                                                          monkeypatch):
    """An idle engine prefills a prompt without a budget; a request arriving meanwhile is taken in at the next
    forward pass and answered while the long prompt is still prefilling, and both answers are those of each
    request alone. Before, it waited for the whole long prefill (minutes for a long prompt on a CPU)."""
    import threading

    engine = no_prefix_cache
    long_prompt = engine.build_prompt([ChatTurn("user", [" ".join(f"word{i}" for i in range(300))])])
    short_prompt = engine.build_prompt([ChatTurn("user", ["Hello there"])])
    greedy = dict(max_tokens=4, temperature=0)
    monkeypatch.setattr(decode, "FORWARD_TOKENS", 16)
    long_alone = engine.generate(long_prompt, SamplingParams(**greedy)).text
    short_alone = engine.generate(short_prompt, SamplingParams(**greedy)).text

    passes, short_done_at, answers = [], [], {}
    short_job = Job(short_prompt, SamplingParams(**greedy))

    def count_pass(layer, inputs):
        passes.append(1)
        if len(passes) == 3:
            engine.scheduler.submit(short_job)  # arrives during the long prompt's third pass

    def collect(name, job, then=lambda: None):
        answers[name] = "".join(e for e in job if isinstance(e, str))
        then()

    hook = engine.model.model.language_model.register_forward_pre_hook(count_pass)
    try:
        long_job = Job(long_prompt, SamplingParams(**greedy))
        threads = [threading.Thread(target=collect, args=("long", long_job)),
                   threading.Thread(target=collect, args=("short", short_job, lambda: short_done_at.append(len(passes))))]
        engine.scheduler.submit(long_job)
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    finally:
        hook.remove()
    long_passes = -(-long_prompt.prompt_tokens // 16)
    assert short_done_at and short_done_at[0] < long_passes  # answered before the long prompt was prefilled
    assert answers == {"long": long_alone, "short": short_alone}
