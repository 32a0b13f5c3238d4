"""--backend openai: this server in front of other OpenAI-compatible servers.

The replicas are live instances of this very server on the demo model (real Paddle engine, real
HTTP), so "the same answer through the gateway" is checked against the real thing. A scripted
upstream (a few lines of http.server) stands in only where a real server cannot be made to
misbehave on cue: 5xx with a traceback, a refused key, an answer cut off, tool calls.
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
import requests
from PIL import Image

from bench.loopback import LoopbackServer
from conftest import ROOT, LiveServer, b64, png_bytes
from serving.web.app import create_app
from serving.web.server import build_engine, free_port
from serving.engines.upstream import UpstreamEngine, normalise_url, parse_error_body, sanitise

CHAT = "/v1/chat/completions"


# ---------------------------------------------------------------- helpers

class Gateway:
    """This server with --backend openai in front of `urls`, on a free loopback port."""

    def __init__(self, settings, urls, wait=True, **changes):
        self.settings = replace(settings, backend="openai", upstream=tuple(urls), port=0, **changes)
        if wait:
            self.engine = UpstreamEngine.from_settings(self.settings)
        else:
            self.engine = UpstreamEngine(self.settings.upstream, api_key=self.settings.upstream_api_key,
                                         health_interval=self.settings.upstream_health_interval)
            self.engine.start_checks(wait=False)
        self.app = create_app(self.settings, self.engine)
        self.server = LiveServer(self.app, self.settings).start()
        self.url = self.server.base_url

    def close(self):
        self.server.stop()
        self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@pytest.fixture(scope="module")
def replicas(serve_app):
    """Two live instances of this server on the demo model."""
    return serve_app(), serve_app()


@pytest.fixture()
def gateway(settings, replicas):
    with Gateway(settings, [r.base_url for r in replicas]) as gw:
        yield gw


def chat(url, body, key=None, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(url + CHAT, json=body, headers=headers, timeout=120, **kw)


def streamed(url, body, key=None):
    """(text, finish_reason, usage, number of content chunks) of a streamed answer."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = requests.post(url + CHAT, json=dict(body, stream=True, stream_options={"include_usage": True}),
                      headers=headers, stream=True, timeout=120)
    assert r.status_code == 200, r.text
    text, finish, usage, chunks = "", None, None, 0
    for line in r.iter_lines():
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        assert "error" not in event, event
        if event.get("usage"):
            usage = event["usage"]
        for choice in event["choices"]:
            piece = choice["delta"].get("content")
            if piece:
                text += piece
                chunks += 1
            finish = choice.get("finish_reason") or finish
    return text, finish, usage, chunks


def metric(url, name, labels=""):
    """A value from a server's /metrics (the sample whose label set contains `labels`), 0 when absent."""
    for line in requests.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name) and labels in line and not line.startswith("#"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_until(check, timeout=15.0, every=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(every)
    return check()


def dead_url():
    return f"http://127.0.0.1:{free_port()}"


QUESTIONS = [
    {"messages": [{"role": "user", "content": "Describe a cat in one sentence."}]},
    {"messages": [{"role": "user", "content": [
        {"type": "image", "image": b64(png_bytes((96, 64), (200, 30, 30)))},
        {"type": "text", "text": "What is in this picture?"}]}]},
    {"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(png_bytes((300, 180), (20, 90, 200)))}},
            {"type": "text", "text": "First picture."}]},
        {"role": "assistant", "content": "A blue rectangle."},
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + b64(png_bytes((64, 200), (10, 200, 10), "JPEG"))}},
            {"type": "text", "text": "And this one, compared with the first?"}]}]},
]


# ---------------------------------------------------------------- the same answers

def _counts(usage: dict) -> tuple:
    """The token counts of a usage body (cached_tokens differs: the second request reuses the first's prompt)."""
    return usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]


@pytest.mark.parametrize("question", range(len(QUESTIONS)))
def test_greedy_answers_through_the_gateway_equal_the_direct_ones(gateway, replicas, question):
    body = dict(QUESTIONS[question], temperature=0, max_tokens=24)
    direct = chat(replicas[0].base_url, body)
    via = chat(gateway.url, body)
    assert direct.status_code == 200 and via.status_code == 200, (direct.text, via.text)
    d, v = direct.json(), via.json()
    assert v["choices"][0]["message"]["content"] == d["choices"][0]["message"]["content"]
    assert v["choices"][0]["finish_reason"] == d["choices"][0]["finish_reason"]
    assert _counts(v["usage"]) == _counts(d["usage"])  # the upstream's own counts, image tokens included
    assert "cached_tokens" in v["usage"]["prompt_tokens_details"]  # passed on (the replica's prefix cache)
    assert v["model"] == d["model"] == "demo"
    if question:  # the sizes the model saw: the gateway sized the images exactly as the replica does
        assert v["image_sizes"] == d["image_sizes"]
    # streamed through the gateway: the same text, piece by piece as the upstream sent it
    text, finish, usage, chunks = streamed(gateway.url, body)
    assert text == d["choices"][0]["message"]["content"] and finish == d["choices"][0]["finish_reason"]
    assert _counts(usage) == _counts(d["usage"]) and chunks > 1
    direct_text, _, _, direct_chunks = streamed(replicas[1].base_url, body)
    assert direct_text == text and direct_chunks == chunks


