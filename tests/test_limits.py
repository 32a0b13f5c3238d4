"""What a request may cost, bounded before the work: message and part counts (before parsing), invalid
Unicode, the prompt's characters (before tokenizing), tokenizing off every shared lock, the memory of
images decoded at once, and REQUEST_TIMEOUT over the whole request, image intake included."""

import json
import threading
import os
import time
from dataclasses import replace

import pytest
import requests

from serving import limits, protocol
from serving.engines.builtin import memory
from serving.intake import urlguard
from serving.web.app import create_app
from serving.chat import ChatService
from serving.errors import InvalidRequest, RequestTimeout
from serving.intake.membudget import MemoryBudget

from conftest import b64, png_bytes

CHAT = "/v1/chat/completions"


# ---------------------------------------------------------------- counts and Unicode, before validation

def test_raw_body_counts_refuse_a_flood_unparsed():
    body = b'{"messages": [' + b",".join([b'{"role":"user","content":"a"}'] * 5000) + b"]}"
    with pytest.raises(InvalidRequest) as info:
        limits.check_raw_body(body, max_messages=1000, max_parts=2000)
    assert info.value.code == "too_many_messages"
    # a text that mentions "role" has its quotes escaped: not counted
    text = b'{"messages": [{"role": "user", "content": "' + b'\\"role\\" ' * 10_000 + b'"}]}'
    limits.check_raw_body(text, max_messages=10, max_parts=10)


def test_exact_counts_and_lone_surrogates():
    ok = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 3}] * 2}
    limits.check_body(ok, max_messages=2, max_parts=6)
    with pytest.raises(InvalidRequest, match="3 messages"):
        limits.check_body({"messages": [{"role": "user", "content": "x"}] * 3}, max_messages=2, max_parts=6)
    with pytest.raises(InvalidRequest, match="7 content parts"):
        limits.check_body({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 7}]},
                          max_messages=2, max_parts=6)
    assert limits.lone_surrogate({"messages": [{"content": "fine \U0001F600"}]}) is None
    assert limits.lone_surrogate({"messages": [{"content": ["x", "ab\udc00"]}]}) == ("messages[0].content[1]", 2)
    assert limits.lone_surrogate({"tools": [{"function": {"name": "\ud800"}}]}) == ("tools[0].function.name", 0)


def _peak_bytes(call):
    """tracemalloc's peak while call() runs (Python allocations: the parsed JSON, the walk's state)."""
    import tracemalloc

    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


NESTED = b'{"messages": [{"role": "user", "content": "Hi"}], "x": ' + b"[" * 100 + b",".join([b"{}"] * 100_000) \
    + b"]" * 100 + b"}"  # 300 KB; the issue's 3 MB of this (900 deep) took 2.7 GB and 13 s
FLAT = b'{"messages": [{"role": "user", "content": "Hi"}], "x": [' + b",".join([b"{}"] * 200_000) + b"]}"


@pytest.mark.parametrize("body, code", [(NESTED, "json_too_deep"), (FLAT, "json_too_complex")], ids=["nested", "flat"])
def test_a_costly_json_shape_is_refused_before_it_is_built(settings, engine, body, code):
    """Nested or flat floods of empty objects: refused 400 by the scan, holding about the body's text; they used
    to be parsed (an empty object is 64 bytes for its 3) and walked with a path string per value."""
    client = create_app(settings, engine).test_client()
    answers = []
    started = time.monotonic()
    peak = _peak_bytes(lambda: answers.append(client.post(CHAT, data=body, content_type="application/json")))
    assert peak < 4 * len(body) + 2**20, (peak, len(body))  # the test client's copy, the bytes, the text
    assert answers[0].status_code == 400 and answers[0].json["error"]["code"] == code, answers[0].json
    assert time.monotonic() - started < 2


