"""What the peers' (llama.cpp, vLLM, FastDeploy) OpenAI-server tests found (issue 20), each fix proven on the demo
model: stream_options needs stream, top_p 0, system_fingerprint, a named tool_choice needs tools, a conversation
ending with an assistant message is continued, the peers' extension fields honoured or refused by name."""

from __future__ import annotations

import json
import re

import pytest

from test_openai_schema import events, validate

CHAT = "/v1/chat/completions"
ASK = [{"role": "user", "content": "What is the best book?"}]
GREEDY = {"temperature": 0, "max_tokens": 12}


def ask(client, status=200, **body):
    body.setdefault("messages", ASK)
    response = client.post(CHAT, json=body)
    assert response.status_code == status, response.get_json()
    data = response.get_json()
    validate(data, "CreateChatCompletionResponse" if status == 200 else "ErrorResponse")
    return data


def refused(client, param, code="invalid_value", **body):
    error = ask(client, 400, **body)["error"]
    assert (error["param"], error["code"]) == (param, code), error
    return error["message"]


# ---------------------------------------------------------------- item 3, 4, 5, 9

def test_stream_options_needs_stream(client):
    message = refused(client, "stream_options", stream_options={"include_usage": True})
    assert "only allowed when 'stream' is enabled" in message
    assert ask(client, stream_options=None, max_tokens=2)["choices"]  # null is no option: accepted


def test_a_named_tool_choice_needs_tools(client):
    message = refused(client, "tool_choice", tool_choice={"type": "function", "function": {"name": "f"}})
    assert "needs tools" in message


def test_top_p_zero_is_the_most_likely_token(client):
    greedy = ask(client, **GREEDY)["choices"][0]["message"]["content"]
    for seed in (1, 2):
        nucleus = ask(client, temperature=1.0, top_p=0, top_k=0, seed=seed, max_tokens=12)
        assert nucleus["choices"][0]["message"]["content"] == greedy
        free = ask(client, temperature=1.0, top_p=1.0, top_k=0, seed=seed, max_tokens=12)
        assert free["choices"][0]["message"]["content"] != greedy  # the same seed samples otherwise


def test_system_fingerprint_is_stable_on_every_response_and_chunk(client, engine):
    first = ask(client, max_tokens=2)["system_fingerprint"]
    assert re.fullmatch(r"fp_[0-9a-f]{12}", first)
    assert ask(client, max_tokens=3, temperature=0)["system_fingerprint"] == first
    response = client.post(CHAT, json={"messages": ASK, "max_tokens": 3, "stream": True,
                                       "stream_options": {"include_usage": True}})
    chunks = events(response)
    assert chunks and all(chunk["system_fingerprint"] == first for chunk in chunks)
    assert first == engine.info.fingerprint
    from dataclasses import replace
    changed = replace(engine.info, configuration=engine.info.configuration + (("dtype", "bfloat16"),))
    assert changed.fingerprint != first  # a configuration that changes answers changes it


# ---------------------------------------------------------------- item 1: an assistant message last is continued

PLAIN = {"temperature": 0, "repetition_penalty": 1.0, "return_token_ids": True}


def test_a_final_assistant_message_is_continued(client, engine):
    """The prompt is the conversation with the assistant's turn opened and its text so far (no end of turn), and
    the answer is what the model writes after that text: the same tokens as the engine's own greedy answer to
    those ids, built here from the plain prompt and the text's tokens."""
    import numpy as np

    from serving.jobs import Prompt, SamplingParams
    from serving.protocol import ChatTurn

    prefill = "```json\n{"
    messages = ASK + [{"role": "assistant", "content": prefill}]
    got = ask(client, messages=messages, max_tokens=8, **PLAIN)
    ids = engine.build_prompt([ChatTurn("user", [ASK[0]["content"]])]).arrays["input_ids"][0].tolist()
    ids += engine.encode(prefill)
    assert got["prompt_token_ids"] == ids
    assert engine.tokenizer.decode(ids).endswith("<|im_start|>assistant\n" + prefill)
    arrays = {"input_ids": np.asarray([ids], dtype=np.int64), "attention_mask": np.ones((1, len(ids)), dtype=np.int64)}
    expected = engine.generate(Prompt(arrays, len(ids), "", 0), SamplingParams(max_tokens=8, temperature=0,
                                                                                 repetition_penalty=1.0))
    assert got["choices"][0]["message"]["content"] == expected.text
    same = ask(client, messages=messages, max_tokens=8, continue_final_message=True, **PLAIN)
    assert same["choices"][0]["token_ids"] == got["choices"][0]["token_ids"]


