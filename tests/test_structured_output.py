"""response_format (json_schema, json_object) and logit_bias in the built-in engine, on the demo model.

The demo's weights are random: left alone it writes noise, so an answer that parses and validates can only
come from the grammar's per-token mask (an honest test of the constraint). Every answer and chunk also
validates against the vendored OpenAI schemas."""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from typing import Literal

import jsonschema
import pytest
from PIL import Image
from pydantic import BaseModel, Field

from conftest import b64, png_bytes
from serving import protocol, structured
from serving.jobs import Finished, SamplingParams
from serving.protocol import ChatTurn
from serving.web.app import create_app
from test_openai_schema import events, validate

CHAT = "/v1/chat/completions"
SCHEMA = {  # bounded: every answer that follows it ends
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 1, "maximum": 5},
        "ok": {"type": "boolean"},
        "name": {"type": "string", "maxLength": 8},
    },
    "required": ["color", "count", "ok", "name"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
IMAGE = [{"type": "image", "image": b64(png_bytes((120, 90)))}, {"type": "text", "text": "Describe it as JSON."}]
SAMPLE = {"temperature": 1.0, "top_p": 1.0, "top_k": -1}  # the demo's generation_config is near-greedy


def ask(client, status=200, **body):
    body.setdefault("messages", [{"role": "user", "content": "Answer in JSON."}])
    response = client.post(CHAT, json=body)
    assert response.status_code == status, response.get_json()
    data = response.get_json()
    validate(data, "CreateChatCompletionResponse" if status == 200 else "ErrorResponse")
    return data


def valid_answer(choice, schema=SCHEMA):
    assert choice["finish_reason"] == "stop", choice
    value = json.loads(choice["message"]["content"])
    jsonschema.validate(value, schema)
    return value


def spec_of(**body) -> structured.OutputSpec:
    body.setdefault("messages", [{"role": "user", "content": "x"}])
    return structured.output_spec(protocol.parse_request(body), max_tools=64, max_schema_bytes=65536)


def run_together(engine, requests) -> list:
    """[(turns, SamplingParams)] submitted at once (they share decoding steps) -> [(text, Finished)]."""
    jobs = [engine.submit(engine.build_prompt(turns), params) for turns, params in requests]
    results = []
    for job in jobs:
        pieces, finish = [], None
        for event in job:
            if isinstance(event, Finished):
                finish = event
            else:
                pieces.append(event)
        results.append(("".join(pieces), finish))
    return results


def test_json_schema_greedy_with_and_without_an_image(client):
    for content in ("Answer in JSON.", IMAGE):
        data = ask(client, messages=[{"role": "user", "content": content}], response_format=FORMAT, max_tokens=64,
                   temperature=0)
        valid_answer(data["choices"][0])


def test_json_schema_with_many_seeds_in_one_batch(engine):
    """Twelve seeded sampling rows decoded side by side: each answer parses and validates, and they differ."""
    compiled = engine.compile_output(spec_of(response_format=FORMAT))
    turns = [ChatTurn("user", ["Answer in JSON."])]
    requests = [(turns, SamplingParams(max_tokens=64, seed=seed, temperature=1.0, top_p=1.0, top_k=0,
                                       output=compiled)) for seed in range(12)]
    answers = run_together(engine, requests)
    values = []
    for text, finish in answers:
        assert finish.finish_reason == "stop", text
        values.append(json.loads(text))
        jsonschema.validate(values[-1], SCHEMA)
    assert len({json.dumps(v, sort_keys=True) for v in values}) > 1  # the seeds did sample


def test_streamed_answer_joins_to_the_non_streamed_one(client):
    for content in ("Answer in JSON.", IMAGE):
        body = dict(messages=[{"role": "user", "content": content}], response_format=FORMAT, max_tokens=64, seed=11,
                    **SAMPLE)
        whole = ask(client, **body)["choices"][0]
        response = client.post(CHAT, json=dict(body, stream=True))
        chunks = events(response)
        for chunk in chunks:
            validate(chunk, "CreateChatCompletionStreamResponse")
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        assert text == whole["message"]["content"]
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        valid_answer(whole)


def test_json_object_gives_an_object(client):
    """json_object bounds nothing (a string may run on): greedy ends with an object; sampled answers that end
    are objects, and one cut by max_tokens is still the start of one."""
    choice = ask(client, response_format={"type": "json_object"}, max_tokens=64, temperature=0)["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    assert isinstance(json.loads(choice["message"]["content"]), dict)
    finished = 0
    for seed in range(4):
        choice = ask(client, response_format={"type": "json_object"}, max_tokens=64, seed=seed, **SAMPLE)["choices"][0]
        if choice["finish_reason"] == "stop":
            finished += 1
            assert isinstance(json.loads(choice["message"]["content"]), dict)
        else:
            assert choice["message"]["content"].startswith("{")
    assert finished


def test_a_seeded_constrained_row_is_the_same_alone_and_in_a_batch(engine):
    compiled = engine.compile_output(spec_of(response_format=FORMAT))
    turns = [ChatTurn("user", ["Answer in JSON."])]
    mine = SamplingParams(max_tokens=64, seed=1234, temperature=1.0, top_p=1.0, top_k=0, output=compiled)
    alone = run_together(engine, [(turns, mine)])[0]
    others = [([ChatTurn("user", [f"Something else {i}."])],
               SamplingParams(max_tokens=40, seed=i, temperature=0.8, top_p=0.9, top_k=0)) for i in range(3)]
    together = run_together(engine, [others[0], (turns, replace(mine)), *others[1:]])[1]
    assert together[0] == alone[0] and together[1].completion_tokens == alone[1].completion_tokens


def test_an_unconstrained_greedy_answer_is_unchanged_beside_constrained_rows(engine):
    turns = [ChatTurn("user", ["Hello there, how are you today?"])]
    plain = SamplingParams(max_tokens=24, temperature=0, logprobs=True)
    alone = run_together(engine, [(turns, plain)])[0]
    compiled = engine.compile_output(spec_of(response_format=FORMAT))
    constrained = [([ChatTurn("user", ["Answer in JSON."])],
                    SamplingParams(max_tokens=64, seed=i, temperature=1.0, top_p=1.0, top_k=0, output=compiled))
                   for i in range(3)]
    together = run_together(engine, [constrained[0], (turns, replace(plain)), *constrained[1:]])
    assert together[1][0] == alone[0] and together[1][1].completion_tokens == alone[1].completion_tokens
    for text, finish in together[:1] + together[2:]:
        jsonschema.validate(json.loads(text), SCHEMA)


def test_logprobs_stay_the_models_raw_logprobs(client):
    """The first token's alternatives are the model's own, not the grammar's: the same as without a format."""
    body = dict(max_tokens=2, temperature=0, logprobs=True, top_logprobs=5)
    free = ask(client, **body)["choices"][0]["logprobs"]["content"][0]
    constrained = ask(client, response_format=FORMAT, **body)["choices"][0]["logprobs"]["content"][0]
    assert constrained["token"] == "{"
    assert constrained["top_logprobs"] == free["top_logprobs"]


def test_logit_bias_moves_the_answer(client, engine):
    base = ask(client, max_tokens=6, temperature=0, logprobs=True)["choices"][0]
    first = base["logprobs"]["content"][0]["token"]
    first_id = engine.encode(first)[0]
    banned = ask(client, max_tokens=6, temperature=0, logprobs=True, logit_bias={str(first_id): -100})["choices"][0]
    assert banned["logprobs"]["content"][0]["token"] != first
    forced_id = engine.encode(" cat")[0]
    forced = ask(client, max_tokens=4, temperature=0, logit_bias={str(forced_id): 100})["choices"][0]
    assert forced["message"]["content"] == engine.tokenizer.decode([forced_id]) * 4
    error = ask(client, 400, logit_bias={"99999999": 5})["error"]
    assert error["param"] == "logit_bias"


@pytest.mark.parametrize("response_format, param, code, words", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "not": {}}}},
     "response_format.json_schema.schema", "unsupported_schema", "'not'"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}},
     "response_format.json_schema.schema", "invalid_schema", "strin"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(a"}}},
     "response_format.json_schema.schema", "invalid_schema", "regex"),
    ({"type": "json_schema"}, "response_format.json_schema", "invalid_value", "json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
        f"field_{i}": {"type": "string", "description": "x" * 200} for i in range(400)}}}},
     "response_format.json_schema.schema", "schema_too_large", "MAX_SCHEMA_BYTES"),
])
def test_bad_schemas_are_refused_before_the_engine(client, engine, monkeypatch, response_format, param, code, words):
    started = []
    monkeypatch.setattr(engine, "start", lambda *a, **k: started.append(a))
    admitted = engine.scheduler.requests_run
    error = ask(client, 400, response_format=response_format)["error"]
    assert (error["param"], error["code"]) == (param, code) and words in error["message"], error
    assert not started and engine.scheduler.requests_run == admitted