def test_logprobs_pass_through(gateway, replicas):
    body = dict(QUESTIONS[0], temperature=0, max_tokens=6, logprobs=True, top_logprobs=2)
    d, v = chat(replicas[0].base_url, body).json(), chat(gateway.url, body).json()
    assert v["choices"][0]["logprobs"] == d["choices"][0]["logprobs"]
    assert len(v["choices"][0]["logprobs"]["content"]) == v["usage"]["completion_tokens"]


def test_models_and_health_name_the_upstreams(gateway, replicas):
    models = requests.get(gateway.url + "/v1/models", timeout=10).json()["data"]
    assert [m["id"] for m in models] == ["demo"] and models[0]["demo"] is True  # the upstreams' model, and what it is
    assert models[0]["max_model_len"] == requests.get(replicas[0].base_url + "/v1/models").json()["data"][0]["max_model_len"]
    health = requests.get(gateway.url + "/health", timeout=10)
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "ok" and "reason" not in body
    assert sorted(u["url"] for u in body["upstreams"]) == sorted(r.base_url for r in replicas)
    assert all(u["status"] == "ok" for u in body["upstreams"])


# ---------------------------------------------------------------- balancing, failures

def test_both_replicas_get_work_and_metrics_are_per_upstream(gateway, replicas):
    ok = 'endpoint="/v1/chat/completions",status="200"'
    before = [metric(r.base_url, "qwenvl_requests_total", ok) for r in replicas]
    body = dict(QUESTIONS[0], temperature=0, max_tokens=48)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: chat(gateway.url, body), range(16)))
    assert [a.status_code for a in answers] == [200] * 16
    assert len({a.json()["choices"][0]["message"]["content"] for a in answers}) == 1
    served = [metric(r.base_url, "qwenvl_requests_total", ok) - b for r, b in zip(replicas, before)]
    assert all(n >= 3 for n in served) and sum(n for n in served) >= 16, served  # least outstanding: both busy
    for r in replicas:
        label = f'upstream="{r.base_url}"'
        assert metric(gateway.url, "qwenvl_upstream_requests_total", label) >= 3
        assert metric(gateway.url, "qwenvl_upstream_healthy", label) == 1
        assert metric(gateway.url, "qwenvl_upstream_in_flight", label) == 0


def test_stopping_a_replica_loses_no_request_that_had_not_started_streaming(settings, engine, replicas):
    """Replica B answers one request at a time (MAX_BATCH_SIZE 1), so when it stops, some of its requests
    are still waiting; each of those must be answered by A. Only a request B had begun answering may fail."""
    b_settings = replace(settings, max_batch_size=1, port=0)
    b_engine = build_engine(b_settings)
    b = LiveServer(create_app(b_settings, b_engine), b_settings).start()
    try:
        # a long health interval: B's loss is found by the requests themselves, not by a check
        with Gateway(settings, [replicas[0].base_url, b.base_url], upstream_health_interval=600) as gw:
            body = dict(QUESTIONS[0], temperature=0, max_tokens=64)
            with ThreadPoolExecutor(12) as pool:
                futures = [pool.submit(chat, gw.url, body) for _ in range(12)]
                b_replica = next(r for r in gw.engine.replicas if r.url == b.base_url)
                assert wait_until(lambda: b_replica.in_flight >= 3, 30)
                stopper = threading.Thread(target=b.stop, kwargs={"timeout": 5})
                stopper.start()
                answers = [f.result() for f in futures]
                stopper.join(30)
            later = [chat(gw.url, body) for _ in range(4)]  # B is gone: every one goes to A
            statuses = [a.status_code for a in answers]
            interrupted = [a for a in answers if a.status_code != 200]
            for a in interrupted:  # only answers B had begun: the gateway says so
                assert a.status_code == 502 and a.json()["error"]["code"] == "upstream_interrupted", a.text
            assert statuses.count(200) >= 12 - 1, statuses  # B answers one at a time: at most one was mid-answer
            assert b_replica.retried >= 1  # the waiting ones moved to A
            assert [a.status_code for a in later] == [200] * 4
            assert not b_replica.healthy
            health = requests.get(gw.url + "/health", timeout=10).json()
            assert health["status"] == "ok" and b.base_url in health["reason"]
            assert [u["status"] for u in health["upstreams"]] == ["ok", "down"]
    finally:
        b_engine.close()


def test_disconnect_mid_stream_cancels_the_upstream_request(gateway, replicas):
    body = {"messages": [{"role": "user", "content": "Count to one thousand."}], "temperature": 0,
            "max_tokens": 2000, "stream": True}
    r = requests.post(gateway.url + CHAT, json=body, stream=True, timeout=60)
    lines = r.iter_lines()
    assert any(b'"content"' in line and b'"content": ""' not in line for line in lines)  # text is flowing
    busy = [metric(u.base_url, "qwenvl_requests_in_flight") for u in replicas]
    assert sum(busy) == 1
    r.close()  # the client goes away mid-answer
    assert wait_until(lambda: sum(metric(u.base_url, "qwenvl_requests_in_flight") for u in replicas) == 0, 10)
    assert wait_until(lambda: all(u.in_flight == 0 for u in gateway.engine.replicas), 10)


