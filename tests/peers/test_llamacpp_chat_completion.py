"""Ported from llama.cpp tools/server/tests/unit/test_chat_completion.py at commit
0ce03597e8c11b6cbc746c3915e0e0a9982d31b7 (github.com/ggml-org/llama.cpp). The checks are re-expressed here
against this project's demo server; each upstream assertion is kept, except these deliberate differences
(docs/api.md, "Differences from the peers' tests"):

- the demo model's answers are random text: assertions on a real model's words (re_content) and llama.cpp's
  exact prompt token counts (n_prompt, from its tinyllama tokenizer and template) are skipped;
- system_fingerprint is "fp_..." here, not llama.cpp's build tag "b...";
- the first stream chunk's delta.content is "" (OpenAI's own form), not null;
- llama.cpp's debug "__verbose" prompt is read here from return_token_ids (prompt_token_ids, decoded);
- llama.cpp's response_format {"type": "json_object", "schema": ...} extension is not served (the schema goes
  in json_schema or response_format json_schema), so its rows are skipped.
"""

from __future__ import annotations

import json
import re

import pytest

from peer_server import server  # noqa: F401  (one demo server per module)
import requests

SYSTEM_BOOK = [{"role": "system", "content": "Book"}, {"role": "user", "content": "What is the best book"}]


def post(server, path, body, stream=False):
    return requests.post(server.base_url + path, json=body, stream=stream, timeout=120)


def stream_events(response):
    for line in response.iter_lines(decode_unicode=True):
        if line and line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


@pytest.mark.parametrize("user_prompt", ["Hey", "What is the best book",
                                         [{"type": "text", "text": "What is"}, {"type": "text", "text": "the best book"}]])
def test_chat_completion(server, user_prompt):
    res = post(server, "/v1/chat/completions", {"max_tokens": 8, "messages": [
        {"role": "system", "content": "Book"}, {"role": "user", "content": user_prompt}]})
    assert res.status_code == 200
    body = res.json()
    assert "cmpl" in body["id"]
    assert body["system_fingerprint"].startswith("fp_")  # llama.cpp: "b" (its build)
    assert body["usage"]["prompt_tokens"] > 0  # llama.cpp: its tokenizer's exact count
    assert body["usage"]["completion_tokens"] == 8
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] == "length"


def test_chat_completion_stream(server):
    res = post(server, "/v1/chat/completions", {"max_tokens": 8, "messages": SYSTEM_BOOK, "stream": True,
                                                "stream_options": {"include_usage": True}}, stream=True)
    content, last_id, usage_seen = "", None, False
    for i, data in enumerate(stream_events(res)):
        if data["choices"]:
            choice = data["choices"][0]
            if i == 0:
                assert choice["delta"]["content"] == ""  # llama.cpp: None
                assert choice["delta"]["role"] == "assistant"
            else:
                assert "role" not in choice["delta"]
            assert data["system_fingerprint"].startswith("fp_")
            last_id = last_id or data["id"]
            assert last_id == data["id"]
            if choice["finish_reason"] in ("stop", "length"):
                assert "content" not in choice["delta"]
                assert choice["finish_reason"] == "length"
            else:
                assert choice["finish_reason"] is None
                content += choice["delta"]["content"] or ""
        else:
            assert data["usage"]["completion_tokens"] == 8
            usage_seen = True
    assert usage_seen and content


def test_chat_completion_with_openai_library(server):
    from openai import OpenAI

    client = OpenAI(api_key="dummy", base_url=server.base_url + "/v1")
    res = client.chat.completions.create(model="gpt-3.5-turbo-instruct", messages=SYSTEM_BOOK, max_tokens=8, seed=42,
                                         temperature=0.8)
    assert res.system_fingerprint is not None and res.system_fingerprint.startswith("fp_")
    assert res.choices[0].finish_reason == "length"
    assert res.choices[0].message.content is not None


