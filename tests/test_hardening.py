"""Hardening: guarded image URLs, decompression bombs, the wait queue (429), the time limit (504),
disconnects, request ids and log lines, waitress's own errors, health while loading."""

import json
import logging
import socket
import threading
import time
from dataclasses import replace

import pytest
import requests

from serving.intake import urlguard
from serving.web.app import attach_engine, create_app
from serving.errors import ImageError
from serving.intake.images import decode_image_bytes, load_image

from conftest import b64, png_bytes, png_header_only

CHAT = "/v1/chat/completions"
LOCAL = ("127.0.0.1",)
LONG_SEED = 2  # with this seed the demo model's story runs past 200 tokens (several seconds)


def say(text="Hello", **extra):
    return {"messages": [{"role": "user", "content": text}], **extra}


# ---------------------------------------------------------------- image URLs


@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.255.0.9", "10.1.2.3", "172.16.0.1", "172.31.255.255", "192.168.0.1", "100.64.0.1",
    "169.254.169.254", "0.0.0.0", "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255", "192.0.2.1",
    "198.18.0.1", "::1", "::", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "fe80::1",
    "fc00::1", "fd12:3456::1", "ff02::1", "fec0::1", "2002:7f00:1::", "2002:a00:1::", "64:ff9b::a9fe:a9fe",
    "2001:db8::1", "::127.0.0.1", "100::1",
])
def test_non_public_addresses(address):
    assert not urlguard.is_public(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111",
                                     "::ffff:8.8.8.8", "2002:808:808::1"])
def test_public_addresses(address):
    assert urlguard.is_public(address)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/", "http://localhost/", "http://2130706433/", "http://0x7f000001/", "http://0177.0.0.1/",
    "http://127.1/", "http://0/", "http://[::1]/", "http://[::ffff:7f00:1]/", "http://[0:0:0:0:0:ffff:127.0.0.1]/",
    "http://169.254.169.254/latest/meta-data/", "https://10.0.0.1/", "ftp://8.8.8.8/", "file:///etc/passwd",
    "http://user:pw@8.8.8.8/", "http:///nohost", "http://[::1", "http://8.8.8.8:99999/",
])
def test_vet_refuses_without_connecting(url, monkeypatch):
    monkeypatch.setattr(urlguard, "_get", lambda *a: pytest.fail("must not connect"))
    with pytest.raises(urlguard.FetchError) as info:
        urlguard.fetch(url, timeout=2, max_bytes=1000)
    assert info.value.code == "image_url_refused"


def test_allow_list_names_hosts_as_written():
    assert urlguard.vet("http://127.0.0.1:9/x", LOCAL).address == "127.0.0.1"
    assert urlguard.vet("http://[::1]:9/x", ("[::1]",)).address == "::1"
    for url in ("http://2130706433:9/", "http://localhost:9/", "http://127.0.0.2:9/"):
        with pytest.raises(urlguard.FetchError):
            urlguard.vet(url, LOCAL)  # other spellings of loopback are not the allowed host


def test_fetch_follows_vetted_redirects(image_server):
    assert load_image(image_server.url + "/redirect", param="p", allow_hosts=LOCAL).size == (33, 22)


def test_resolved_address_is_pinned(image_server, monkeypatch):
    """The host is resolved once; a second, different answer (DNS rebinding) is never used."""
    real = socket.getaddrinfo
    calls = []

    def rebinding(host, port, *args, **kwargs):
        if host == "images.test":
            calls.append(host)
            host = "127.0.0.1" if len(calls) == 1 else "127.0.0.2"  # nothing listens on 127.0.0.2
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    url = f"http://images.test:{image_server.port}/img.png"
    assert load_image(url, param="p", allow_hosts=("images.test",)).size == (33, 22)
    assert calls == ["images.test"]


def test_fetch_time_limit_is_overall(image_server):
    started = time.monotonic()
    with pytest.raises(ImageError) as info:
        load_image(image_server.url + "/slow.png", param="p", allow_hosts=LOCAL, timeout=0.5)
    assert info.value.code == "image_fetch_failed" and time.monotonic() - started < 2.5