def test_cancel_reaches_an_upstream_still_before_its_first_byte(settings):
    """A client gone while the upstream has not answered at all (a long prefill, a queue) closes the
    upstream connection at once: the upstream need not finish anything to notice."""
    up = Scripted(lambda h, body: h.hang())
    try:
        gw = UpstreamEngine([up.url])
        gw.start_checks(wait=True, timeout=10)
        from serving.jobs import SamplingParams
        from serving.protocol import ChatTurn

        call = gw.start([ChatTurn("user", ["hi"])], SamplingParams(max_tokens=4))
        assert up.arrived.wait(10)
        call.cancel()
        assert up.closed.wait(2)  # the upstream saw the connection end
        assert list(call) == []  # cancelled: no Finished
        assert wait_until(lambda: gw.replicas[0].in_flight == 0, 5)
        gw.close()
    finally:
        up.stop()


def test_health_is_200_while_one_upstream_is_up_and_503_when_none(settings, replicas):
    dead = dead_url()
    with Gateway(settings, [replicas[0].base_url, dead]) as gw:
        r = requests.get(gw.url + "/health", timeout=10)
        assert r.status_code == 200
        body = r.json()
        assert dead in body["reason"] and "connection refused" in body["reason"]
        assert {u["url"]: u["status"] for u in body["upstreams"]} == {replicas[0].base_url: "ok", dead: "down"}
        assert chat(gw.url, dict(QUESTIONS[0], max_tokens=4)).status_code == 200  # only the healthy one gets work
    with Gateway(settings, [dead], wait=False) as gw:
        r = requests.get(gw.url + "/health", timeout=10)
        assert r.status_code == 503 and r.json()["status"] == "unavailable"
        assert r.json()["upstreams"][0]["status"] == "down"
        answer = chat(gw.url, dict(QUESTIONS[0], max_tokens=4))
        assert answer.status_code == 503 and answer.headers["Retry-After"]


# ---------------------------------------------------------------- what the gateway keeps: format, auth, limits

def test_tutorial_format_images_auth_and_limits_work_through_the_gateway(settings, serve_app):
    upstream = serve_app(api_key=("inner-key",), max_tokens_limit=40)
    with Gateway(settings, [upstream.base_url], api_key=("outer-key",), upstream_api_key="inner-key",
                 max_images=2) as gw:
        tutorial = {"messages": [{"role": "user", "content": [
            {"type": "image", "image": b64(png_bytes((120, 80)))}, {"type": "text", "text": "What is this?"}]}],
            "max_tokens": 8, "temperature": 0}
        assert chat(gw.url, tutorial).status_code == 401  # the gateway's own key
        assert chat(gw.url, tutorial, key="inner-key").status_code == 401
        ok = chat(gw.url, tutorial, key="outer-key")
        assert ok.status_code == 200 and ok.headers["X-Request-Id"]
        direct = chat(upstream.base_url, tutorial, key="inner-key").json()
        assert ok.json()["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]
        # the gateway's limits, checked before anything is sent on
        three = {"messages": [{"role": "user", "content": [{"type": "image", "image": b64(png_bytes())}] * 3 + [
            {"type": "text", "text": "hi"}]}]}
        r = chat(gw.url, three, key="outer-key")
        assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_images"
        r = chat(gw.url, {"messages": [{"role": "user", "content": [{"type": "image", "image": "not base64!"}]}]},
                 key="outer-key")
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_image"
        # the upstream's own limit: its 400 comes back as a 400 with its message and code
        r = chat(gw.url, dict(tutorial, max_tokens=100), key="outer-key")
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "max_tokens_too_large" and "40" in error["message"] and error["param"] == "max_tokens"
        # a wrong UPSTREAM_API_KEY is this server's configuration, not the client's fault
    with Gateway(settings, [upstream.base_url], upstream_api_key="wrong", wait=False) as gw:
        r = requests.get(gw.url + "/health", timeout=10)
        assert r.status_code == 503 and "401" in r.json()["reason"]


# ---------------------------------------------------------------- a scripted upstream for what a real one will not do

class Scripted(LoopbackServer):
    """An OpenAI-compatible server whose chat answers a test scripts: `respond(handler, request_body)`."""

    def __init__(self, respond, model="scripted-model"):
        scripted = self
        self.bodies, self.headers = [], []
        self.arrived, self.closed = threading.Event(), threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # answers end when the connection closes: no chunked encoding

            def do_GET(self):
                if self.path == "/v1/models":
                    self.send_json(200, {"object": "list", "data": [{"id": model, "object": "model"}]})
                else:
                    self.send_json(404, {"detail": "Not Found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                scripted.bodies.append(body)
                scripted.headers.append(dict(self.headers))
                scripted.arrived.set()
                respond(self, body)

            def send_json(self, status, obj, headers=()):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def send_events(self, events, done=True):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for event in events:
                    self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")
                    self.wfile.flush()
                if done:
                    self.wfile.write(b"data: [DONE]\n\n")

            def hang(self):  # read nothing more, answer nothing: until the client goes away
                self.connection.settimeout(10)
                try:
                    while self.connection.recv(1024):
                        pass
                except OSError:
                    pass
                scripted.closed.set()

            def log_message(self, *args):
                pass

        super().__init__(Handler)


def chunk(content=None, finish=None, **delta):
    if content is not None:
        delta["content"] = content
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


TRACEBACK = 'Traceback (most recent call last):\n  File "/srv/secret/engine.py", line 9, in step\nRuntimeError: CUDA oom'


@pytest.mark.parametrize("status,body,expect_status,expect_code", [
    (500, TRACEBACK, 502, "upstream_error"),
    (502, {"error": {"message": TRACEBACK}}, 502, "upstream_error"),
    (503, {"detail": "loading"}, 503, "upstream_unavailable"),
    (401, {"error": {"message": "bad key"}}, 502, "upstream_auth_failed"),
    (429, {"detail": "Too many requests,current max concurrency is 512"}, 429, "queue_full"),
    (400, {"detail": {"object": "error", "message": "image too large for this model", "code": 400}}, 400,
     "invalid_value"),
    (422, {"detail": [{"loc": ["body", "temperature"], "msg": "Input should be a valid number"}]}, 400,
     "invalid_value"),
    (413, "Request Entity Too Large", 400, "request_too_large"),
])
def test_upstream_errors_become_clean_openai_errors(settings, status, body, expect_status, expect_code):
    def respond(h, _):
        if isinstance(body, str):
            data = body.encode()
            h.send_response(status)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
        else:
            h.send_json(status, body)

    ups = [Scripted(respond), Scripted(respond)]
    try:
        with Gateway(settings, [u.url for u in ups], upstream_health_interval=600) as gw:
            for stream in (False, True):
                r = chat(gw.url, dict(QUESTIONS[0], stream=stream))
                assert r.status_code == expect_status, r.text
                error = r.json()["error"]
                if status == 503 and stream:  # both upstreams were taken out by the first request's 503s
                    assert error["code"] == "engine_unavailable" and "no upstream is healthy" in error["message"]
                else:
                    assert error["code"] == expect_code
                for secret in ("Traceback", "/srv/secret", "CUDA", "engine.py"):
                    assert secret not in r.text
                if status == 400:
                    assert error["message"] == "image too large for this model"
                if status == 422:
                    assert error["param"] == "temperature" and "valid number" in error["message"]
            # 5xx and 429: once more elsewhere; a 503 also takes the upstream out (the second request finds none)
            sent = {500: 4, 502: 4, 429: 4, 503: 2}.get(status, 2)
            assert sum(len(u.bodies) for u in ups) == sent
    finally:
        for u in ups:
            u.stop()


def test_an_answer_cut_off_mid_stream_ends_with_an_error(settings):
    def respond(h, _):
        h.send_events([chunk(role="assistant", content=""), chunk("Hel"), chunk("lo")], done=False)  # then closes

    up = Scripted(respond)
    try:
        with Gateway(settings, [up.url]) as gw:
            r = chat(gw.url, QUESTIONS[0])
            assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_interrupted"
            r = requests.post(gw.url + CHAT, json=dict(QUESTIONS[0], stream=True), stream=True, timeout=30)
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith(b"data: {")]
            assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1]) == "Hello"
            assert events[-1]["error"]["code"] == "upstream_interrupted"
            assert len(up.bodies) == 2  # text had reached the client: not retried
    finally:
        up.stop()