def test_add_generation_prompt_is_honoured(client, engine):
    opened = ask(client, max_tokens=2, **PLAIN)["prompt_token_ids"]
    closed = ask(client, max_tokens=2, add_generation_prompt=False, **PLAIN)["prompt_token_ids"]
    assert engine.tokenizer.decode(opened[len(closed):]) == "<|im_start|>assistant\n" and opened[:len(closed)] == closed
    messages = ASK + [{"role": "assistant", "content": "Whill"}]
    new_turn = ask(client, messages=messages, max_tokens=2, add_generation_prompt=True, **PLAIN)["prompt_token_ids"]
    assert engine.tokenizer.decode(new_turn).endswith("Whill<|im_end|>\n<|im_start|>assistant\n")


def test_prompt_ending_mistakes(client):
    assert "last message to be an assistant" in refused(client, "continue_final_message", continue_final_message=True)
    messages = ASK + [{"role": "assistant", "content": "Whill"}]
    assert "cannot both be true" in refused(client, "continue_final_message", messages=messages,
                                            continue_final_message=True, add_generation_prompt=True)


# ---------------------------------------------------------------- item 7: the peers' fields, honoured or refused

def test_stop_token_ids_and_min_tokens(client):
    ids = ask(client, max_tokens=8, **PLAIN)["choices"][0]["token_ids"]
    stopper = ids[2]
    first = ids.index(stopper)
    stopped = ask(client, max_tokens=8, stop_token_ids=[stopper], **PLAIN)
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["choices"][0]["token_ids"] == ids[:first + 1]  # the stop token ends it, and is not text
    longer = ask(client, max_tokens=8, stop_token_ids=[stopper], min_tokens=first + 3, **PLAIN)
    assert longer["usage"]["completion_tokens"] >= first + 3
    assert stopper not in longer["choices"][0]["token_ids"][:first + 2]


def test_ignore_eos(client, engine):
    eos = engine.eos_token_ids[0]
    ended = ask(client, max_tokens=6, logit_bias={str(eos): 100}, **PLAIN)["choices"][0]
    assert ended["finish_reason"] == "stop" and ended["token_ids"] == [eos]
    going = ask(client, max_tokens=6, logit_bias={str(eos): 100}, ignore_eos=True, **PLAIN)
    assert going["choices"][0]["finish_reason"] == "length" and going["usage"]["completion_tokens"] == 6
    assert not set(going["choices"][0]["token_ids"]) & set(engine.eos_token_ids)


def test_token_ids_are_checked_against_the_vocabulary(client, engine):
    size = engine.vocab_size  # the ids the model can write (more than the tokenizer names)
    assert f"token id {size}" in refused(client, "stop_token_ids", stop_token_ids=[1, size])
    refused(client, "stop_token_ids[0]", stop_token_ids=[-1])
    assert "more than max_tokens" in refused(client, "min_tokens", min_tokens=9, max_tokens=8)


def test_min_p_one_keeps_only_the_most_likely_token(client):
    greedy = ask(client, max_tokens=10, **PLAIN)["choices"][0]["token_ids"]
    for seed in (3, 4):
        sampled = ask(client, max_tokens=10, temperature=2.0, top_k=0, top_p=1.0, min_p=1.0, seed=seed,
                      repetition_penalty=1.0, return_token_ids=True)
        assert sampled["choices"][0]["token_ids"] == greedy
    free = [ask(client, max_tokens=10, temperature=2.0, top_k=0, top_p=1.0, seed=seed, repetition_penalty=1.0,
                return_token_ids=True)["choices"][0]["token_ids"] for seed in (3, 4)]
    assert all(tokens != greedy for tokens in free)  # without it the same seeds sample other answers


def test_return_token_ids_streamed_and_whole(client, engine):
    body = dict(max_tokens=8, **PLAIN)
    whole = ask(client, **body)
    prompt = engine.build_prompt([__import__("serving.protocol", fromlist=["ChatTurn"]).ChatTurn("user", [ASK[0]["content"]])])
    assert whole["prompt_token_ids"] == prompt.arrays["input_ids"][0].tolist()
    choice = whole["choices"][0]
    assert len(choice["token_ids"]) == whole["usage"]["completion_tokens"]
    assert engine.tokenizer.decode(choice["token_ids"], skip_special_tokens=True) == choice["message"]["content"]
    chunks = events(client.post(CHAT, json={"messages": ASK, "stream": True, **body}))
    assert chunks[0]["prompt_token_ids"] == whole["prompt_token_ids"]
    streamed = [t for c in chunks for ch in c["choices"] for t in ch.get("token_ids", [])]
    assert streamed == choice["token_ids"]


CHOICES = ["red apple", "green pear", "blue plum"]


@pytest.mark.parametrize("field", [
    {"guided_choice": CHOICES}, {"structured_outputs": {"choice": CHOICES}},
    {"grammar": 'root ::= "red apple" | "green pear" | "blue plum"'},
    {"guided_grammar": 'start: "red apple" | "green pear" | "blue plum"'}], ids=lambda f: next(iter(f)))
