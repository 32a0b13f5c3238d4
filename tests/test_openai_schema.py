"""Real answers of the server on the demo model validate against the official OpenAI specification's schemas
(chat completions, chunks, model lists, errors), vendored in tests/openai/schemas.json with their source,
commit and version; and /openapi.json agrees with what the server does."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import jsonschema
import pytest

from conftest import b64, png_bytes
from serving.web.app import create_app

VENDORED = json.loads((Path(__file__).parent / "openai" / "schemas.json").read_text(encoding="utf-8"))
CHAT = "/v1/chat/completions"
IMAGE = b64(png_bytes((300, 200)))


def _nullable(node):
    """OpenAPI 3.0's `nullable: true`, which parts of this 3.1 document still use (a chunk's finish_reason,
    usage, logprobs), as JSON Schema says it: anyOf the schema and null. Everything else is unchanged."""
    if isinstance(node, list):
        return [_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _nullable(value) for key, value in node.items()}
    if out.get("nullable") is True:
        del out["nullable"]
        return {"anyOf": [out, {"type": "null"}]}
    return out


DOCUMENT = {"components": {"schemas": _nullable(VENDORED["schemas"])}}


def validate(instance, schema_name: str) -> None:
    schema = {"$ref": f"#/components/schemas/{schema_name}", **DOCUMENT}
    jsonschema.Draft202012Validator(schema).validate(instance)


def post(client, **body):
    body.setdefault("messages", [{"role": "user", "content": "Hello"}])
    return client.post(CHAT, json=body)


def events(response) -> list:
    lines = [line[6:] for line in response.get_data(as_text=True).split("\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def with_image(text="What is in the picture?"):
    return [{"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": text}]}]


def test_the_vendored_schemas_name_their_source():
    assert VENDORED["repository"] == "openai/openai-openapi" and len(VENDORED["commit"]) == 40
    assert VENDORED["commit"] in VENDORED["source"] and VENDORED["info_version"]
    for name in ("CreateChatCompletionResponse", "CreateChatCompletionStreamResponse", "ListModelsResponse",
                 "ErrorResponse"):
        assert name in VENDORED["schemas"]


def test_the_schemas_catch_what_the_issue_found():
    """The checks have teeth: the answers this server gave before fail them."""
    good = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": "hi", "refusal": None}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    validate(good, "CreateChatCompletionResponse")
    no_refusal = json.loads(json.dumps(good))
    del no_refusal["choices"][0]["message"]["refusal"]
    null_fingerprint = dict(good, system_fingerprint=None)
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": {"role": None, "content": "x"}, "finish_reason": None}]}
    for bad, name in ((no_refusal, "CreateChatCompletionResponse"), (null_fingerprint, "CreateChatCompletionResponse"),
                      (chunk, "CreateChatCompletionStreamResponse")):
        with pytest.raises(jsonschema.ValidationError):
            validate(bad, name)


def test_chat_completion(client):
    r = post(client, max_tokens=4, temperature=0)
    assert r.status_code == 200, r.json
    validate(r.json, "CreateChatCompletionResponse")
    message = r.json["choices"][0]["message"]
    assert message["refusal"] is None and "refusal" in message
    assert r.json["system_fingerprint"].startswith("fp_") and "image_sizes" not in r.json  # no images: nothing to say


def test_chat_completion_with_image_and_logprobs(client):
    r = post(client, messages=with_image(), max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
    assert r.status_code == 200, r.json
    validate(r.json, "CreateChatCompletionResponse")
    assert r.json["choices"][0]["logprobs"]["refusal"] is None
    assert r.json["image_sizes"] == [{"width": 300, "height": 200, "model_width": 308, "model_height": 196}]


@pytest.mark.parametrize("extra", [{}, {"logprobs": True, "top_logprobs": 1}])
def test_stream_chunks(client, extra):
    r = post(client, messages=with_image(), max_tokens=4, temperature=0, stream=True,
             stream_options={"include_usage": True}, **extra)
    assert r.status_code == 200
    chunks = events(r)
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
        assert chunk["system_fingerprint"].startswith("fp_")
    first, *rest = chunks
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("role" not in c["choices"][0]["delta"] for c in rest if c["choices"])  # only the first has it
    finish = next(c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"])
    assert finish["choices"][0]["delta"] == {}
    assert chunks[-1]["usage"]["total_tokens"] > 0 and chunks[-1]["choices"] == []
    sizes = [{"width": 300, "height": 200, "model_width": 308, "model_height": 196}]
    assert finish["image_sizes"] == sizes and chunks[-1]["image_sizes"] == sizes  # the last chunk carries them
    assert all("image_sizes" not in c for c in chunks if c is not finish and c is not chunks[-1])


def test_models(client):
    r = client.get("/v1/models")
    validate(r.json, "ListModelsResponse")


def _error_answers(app_settings, engine):
    client = create_app(app_settings, engine).test_client()
    keyed = create_app(replace(app_settings, api_key=("k",)), engine).test_client()
    loading = create_app(app_settings, None).test_client()
    return [
        post(client, messages=[{"role": "wizard", "content": "x"}]),
        post(client, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}),
        post(client, max_completion_tokens=10**6),
        client.post(CHAT, data=b"{not json", content_type="application/json"),
        client.get("/nowhere"),
        client.get(CHAT),
        keyed.get("/v1/models"),
        post(loading),
    ]


def test_errors(settings, engine):
    answers = _error_answers(settings, engine)
    assert [r.status_code for r in answers] == [400, 400, 400, 400, 404, 405, 401, 503]
    for r in answers:
        validate(r.json, "ErrorResponse")


def test_method_not_allowed_says_what_is(client):
    r = client.get(CHAT)
    assert r.status_code == 405 and "POST" in r.headers["Allow"].split(", ")
    r = client.post("/v1/models")
    assert r.status_code == 405 and "GET" in r.headers["Allow"].split(", ")


def test_max_completion_tokens_is_named(client):
    error = post(client, max_completion_tokens=10**6).json["error"]
    assert error["param"] == "max_completion_tokens" and error["code"] == "max_tokens_too_large"
    assert error["message"].startswith("max_completion_tokens is 1000000")
    assert post(client, max_tokens=10**6).json["error"]["param"] == "max_tokens"


def test_root_sends_its_charset_once(client):
    assert client.get("/").headers["Content-Type"] == "text/plain; charset=utf-8"


# ---------------------------------------------------------------- /openapi.json says what the server does


def _message_schemas(spec) -> dict:
    schemas = spec["components"]["schemas"]
    refs = schemas["ChatCompletionRequest"]["properties"]["messages"]["items"]["oneOf"]
    return {name: schemas[name] for name in (ref["$ref"].rsplit("/", 1)[-1] for ref in refs)}


def test_openapi_content_is_required_where_the_server_requires_it(client):
    spec = client.get("/openapi.json").json
    kinds = _message_schemas(spec)
    required = {name: "content" in schema.get("required", []) for name, schema in kinds.items()}
    assert required == {"SystemMessage": True, "UserMessage": True, "AssistantMessage": False, "ToolMessage": True}
    # and the server does as it says: user content missing -> 400; assistant content missing -> fine
    missing = post(client, messages=[{"role": "user"}])
    assert missing.status_code == 400 and missing.json["error"]["param"] == "messages[0].content"
    ok = post(client, max_tokens=2, messages=[{"role": "user", "content": "a"}, {"role": "assistant"},
                                              {"role": "user", "content": "b"}])
    assert ok.status_code == 200, ok.json


def test_openapi_documents_the_answers(client):
    spec = client.get("/openapi.json").json
    schemas = spec["components"]["schemas"]
    assert "refusal" in schemas["ResponseMessage"]["properties"]
    assert "image_sizes" in schemas["ChatCompletion"]["properties"]
    assert "image_sizes" in schemas["ChatCompletionChunk"]["properties"]
    assert set(schemas["ImageSize"]["required"]) == {"width", "height", "model_width", "model_height"}
    for field in ("response_format", "tools", "tool_choice", "logit_bias", "metadata", "store", "service_tier",
                  "parallel_tool_calls", "user"):
        assert field in schemas["ChatCompletionRequest"]["properties"], field