def test_fields_beyond_sampling_pass_through_and_tool_calls_come_back(settings):
    def respond(h, body):
        h.send_events([
            chunk(role="assistant", content=""),
            chunk(tool_calls=[{"index": 0, "id": "call_1", "type": "function",
                               "function": {"name": "get_weather", "arguments": ""}}]),
            chunk(tool_calls=[{"index": 0, "function": {"arguments": '{"city": '}}]),
            chunk(tool_calls=[{"index": 0, "function": {"arguments": '"Paris"}'}}]),
            chunk(finish="tool_calls"),
            {"object": "chat.completion.chunk", "choices": [],
             "usage": {"prompt_tokens": 77, "completion_tokens": 12, "total_tokens": 89}}])

    up = Scripted(respond)
    try:
        with Gateway(settings, [up.url], upstream_api_key="sekret") as gw:
            image = Image.new("RGB", (1000, 700), (1, 2, 3))
            buf = io.BytesIO()
            image.save(buf, "JPEG")
            tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
            body = {"messages": [
                {"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + b64(buf.getvalue())},
                     "max_pixels": 200000},
                    {"type": "text", "text": "Weather where this was taken?"}]},
                {"role": "assistant", "tool_calls": [{"id": "call_0", "type": "function",
                                                      "function": {"name": "locate", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "call_0", "content": "Paris"}],
                "tools": tools, "tool_choice": "auto", "response_format": {"type": "json_object"},
                "logit_bias": {"42": -100}, "temperature": 0.5, "top_k": 5, "seed": 7, "max_tokens": 30,
                "stop": ["END"], "model": "whatever-the-client-says"}
            r = chat(gw.url, body)
            assert r.status_code == 200, r.text
            answer = r.json()
            message = answer["choices"][0]["message"]
            assert answer["choices"][0]["finish_reason"] == "tool_calls" and message["content"] is None
            assert message["tool_calls"] == [{"id": "call_1", "type": "function",
                                              "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]
            assert answer["usage"] == {"prompt_tokens": 77, "completion_tokens": 12, "total_tokens": 89}
            sent = up.bodies[0]
            assert up.headers[0]["Authorization"] == "Bearer sekret"
            assert sent["model"] == "scripted-model" and sent["stream"] is True
            assert sent["tools"] == tools and sent["tool_choice"] == "auto"
            assert sent["response_format"] == {"type": "json_object"} and sent["logit_bias"] == {"42": -100}
            assert (sent["temperature"], sent["top_k"], sent["seed"], sent["max_tokens"], sent["stop"]) == (
                0.5, 5, 7, 30, ["END"])
            assert sent["messages"][1] == {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_0", "type": "function", "function": {"name": "locate", "arguments": "{}"}}]}
            assert sent["messages"][2] == {"role": "tool", "content": "Paris", "tool_call_id": "call_0"}
            part = sent["messages"][0]["content"][0]
            assert part["type"] == "image_url" and "max_pixels" not in part
            url = part["image_url"]["url"]
            assert url.startswith("data:image/png;base64,")
            sent_image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
            # sized here, within the part's own pixel budget, to sides that are multiples of 28
            assert sent_image.width % 28 == 0 and sent_image.height % 28 == 0
            assert sent_image.width * sent_image.height <= 200000
            assert answer["image_sizes"] == [{"width": 1000, "height": 700, "model_width": sent_image.width,
                                              "model_height": sent_image.height}]
            # streamed: the calls arrive as a tool_calls delta, then finish_reason tool_calls
            r = requests.post(gw.url + CHAT, json=dict(body, stream=True), stream=True, timeout=30)
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith(b"data: {")]
            calls = [c for e in events for c in e["choices"][0]["delta"].get("tool_calls") or ()]
            assert calls == [dict(message["tool_calls"][0], index=0)]
            assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    finally:
        up.stop()


def test_jpeg_images_option(settings):
    up = Scripted(lambda h, b: h.send_events([chunk("ok"), chunk(finish="stop")]))
    try:
        with Gateway(settings, [up.url], upstream_image_format="jpeg") as gw:
            r = chat(gw.url, QUESTIONS[1])
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "ok"
            url = up.bodies[0]["messages"][0]["content"][0]["image_url"]["url"]
            assert url.startswith("data:image/jpeg;base64,")
            assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (84, 56)
            assert r.json()["usage"]["completion_tokens"] == 1  # no usage from the upstream: counted
    finally:
        up.stop()


def test_an_image_intake_leaves_as_it_is_goes_on_as_sent(settings):
    """An upright RGB picture already at the model's size (sides multiples of 28, within the pixel budget)
    reaches the upstream as the very bytes the client sent: nothing is encoded again here or decoded
    from a larger file there. Anything intake changed (here: an EXIF rotation) is encoded at its new size."""
    exif = Image.Exif()
    exif[0x0112] = 6  # turned a quarter
    buf = io.BytesIO()
    Image.new("RGB", (112, 84), (20, 120, 40)).save(buf, "JPEG", exif=exif.tobytes())
    rotated = buf.getvalue()
    sent = {"image/jpeg": png_bytes((112, 84), (200, 30, 30), fmt="JPEG"),
            "image/png": png_bytes((112, 84), (20, 90, 200))}
    up = Scripted(lambda h, b: h.send_events([chunk("ok"), chunk(finish="stop")]))
    try:
        with Gateway(settings, [up.url]) as gw:
            for mime, data in list(sent.items()) + [("rotated", rotated)]:
                body = {"messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{b64(data)}"}},
                    {"type": "text", "text": "What is in this picture?"}]}]}
                r = chat(gw.url, body)
                assert r.status_code == 200, r.text
                url = up.bodies[-1]["messages"][0]["content"][0]["image_url"]["url"]
                if mime == "rotated":
                    assert url.startswith("data:image/png;base64,")
                    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (84, 112)
                else:
                    assert url == f"data:{mime};base64," + base64.b64encode(data).decode("ascii"), mime
    finally:
        up.stop()