def test_choice_forms(client, field):
    for seed in (1, 2, 3):
        content = ask(client, max_tokens=12, temperature=1.0, seed=seed, **field)["choices"][0]["message"]["content"]
        assert content in CHOICES


@pytest.mark.parametrize("field", ["guided_regex", "structured_outputs"])
def test_regex_forms(client, field):
    regex = r"[0-9]{3}-[a-z]{2}"
    value = {"regex": regex} if field == "structured_outputs" else regex
    for seed in (1, 2):
        choice = ask(client, max_tokens=12, temperature=1.0, seed=seed, **{field: value})["choices"][0]
        assert re.fullmatch(regex, choice["message"]["content"]) and choice["finish_reason"] == "stop"


POINT = {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 999}, "tag": {"enum": ["a", "b"]}},
         "required": ["x", "tag"], "additionalProperties": False}


@pytest.mark.parametrize("field", [{"guided_json": POINT}, {"guided_json": json.dumps(POINT)},
                                   {"structured_outputs": {"json": POINT}}, {"json_schema": POINT}],
                         ids=["guided_json", "guided_json_text", "structured_outputs", "json_schema"])
def test_json_schema_forms(client, field):
    import jsonschema

    content = ask(client, max_tokens=40, temperature=0, **field)["choices"][0]["message"]["content"]
    jsonschema.validate(json.loads(content), POINT)


def test_json_object_forms(client):
    """The same grammar as response_format json_object: the same answer, token for token."""
    body = dict(max_tokens=24, temperature=0, return_token_ids=True)
    expected = ask(client, response_format={"type": "json_object"}, **body)["choices"][0]
    assert expected["message"]["content"].startswith("{")
    for field in ({"guided_json_object": True}, {"structured_outputs": {"json_object": True}}):
        assert ask(client, **field, **body)["choices"][0]["token_ids"] == expected["token_ids"]


BAD_FORMS = [
    ("two forms", dict(guided_regex="a+", guided_choice=["a"]), "guided_choice", "invalid_value"),
    ("a form and response_format", dict(guided_regex="a+", response_format={"type": "json_object"}),
     "guided_regex", "invalid_value"),
    ("a bad regex", dict(guided_regex="(unclosed"), "guided_regex", "invalid_grammar"),
    ("a bad grammar", dict(grammar="root ::= ("), "grammar", "invalid_grammar"),
    ("a grammar naming an undefined rule", dict(guided_grammar="root ::= missing"), "guided_grammar",
     "invalid_grammar"),  # llguidance's GBNF converter raised a bare Exception: it was a 500
    ("guided_json not a schema", dict(guided_json="{nope"), "guided_json", "invalid_value"),
    ("an unknown structured_outputs key", dict(structured_outputs={"structural_tag": "x"}),
     "structured_outputs.structural_tag", "unsupported_parameter"),
    ("a grammar with tools", dict(guided_regex="a", tools=[{"type": "function", "function": {"name": "f"}}]),
     "guided_regex", "invalid_value"),
]


@pytest.mark.parametrize("name,body,param,code", BAD_FORMS, ids=[b[0] for b in BAD_FORMS])
def test_bad_forms_are_named(client, name, body, param, code):
    refused(client, param, code, **body)


@pytest.mark.parametrize("field,value", [("echo", True), ("best_of", 2),
                                         ("use_beam_search", True), ("skip_special_tokens", False),
                                         ("typical_p", 0.5), ("mirostat", 2), ("chat_template", "{{ x }}"),
                                         ("allowed_token_ids", [1]), ("prompt_token_ids", [1, 2, 3]),
                                         ("completion_token_ids", [5]), ("response_max_tokens", 3)])
def test_peer_fields_not_honoured_are_refused_by_name(client, field, value):
    message = refused(client, field, "unsupported_parameter", **{field: value})
    assert field in message and "docs/api.md" in message


def test_neutral_values_of_refused_fields_are_accepted(client):
    ask(client, max_tokens=2, echo=False, best_of=1, skip_special_tokens=True, typical_p=1.0, prompt_logprobs=None,
        disable_chat_template=False)


def test_an_engine_without_the_features_refuses_the_honoured_fields(settings):
    from fake_engine import FakeEngine
    from serving.web.app import create_app

    fake = create_app(settings, FakeEngine()).test_client()
    for field, value in (("min_tokens", 2), ("guided_choice", ["a"]), ("return_token_ids", True)):
        refused(fake, field, "unsupported_parameter", **{field: value})
    refused(fake, "messages", "unsupported_parameter", messages=ASK + [{"role": "assistant", "content": "x"}])


# ---------------------------------------------------------------- item 6: n choices