def test_fetch_size_cap(image_server):
    for path in ("/big.png", "/big-unsized.png"):
        with pytest.raises(ImageError) as info:
            load_image(image_server.url + path, param="p", allow_hosts=LOCAL, max_bytes=50_000)
        assert info.value.code == "image_too_large"


# ---------------------------------------------------------------- bombs and byte limits


def test_pixels_checked_from_the_header_before_decoding(monkeypatch):
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded a bomb"))
    with pytest.raises(ImageError) as info:
        decode_image_bytes(png_header_only(20000, 20000), param="p", pixel_limit=50_000_000)
    assert info.value.code == "image_too_many_pixels" and "pixels" in info.value.message
    with pytest.raises(ImageError) as info:  # under Pillow's own limit, over ours
        decode_image_bytes(png_header_only(5000, 5000), param="p", pixel_limit=10_000_000)
    assert info.value.code == "image_too_many_pixels" and "5000x5000" in info.value.message


def test_base64_size_checked_before_decoding():
    with pytest.raises(ImageError) as info:
        load_image("A" * 4000, param="p", max_bytes=1000)
    assert info.value.code == "image_too_large"


def test_pixel_budget_per_request_within_server_bounds(settings, engine, monkeypatch):
    client = create_app(replace(settings, min_pixels=3136, max_pixels=200_000), engine).test_client()
    big = b64(png_bytes((1200, 900)))
    seen = []
    start = engine.start

    def spy(turns, params):
        seen.append([p.size for t in turns for p in t.parts if not isinstance(p, str)][0])
        return start(turns, params)

    monkeypatch.setattr(engine, "start", spy)
    for extra in ({}, {"max_pixels": 50_000}, {"max_pixels": 10**9}, {"min_pixels": 10**9}):
        body = {"messages": [{"role": "user", "content": [{"type": "image", "image": big, **extra}]}],
                "max_tokens": 1}
        assert client.post(CHAT, json=body).status_code == 200
    pixels = [w * h for w, h in seen]
    assert pixels[0] <= 200_000 and pixels[1] <= 50_000 and pixels[2] <= 200_000 and pixels[3] <= 200_000
    assert all(w % 28 == 0 and h % 28 == 0 for w, h in seen)


# ---------------------------------------------------------------- wait queue, time limit, disconnects


def open_stream(server, max_tokens=400):
    """A streaming request, read until its first content chunk; returns the open response."""
    body = say("Write a long story.", max_tokens=max_tokens, stream=True, temperature=1.0, top_k=0, top_p=1.0,
               repetition_penalty=1.0, seed=LONG_SEED)
    response = requests.post(server.base_url + CHAT, json=body, stream=True, timeout=60)
    assert response.status_code == 200
    for line in response.iter_lines():
        if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["delta"]["content"]:
            return response
    pytest.fail("the stream ended before its first content chunk")


def test_full_queue_answers_429_and_a_disconnect_frees_the_place(serve_app):
    server = serve_app(max_queue=1, max_tokens_limit=400)
    stream = open_stream(server)
    busy = requests.post(server.base_url + CHAT, json=say(max_tokens=2), timeout=30)
    assert busy.status_code == 429 and int(busy.headers["Retry-After"]) >= 1
    assert busy.json()["error"]["code"] == "queue_full" and busy.json()["error"]["type"] == "rate_limit_error"
    stream.close()  # hang up mid-stream: the generation is cancelled and the place given back
    deadline = time.time() + 20
    while True:
        started = time.time()
        after = requests.post(server.base_url + CHAT, json=say(max_tokens=2), timeout=30)
        if after.status_code == 200 or time.time() > deadline:
            break
        time.sleep(0.2)
    assert after.status_code == 200
    assert time.time() - started < 10  # not stuck behind the abandoned 400-token generation
    readers = lambda: [t for t in threading.enumerate() if t.name == "job-reader"]  # noqa: E731
    deadline = time.time() + 10
    while readers() and time.time() < deadline:
        time.sleep(0.1)
    assert not readers(), "a job reader thread outlived its request"
    metrics = requests.get(server.base_url + "/metrics", timeout=10).text
    assert 'qwenvl_rejected_requests_total{reason="queue_full"}' in metrics
    assert 'status="499"' in metrics