# ---------------------------------------------------------------- pieces

def test_urls_and_error_bodies():
    assert normalise_url("http://10.0.0.2:8000/v1/") == "http://10.0.0.2:8000"
    assert normalise_url("127.0.0.1:8080") == "http://127.0.0.1:8080"
    assert normalise_url("https://h.example/prefix") == "https://h.example/prefix"
    with pytest.raises(ValueError):
        normalise_url("ftp://h")
    assert parse_error_body(b'{"error": {"message": "m", "code": "c_1", "param": "p"}}') == ("m", "c_1", "p")
    assert parse_error_body(b'{"detail": "Not Found"}') == ("Not Found", None, None)
    assert parse_error_body(b'{"object": "error", "message": "x", "code": 400}') == ("x", None, None)
    assert parse_error_body(b"<html><body>502 Bad Gateway</body></html>") == ("", None, None)
    assert sanitise(TRACEBACK) == "" and sanitise("a\n  b\x07") == "a b" and len(sanitise("x" * 999)) == 300


def test_bad_upstream_settings_are_one_clear_error(settings):
    from serving.model.loader import ModelLoadError

    with pytest.raises(ModelLoadError, match="at least one upstream"):
        UpstreamEngine.from_settings(replace(settings, backend="openai", upstream=()))
    with pytest.raises(ModelLoadError, match="not an http"):
        UpstreamEngine.from_settings(replace(settings, backend="openai", upstream=("ftp://x",)))