def test_json_shape_limits_and_what_an_accepted_body_costs():
    tokens = limits.max_json_tokens(1024, 2048)
    deep = "[" * 64 + "]" * 64
    assert limits.parse_json(deep, max_tokens=tokens) == eval(deep)
    with pytest.raises(InvalidRequest, match="more than 64 levels"):
        limits.parse_json("[" + deep + "]", max_tokens=tokens)
    # brackets, commas and quotes inside strings are text, not structure (escaped quotes included)
    text = json.dumps({"messages": [{"role": "user", "content": '[{"a": [1, 2]}, ' * 20_000 + '\\"\\'}]})
    assert limits.parse_json(text, max_tokens=100)["messages"][0]["content"].startswith('[{"a"')
    with pytest.raises(InvalidRequest) as info:
        limits.parse_json('{"a": "not closed', max_tokens=100)
    assert info.value.code == "invalid_json"
    # the largest body of small values accepted at the defaults: its objects are a few MB beyond its size
    body = '{"x": [' + ",".join(['{"a":0}'] * (tokens // 4 - 10)) + "]}"
    peak = _peak_bytes(lambda: limits.check_body(limits.parse_json(body, max_tokens=tokens), max_messages=1024,
                                                 max_parts=2048))
    assert peak < 3 * len(body) + 8 * 2**20, (peak, len(body))


def test_a_prompt_too_long_for_any_context_is_refused_before_tokenizing(settings, engine, monkeypatch):
    calls = []
    monkeypatch.setattr(engine, "encode", lambda text: calls.append(len(text)) or [0])
    client = create_app(settings, engine).test_client()
    chars = engine.info.context_length * limits.MAX_CHARS_PER_TOKEN + 1
    started = time.monotonic()
    r = client.post(CHAT, json={"messages": [{"role": "user", "content": "a" * chars}]})
    assert r.status_code == 400 and r.json["error"]["code"] == "context_length_exceeded"
    assert f"{chars} characters" in r.json["error"]["message"] and calls == []
    assert time.monotonic() - started < 5


def test_a_long_prompt_does_not_hold_up_a_short_one(engine):
    """Tokenizing holds no shared lock and releases the GIL: while a 2-million-character prompt is being
    tokenized (over a second), a short one is built start to end in a fraction of that. With a lock around
    the tokenizer it would wait for the long one; with the GIL held it could not even start."""
    from serving.protocol import ChatTurn

    long_turns = [ChatTurn("user", ["hello world, this is a test. " * 70_000])]
    times = {}

    def build_long():
        times["long_start"] = time.monotonic()
        engine.build_prompt(long_turns)
        times["long_end"] = time.monotonic()

    long_thread = threading.Thread(target=build_long)
    long_thread.start()
    time.sleep(0.3)  # the long one is tokenizing now
    times["short_start"] = time.monotonic()
    engine.build_prompt([ChatTurn("user", ["Hi"])])
    times["short_end"] = time.monotonic()
    long_thread.join(60)
    assert times["long_end"] - times["long_start"] > 1.0, times  # long enough to tell
    assert times["short_start"] - times["long_start"] < 0.6, times  # this thread ran meanwhile (no GIL held)
    assert times["short_end"] < times["long_end"] - 0.3, times  # and did not wait for the long one (no lock)


def test_concurrent_tokenizing_gives_the_same_ids(engine):
    texts = [f"Question {k}: what is {k} plus {k}? 中文 émoji \U0001F600" * (k + 1) for k in range(8)]
    expected = [engine.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    got = [None] * len(texts)

    def run(k):
        for _ in range(20):
            got[k] = engine.encode(texts[k])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected


# ---------------------------------------------------------------- the memory of images decoded at once

def test_memory_budget_waits_in_order_and_times_out():
    budget = MemoryBudget(100)
    order = []

    def holder(name, nbytes):
        with budget.hold(nbytes):
            order.append(name)

    with budget.hold(80):
        first = threading.Thread(target=holder, args=("big", 50))
        first.start()
        time.sleep(0.1)
        second = threading.Thread(target=holder, args=("small", 10))  # would fit, but comes after "big"
        second.start()
        time.sleep(0.1)
        assert order == [] and budget.used == 80
        with pytest.raises(TimeoutError):
            with budget.hold(30, deadline=time.perf_counter() + 0.2):
                pass
    first.join(5)
    second.join(5)
    assert order == ["big", "small"] and budget.used == 0 and budget.waited >= 2
    with budget.hold(10**9):  # larger than the whole budget: runs alone
        assert budget.used == 100


def one_bit_png(side=4000) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (side, side), 1).save(buf, "PNG")
    return buf.getvalue()


def image_turns(data: bytes, **part):
    req = protocol.parse_request({"messages": [{"role": "user", "content": [
        {"type": "image", "image": b64(data), **part}, {"type": "text", "text": "?"}]}], "max_tokens": 1})
    return protocol.normalise_messages(req), req


def test_images_wait_for_the_decode_budget_then_are_decoded(settings, engine):
    service = ChatService(engine, replace(settings, image_decode_mb=40))
    turns, _ = image_turns(one_bit_png())  # 16 M pixels: about 32 MB to decode
    done = []
    with service.decode_budget.hold(service.decode_budget.total):  # all of it, taken
        loader = threading.Thread(target=lambda: done.append(service.load_images(turns)))
        loader.start()
        time.sleep(0.3)
        assert not done and service.decode_budget.waited == 1  # waiting its turn, nothing decoded
    loader.join(30)
    assert done and done[0][0].parts[0].mode == "RGB" and service.decode_budget.used == 0
    assert 20 * 2**20 < service.decode_budget.peak <= service.decode_budget.total


def test_waiting_for_the_decode_budget_ends_at_the_request_deadline(settings, engine):
    service = ChatService(engine, replace(settings, image_decode_mb=40))
    _, req = image_turns(one_bit_png())
    with service.decode_budget.hold(service.decode_budget.total):
        started = time.perf_counter()
        with pytest.raises(RequestTimeout):
            service.start(protocol.normalise_messages(req), service.params_from_request(req), time_limit=0.5)
    assert time.perf_counter() - started < 2


def test_large_images_are_decoded_small():
    """A 1-bit 7000x7000 PNG (14 KB) used to cost ~300 MB while decoded; a 3 KB JPEG declaring 7000x7000 was
    decoded at full cost into grey: now the first is shrunk right after decoding, the second refused."""
    from serving.errors import ImageError
    from serving.intake.images import decode_cost, decode_image_bytes

    img = decode_image_bytes(one_bit_png(7000), param="p", target_pixels=1003520)
    assert img.mode == "RGB" and 1003520 <= img.size[0] * img.size[1] < 4 * 1003520
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (700, 700), (120, 30, 40)).resize((7000, 7000)).save(buf, "JPEG", quality=90)
    with pytest.raises(ImageError, match="truncated or damaged"):
        decode_image_bytes(buf.getvalue()[:3000] + b"\xff\xd9", param="p", target_pixels=1003520)
    assert decode_image_bytes(buf.getvalue(), param="p", target_pixels=1003520).size == (1750, 1750)  # whole: fine
    with Image.open(io.BytesIO(one_bit_png(7000))) as opened:
        assert decode_cost(opened, 7000, 7000) == 7000 * 7000 * 2  # the 1-bit pixels and their grey copy


def test_upper_case_data_url_is_a_data_url():
    from serving.intake.images import load_image

    assert load_image("DATA:IMAGE/PNG;BASE64," + b64(png_bytes((30, 20))), param="p").size == (30, 20)


# ---------------------------------------------------------------- time limits over the whole request

def test_image_fetch_deadline_covers_the_headers(image_server):
    started = time.monotonic()
    with pytest.raises(urlguard.FetchError, match="IMAGE_FETCH_TIMEOUT"):
        urlguard.fetch(image_server.url + "/slow-headers.png", timeout=0.6, max_bytes=10**6, allow_hosts=("127.0.0.1",))
    assert time.monotonic() - started < 2


def test_request_timeout_covers_image_intake(serve_app, image_server):
    server = serve_app(request_timeout=1.0, image_fetch_timeout=5.0, image_url_allow_hosts=("127.0.0.1",))
    body = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_server.url + "/slow-headers.png"}}]}]}
    started = time.monotonic()
    r = requests.post(server.base_url + CHAT, json=body, timeout=30)
    assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
    assert "images" in r.json()["error"]["message"] and time.monotonic() - started < 3