def test_time_limit_non_streaming_is_504(serve_app):
    server = serve_app(request_timeout=0.3, max_tokens_limit=400)
    started = time.time()
    r = requests.post(server.base_url + CHAT, json=say("Write a long story.", max_tokens=400, temperature=1.0,
                                                     top_k=0, top_p=1.0, repetition_penalty=1.0, seed=LONG_SEED),
                      timeout=60)
    assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
    assert time.time() - started < 5
    assert requests.post(server.base_url + CHAT, json=say(max_tokens=2), timeout=60).status_code == 200


def test_time_limit_mid_stream_ends_with_an_error_event(serve_app):
    server = serve_app(request_timeout=0.3, max_tokens_limit=400)
    body = say("Write a long story.", max_tokens=400, stream=True, temperature=1.0, top_k=0, top_p=1.0,
               repetition_penalty=1.0, seed=LONG_SEED)
    with requests.post(server.base_url + CHAT, json=body, stream=True, timeout=60) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"  # the error event, then [DONE] so every client sees the stream end
    assert json.loads(events[-2])["error"]["code"] == "request_timeout"
    assert any(b'"content"' in e for e in events[:-2])


def test_admission_slot_released_once():
    from serving.web.admission import Admission
    from serving.errors import ServerBusy

    admission = Admission(2)
    a, b = admission.enter(), admission.enter()
    with pytest.raises(ServerBusy):
        admission.enter()
    a.release()
    a.release()
    assert admission.in_flight() == 1
    admission.enter()
    b.release()
    assert admission.in_flight() == 1


# ---------------------------------------------------------------- ids, log lines, server errors, loading


def test_request_id_echoed_or_made(client):
    assert client.get("/health", headers={"X-Request-Id": "abc-123"}).headers["X-Request-Id"] == "abc-123"
    made = client.get("/health", headers={"X-Request-Id": "x" * 500}).headers["X-Request-Id"]
    assert made and made != "x" * 500
    r = client.post(CHAT, json=say(max_tokens=2, stream=True), headers={"X-Request-Id": "s-1"})
    assert r.headers["X-Request-Id"] == "s-1"


@pytest.mark.parametrize("body", [say(max_tokens=2), say(max_tokens=2, stream=True), {"messages": []}])
def test_one_log_line_per_request(client, caplog, body):
    with caplog.at_level(logging.INFO, logger="serving.web.app"):
        client.post(CHAT, json=body, headers={"X-Request-Id": "one-line"}).get_data()
    lines = [r.getMessage() for r in caplog.records if "one-line" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "status=" in lines[0] and "latency=" in lines[0] and "completion_tokens=" in lines[0]


def test_waitress_errors_are_json(serve_app):
    server = serve_app(max_request_bytes=1000)
    r = requests.post(server.base_url + CHAT, data=b"x" * 5000, timeout=10)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_the_real_server_answers_oversized_bodies_in_json(app, settings):
    """waitress refuses the body itself, before the app: make_server makes that answer JSON too."""
    from conftest import LiveServer

    live = LiveServer(app, replace(settings, max_request_bytes=1000)).start()
    try:
        r = requests.post(live.base_url + CHAT, data=b"x" * 5000, timeout=10)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    finally:
        live.stop()


def test_health_while_loading_then_ready(serve_app, engine):
    server = serve_app(engine=None)
    deadline = time.time() + 10
    while True:
        try:
            r = requests.get(server.base_url + "/health", timeout=5)
            break
        except requests.ConnectionError:
            assert time.time() < deadline
            time.sleep(0.1)
    assert r.status_code == 503 and r.json()["status"] == "loading" and r.json()["reason"]
    chat = requests.post(server.base_url + CHAT, json=say(), timeout=5)
    assert chat.status_code == 503 and chat.headers["Retry-After"]
    attach_engine(server.app, engine)
    assert requests.get(server.base_url + "/health", timeout=5).json()["status"] == "ok"
    assert requests.post(server.base_url + CHAT, json=say(max_tokens=2), timeout=60).status_code == 200