def test_the_openai_backend_never_imports_paddle(replicas):
    """The whole gateway process (app, engine, a chat through it) without Paddle: --backend openai needs
    no GPU build, no model and no PaddleFormers."""
    code = f"""
import sys
from serving.web.app import create_app
from serving.config import load_settings
from serving.web.server import build_engine

settings = load_settings(["--backend", "openai", "--upstream", {replicas[0].base_url!r}])
engine = build_engine(settings)
client = create_app(settings, engine).test_client()
r = client.post("/v1/chat/completions", json={{"messages": [{{"role": "user", "content": "hi"}}], "max_tokens": 3}})
assert r.status_code == 200, r.get_data(as_text=True)
assert client.get("/health").status_code == 200
import api
import serving.engines.fastdeploy, serving.deploy.fastdeploy_env  # --backend fastdeploy's side of this process: no Paddle either
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("paddle", "paddleformers", "torch"))
assert not bad, bad[:10]
engine.close()
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k not in ("BACKEND", "UPSTREAM")}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


def test_every_setting_is_in_the_readme_table():
    from dataclasses import fields

    from serving.config import Settings, env_name

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = set(re.findall(r"^\| `--([a-z0-9-]+)` \| `([A-Z0-9_]+)` \|", readme, re.MULTILINE))
    missing = [f.name for f in fields(Settings) if ("" + f.name.replace("_", "-"), env_name(f.name)) not in rows]
    assert missing == [], f"settings without a row in README's settings table: {missing}"


def test_a_kept_alive_connection_the_upstream_closed_is_not_a_failure(settings):
    """An upstream may close an idle kept-alive connection just as it is reused (the race every HTTP client
    meets): the request goes again on a new connection, and the upstream is not taken out."""
    served = []

    class KeepAlive(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            data = json.dumps({"object": "list", "data": [{"id": "m"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
            self.close_connection = True

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            if getattr(self, "answered", False):  # this connection was used before: drop it unanswered
                self.close_connection = True
                return
            self.answered = True
            served.append(self.client_address)
            events = [chunk("hi"), chunk(finish="stop")]
            data = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), KeepAlive)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with Gateway(settings, [f"http://127.0.0.1:{server.server_address[1]}"], upstream_health_interval=600) as gw:
            for _ in range(3):
                r = chat(gw.url, QUESTIONS[0])
                assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "hi", r.text
            replica = gw.engine.replicas[0]
            assert replica.healthy and replica.failures == 0 and replica.retried == 0
            assert len(served) == 3 and len(set(served)) == 3  # each answer on a connection of its own
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("chunked", [False, True])
def test_an_upstream_that_keeps_the_stream_open_after_done_does_not_hold_the_answer(settings, chunked):
    def respond(h, _):
        events = [chunk("fine"), chunk(finish="stop")]
        if chunked:  # HTTP/1.1 chunked: the body's end would be a last, empty chunk, which never comes
            h.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            for data in [b"data: " + json.dumps(e).encode() + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]:
                h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            h.wfile.flush()
        else:  # HTTP/1.0: the body would end when the connection closes, which it does not
            h.send_events(events)
        h.hang()

    up = Scripted(respond)
    try:
        with Gateway(settings, [up.url]) as gw:
            started = time.monotonic()
            r = chat(gw.url, QUESTIONS[0])
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "fine"
            assert time.monotonic() - started < 1.5  # answered at [DONE], not when the upstream lets go
            assert wait_until(lambda: gw.engine.replicas[0].in_flight == 0, 5)  # the connection was given up
            assert up.closed.wait(5)
    finally:
        up.stop()


def test_the_gateway_benchmark_runs():
    """bench.gateway, as small as it goes (no timing asserted: the figures are in docs/backends.md, from a full run)."""
    from dataclasses import replace as change

    from bench import gateway

    result = gateway.run(change(gateway.QUICK, pairs=1, rounds=1, per_round=2))
    assert result["same_greedy_answer"] is True
    assert len(result["one_client"]["latencies_s"]["gateway"]) == 1
    assert result["eight_clients"]["gateway_requests_per_s"] > 0
    assert "overhead" in gateway.report(result)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_client_gone_before_the_upstreams_first_byte_closes_the_upstream_connection(settings, stream):
    """The gateway notices a client that hangs up while its upstream has not answered at all (issue 21, 5): the
    upstream connection is shut at once, not at REQUEST_TIMEOUT (it used to stay open 27 s with a 30 s limit)."""
    up = Scripted(lambda h, body: h.hang())
    try:
        with Gateway(settings, [up.url], request_timeout=30) as gw:
            host, port = gw.url.rsplit("//", 1)[1].split(":")
            payload = json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": stream}).encode()
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
                assert up.arrived.wait(10)
            left = time.monotonic()
            assert up.closed.wait(5)
            assert time.monotonic() - left < 2
            assert wait_until(lambda: metric(gw.url, "qwenvl_requests_in_flight") == 0, 5)
    finally:
        up.stop()


def test_client_mistakes_are_400s_through_the_gateway(settings):
    """Refused before anything goes upstream (issue 21, 9-11): they were 500s (tool_calls on a user message, a
    schema 300 levels deep) or 502s counted against a healthy upstream (an infinite repetition_penalty)."""
    up = Scripted(lambda h, body: h.send_events([chunk(role="assistant", content="ok"), chunk(finish="stop")]))
    try:
        with Gateway(settings, [up.url]) as gw:
            deep = json.loads('{"a":' * 300 + "1" + "}" * 300)
            bodies = [
                {"messages": [{"role": "user", "content": "x", "tool_calls": [
                    {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
                {"messages": [{"role": "user", "content": "x"}], "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": deep}}]},
                {"messages": [{"role": "user", "content": "x"}], "response_format": {
                    "type": "json_schema", "json_schema": {"name": "s", "schema": deep}}},
            ]
            answers = [chat(gw.url, body) for body in bodies]
            answers.append(requests.post(gw.url + CHAT, data=b'{"messages": [{"role": "user", "content": "x"}], '
                                         b'"repetition_penalty": 1e309}', timeout=30,
                                         headers={"Content-Type": "application/json"}))
            assert [a.status_code for a in answers] == [400] * 4, [a.text[:200] for a in answers]
            assert [a.json()["error"]["code"] for a in answers] == ["invalid_value", "json_too_deep", "json_too_deep",
                                                                     "invalid_value"]
            assert up.bodies == []  # nothing went upstream, and no failure was counted against it
            assert chat(gw.url, {"messages": [{"role": "user", "content": "x"}]}).status_code == 200
    finally:
        up.stop()


@pytest.mark.parametrize("events, stream", [
    ([chunk(role="assistant", content=""), {"object": "chat.completion.chunk", "choices": [{
        "index": 0, "delta": {"content": "a"}, "finish_reason": None,
        "logprobs": {"content": [{"token": "a", "logprob": float("nan"), "bytes": [97], "top_logprobs": []}]}}]},
      chunk(finish="stop")], True),
    ([chunk(role="assistant", content=""), chunk(content={"text": "a dict"}), chunk(finish="stop")], False),
    ([chunk(role="assistant", content=""), chunk(content=7), chunk(finish="stop")], True),
], ids=["NaN logprob", "dict content", "int content"])
def test_malformed_upstream_values_are_not_passed_on(settings, events, stream):
    """An upstream's values are checked before they are written (issue 21, 13): a NaN logprob was written as bare
    NaN (not JSON), a dict or int content as Python's repr text."""
    up = Scripted(lambda h, body: h.send_events(events))
    try:
        with Gateway(settings, [up.url]) as gw:
            body = {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "stream": stream}
            r = chat(gw.url, body)
            assert "NaN" not in r.text and "a dict" not in r.text
            if r.headers["Content-Type"].startswith("text/event-stream"):  # the error came after the first event
                data = [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]
                assert data[-1] == "[DONE]" and json.loads(data[-2])["error"]["code"] == "upstream_bad_response"
            else:  # before it: a plain error
                assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_bad_response"
    finally:
        up.stop()


