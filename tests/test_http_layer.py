"""The HTTP layer alone, over an engine without a model (tests/fake_engine.py): logprobs in OpenAI's
shape, the new sampling fields, the error table, health and metrics read through the engine
protocol, the time limit, and no Paddle imported. What the model does is proven elsewhere, on the
real engine."""

import json
import subprocess
import sys
import time
from dataclasses import replace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, b64, png_bytes
from fake_engine import SCRIPT, FakeEngine
from serving import errors
from serving.web.app import create_app
from serving.web.http_errors import TABLE
from serving.jobs import Finished, TextDelta

CHAT = "/v1/chat/completions"


def say(text="Hi", **extra):
    return {"messages": [{"role": "user", "content": text}], **extra}


def client_of(settings, engine):
    return create_app(settings, engine).test_client()


def events_of(response):
    lines = [line[6:] for line in response.get_data(as_text=True).split("\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def expected_content(top):
    """SCRIPT's tokens as OpenAI's logprobs.content, with `top` alternatives each."""
    return [{"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode()),
             "top_logprobs": [{"token": a.token, "logprob": a.logprob, "bytes": list(a.token.encode())}
                              for a in t.top_logprobs[:top]]}
            for delta in SCRIPT if isinstance(delta, TextDelta) for t in delta.logprobs]


# ---------------------------------------------------------------- logprobs and the new sampling fields


def test_logprobs_in_openai_shape(settings):
    r = client_of(settings, FakeEngine()).post(CHAT, json=say(logprobs=True, top_logprobs=2))
    assert r.status_code == 200, r.json
    choice = r.json["choices"][0]
    assert choice["message"]["content"] == "Hello!"
    assert choice["logprobs"] == {"content": expected_content(2), "refusal": None}


def test_logprobs_are_null_unless_asked(settings):
    client = client_of(settings, FakeEngine())
    assert client.post(CHAT, json=say()).json["choices"][0]["logprobs"] is None
    assert client.post(CHAT, json=say(logprobs=False)).json["choices"][0]["logprobs"] is None
    without_alternatives = client.post(CHAT, json=say(logprobs=True)).json["choices"][0]["logprobs"]
    assert without_alternatives == {"content": expected_content(0), "refusal": None}
    streamed = events_of(client.post(CHAT, json=say(stream=True)))
    assert all(e["choices"][0]["logprobs"] is None for e in streamed)


def test_each_chunk_carries_the_logprobs_of_its_delta(settings):
    client = client_of(settings, FakeEngine())
    events = events_of(client.post(CHAT, json=say(stream=True, logprobs=True, top_logprobs=3)))
    role, *texts, finish = events
    assert role["choices"][0]["delta"]["role"] == "assistant" and role["choices"][0]["logprobs"] is None
    assert [e["choices"][0]["delta"]["content"] for e in texts] == ["Hel", "lo!"]
    assert [[t["token"] for t in e["choices"][0]["logprobs"]["content"]] for e in texts] == [["Hel"], ["lo", "!"]]
    streamed = [t for e in texts for t in e["choices"][0]["logprobs"]["content"]]
    assert streamed == expected_content(3)
    assert finish["choices"][0]["finish_reason"] == "stop" and finish["choices"][0]["logprobs"] is None


def test_a_token_of_probability_zero_is_reported_as_openai_does(settings):
    script = (TextDelta("x", [replace(SCRIPT[0].logprobs[0], token="x", logprob=float("-inf"))]), SCRIPT[-1])
    r = client_of(settings, FakeEngine(script)).post(CHAT, data=json.dumps(say(logprobs=True)),
                                                     content_type="application/json")
    assert r.json["choices"][0]["logprobs"]["content"][0]["logprob"] == -9999.0  # JSON has no -Infinity


def test_sampling_fields_reach_the_engine(settings):
    engine = FakeEngine()
    client = client_of(settings, engine)
    body = say(presence_penalty=0.5, frequency_penalty=-1.25, logprobs=True, top_logprobs=3, seed=5, temperature=0.3,
               top_p=0.9, top_k=20, repetition_penalty=1.1, stop="END")
    assert client.post(CHAT, json=body).status_code == 200
    params = engine.started[-1][1]
    assert (params.presence_penalty, params.frequency_penalty, params.logprobs, params.top_logprobs) == (0.5, -1.25,
                                                                                                          True, 3)
    assert (params.seed, params.temperature, params.top_p, params.top_k, params.repetition_penalty, params.stop) == (
        5, 0.3, 0.9, 20, 1.1, ["END"])
    assert params.max_tokens == settings.default_max_tokens
    assert client.post(CHAT, json=say()).status_code == 200
    plain = engine.started[-1][1]
    assert (plain.presence_penalty, plain.frequency_penalty, plain.logprobs, plain.top_logprobs) == (0.0, 0.0, False, 0)


@pytest.mark.parametrize("extra,param,words", [
    ({"presence_penalty": 2.01}, "presence_penalty", "less than or equal to 2"),
    ({"frequency_penalty": -2.5}, "frequency_penalty", "greater than or equal to -2"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
    ({"top_logprobs": 2}, "top_logprobs", "needs logprobs: true"),
    ({"logprobs": False, "top_logprobs": 2}, "top_logprobs", "needs logprobs: true"),
])
def test_new_fields_out_of_range_are_400_with_a_clear_message(settings, extra, param, words):
    engine = FakeEngine()
    r = client_of(settings, engine).post(CHAT, json=say(**extra))
    assert r.status_code == 400
    error = r.json["error"]
    assert error["param"] == param and words in error["message"] and error["code"] == "invalid_value"
    assert engine.started == []  # refused before the engine saw it


# ---------------------------------------------------------------- the error table


def domain_errors():
    found, todo = set(), [errors.ServiceError]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub.__module__ == errors.__name__:
                found.add(sub)
                todo.append(sub)
    return found


def test_every_domain_error_has_a_row():
    assert domain_errors() == set(TABLE)
    for status, kind in TABLE.values():
        assert 400 <= status < 600 and kind


@pytest.mark.parametrize("error_class", sorted(TABLE, key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_each_domain_error_reaches_the_client_as_its_row(settings, error_class):
    engine = FakeEngine(start_error=error_class("it went wrong", param="messages", code="some_code", retry_after=3))
    r = client_of(settings, engine).post(CHAT, json=say())
    status, kind = TABLE[error_class]
    assert r.status_code == status and r.headers["Retry-After"] == "3"
    assert r.json == {"error": {"message": "it went wrong", "type": kind, "param": "messages", "code": "some_code"}}


def test_an_unexpected_exception_is_500_naming_only_its_type(settings):
    r = client_of(settings, FakeEngine(start_error=KeyError("secret detail"))).post(CHAT, json=say())
    assert r.status_code == 500 and r.json["error"]["type"] == "server_error"
    assert "KeyError" in r.json["error"]["message"] and "secret" not in r.json["error"]["message"]


def test_an_error_mid_stream_is_the_streams_last_event(settings):
    script = (SCRIPT[0], errors.InternalError("generation failed: boom"))
    r = client_of(settings, FakeEngine(script)).post(CHAT, json=say(stream=True))
    assert r.status_code == 200
    lines = [line[6:] for line in r.get_data(as_text=True).split("\n") if line.startswith("data: ")]
    assert json.loads(lines[1])["choices"][0]["delta"]["content"] == "Hel"
    assert lines[-1] == "[DONE]"  # after the error event, so every client sees the stream end
    assert json.loads(lines[-2]) == {"error": {"message": "generation failed: boom", "type": "server_error",
                                               "param": None, "code": None}}


# ---------------------------------------------------------------- time limit, health, models, metrics


def test_a_stuck_engine_gives_504_not_a_hang(settings):
    engine = FakeEngine(step_seconds=60)  # never answers within the test
    client = client_of(replace(settings, request_timeout=0.3), engine)
    for stream in (False, True):
        started = time.time()
        r = client.post(CHAT, json=say(stream=stream))
        assert r.status_code == 504 and r.json["error"]["type"] == "timeout_error"
        assert r.json["error"]["code"] == "request_timeout" and time.time() - started < 3
    assert len(engine.generations) == 2 and all(g.cancelled for g in engine.generations)


def test_an_engine_that_cannot_serve_is_503(settings):
    engine = FakeEngine(health=(False, "the model worker has stopped"))
    client = client_of(settings, engine)
    health = client.get("/health")
    assert health.status_code == 503
    assert health.json == {"status": "unavailable", "model": "fake", "reason": "the model worker has stopped"}
    r = client.post(CHAT, json=say())
    assert r.status_code == 503 and r.json["error"]["code"] == "engine_unavailable" and r.headers["Retry-After"]
    assert "worker has stopped" in r.json["error"]["message"] and engine.started == []


def test_models_and_health_come_from_the_engine_info(settings):
    client = client_of(settings, FakeEngine())
    assert client.get("/health").json == {"status": "ok", "model": "fake", "demo": True}
    card = client.get("/v1/models").json["data"][0]
    assert (card["id"], card["root"], card["max_model_len"], card["demo"]) == ("fake", "fake", 4096, True)


def test_models_list_shows_the_id_not_the_folder(settings):
    """The engine's source is a folder on this machine: /v1/models names the model by its id alone."""
    engine = FakeEngine()
    engine.info = replace(engine.info, name="qwen-vl", source="/home/aistudio/secret/Qwen2.5-VL-3B")
    client = client_of(settings, engine)
    body = client.get("/v1/models").get_data(as_text=True)
    assert "/home/aistudio" not in body and "secret" not in body
    card = client.get("/v1/models").json["data"][0]
    assert card["id"] == card["root"] == "qwen-vl"


def test_health_polls_are_logged_at_debug(settings, caplog):
    """A platform polls /health every few seconds: those lines are DEBUG; other requests stay INFO, and a health
    check that finds the engine broken is still an error."""
    caplog.set_level("DEBUG", logger="serving.web.app")

    def levels(client, path):
        caplog.clear()
        client.get(path)
        return [rec.levelname for rec in caplog.records if rec.name == "serving.web.app" and f" {path} " in
                rec.getMessage()]

    loading = create_app(settings).test_client()  # no engine yet: 503 "loading" is normal operation
    assert levels(loading, "/health") == ["DEBUG"]
    client = client_of(settings, FakeEngine())
    assert levels(client, "/health") == ["DEBUG"]
    assert levels(client, "/metrics") == ["DEBUG"]
    assert levels(client, "/v1/models") == ["INFO"]
    broken = client_of(settings, FakeEngine(health=(False, "the model worker has stopped")))
    assert levels(broken, "/health") == ["ERROR"]


def metric_samples(client):
    out = {}
    for family in text_string_to_metric_families(client.get("/metrics").get_data(as_text=True)):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_read_the_engine_stats(settings):
    stats = {"queue_depth": 3, "rows_running": 2, "steps": 40, "step_seconds": 1.5, "prefill_tokens": 900,
             "joined": 4, "batches": 6, "batched_requests": 9,
             "caches": {"pixels": {"hits": 5, "misses": 2, "bytes": 1000}, "vision": {"hits": 1, "misses": 6,
                                                                                      "bytes": 300}}}
    found = metric_samples(client_of(settings, FakeEngine(stats=stats)))
    assert found[("qwenvl_queue_depth", ())] == 3 and found[("qwenvl_rows_running", ())] == 2
    assert found[("qwenvl_decode_steps_total", ())] == 40 and found[("qwenvl_decode_step_seconds_total", ())] == 1.5
    assert found[("qwenvl_prefill_tokens_total", ())] == 900 and found[("qwenvl_joined_requests_total", ())] == 4
    assert found[("qwenvl_batches_total", ())] == 6 and found[("qwenvl_batched_requests_total", ())] == 9
    assert found[("qwenvl_image_cache_lookups_total", (("cache", "pixels"), ("result", "hit")))] == 5
    assert found[("qwenvl_image_cache_bytes", (("cache", "vision"),))] == 300


def test_metrics_skip_what_the_engine_does_not_give(settings):
    found = metric_samples(client_of(settings, FakeEngine(stats={"queue_depth": 1})))
    names = {name for name, _ in found}
    assert ("qwenvl_queue_depth", ()) in found
    assert not names & {"qwenvl_rows_running", "qwenvl_decode_steps_total", "qwenvl_batches_total",
                        "qwenvl_image_cache_lookups_total", "qwenvl_image_cache_bytes"}
    loading = metric_samples(client_of(settings, None))
    assert loading[("qwenvl_queue_depth", ())] == 0


def test_a_finished_answer_is_counted(settings):
    client = client_of(settings, FakeEngine())
    client.post(CHAT, json=say())
    found = metric_samples(client)
    finished = next(e for e in SCRIPT if isinstance(e, Finished))
    assert found[("qwenvl_generated_tokens_total", ())] == finished.completion_tokens
    assert found[("qwenvl_prompt_tokens_total", ())] == finished.prompt_tokens
    assert found[("qwenvl_time_to_first_token_seconds_count", ())] == 1


# ---------------------------------------------------------------- no Paddle in the HTTP layer


def test_the_http_layer_never_imports_paddle():
    code = f"""
import sys
sys.path.insert(0, "tests")
from fake_engine import FakeEngine
from serving.web.app import create_app
from serving.config import Settings

client = create_app(Settings(model="fake"), FakeEngine()).test_client()
image = {{"type": "image_url", "image_url": {{"url": "data:image/png;base64,{b64(png_bytes())}"}}}}
body = {{"messages": [{{"role": "user", "content": [image, {{"type": "text", "text": "?"}}]}}], "logprobs": True}}
assert client.post("/v1/chat/completions", json=body).status_code == 200
assert client.post("/v1/chat/completions", json={{**body, "stream": True}}).get_data().endswith(b"[DONE]\\n\\n")
for path in ("/", "/health", "/v1/models", "/metrics", "/openapi.json"):
    assert client.get(path).status_code == 200, path
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("paddle", "paddleformers", "torch"))
assert not heavy, heavy
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


def test_control_characters_from_a_path_are_escaped_in_the_log_and_the_answer(settings, caplog):
    """`%0a` in a URL path decodes to a newline: it wrote a forged line in the server's own format into the log
    (and the 404's message). Control characters from a request are written escaped."""
    client = client_of(settings, FakeEngine())
    caplog.set_level("INFO", logger="serving.web.app")
    forged = "request 0 POST /v1/chat/completions status=200 latency=0.001s"
    r = client.get("/x%0a" + forged.replace(" ", "%20") + "%0d%1b")
    assert r.status_code == 404 and "\n" not in r.json["error"]["message"]
    assert "\\x0a" + forged + "\\x0d\\x1b" in r.json["error"]["message"]
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "serving.web.app"]
    assert lines and all("\n" not in line and "\r" not in line and "\x1b" not in line for line in lines), lines
    assert any("/x\\x0a" + forged in line for line in lines)


def test_a_non_ascii_api_key_works_as_utf8_and_as_latin1(settings):
    """Header values reach the app as latin-1 text: a key with 'é' sent in UTF-8 (curl) arrived as 'Ã©' and never
    matched. The bytes sent are compared, as UTF-8 or latin-1 (Python's http.client)."""
    client = client_of(replace(settings, api_key=("clé-ключ", "café")), FakeEngine())

    def status(raw: bytes) -> int:
        header = "Bearer " + raw.decode("latin-1")  # what the WSGI server makes of the bytes on the wire
        return client.get("/v1/models", environ_overrides={"HTTP_AUTHORIZATION": header}).status_code

    assert status("clé-ключ".encode()) == 200
    assert status("café".encode()) == 200 and status("café".encode("latin-1")) == 200
    assert status("cafe".encode()) == 401 and status("clé".encode()) == 401


def test_allowed_hosts_refuses_other_host_names(settings):
    """ALLOWED_HOSTS: a page on another origin that rebinds its DNS name to 127.0.0.1 reaches the server with its
    own name in Host; that is refused, the listed names (with any port) are answered."""
    client = client_of(replace(settings, allowed_hosts=("127.0.0.1", "LocalHost", "::1")), FakeEngine())
    for host in ("127.0.0.1:8080", "localhost", "LOCALHOST:80", "[::1]:8080"):
        assert client.get("/health", headers={"Host": host}).status_code == 200, host
    r = client.post(CHAT, json=say(), headers={"Host": "evil.example:8080"})
    assert r.status_code == 400 and r.json["error"]["code"] == "host_not_allowed"
    assert client.get("/health", headers={"Host": "evil.example"}).status_code == 400
    assert client_of(settings, FakeEngine()).get("/health", headers={"Host": "evil.example"}).status_code == 200


def test_a_chat_body_must_be_declared_json(settings):
    """A browser sends text/plain or a form to any server without a CORS preflight; application/json needs one,
    which this server never grants. So a web page cannot drive a local server without API keys."""
    client = client_of(settings, FakeEngine())
    body = json.dumps(say())
    for content_type in ("text/plain;charset=UTF-8", "application/x-www-form-urlencoded", "multipart/form-data"):
        r = client.post(CHAT, data=body, content_type=content_type)
        assert r.status_code == 415 and r.json["error"]["code"] == "unsupported_media_type", content_type
    assert client.post(CHAT, data=body, content_type="application/json; charset=utf-8").status_code == 200