@pytest.mark.parametrize("prefill,re_prefill", [
    ("Whill", "Whill"),
    ([{"type": "text", "text": "Wh"}, {"type": "text", "text": "ill"}], "Whill"),
])
def test_chat_template_assistant_prefill(server, engine, prefill, re_prefill):
    res = post(server, "/v1/chat/completions", {"max_tokens": 8, "return_token_ids": True, "messages": SYSTEM_BOOK + [
        {"role": "assistant", "content": prefill}]})
    assert res.status_code == 200
    prompt = engine.tokenizer.decode(res.json()["prompt_token_ids"])  # llama.cpp: __verbose.prompt
    assert prompt == ("<|im_start|>system\nBook<|im_end|>\n<|im_start|>user\nWhat is the best book<|im_end|>\n"
                      f"<|im_start|>assistant\n{re_prefill}")


@pytest.mark.parametrize("response_format,n_predicted,re_content", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"const": "foooooo"}}}, 10, "\"foooooo\""),
    ({"type": "json_object"}, 10, r"(\{|John)+"),
    ({"type": "sound"}, 0, None),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 123}}}, 0, None),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "hiccup"}}}, 0, None),
])
def test_completion_with_response_format(server, response_format, n_predicted, re_content):
    # upstream sends these schemas under json_object's "schema" (a llama.cpp extension): json_schema here
    res = post(server, "/v1/chat/completions", {"max_tokens": n_predicted or 1, "response_format": response_format,
                                                "messages": [{"role": "system", "content": "You are a coding assistant."},
                                                             {"role": "user", "content": "Write an example"}]})
    if re_content is not None:
        assert res.status_code == 200
        assert re.search(re_content, res.json()["choices"][0]["message"]["content"])
    else:
        assert res.status_code == 400
        assert "error" in res.json()


def test_completion_with_json_schema(server):
    res = post(server, "/v1/chat/completions", {"max_tokens": 6, "json_schema": {"const": "42"}, "messages": [
        {"role": "system", "content": "You are a coding assistant."}, {"role": "user", "content": "Write an example"}]})
    assert res.status_code == 200
    assert re.search("\"42\"", res.json()["choices"][0]["message"]["content"])


def test_completion_with_grammar(server):
    res = post(server, "/v1/chat/completions", {"max_tokens": 6, "grammar": 'root ::= "a"{5,5}', "messages": [
        {"role": "user", "content": "Does not matter what I say, does it?"}]})
    assert res.status_code == 200, res.json()
    assert re.search("a{5,5}", res.json()["choices"][0]["message"]["content"])


@pytest.mark.parametrize("messages", [
    None, "string", [123], [{}], [{"role": 123}], [{"role": "system", "content": 123}],
    [{"role": "system", "content": "test"}, {}],
])
def test_invalid_chat_completion_req(server, messages):
    res = post(server, "/v1/chat/completions", {"messages": messages})
    assert res.status_code in (400, 500)
    assert "error" in res.json()


def test_logprobs(server):
    from openai import OpenAI

    client = OpenAI(api_key="dummy", base_url=server.base_url + "/v1")
    res = client.chat.completions.create(model="gpt-3.5-turbo-instruct", temperature=0.0, messages=SYSTEM_BOOK,
                                         max_tokens=5, logprobs=True, top_logprobs=10)
    assert res.choices[0].logprobs is not None and res.choices[0].logprobs.content is not None
    for token in res.choices[0].logprobs.content:
        assert token.logprob <= 0.0
        assert token.bytes is not None
        assert len(token.top_logprobs) > 0
    text = bytes(b for token in res.choices[0].logprobs.content for b in token.bytes).decode("utf-8", "replace")
    assert text == res.choices[0].message.content  # upstream joins token strings; a token here may be part of a
    # character (the demo writes random bytes), so the tokens' bytes are joined


def test_logit_bias(server):
    exclude = ["i", "I", "the", "The", "to", "a", "an", "be", "is", "was", "book", "Book"]
    res = post(server, "/tokenize", {"content": " " + " ".join(exclude) + " "})
    assert res.status_code == 200
    tokens = res.json()["tokens"]
    res = post(server, "/v1/chat/completions", {"max_tokens": 64, "messages": SYSTEM_BOOK, "temperature": 0,
                                                "return_token_ids": True,
                                                "logit_bias": {str(t): -100 for t in tokens}})
    assert res.status_code == 200
    assert not set(res.json()["choices"][0]["token_ids"]) & set(tokens)
