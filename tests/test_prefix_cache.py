"""The prefix cache on the real Paddle engine (demo checkpoint): a conversation's later turns reuse the KV of
the earlier ones and answer token for token as a cold server does; another picture (same placeholder count, or
the same picture at another size) reuses nothing past the text before it; an image after the reused prefix
still goes through the vision tower; a tiny budget evicts and stays correct; concurrent rows sharing a prefix
each get their cold answers; cancelling mid-prefill leaves the cache consistent."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PIL import Image

from serving.engines.builtin import prefix_cache as pc
from serving.engines.builtin.decode import Prefill
from serving.engines.builtin.prefix_cache import BLOCK, PrefixCache
from serving.jobs import Finished, SamplingParams
from serving.protocol import ChatTurn

N = 10


def greedy(max_tokens=N, **more):
    return SamplingParams(max_tokens=max_tokens, temperature=0, **more)


def picture(seed: int, size=(84, 56)):
    """A noisy picture: its tower output differs from any other seed's."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def answer(engine, turns, max_tokens=N):
    """(text, Finished) of a greedy answer to `turns`."""
    pieces, finish = [], None
    for event in engine.submit(engine.build_prompt(turns), greedy(max_tokens)):
        if isinstance(event, Finished):
            finish = event
        else:
            pieces.append(event)
    return "".join(pieces), finish


def wait_idle(engine, timeout=10.0):
    """The worker has dropped every row (a finished row's answer goes into the cache on the step it ends)."""
    deadline = time.time() + timeout
    while (engine.stats()["rows_running"] or engine.stats()["queue_depth"]) and time.time() < deadline:
        time.sleep(0.01)


def conversation(engine, first_turns, follow_ups):
    """Each turn's (text, cached tokens), sending the whole history each time as API clients do."""
    turns, out = list(first_turns), []
    for question in [None] + list(follow_ups):
        if question is not None:
            turns += [ChatTurn("user", [question])]
        text, finish = answer(engine, turns)
        wait_idle(engine)
        out.append((text, finish.cached_tokens, finish.prompt_tokens))
        turns += [ChatTurn("assistant", [text])]
    return out


@pytest.fixture()
def cache(engine):
    """The shared engine with a fresh prefix cache of its own for this test."""
    saved = engine.prefix_cache
    engine.prefix_cache = PrefixCache(64 * 2**20)
    yield engine.prefix_cache
    engine.prefix_cache = saved


class cold:
    """The engine's prefix cache off while inside (a cold server's answers)."""

    def __init__(self, engine):
        self.engine = engine

    def __enter__(self):
        self.saved, self.engine.prefix_cache = self.engine.prefix_cache, PrefixCache(0)

    def __exit__(self, *exc):
        self.engine.prefix_cache = self.saved