def test_an_absurd_usage_count_does_not_reach_the_metrics(settings):
    events = [chunk(role="assistant", content="hi"), chunk(finish="stop"),
              {"object": "chat.completion.chunk", "choices": [],
               "usage": {"prompt_tokens": 10**30, "completion_tokens": 10**30, "total_tokens": 2 * 10**30}}]
    up = Scripted(lambda h, body: h.send_events(events))
    try:
        with Gateway(settings, [up.url]) as gw:
            r = chat(gw.url, {"messages": [{"role": "user", "content": "x"}]})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] < 1000
            text = requests.get(gw.url + "/metrics", timeout=10).text
            assert "e+30" not in text and "1e30" not in text
    finally:
        up.stop()


def test_comments_after_done_hold_the_call_at_most_the_drain_time(settings):
    """An upstream that keeps sending SSE comments after [DONE] (each read within the per-read timeout) held a
    thread and an in-flight count per finished answer without end (issue 21, 14): now DRAIN_SECONDS in all."""
    from serving.engines import upstream

    def respond(h, _):
        h.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for data in [b"data: " + json.dumps(e).encode() + b"\n\n" for e in (chunk("fine"), chunk(finish="stop"))] \
                + [b"data: [DONE]\n\n"]:
            h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        try:
            for _ in range(100):  # a comment every 0.3 s for 30 s
                h.wfile.write(b"%x\r\n%s\r\n" % (len(b": ping\n\n"), b": ping\n\n"))
                h.wfile.flush()
                time.sleep(0.3)
        except OSError:
            scripted.closed.set()

    scripted = up = Scripted(respond)
    try:
        with Gateway(settings, [up.url]) as gw:
            r = chat(gw.url, QUESTIONS[0])
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "fine"
            done = time.monotonic()
            assert wait_until(lambda: gw.engine.replicas[0].in_flight == 0, upstream.DRAIN_SECONDS + 3)
            assert time.monotonic() - done < upstream.DRAIN_SECONDS + 2
            assert up.closed.wait(5)  # the connection was shut, not kept
    finally:
        up.stop()