def test_max_schema_bytes_is_a_setting(settings, engine):
    client = create_app(replace(settings, max_schema_bytes=200), engine).test_client()
    small = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    ask(client, response_format=small, max_tokens=32)
    error = ask(client, 400, response_format=FORMAT)["error"]
    assert error["code"] == "schema_too_large" and "200 bytes" in error["message"]


def test_compiled_grammars_are_cached_and_counted(client, engine):
    fresh = dict(SCHEMA, properties=dict(SCHEMA["properties"], extra={"type": "boolean"}))
    fmt = {"type": "json_schema", "json_schema": {"name": "fresh", "schema": fresh}}
    before = engine.stats()
    ask(client, response_format=fmt, max_tokens=64, temperature=0)
    middle = engine.stats()
    ask(client, response_format=fmt, max_tokens=64, temperature=0)
    after = engine.stats()
    assert middle["grammar_compiles"] == before["grammar_compiles"] + 1
    assert after["grammar_compiles"] == middle["grammar_compiles"]
    assert after["grammar_cache_hits"] > middle["grammar_cache_hits"]
    assert after["constrained_rows"] == before["constrained_rows"] + 2 and after["grammar_masks"] > before["grammar_masks"]
    text = client.get("/metrics").get_data(as_text=True)
    for name in ("qwenvl_constrained_rows_total", "qwenvl_grammar_compiles_total", "qwenvl_grammar_compile_seconds_total",
                 "qwenvl_grammar_cache_hits_total", "qwenvl_grammar_mask_seconds_total"):
        assert name in text


