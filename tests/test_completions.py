"""/v1/completions, /tokenize, /detokenize and CORS (issue 20 item 8), on the demo model."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np
import pytest

from serving.jobs import Prompt, SamplingParams
from serving.web.app import create_app

PROMPT = "Once upon a time"
GREEDY = {"temperature": 0, "repetition_penalty": 1.0}


def complete(client, status=200, **body):
    body.setdefault("prompt", PROMPT)
    response = client.post("/v1/completions", json=body)
    assert response.status_code == status, response.get_json()
    return response.get_json()


def sse(response) -> list:
    lines = [line[6:] for line in response.get_data(as_text=True).split("\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def engine_answer(engine, ids, max_tokens):
    arrays = {"input_ids": np.asarray([ids], dtype=np.int64), "attention_mask": np.ones((1, len(ids)), dtype=np.int64)}
    return engine.generate(Prompt(arrays, len(ids), "", 0),
                           SamplingParams(max_tokens=max_tokens, temperature=0, repetition_penalty=1.0)).text


def test_a_string_prompt_is_the_raw_prompt(client, engine):
    out = complete(client, max_tokens=8, **GREEDY)
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")
    assert out["system_fingerprint"] == engine.info.fingerprint
    ids = engine.encode(PROMPT)
    choice = out["choices"][0]
    assert choice["text"] == engine_answer(engine, ids, 8) and choice["index"] == 0 and choice["logprobs"] is None
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 8, "total_tokens": len(ids) + 8,
                            "prompt_tokens_details": {"cached_tokens": 0}}  # shorter than a cache block
    by_ids = complete(client, prompt=ids, max_tokens=8, **GREEDY)
    assert by_ids["choices"][0]["text"] == choice["text"]
    assert complete(client, prompt=[ids], max_tokens=8, **GREEDY)["choices"][0]["text"] == choice["text"]


def test_usage_counts_the_prompt_tokens_reused_from_the_prefix_cache(client, engine):
    prompt = " ".join(f"part{i}" for i in range(60))
    first = complete(client, prompt=prompt, max_tokens=2, **GREEDY)["usage"]
    again = complete(client, prompt=prompt, max_tokens=2, **GREEDY)["usage"]
    assert first["prompt_tokens"] == again["prompt_tokens"] > 32
    assert again["prompt_tokens_details"]["cached_tokens"] == again["prompt_tokens"] - 1  # all but the last one


def test_default_max_tokens_is_16(client):
    assert complete(client, **GREEDY)["usage"]["completion_tokens"] == 16


def test_logprobs_in_the_legacy_form(client):
    choice = complete(client, max_tokens=6, logprobs=2, **GREEDY)["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 6
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert logprob <= 0 and 1 <= len(top) <= 2
        assert max(top.values()) == pytest.approx(logprob, abs=1e-5)  # greedy: the chosen token is the top one


def test_echo(client):
    plain = complete(client, max_tokens=5, **GREEDY)["choices"][0]["text"]
    echoed = complete(client, max_tokens=5, echo=True, **GREEDY)["choices"][0]["text"]
    assert echoed == PROMPT + plain


def test_streamed(client):
    whole = complete(client, max_tokens=6, echo=True, **GREEDY)
    chunks = sse(client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 6, "echo": True, "stream": True,
                                                      "stream_options": {"include_usage": True}, **GREEDY}))
    assert all(c["object"] == "text_completion" for c in chunks)
    text = "".join(ch["text"] for c in chunks for ch in c["choices"])
    assert text == whole["choices"][0]["text"]
    assert [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]] == ["length"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_return_token_ids_whole_and_streamed(client, engine):
    ids = engine.encode(PROMPT)
    whole = complete(client, max_tokens=6, return_token_ids=True, n=2, **GREEDY)
    for choice in whole["choices"]:  # vLLM's form: on each choice
        assert choice["prompt_token_ids"] == ids
        assert engine.tokenizer.decode(choice["token_ids"]) == choice["text"]
        assert len(choice["token_ids"]) == whole["usage"]["completion_tokens"] // 2
    chunks = sse(client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 6, "stream": True,
                                                      "return_token_ids": True, **GREEDY}))
    choices = [ch for c in chunks for ch in c["choices"]]
    assert choices[0]["prompt_token_ids"] == ids and all(ch["prompt_token_ids"] is None for ch in choices[1:])
    streamed = [t for ch in choices for t in (ch["token_ids"] or [])]
    assert streamed == complete(client, max_tokens=6, return_token_ids=True, **GREEDY)["choices"][0]["token_ids"]
    plain = complete(client, max_tokens=2, **GREEDY)["choices"][0]
    assert "token_ids" not in plain and "prompt_token_ids" not in plain


def test_n_choices(client):
    body = dict(max_tokens=6, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0)
    many = complete(client, n=2, seed=5, **body)
    assert [c["text"] for c in many["choices"]] == [complete(client, seed=5 + i, **body)["choices"][0]["text"]
                                                    for i in range(2)]
    assert many["usage"]["completion_tokens"] == 12


def test_ids_the_model_writes_past_the_tokenizer_are_taken_back(client, engine):
    """The model's vocabulary (its embedding rows) outnumbers the tokenizer's entries, as Qwen2.5-VL's does
    (151,936 and 151,665): an id it can write is accepted back as a prompt, a stop id and by /detokenize."""
    assert engine.vocab_size > len(engine.tokenizer)
    unnamed = engine.vocab_size - 1
    assert client.post("/detokenize", json={"tokens": [unnamed]}).status_code == 200
    out = complete(client, prompt=engine.encode(PROMPT) + [unnamed], max_tokens=2, stop_token_ids=[unnamed], **GREEDY)
    assert out["usage"]["prompt_tokens"] == len(engine.encode(PROMPT)) + 1
    error = complete(client, 400, prompt=[1, engine.vocab_size], max_tokens=2)["error"]
    assert error["param"] == "prompt" and f"token id {engine.vocab_size}" in error["message"]


def test_logit_bias(client, engine):
    """OpenAI's logit_bias on /v1/completions, enforced per row as on chat: -100 keeps a token out of a greedy
    answer that had it, +100 makes a token the answer; the unbiased answer is as before."""
    ids = engine.encode(PROMPT)
    free = complete(client, max_tokens=8, return_token_ids=True, **GREEDY)["choices"][0]
    banned = sorted(set(free["token_ids"]))
    kept_out = complete(client, max_tokens=8, return_token_ids=True, logit_bias={str(t): -100 for t in banned},
                        **GREEDY)["choices"][0]
    assert not set(kept_out["token_ids"]) & set(banned) and len(kept_out["token_ids"]) == 8
    forced = complete(client, max_tokens=3, return_token_ids=True, logit_bias={str(banned[0]): 100}, **GREEDY)
    assert forced["choices"][0]["token_ids"] == [banned[0]] * 3
    assert complete(client, max_tokens=8, **GREEDY)["choices"][0]["text"] == engine_answer(engine, ids, 8)


SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                           "count": {"type": "integer", "minimum": 1, "maximum": 5},
                                           "name": {"type": "string", "maxLength": 8}},
          "required": ["color", "count", "name"], "additionalProperties": False}  # bounded: every answer ends
CHOICES = ["apple pie", "banana", "cherry tart"]


@pytest.mark.parametrize("form", [
    {"structured_outputs": {"json": SCHEMA}}, {"guided_json": SCHEMA},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}},
], ids=["structured_outputs", "guided_json", "response_format"])
def test_a_json_schema_shapes_the_completion(client, form):
    """The answer's form on /v1/completions, through the grammar path chat uses: greedy and sampled rows (n 3)."""
    import jsonschema

    greedy = complete(client, max_tokens=64, **GREEDY, **form)["choices"][0]
    sampled = complete(client, max_tokens=64, n=3, temperature=1.0, top_p=1.0, top_k=-1, seed=7, **form)["choices"]
    for choice in [greedy, *sampled]:
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["text"]), SCHEMA)