def test_reading_events_is_linear_in_a_long_line():
    """A `data:` line sent in many small blocks without its newline cost time quadratic in its length (20 MB:
    1.6 s); a line past MAX_EVENT_BYTES is refused."""
    from serving.engines import upstream
    from serving.errors import UpstreamError

    class Raw:
        chunked = False

        def __init__(self, blocks):
            self.blocks = iter(blocks)

        def read1(self, n):
            return next(self.blocks, b"")

    class Response:
        def __init__(self, blocks):
            self.raw = Raw(blocks)

    payload = b"x" * (4 * 2**20)
    blocks = [b"data: "] + [payload[k:k + 4096] for k in range(0, len(payload), 4096)] + [b"\n\n"]
    started = time.perf_counter()
    events = list(upstream.sse_events(Response(blocks)))
    assert time.perf_counter() - started < 1.0 and len(events) == 1 and len(events[0]) == len(payload)
    huge = [b"data: "] + [b"x" * 2**20] * (upstream.MAX_EVENT_BYTES // 2**20 + 2)
    with pytest.raises(UpstreamError):
        list(upstream.sse_events(Response(huge)))


class ModelsServer(LoopbackServer):
    """An upstream whose /v1/models answers as `answer(handler)` says; counts the checks it gets."""

    def __init__(self, answer):
        server_self = self
        self.hits = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def do_GET(self):
                server_self.hits += 1
                answer(self)

            def log_message(self, *args):
                pass

        super().__init__(Handler)


def _models(h, body=None):
    data = body if body is not None else json.dumps({"object": "list", "data": [{"id": "m"}]}).encode()
    h.send_response(200)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    try:
        h.wfile.write(data)
    except OSError:
        pass


def _trickle(h):
    h.send_response(200)
    h.send_header("Content-Type", "application/json")
    h.end_headers()
    try:
        for _ in range(60):  # a byte every 0.5 s: each read is well within its timeout
            h.wfile.write(b" ")
            h.wfile.flush()
            time.sleep(0.5)
    except OSError:
        pass


def test_health_checks_run_per_upstream_each_bounded_in_time_and_size(monkeypatch):
    """Issue 21, 6: the checks ran as one batch waiting for the slowest (an upstream trickling its /v1/models held
    every other upstream's checks), with no total deadline and no size cap (a 200 MB answer was read whole)."""
    from serving.engines import upstream

    monkeypatch.setattr(upstream, "CHECK_TIMEOUT", 1.0)
    monkeypatch.setattr(upstream, "MAX_MODELS_BYTES", 10_000, raising=False)
    good, slow = ModelsServer(_models), ModelsServer(_trickle)
    big = ModelsServer(lambda h: _models(h, b'{"data": [{"id": "m"}], "pad": "' + b"x" * 100_000 + b'"}'))
    engine = UpstreamEngine([good.url, slow.url, big.url], health_interval=0.3)
    try:
        started = time.monotonic()
        engine.start_checks(wait=True, timeout=10)
        assert time.monotonic() - started < 3  # the first round waited at most CHECK_TIMEOUT for the slow one
        hits = good.hits
        time.sleep(3)
        assert good.hits - hits >= 5  # checked every 0.3 s meanwhile, whatever the slow one did
        states = {r.label: r for r in engine.replicas}
        assert states[upstream.url_label(good.url)].healthy
        assert "took longer than 1 s" in states[upstream.url_label(slow.url)].reason
        assert "larger than 10000 bytes" in states[upstream.url_label(big.url)].reason
    finally:
        engine.close()
        for server in (good, slow, big):
            server.stop()


def test_resized_images_go_upstream_compressed_and_a_413_names_the_upstream(settings):
    """Issue 21, 12: an image intake resized went upstream as an uncompressed PNG (3 bytes a pixel, ~4 MB of base64
    a megapixel), so a valid request could outgrow its upstream's limit, and the client then read the upstream's
    own words, "this server's limit". Now a fast compressed PNG, the same pixels, and a 413 that says whose."""
    import numpy as np

    gradient = np.linspace(0, 255, 1200, dtype=np.uint8)
    picture = Image.fromarray(np.stack([np.tile(gradient, (900, 1))] * 3, axis=-1))  # 1200x900: resized by intake
    buf = io.BytesIO()
    picture.save(buf, "PNG")
    up = Scripted(lambda h, b: h.send_events([chunk("ok"), chunk(finish="stop")]))
    try:
        with Gateway(settings, [up.url]) as gw:
            body = {"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64(buf.getvalue())}"}}]}]}
            assert chat(gw.url, body).status_code == 200
            url = up.bodies[-1]["messages"][0]["content"][0]["image_url"]["url"]
            sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
            assert sent.format == "PNG" and sent.size != picture.size
            assert len(url) < sent.size[0] * sent.size[1]  # under a byte of base64 a pixel (it was 4)
    finally:
        up.stop()
    limit = Scripted(lambda h, b: h.send_json(413, {"error": {"message": "the request body is larger than this "
                                                                        "server's limit of 1000 bytes"}}))
    try:
        with Gateway(settings, [limit.url]) as gw:
            r = chat(gw.url, {"messages": [{"role": "user", "content": "x"}]})
            assert r.status_code == 400 and r.json()["error"]["code"] == "request_too_large"
            assert r.json()["error"]["message"].startswith("the request, as sent on to the upstream server")
    finally:
        limit.stop()
