"""The HTTP API through Flask's test client, on the demo model."""

import json
from dataclasses import replace

import pytest

from serving.web.app import ROOT_TEXT, create_app
from serving.chat import ChatService
from serving.protocol import ChatTurn

from conftest import b64, png_bytes

IMAGE = b64(png_bytes())


def chat(client, body, **kw):
    return client.post("/v1/chat/completions", data=json.dumps(body), content_type="application/json", **kw)


def sse_events(response):
    text = response.get_data(as_text=True)
    events = [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_root_health_models(client):
    assert client.get("/").get_data(as_text=True) == ROOT_TEXT
    health = client.get("/health")
    assert health.status_code == 200 and health.json["status"] == "ok"
    models = client.get("/v1/models").json
    assert models["object"] == "list"
    card = models["data"][0]
    assert card["id"] == "demo" and card["demo"] is True and "random weights" in card["description"]
    assert card["root"] == "demo"  # the id, not the demo checkpoint's folder on this machine
    assert card["max_model_len"] > 0


def test_tutorial_payload(client):
    body = {"model": "Qwen/Qwen2.5-VL-3B-Instruct", "temperature": 0.7, "messages": [
        {"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "What is this?"}]}]}
    r = chat(client, body)
    assert r.status_code == 200, r.json
    data = r.json
    assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-")
    assert data["model"] == "demo"  # the model actually served, whatever the request named
    choice = data["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = data["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens"] <= 16  # DEFAULT_MAX_TOKENS in the test settings
    assert r.headers["X-Request-Id"]


def test_openai_payload_with_params(client):
    body = {"model": "gpt-whatever", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Compare"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64," + IMAGE}},
                                     {"type": "image_url", "image_url": "data:image/png;base64," + IMAGE}]}],
        "temperature": 0, "top_p": 0.9, "top_k": 20, "max_completion_tokens": 5, "seed": 1, "stop": ["\n\n"],
        "presence_penalty": 0.5, "logit_bias": {}}
    r = chat(client, body)
    assert r.status_code == 200, r.json
    assert r.json["usage"]["completion_tokens"] <= 5


def test_length_and_usage_are_right(client, engine, settings):
    body = {"messages": [{"role": "user", "content": "Say something long."}], "max_tokens": 4, "temperature": 0,
            "repetition_penalty": 1.0}
    data = chat(client, body).json
    choice = data["choices"][0]
    tokens = data["usage"]["completion_tokens"]
    if choice["finish_reason"] == "length":
        assert tokens == 4
    service = ChatService(engine, settings)
    direct = service.start([ChatTurn("user", ["Say something long."])], service.sampling_params(max_tokens=1))
    assert data["usage"]["prompt_tokens"] == direct.prompt_tokens == direct.collect().finished.prompt_tokens


def test_seed_reproduces(client):
    body = {"messages": [{"role": "user", "content": "Random words please."}], "max_tokens": 12,
            "temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": 42}
    first = chat(client, body).json["choices"][0]["message"]["content"]
    assert chat(client, body).json["choices"][0]["message"]["content"] == first


def test_logprobs_of_the_real_model(client):
    """Greedy, no penalty: each chosen token is the most likely one, and its bytes spell the answer."""
    body = {"messages": [{"role": "user", "content": "Say something long."}], "max_tokens": 6, "temperature": 0,
            "repetition_penalty": 1.0, "logprobs": True, "top_logprobs": 3}
    data = chat(client, body).json
    choice = data["choices"][0]
    tokens = choice["logprobs"]["content"]
    assert 1 <= len(tokens) <= data["usage"]["completion_tokens"]
    for t in tokens:
        assert set(t) == {"token", "logprob", "bytes", "top_logprobs"} and t["logprob"] <= 0
        top = t["top_logprobs"]
        assert len(top) == 3 and [a["logprob"] for a in top] == sorted((a["logprob"] for a in top), reverse=True)
        assert (top[0]["token"], top[0]["bytes"]) == (t["token"], t["bytes"])
        assert top[0]["logprob"] == pytest.approx(t["logprob"], abs=1e-5)
    if choice["finish_reason"] == "length":  # no end-of-text token among them
        assert len(tokens) == data["usage"]["completion_tokens"] == 6
        assert bytes(b for t in tokens for b in t["bytes"]).decode("utf-8", "replace") == choice["message"]["content"]
    streamed = sse_events(chat(client, {**body, "stream": True}))
    again = [t for e in streamed if e["choices"] and e["choices"][0]["logprobs"]
             for t in e["choices"][0]["logprobs"]["content"]]
    assert [t["token"] for t in again] == [t["token"] for t in tokens]


