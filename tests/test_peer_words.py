"""The peers' stop-string and bad-word fields (issue 20, found by FastDeploy's and vLLM's tests), on the demo model:
include_stop_str_in_output keeps the stop string in the text; bad_words (vLLM) and bad_words_token_ids
(FastDeploy) keep token sequences out of the answer, masking a sequence's last token when the answer ends with
the rest of it (serving.engines.builtin.row_rules)."""

from __future__ import annotations

import pytest

from serving.engines.builtin.row_rules import MAX_BAD_WORD_TOKENS, bad_word_sequences
from test_openai_schema import events
from test_peer_fields import ask, refused

GREEDY = {"temperature": 0, "repetition_penalty": 1.0, "return_token_ids": True, "max_tokens": 12}


def greedy_answer(client, **body):
    choice = ask(client, **GREEDY, **body)["choices"][0]
    return choice["message"]["content"], choice["token_ids"], choice["finish_reason"]


def contains(ids, seq) -> bool:
    return any(tuple(ids[i:i + len(seq)]) == tuple(seq) for i in range(len(ids) - len(seq) + 1))


# ---------------------------------------------------------------- include_stop_str_in_output

def test_include_stop_str_in_output_keeps_the_stop_string(client):
    text, _, _ = greedy_answer(client)
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop.strip(), text  # (a stop string that is only whitespace would test less)
    at = text.index(stop)
    cut, cut_ids, reason = greedy_answer(client, stop=[stop])
    assert (cut, reason) == (text[:at], "stop")
    kept, kept_ids, reason = greedy_answer(client, stop=[stop], include_stop_str_in_output=True)
    assert (kept, reason) == (text[:at + len(stop)], "stop")
    assert kept_ids == cut_ids  # the same tokens: only the text differs
    assert greedy_answer(client, stop=[stop], include_stop_str_in_output=False)[0] == cut

    streamed = client.post("/v1/chat/completions", json=dict(GREEDY, messages=[{"role": "user", "content": "What is "
                           "the best book?"}], stop=[stop], include_stop_str_in_output=True, stream=True))
    pieces = [c["choices"][0]["delta"].get("content") or "" for c in events(streamed) if c["choices"]]
    assert "".join(pieces) == kept

    prompt = {"prompt": "Hello, how are you?", "temperature": 0, "max_tokens": 12}
    plain = client.post("/v1/completions", json=prompt).get_json()["choices"][0]["text"]
    stop = plain[len(plain) // 2:len(plain) // 2 + 2]
    completion = client.post("/v1/completions", json=dict(prompt, stop=[stop], include_stop_str_in_output=True))
    assert completion.get_json()["choices"][0]["text"] == plain[:plain.index(stop) + len(stop)]


def test_include_stop_str_in_output_keeps_a_stop_tokens_text(client, engine):
    _, ids, _ = greedy_answer(client)
    stopper = next(t for t in ids[1:] if engine.tokenizer.decode([t]).strip())
    at = ids.index(stopper)
    without, _, reason = greedy_answer(client, stop_token_ids=[stopper])
    with_text, stopped_ids, _ = greedy_answer(client, stop_token_ids=[stopper], include_stop_str_in_output=True)
    assert reason == "stop" and stopped_ids == ids[:at + 1]
    assert with_text == engine.tokenizer.decode(ids[:at + 1], skip_special_tokens=True)
    assert with_text.startswith(without) and len(with_text) > len(without)


# ---------------------------------------------------------------- bad_words_token_ids (FastDeploy)

def test_bad_words_token_ids_never_appear(client):
    _, ids, _ = greedy_answer(client)
    banned = ids[3:5]
    first = min(ids.index(t) for t in banned)
    _, answer, _ = greedy_answer(client, bad_words_token_ids=banned)
    assert not set(answer) & set(banned)
    assert answer[:first] == ids[:first]  # the same greedy tokens until a banned one would come
    n_answers = ask(client, **dict(GREEDY, temperature=1.0, top_k=0, top_p=1.0, seed=5), n=2,
                    bad_words_token_ids=banned)["choices"]
    assert all(not set(choice["token_ids"]) & set(banned) for choice in n_answers)


# ---------------------------------------------------------------- bad_words (vLLM)

def test_a_bad_word_loses_its_last_token_where_the_rest_was_written(client, engine):
    """A two-token word found in the greedy answer: the answer with it banned keeps every token up to the word's
    first one and then differs, and contains none of the word's token sequences."""
    _, ids, _ = greedy_answer(client)
    for i in range(len(ids) - 1):
        word = engine.tokenizer.decode(ids[i:i + 2])
        sequences = bad_word_sequences(engine.encode, [word], [])
        if "\ufffd" not in word and word.strip() and tuple(ids[i:i + 2]) in sequences:
            break
    else:
        pytest.fail(f"no two-token word in {ids} that tokenizes back to itself")
    _, answer, _ = greedy_answer(client, bad_words=[word])
    assert answer[:i + 1] == ids[:i + 1]  # its first token is written: only the ending token is masked
    assert answer[i + 1] != ids[i + 1]
    assert not any(contains(answer, seq) for seq in sequences)


def test_a_one_token_bad_word_is_banned_everywhere(client, engine):
    _, ids, _ = greedy_answer(client)
    token = next(t for t in ids if len(bad_word_sequences(engine.encode, [engine.tokenizer.decode([t])], [])[0]) == 1
                 and engine.tokenizer.decode([t]).strip())
    word = engine.tokenizer.decode([token])
    _, answer, _ = greedy_answer(client, bad_words=[word])
    assert not any(contains(answer, seq) for seq in bad_word_sequences(engine.encode, [word], []))
    text = client.post("/v1/completions", json={"prompt": "Hello", "temperature": 0, "max_tokens": 12,
                                                "bad_words": [word], "return_token_ids": True}).get_json()
    assert token not in text["choices"][0]["token_ids"]


def test_bad_word_mistakes_are_400s_naming_the_field(client, engine):
    size = engine.vocab_size  # the ids the model can write (more than the tokenizer names)
    assert f"token id {size}" in refused(client, "bad_words_token_ids", bad_words_token_ids=[1, size])
    refused(client, "bad_words_token_ids[0]", bad_words_token_ids=[-1])
    refused(client, "bad_words[0]", bad_words=[""])
    refused(client, "bad_words", bad_words=["x"] * 65)
    refused(client, "bad_words_token_ids", bad_words_token_ids=[1] * 1025)
    assert f"1 to {MAX_BAD_WORD_TOKENS} tokens" in refused(client, "bad_words", bad_words=["a b c d e " * 20])
    refused(client, "include_stop_str_in_output", include_stop_str_in_output="yes please")
    ask(client, max_tokens=2, bad_words=[], bad_words_token_ids=[], include_stop_str_in_output=False)  # neutral


def test_an_engine_without_the_rules_refuses_them(settings):
    from fake_engine import FakeEngine
    from serving.web.app import create_app

    fake = create_app(settings, FakeEngine()).test_client()
    for field, value in (("bad_words", ["a"]), ("bad_words_token_ids", [1]), ("include_stop_str_in_output", True)):
        refused(fake, field, "unsupported_parameter", **{field: value})