def test_malloc_returns_large_buffers():
    assert memory.tune_malloc() is True  # glibc on Linux: buffers of 4 MB or more are mapped on their own


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_give_back_returns_the_heaps_free_pages():
    """Buffers under the mmap threshold come from the heap; freed, they stay in RSS until give_back()."""
    import ctypes

    assert memory.tune_malloc() is True
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size, count = 2 << 20, 64  # 128 MB in 2 MB blocks: below the mmap threshold, from the heap
    blocks = [libc.malloc(size) for _ in range(count)]
    for block in blocks:
        ctypes.memset(block, 1, size)  # touched: resident
    for block in blocks[0::2]:  # every other one: each freed block lies between live ones, not at the heap's top
        libc.free(block)
    held = _rss_bytes()
    memory.give_back()
    released = held - _rss_bytes()
    for block in blocks[1::2]:
        libc.free(block)
    assert released > 56 << 20, f"give_back released {released / 2**20:.0f} MB of the 64 MB freed"


def test_model_threads_spin_briefly_after_their_work():
    """Intel OpenMP's helpers would spin 200 ms after each op, taking a core from the HTTP threads and the
    prefill lanes: a model thread sets its own spin time (serving.engines.builtin.cpu_math)."""
    import threading

    from serving.engines.builtin import cpu_math

    openmp = cpu_math._intel_openmp()
    if not openmp:
        pytest.skip("this Paddle build has no Intel OpenMP")
    seen = {}

    def model_thread():
        cpu_math.use_threads(2)
        seen["blocktime"] = openmp.kmp_get_blocktime()

    thread = threading.Thread(target=model_thread)
    thread.start()
    thread.join()
    assert seen["blocktime"] == cpu_math.SPIN_MS