FOLLOW_UPS = ["What colour is it?", "And the shapes?", "Thanks. One word to sum up?"]
CONVERSATIONS = {
    "text only": [ChatTurn("system", ["Be brief."]), ChatTurn("user", ["Tell me about the sea, please."])],
    "one image": [ChatTurn("user", [picture(1), "What is in this picture?"])],
    "two images": [ChatTurn("user", [picture(2), picture(3, (56, 84)), "Compare these two."])],
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_a_conversation_answers_as_a_cold_server_does_and_reuses_its_earlier_turns(engine, cache, name):
    with cold(engine):
        expected = conversation(engine, CONVERSATIONS[name], FOLLOW_UPS)
    warm = conversation(engine, CONVERSATIONS[name], FOLLOW_UPS)
    assert [t for t, _, _ in warm] == [t for t, _, _ in expected]
    assert warm[0][1] == 0  # nothing to reuse at first
    for turn in range(1, len(warm)):  # every later turn reuses at least the whole previous prompt
        assert warm[turn][1] >= warm[turn - 1][2], (turn, warm)
        assert warm[turn][1] < warm[turn][2]  # the last token is always computed
    assert all(c is None for _, c, _ in expected) or all(c == 0 for _, c, _ in expected)
    assert cache.stats()["hit_tokens"] == sum(c for _, c, _ in warm)


def test_the_logits_after_a_hit_equal_a_cold_prefills(engine, cache):
    turns = [ChatTurn("user", [picture(4), "Describe it."])]
    text, _ = answer(engine, turns)
    wait_idle(engine)
    turns += [ChatTurn("assistant", [text]), ChatTurn("user", [picture(5), "And this one?"])]
    prompt = engine.build_prompt(turns)
    hit = cache.lookup(engine.prefix_key(prompt))
    assert hit is not None and hit.images == 1  # the first picture is inside the reused prefix, the second not
    warm = Prefill(engine.model, prompt.arrays, reuse=hit)
    assert warm.remaining == prompt.prompt_tokens - hit.length
    warm_logits = warm.run(10**6).logits.numpy()
    cold_logits = Prefill(engine.model, prompt.arrays).run(10**6).logits.numpy()
    assert np.argmax(warm_logits) == np.argmax(cold_logits)
    np.testing.assert_allclose(warm_logits, cold_logits, rtol=1e-4, atol=1e-4 * np.abs(cold_logits).max())


def test_a_finished_answer_is_kept_and_its_kv_equals_a_prefills(engine, cache):
    """A row's prompt and answer go into the cache when it ends: a next turn that sends the answer back as
    the same tokens reuses all of it, and the answer's KV (computed while decoding, one token a step) gives
    the logits a cold prefill of the same tokens gives."""
    from serving.jobs import Prompt

    turns = [ChatTurn("user", [picture(60), "Describe it."])]
    prompt = engine.build_prompt(turns)
    _, finish = answer(engine, turns, max_tokens=12)
    wait_idle(engine)
    (entry,) = cache._entries.values()  # the prompt's own entry gave way to the longer one
    n = prompt.prompt_tokens
    assert len(entry.key) == n + finish.completion_tokens - 1  # every token but the last one sampled
    assert entry.key.ids[:n].tolist() == prompt.arrays["input_ids"][0].tolist()
    more = engine.encode("<|im_end|>\n<|im_start|>user\nMore?<|im_end|>\n<|im_start|>assistant\n")
    ids = np.concatenate([entry.key.ids, more])[None]
    arrays = dict(prompt.arrays, input_ids=ids, attention_mask=np.ones_like(ids))
    follow_up = Prompt(arrays=arrays, prompt_tokens=ids.shape[1], text="", image_count=1,
                       image_keys=prompt.image_keys)
    hit = cache.lookup(engine.prefix_key(follow_up))
    assert hit.length == len(entry.key) and hit.images == 1
    warm_logits = Prefill(engine.model, arrays, reuse=hit).run(10**6).logits.numpy()
    cold_logits = Prefill(engine.model, arrays).run(10**6).logits.numpy()
    assert np.argmax(warm_logits) == np.argmax(cold_logits)
    np.testing.assert_allclose(warm_logits, cold_logits, rtol=1e-4, atol=1e-4 * np.abs(cold_logits).max())


@pytest.mark.parametrize("other", ["another picture, same size", "the same picture, another size"])
def test_another_picture_reuses_nothing_past_the_text_before_it(engine, cache, other):
    """The regression from the issue: same placeholder ids, another image: a hit would serve the wrong KV."""
    first = picture(6)
    second = picture(7) if other.startswith("another") else first.resize((56, 84))
    def turns(image):
        return [ChatTurn("system", ["You describe pictures."]), ChatTurn("user", [image, "What is in this picture?"])]

    answer(engine, turns(first))
    wait_idle(engine)
    prompt = engine.build_prompt(turns(second))
    key = engine.prefix_key(prompt)
    image_start = key.runs[0].start
    if other.startswith("another"):
        assert engine.prefix_key(engine.build_prompt(turns(first))).ids.tolist() == key.ids.tolist()  # same ids
    with cold(engine):
        expected, _ = answer(engine, turns(second))
    got, finish = answer(engine, turns(second))
    assert got == expected
    assert finish.cached_tokens <= image_start  # the text before the picture at most


@pytest.fixture()
def tower_tokens(engine, monkeypatch):
    """Image tokens the vision tower puts out from now on (a list, one count per pass: whole or block by block),
    with the vision cache empty and keeping nothing, so every image asked for goes through the tower."""
    from collections import OrderedDict

    seen = []
    hook = engine.model.model.visual.merger.register_forward_post_hook(
        lambda layer, inputs, output: seen.append(int(output.shape[0])))
    monkeypatch.setattr(engine.vision_cache, "_items", OrderedDict())
    monkeypatch.setattr(engine.vision_cache, "max_bytes", 0)
    yield seen
    hook.remove()


def image_tokens(engine, img) -> int:
    return engine.build_prompt([ChatTurn("user", [img])]).arrays["image_grid_thw"].prod() // 4


def test_an_image_after_the_reused_prefix_runs_the_vision_tower(engine, cache, tower_tokens):
    text, _ = answer(engine, [ChatTurn("user", [picture(8), "Describe it."])])
    wait_idle(engine)
    turns = [ChatTurn("user", [picture(8), "Describe it."]), ChatTurn("assistant", [text]),
             ChatTurn("user", [picture(9, (112, 84)), "And this one?"])]
    with cold(engine):
        expected, _ = answer(engine, turns)
    tower_tokens.clear()
    got, finish = answer(engine, turns)
    assert finish.cached_tokens > image_tokens(engine, picture(8))  # the first picture is inside the reused part
    assert sum(tower_tokens) == image_tokens(engine, picture(9, (112, 84)))  # the new picture only, through the tower
    assert got == expected


def test_an_image_inside_the_reused_prefix_skips_the_tower(engine, cache, tower_tokens):
    turns = [ChatTurn("user", [picture(10), "Describe it."])]
    text, _ = answer(engine, turns)
    wait_idle(engine)
    tower_tokens.clear()
    _, finish = answer(engine, turns + [ChatTurn("assistant", [text]), ChatTurn("user", ["More?"])])
    assert finish.cached_tokens > 0 and tower_tokens == []


def test_a_video_conversation_reuses_its_first_turn(engine, cache):
    from serving.intake.video import Video

    frames = np.random.default_rng(11).integers(0, 256, (4, 56, 56, 3), dtype=np.uint8)
    clip = Video(frames=frames, fps=2.0, timestamps=(0, 0.5, 1.0, 1.5), duration=2.0)
    slower = Video(frames=frames, fps=1.0, timestamps=(0, 1, 2, 3), duration=4.0)  # other time positions
    first = [ChatTurn("user", [clip, "What happens?"])]
    with cold(engine):
        expected = conversation(engine, first, ["Why?"])
    warm = conversation(engine, first, ["Why?"])
    assert [t for t, _, _ in warm] == [t for t, _, _ in expected]
    assert warm[1][1] >= warm[0][2]
    key, other = (engine.prefix_key(engine.build_prompt([ChatTurn("user", [v, "What happens?"])]))
                  for v in (clip, slower))
    assert key.ids.tolist() == other.ids.tolist() and key.runs != other.runs  # same ids, other sampling rate
    assert cache.lookup(other).length <= other.runs[0].start


def test_a_changed_system_prompt_reuses_nothing_after_it(engine, cache):
    def turns(system):
        return [ChatTurn("system", [system]), ChatTurn("user", [picture(12), "What is it? Say it in a few words."])]

    answer(engine, turns("You are terse and exact."))
    wait_idle(engine)
    with cold(engine):
        expected, _ = answer(engine, turns("You are chatty and vague."))
    got, finish = answer(engine, turns("You are chatty and vague."))
    assert got == expected
    assert finish.cached_tokens < BLOCK * 2  # at most the template's first tokens, before the system text differs


def test_a_tiny_budget_evicts_and_stays_correct(engine):
    prompts = [[ChatTurn("user", [picture(20 + i), f"Picture number {i}: what is it?"])] for i in range(4)]
    with cold(engine):
        expected = [answer(engine, p)[0] for p in prompts]
    one = engine.prefix_key(engine.build_prompt(prompts[0]))
    per_entry = _kv_bytes_per_token(engine) * (len(one) + N)
    saved = engine.prefix_cache
    engine.prefix_cache = tiny = PrefixCache(int(per_entry * 1.5))  # room for one conversation, not two
    try:
        got = []
        for p in prompts + prompts:
            got.append(answer(engine, p)[0])
            wait_idle(engine)
            assert tiny.bytes <= tiny.max_bytes
    finally:
        engine.prefix_cache = saved
    assert got == expected + expected
    stats = tiny.stats()
    assert stats["evictions"] >= len(prompts) and stats["entries"] == 1
    # each picture's entry was evicted before it came again: only the template's text before the picture is reused
    assert stats["hit_tokens"] <= stats["hits"] * one.runs[0].start


def test_concurrent_rows_sharing_a_prefix_each_get_their_cold_answers(engine, cache):
    system = ChatTurn("system", ["You are a careful assistant who looks at pictures and answers in short sentences."])
    requests = [[system, ChatTurn("user", [picture(30 + i % 3), f"Question {i}: what do you see?"])]
                for i in range(6)] + [[system, ChatTurn("user", [f"Question {i}, no picture."])] for i in range(2)]
    with cold(engine):
        expected = [answer(engine, r)[0] for r in requests]
    answer(engine, [system, ChatTurn("user", ["Warm up."])])  # the shared system prompt is cached
    wait_idle(engine)
    results = [None] * len(requests)

    def ask(i):
        results[i] = answer(engine, requests[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [r[0] for r in results] == expected
    assert all(r[1].cached_tokens >= BLOCK for r in results)


def test_cancelling_mid_prefill_leaves_the_cache_consistent(engine, cache):
    scheduler = engine.scheduler
    turns = [ChatTurn("user", [picture(40), "Describe this picture in detail."])]
    with cold(engine):
        expected, _ = answer(engine, turns)
    blocker = engine.submit(engine.build_prompt([ChatTurn("user", ["Go on."])]), greedy(max_tokens=200, stop=[]))
    next(iter(blocker))  # decoding: the prefill budget applies
    saved = scheduler.prefill_tokens
    scheduler.prefill_tokens = 5
    try:
        job = engine.submit(engine.build_prompt(turns), greedy())
        time.sleep(0.05)
        job.cancel()
    finally:
        scheduler.prefill_tokens = saved
        blocker.cancel()
        wait_idle(engine)
    got, finish = answer(engine, turns)
    assert got == expected
    entries = cache._entries.values()
    assert cache.bytes == sum(e.nbytes for e in entries)
    assert all(int(k.shape[2]) == len(e.key) for e in entries for k, _ in e.layers)


def test_a_failure_to_fill_the_cache_fails_no_request(engine, cache, monkeypatch):
    def fail(*args):
        raise MemoryError("out of device memory")

    monkeypatch.setattr(cache, "insert", fail)
    turns = [ChatTurn("user", ["Hello, who are you and what can you do for me?"])]
    with cold(engine):
        expected, _ = answer(engine, turns)
    for _ in range(2):  # the prompt's and the answer's KV both fail to go in; the worker goes on
        got, finish = answer(engine, turns)
        assert got == expected and finish.finish_reason in ("stop", "length")
    assert engine.health() == (True, "ok")


def test_prefix_cache_mb_is_a_setting_with_a_size_by_device(engine):
    from serving.config import SettingsError, load_settings

    assert load_settings([], {}).prefix_cache_mb == -1  # auto
    assert load_settings(["--prefix-cache-mb", "0"], {}).prefix_cache_mb == 0
    assert load_settings([], {"PREFIX_CACHE_MB": "64"}).prefix_cache_mb == 64
    with pytest.raises(SettingsError):
        load_settings(["--prefix-cache-mb", "-2"], {})
    assert engine.loaded.device == "cpu" and engine.prefix_cache.max_bytes == pc.AUTO_MB["cpu"] * 2**20


# ---------------------------------------------------------------- the keys, without the model


def key_with(grid, digest="a" * 32, pad=7, text=(1, 2, 3) * 6, after=(4, 5, 6) * 6):
    size = int(np.prod(grid)) // 4
    ids = np.asarray([list(text) + [pad] * size + list(after)], dtype=np.int64)
    arrays = {"input_ids": ids, "image_grid_thw": np.asarray([grid])}
    return pc.prompt_key(arrays, (digest,), (), pad, 8, 4)


class FakeTensor:
    """Stands for a [1, heads, n, dim] KV tensor in key tests (the cache only slices and measures it)."""

    def __init__(self, n):
        self.shape = (1, 1, n, 1)
        self.dtype = "float32"

    def __getitem__(self, index):
        return FakeTensor(index[2].stop)


def insert(cache, key):
    cache.insert(key, [(FakeTensor(len(key)), FakeTensor(len(key)))])


def test_a_transposed_grid_with_the_same_token_count_does_not_match():
    cache = PrefixCache(2**20)
    wide, tall = key_with((1, 6, 30)), key_with((1, 30, 6))
    assert wide.ids.tolist() == tall.ids.tolist()
    insert(cache, wide)
    assert cache.lookup(wide).length == len(wide) - 1
    assert cache.lookup(tall).length == tall.runs[0].start  # the text before the picture only
    other = key_with((1, 6, 30), digest="b" * 32)
    assert cache.lookup(other).length == other.runs[0].start


def test_a_hit_never_ends_inside_an_image_and_never_covers_the_last_token():
    cache = PrefixCache(2**20)
    long = key_with((1, 8, 8), after=(4, 5, 6) * 10)
    insert(cache, long)
    image = long.runs[0]
    cut = pc.PrefixKey(long.ids[: image.start + 5], long.runs)  # a prompt that ends inside the image: usable
    assert cut.usable(image.start + 5) == image.start
    assert cache.lookup(long).length == len(long) - 1
    shorter = key_with((1, 8, 8), after=(4, 5, 6) * 10)
    shorter = pc.PrefixKey(shorter.ids[:-4], shorter.runs)
    assert cache.lookup(shorter).length == len(shorter) - 1


def test_a_longer_entry_replaces_its_prefix_and_the_budget_evicts_least_recently_used():
    cache = PrefixCache(100)
    a = pc.PrefixKey(np.arange(40, dtype=np.int64), ())
    insert(cache, a)  # 40 tokens x 2 tensors x 4 bytes: 320 > 100, not kept
    assert cache.stats()["entries"] == 0
    cache = PrefixCache(400)
    insert(cache, pc.PrefixKey(np.arange(20, dtype=np.int64), ()))
    insert(cache, pc.PrefixKey(np.arange(30, dtype=np.int64), ()))  # extends it: replaces it
    assert cache.stats()["entries"] == 1 and cache.bytes == 240 and cache.evictions == 0
    cache = PrefixCache(400)  # room for two entries of 20 tokens (160 bytes each), not three
    a, b, c = (pc.PrefixKey(np.arange(start, start + 20, dtype=np.int64), ()) for start in (0, 100, 200))
    insert(cache, a)
    insert(cache, b)
    assert cache.lookup(a).length == 19  # a is now the most recently used
    insert(cache, c)
    assert cache.evictions == 1 and cache.bytes == 320
    assert cache.lookup(b) is None and cache.lookup(a).length == 19 and cache.lookup(c).length == 19


def _kv_bytes_per_token(engine) -> int:
    config = engine.model.config
    text = getattr(config, "text_config", config)
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    dim = text.hidden_size // text.num_attention_heads
    return text.num_hidden_layers * 2 * heads * dim * 4


# ---------------------------------------------------------------- over HTTP


def test_usage_reports_cached_tokens_and_metrics_count_the_reuse(engine, cache, serve_app):
    import base64
    import io
    import json

    import requests
    from prometheus_client.parser import text_string_to_metric_families

    buffer = io.BytesIO()
    picture(50).save(buffer, "PNG")
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()}}
    url = serve_app().base_url + "/v1/chat/completions"
    messages = [{"role": "user", "content": [image, {"type": "text", "text": "What is this?"}]}]
    first = requests.post(url, json={"messages": messages, "max_tokens": 6, "temperature": 0}, timeout=60).json()
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    wait_idle(engine)
    messages += [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                 {"role": "user", "content": "And then?"}]
    r = requests.post(url, json={"messages": messages, "max_tokens": 6, "temperature": 0, "stream": True,
                                 "stream_options": {"include_usage": True}}, timeout=60)
    usage = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")][-1]["usage"]
    assert first["usage"]["prompt_tokens"] <= usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"]
    wait_idle(engine)  # the answer's KV goes in as its row leaves the batch, just after the stream ends
    found = {(s.name, tuple(s.labels.items())): s.value
             for family in text_string_to_metric_families(requests.get(url.replace("/v1/chat/completions", "/metrics"),
                                                                        timeout=10).text)
             for s in family.samples}
    assert found[("qwenvl_prefix_cache_lookups_total", (("result", "hit"),))] == cache.hits == 1
    assert found[("qwenvl_prefix_cache_lookups_total", (("result", "miss"),))] == 1
    assert found[("qwenvl_prefix_cache_hit_tokens_total", ())] == usage["prompt_tokens_details"]["cached_tokens"]
    assert found[("qwenvl_prefix_cache_bytes", ())] == cache.bytes > 0
    assert found[("qwenvl_prefix_cache_capacity_bytes", ())] == cache.max_bytes >= cache.bytes
    assert ("qwenvl_prefix_cache_evictions_total", ()) in found