def test_guided_choice_answers_one_of_the_choices(client):
    for form in ({"guided_choice": CHOICES}, {"structured_outputs": {"choice": CHOICES}}):
        answers = complete(client, max_tokens=16, n=4, temperature=1.0, top_p=1.0, top_k=-1, seed=3, **form)
        for choice in answers["choices"]:
            assert choice["text"] in CHOICES and choice["finish_reason"] == "stop", choice
    regex = r"[0-9]{3}-[a-z]{2}"
    choice = complete(client, max_tokens=16, structured_outputs={"regex": regex}, **GREEDY)["choices"][0]
    assert re.fullmatch(regex, choice["text"]) and choice["finish_reason"] == "stop", choice


@pytest.mark.parametrize("body,param,code", [
    (dict(structured_outputs={"json": {"type": "object", "properties": {"foo": "bar"}}}), "structured_outputs.json",
     "invalid_schema"),
    (dict(guided_json={"type": "strin"}), "guided_json", "invalid_schema"),
    (dict(structured_outputs={"regex": "[.*"}), "structured_outputs.regex", "invalid_grammar"),
    (dict(guided_regex="(unclosed"), "guided_regex", "invalid_grammar"),
    (dict(structured_outputs={"grammar": "root ::= undefined_rule"}), "structured_outputs.grammar",
     "invalid_grammar"),
    (dict(structured_outputs={"choice": []}), "structured_outputs.choice", "invalid_value"),
    (dict(structured_outputs={"whitespace": "x"}), "structured_outputs.whitespace", "unsupported_parameter"),
    (dict(guided_regex="a+", guided_choice=["a"]), "guided_choice", "invalid_value"),
], ids=["json", "guided_json", "regex", "guided_regex", "grammar", "empty choice", "unknown key", "two forms"])
def test_an_answer_form_that_cannot_be_served_is_a_400_naming_it(client, body, param, code):
    error = complete(client, 400, **body)["error"]
    assert (error["param"], error["code"]) == (param, code), error