def test_n_greedy_choices_share_the_prompt(client, engine):
    messages = [{"role": "user", "content": "A question never asked before: n choices?"}]
    one = ask(client, messages=messages, max_tokens=6, **PLAIN)
    before = engine.scheduler.prefill_tokens_done
    three = ask(client, messages=[{"role": "user", "content": "Another new question for three choices?"}],
                max_tokens=6, n=3, **PLAIN)
    prefilled = engine.scheduler.prefill_tokens_done - before
    prompt = three["usage"]["prompt_tokens"]
    assert prefilled < prompt + 2 * 4  # choices 1 and 2 reused choice 0's prompt KV (the prefix cache)
    assert [c["index"] for c in three["choices"]] == [0, 1, 2]
    assert len({tuple(c["token_ids"]) for c in three["choices"]}) == 1  # greedy: the same answer three times
    assert three["usage"]["completion_tokens"] == sum(len(c["token_ids"]) for c in three["choices"])
    assert three["usage"]["total_tokens"] == prompt + three["usage"]["completion_tokens"]
    again = ask(client, messages=messages, max_tokens=6, n=2, **PLAIN)
    assert all(c["token_ids"] == one["choices"][0]["token_ids"] for c in again["choices"])


def test_n_seeded_choice_i_uses_seed_plus_i(client):
    body = dict(max_tokens=8, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, return_token_ids=True)
    many = ask(client, n=3, seed=40, **body)["choices"]
    alone = [ask(client, seed=40 + i, **body)["choices"][0]["token_ids"] for i in range(3)]
    assert [c["token_ids"] for c in many] == alone
    assert len({tuple(t) for t in alone}) > 1


def test_n_streamed_with_index(client):
    body = dict(messages=ASK, max_tokens=6, temperature=1.0, top_k=0, top_p=1.0, seed=7, n=2)
    whole = ask(client, **body)
    chunks = events(client.post(CHAT, json=dict(body, stream=True, stream_options={"include_usage": True})))
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    for i in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == i]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content") or "" for c in mine) == whole["choices"][i]["message"]["content"]
        assert [c["finish_reason"] for c in mine if c["finish_reason"]] == [whole["choices"][i]["finish_reason"]]
    assert chunks[-1]["usage"] == whole["usage"]


def test_a_streamed_n_request_logs_all_choices_tokens(client, caplog):
    caplog.set_level("INFO", logger="serving.web.app")
    for path, body in ((CHAT, dict(messages=ASK)), ("/v1/completions", dict(prompt="Once upon a time"))):
        caplog.clear()
        events(client.post(path, json=dict(body, max_tokens=5, ignore_eos=True, n=3, stream=True)))
        lines = [rec.getMessage() for rec in caplog.records if f"POST {path} status=200" in rec.getMessage()]
        assert len(lines) == 1 and "completion_tokens=15 stream" in lines[0], lines  # 3 choices x 5 tokens


# ---------------------------------------------------------------- vLLM's stream_options.continuous_usage_stats

@pytest.mark.parametrize("path,body", [(CHAT, dict(messages=ASK)), ("/v1/completions", dict(prompt="Once upon"))])
def test_continuous_usage_stats_puts_the_usage_so_far_on_every_chunk(client, path, body):
    body = dict(body, max_tokens=6, ignore_eos=True, n=2, stream=True)
    chunks = events(client.post(path, json=dict(body, stream_options={"include_usage": True,
                                                                      "continuous_usage_stats": True})))
    assert all(chunk["usage"] is not None for chunk in chunks)
    so_far = [chunk["usage"]["completion_tokens"] for chunk in chunks]
    assert so_far == sorted(so_far) and so_far[-1] == 12  # both choices' tokens, growing
    assert so_far[0] == (0 if path == CHAT else 1)  # the role chunk counts none; a completion's first text, one
    texts = [c for c in chunks if c["choices"] and (c["choices"][0].get("text") or
                                                     (c["choices"][0].get("delta") or {}).get("content"))]
    counts = [c["usage"]["completion_tokens"] for c in texts]
    assert counts == sorted(set(counts)) and counts[-1] == 12, counts  # each text chunk adds its tokens
    assert all("token_ids" not in c["choices"][0] for c in texts)  # counted, not shown (return_token_ids not asked)
    prompt = {chunk["usage"]["prompt_tokens"] for chunk in chunks}
    assert len(prompt) == 1 and prompt.pop() > 0
    assert all(c["usage"]["total_tokens"] == c["usage"]["prompt_tokens"] + c["usage"]["completion_tokens"]
               for c in chunks)
    if path == CHAT:
        for chunk in chunks:
            validate(chunk, "CreateChatCompletionStreamResponse")
    # without include_usage it asks for nothing (as vLLM: both are needed); off by default
    for options in ({"continuous_usage_stats": True}, {"include_usage": True}):
        chunks = events(client.post(path, json=dict(body, stream_options=options)))
        assert all(chunk.get("usage") is None for chunk in chunks[:-1])