def test_stream_format(client):
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    r = chat(client, body)
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    events = sse_events(r)
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert len({e["id"] for e in events}) == 1
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    finals = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] in ("stop", "length")
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] >= 1
    streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    whole = chat(client, {**body, "stream": False, "stream_options": None}).json["choices"][0]["message"]["content"]
    assert streamed == whole


def test_stream_without_usage(client):
    r = chat(client, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True})
    assert all(e.get("usage") is None for e in sse_events(r))


def test_stream_error_before_generation_is_plain_json(client):
    r = chat(client, {"messages": [{"role": "user", "content": [{"type": "image", "image": "xx!!"}]}],
                      "stream": True})
    assert r.status_code == 400 and r.mimetype == "application/json"
    assert r.json["error"]["code"] == "invalid_image"


BAD = [
    (b"{not json", 400, "invalid_json"),
    (b"[1, 2]", 400, "invalid_body"),
    (b'{"model": "x"}', 400, "invalid_value"),
    (b'{"messages": []}', 400, "invalid_value"),
    (b'{"messages": [{"role": "wizard", "content": "x"}]}', 400, "invalid_value"),
    (b'{"messages": [{"role": "user", "content": 12}]}', 400, "invalid_value"),
    (b'{"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]}', 400, "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}', 400, "invalid_value"),
    (b'{"messages": [{"role": "user", "content": [{"type": "image", "image": "%%%"}]}]}', 400, "invalid_image"),
    (('{"messages": [{"role": "user", "content": [{"type": "image", "image": "%s"}]}]}'
      % b64(b"GIF89a but not really an image")).encode(), 400, "invalid_image"),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 999999}', 400, "max_tokens_too_large"),
]


@pytest.mark.parametrize("raw,status,code", BAD)
def test_client_errors_are_openai_shaped(client, raw, status, code):
    r = client.post("/v1/chat/completions", data=raw, content_type="application/json")
    assert r.status_code == status
    error = r.json["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["type"] == "invalid_request_error" and error["message"]
    # and the next request is served normally
    assert chat(client, {"messages": [{"role": "user", "content": "ok?"}], "max_tokens": 2}).status_code == 200


def test_unknown_route_and_method(client):
    assert client.get("/v1/nothing").status_code == 404
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405 and r.json["error"]["type"] == "invalid_request_error"


def test_body_size_limit(settings, engine):
    app = create_app(replace(settings, max_request_bytes=1000), engine)
    r = app.test_client().post("/v1/chat/completions", data=b"x" * 5000, content_type="application/json")
    assert r.status_code == 413 and r.json["error"]["code"] == "request_too_large"


def test_api_key(settings, engine):
    client = create_app(replace(settings, api_key=("k1", "k2")), engine).test_client()
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    assert chat(client, body).status_code == 401
    r = chat(client, body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json["error"]["type"] == "authentication_error"
    assert chat(client, body, headers={"Authorization": "Bearer k2"}).status_code == 200
    assert chat(client, body, headers={"Authorization": "token k1"}).status_code == 200  # AI Studio's scheme
    assert chat(client, body, headers={"Authorization": "Basic k1"}).status_code == 401
    assert client.get("/v1/models").status_code == 401
    assert client.get("/health").status_code == 200 and client.get("/").status_code == 200


def test_internal_error_is_500_and_server_recovers(client, engine, monkeypatch):
    def broken(turns, params):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(engine, "start", broken)
    r = chat(client, {"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 500 and r.json["error"]["type"] == "server_error"
    assert "RuntimeError" in r.json["error"]["message"] and "simulated" not in r.json["error"]["message"]
    monkeypatch.undo()
    assert chat(client, {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}).status_code == 200


def test_generation_failure_in_worker_is_500_and_worker_survives(client, engine, monkeypatch):
    def explode(layer, inputs):
        raise RuntimeError("kernel exploded")

    # every forward pass ends in lm_head, in the worker (a hook: patching `forward` on the layer would leave it
    # shadowing the class's after undo, and later tests patching the class would see nothing)
    hook = engine.model.lm_head.register_forward_pre_hook(explode)
    try:
        r = chat(client, {"messages": [{"role": "user", "content": "x"}]})
    finally:
        hook.remove()
    assert r.status_code == 500 and r.json["error"]["type"] == "server_error"
    assert chat(client, {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}).status_code == 200


def test_loading_state_is_503(settings):
    client = create_app(settings, engine=None).test_client()
    assert client.get("/health").status_code == 503
    r = chat(client, {"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 503 and r.json["error"]["code"] == "model_loading" and r.headers["Retry-After"]


def test_no_image_written(client, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    chat(client, {"messages": [{"role": "user", "content": [{"type": "image", "image": IMAGE}]}], "max_tokens": 1})
    assert list(tmp_path.iterdir()) == []