@pytest.mark.parametrize("body,param,code", [
    (dict(prompt=["a", "b"]), "prompt", "invalid_value"),
    (dict(prompt=[1, 10**6]), "prompt", "invalid_value"),
    (dict(prompt=""), "prompt", "invalid_value"),
    (dict(suffix="x"), "suffix", "unsupported_parameter"),
    (dict(logprobs=21), "logprobs", "invalid_value"),
    (dict(stream_options={"include_usage": True}), "stream_options", "invalid_value"),
    (dict(logit_bias={"the": -100}), "logit_bias", "invalid_value"),
    (dict(logit_bias={"5": 101}), "logit_bias.5", "invalid_value"),
    (dict(logit_bias={"1000000": 5}), "logit_bias", "invalid_value"),
], ids=["two prompts", "unknown id", "empty", "suffix", "logprobs 21", "stream_options", "logit_bias text key",
        "logit_bias 101", "logit_bias unknown id"])
def test_mistakes(client, body, param, code):
    error = complete(client, 400, **body)["error"]
    assert (error["param"], error["code"]) == (param, code), error


def test_tokenize_and_detokenize(client, engine):
    ids = engine.encode(PROMPT)
    assert client.post("/tokenize", json={"content": PROMPT}).get_json()["tokens"] == ids  # llama.cpp's form
    vllm = client.post("/tokenize", json={"prompt": PROMPT, "return_token_strs": True}).get_json()
    assert vllm["tokens"] == ids and vllm["count"] == len(ids) and vllm["max_model_len"] == engine.context_length
    assert len(vllm["token_strs"]) == len(ids)
    pieces = client.post("/tokenize", json={"content": PROMPT, "with_pieces": True}).get_json()["tokens"]
    assert [p["id"] for p in pieces] == ids and "".join(p["piece"] for p in pieces) == PROMPT
    from serving.protocol import ChatTurn

    chat = client.post("/tokenize", json={"messages": [{"role": "user", "content": PROMPT}]}).get_json()
    assert chat["tokens"] == engine.build_prompt([ChatTurn("user", [PROMPT])]).arrays["input_ids"][0].tolist()
    back = client.post("/detokenize", json={"tokens": ids}).get_json()
    assert back == {"content": PROMPT, "prompt": PROMPT}
    bad = client.post("/detokenize", json={"tokens": [10**7]})
    assert bad.status_code == 400 and bad.get_json()["error"]["param"] == "tokens"


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def test_tokenize_with_tools_is_the_chat_endpoints_prompt(client, engine):
    """/tokenize with messages and tools gives the ids the chat endpoint prompts the model with (its
    return_token_ids), tools block included; tool_choice "none" lists none there, and so here."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]
    for extra in ({}, {"tool_choice": "required"}, {"tool_choice": "none"}):
        chat = client.post("/v1/chat/completions", json=dict(messages=messages, tools=TOOLS, max_tokens=1,
                                                            return_token_ids=True, **extra)).get_json()
        tokenized = client.post("/tokenize", json=dict(messages=messages, tools=TOOLS, **extra)).get_json()
        assert tokenized["tokens"] == chat["prompt_token_ids"], extra
        listed = "get_weather" in engine.tokenizer.decode(tokenized["tokens"])
        assert listed == (extra.get("tool_choice") != "none"), extra
    without = client.post("/tokenize", json={"messages": messages}).get_json()["tokens"]
    listing = client.post("/tokenize", json={"messages": messages, "tools": TOOLS}).get_json()["tokens"]
    assert len(without) < len(listing)
    misnamed = [{"type": "function", "function": {"name": "a b"}}]
    bad = client.post("/tokenize", json={"messages": messages, "tools": misnamed})
    assert bad.status_code == 400 and bad.get_json()["error"]["param"] == "tools[0].function.name"


def test_cors_is_off_by_default(client):
    preflight = client.options("/v1/chat/completions", headers={"Origin": "https://a.example",
                                                                "Access-Control-Request-Method": "POST"})
    assert preflight.status_code != 204 and "Access-Control-Allow-Origin" not in preflight.headers


def test_cors_for_listed_origins(settings, engine):
    client = create_app(replace(settings, cors_allow_origins=("https://a.example",), api_key=("k",)),
                        engine).test_client()
    ask = {"Origin": "https://a.example", "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization, content-type"}
    preflight = client.options("/v1/chat/completions", headers=ask)  # no API key: browsers send none here
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://a.example"
    assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    other = client.options("/v1/chat/completions", headers=dict(ask, Origin="https://evil.example"))
    assert other.status_code == 401 and "Access-Control-Allow-Origin" not in other.headers
    answer = client.post("/v1/chat/completions", headers={"Origin": "https://a.example", "Authorization": "Bearer k"},
                         json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert answer.status_code == 200 and answer.headers["Access-Control-Allow-Origin"] == "https://a.example"
    assert client.post("/tokenize", json={"content": "x"}).status_code == 401  # the tokenizer needs the key too