def test_max_tokens_still_cuts_a_constrained_answer(client):
    choice = ask(client, response_format=FORMAT, max_tokens=3, temperature=0)["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["content"].startswith("{")


class Answer(BaseModel):
    color: Literal["red", "green", "blue"]
    count: int = Field(ge=1, le=5)
    ok: bool
    name: str = Field(max_length=8)


def test_the_openai_sdk_parse_helper(live_server):
    import openai

    client = openai.OpenAI(base_url=live_server.base_url + "/v1", api_key="unused", max_retries=0)
    completion = client.chat.completions.parse(model="demo", messages=[{"role": "user", "content": "Describe it."}],
                                               response_format=Answer, max_tokens=64, temperature=0)
    message = completion.choices[0].message
    assert isinstance(message.parsed, Answer) and completion.choices[0].finish_reason == "stop"


def test_requests_from_many_threads_each_get_their_own_grammar(app):
    """Different schemas decoded in one batch: every row follows its own."""
    schemas = [SCHEMA, {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}},
                        "required": ["x"], "additionalProperties": False},
               {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 3}]
    results = [None] * len(schemas)

    def one(i):
        fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schemas[i]}}
        results[i] = ask(app.test_client(), response_format=fmt, max_tokens=64, seed=i, **SAMPLE)["choices"][0]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(schemas))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for schema, choice in zip(schemas, results):
        valid_answer(choice, schema)


def test_json_whitespace_compact_or_bounded_pretty(engine):
    """compact: exactly ", " and ": "; pretty: up to 8 spaces or newlines between items, never more."""
    from serving.engines.builtin.grammar import GrammarCompiler

    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "array", "items": {
        "type": "integer"}}}, "required": ["a", "b"], "additionalProperties": False}
    spec = spec_of(response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": schema}})
    texts = {"compact": '{"a": 1, "b": [1, 2]}', "pretty": '{\n  "a": 1,\n  "b": [\n    1,\n    2\n  ]\n}',
             "too wide": '{"a":' + " " * 9 + '1,"b":[]}'}
    accepted = {}
    for whitespace in ("compact", "pretty"):
        compiled = GrammarCompiler(engine.tokenizer, engine.grammar.vocab, engine.eos_token_ids,
                                   whitespace=whitespace).compile(spec)
        for name, text in texts.items():
            matcher, ids = compiled.matcher.deep_copy(), engine.encode(text)
            accepted[whitespace, name] = matcher.try_consume_tokens(ids) == len(ids) and not matcher.is_error()
    assert accepted == {("compact", "compact"): True, ("compact", "pretty"): False, ("compact", "too wide"): False,
                        ("pretty", "compact"): True, ("pretty", "pretty"): True, ("pretty", "too wide"): False}


def test_greedy_rows_pick_the_same_tokens_with_the_argmax_test_as_with_the_full_mask(engine, monkeypatch):
    """A greedy constrained row tests its argmax's bit and masks only when the grammar rejects it
    (RowConstraint.adjust_greedy): over several schemas, tool calls and a logit bias, decoded side by side, the
    token ids are exactly those of the full mask at every step, and both branches were taken."""
    from serving.engines.builtin.grammar import RowConstraint

    digits = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 6,
              "maxItems": 6}
    tags = {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3}
    nested = {"type": "object", "properties": {"tags": tags, "score": {"type": "number"},
                                               "id": {"type": "string", "pattern": "^[a-f0-9]{4}$"}},
              "required": ["id", "tags", "score"], "additionalProperties": False}
    weather = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]},
                                                "days": {"type": "integer", "minimum": 1, "maximum": 7}},
               "required": ["city", "days"], "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": weather}}]
    forms = [dict(response_format=FORMAT),
             dict(response_format={"type": "json_schema", "json_schema": {"name": "d", "schema": digits}}),
             dict(response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": nested}}),
             dict(response_format={"type": "json_object"}),
             dict(tools=tools, tool_choice="required"),
             dict(response_format=FORMAT, logit_bias={"20": 5, "33": -3})]
    prompts = ["Answer in JSON.", "Describe a cat, please.", "x"]
    requests = [([ChatTurn("user", [prompt])],
                 SamplingParams(max_tokens=48, temperature=0, return_token_ids=True,
                                output=engine.compile_output(spec_of(**form))))
                for form in forms for prompt in prompts]

    masked = {"calls": 0}
    full_mask = RowConstraint._masked

    def counted(self, scores):
        masked["calls"] += 1
        return full_mask(self, scores)

    monkeypatch.setattr(RowConstraint, "_masked", counted)

    def token_ids() -> list:
        jobs = [engine.submit(engine.build_prompt(turns), replace(params)) for turns, params in requests]
        answers = []
        for job in jobs:
            ids, finish = [], None
            for event in job:
                if isinstance(event, Finished):
                    finish = event
                else:
                    ids.extend(getattr(event, "token_ids", ()))
            assert finish is not None and len(ids) == finish.completion_tokens
            answers.append(ids)
        return answers

    monkeypatch.setattr(RowConstraint, "always_full_mask", True)
    before = engine.grammar.stats.masks
    expected = token_ids()
    assert masked["calls"] == engine.grammar.stats.masks - before  # every step masked in full
    masked["calls"], before = 0, engine.grammar.stats.masks
    monkeypatch.setattr(RowConstraint, "always_full_mask", False)
    assert token_ids() == expected
    steps = engine.grammar.stats.masks - before
    assert 0 < masked["calls"] < steps  # the argmax was allowed at some steps and rejected at others


def test_a_mask_sets_exactly_the_forbidden_tokens_to_minus_infinity(engine):
    """RowConstraint's mask, copied out of a row of -inf when few tokens are allowed (JSON syntax) or by np.where
    when many are (inside a string), equals np.where over the grammar's bitmask at every step, bias included."""
    import numpy as np

    from serving.engines.builtin.grammar import GrammarCompiler

    schema = {"type": "object", "properties": {"note": {"type": "string", "maxLength": 12}, "n": {"type": "integer"}},
              "required": ["note", "n"], "additionalProperties": False}
    spec = spec_of(response_format={"type": "json_schema", "json_schema": {"name": "m", "schema": schema}},
                   logit_bias={"7": 3.5})
    text = '{"note": "a cat", "n": 42}'
    dense = sparse = 0
    for vocab in (engine.grammar.vocab, 151936):  # the demo's own, and padded to Qwen's real size
        compiler = GrammarCompiler(engine.tokenizer, vocab, engine.eos_token_ids)
        row = compiler.row(compiler.compile(spec))
        rng = np.random.default_rng(vocab)
        for token in engine.encode(text):
            scores = rng.standard_normal(vocab).astype(np.float32)
            biased = scores.copy()
            biased[7] += np.float32(3.5)
            masked = row.adjust(scores.copy())
            allowed = np.unpackbits(row.bits.view(np.uint8), bitorder="little", count=vocab).astype(bool)
            assert np.array_equal(masked, np.where(allowed, biased, np.float32(-np.inf)))
            assert masked.dtype == np.float32
            sparse += allowed.sum() * 64 < vocab
            dense += allowed.sum() * 64 >= vocab
            assert row.accept(token) is None
    assert sparse and dense
