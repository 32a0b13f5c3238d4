"""Ported from FastDeploy tests/e2e/test_EB_Lite_serving.py at commit 02db6694cdd64b19533acdef7d99e9b3ff77bafe
(github.com/PaddlePaddle/FastDeploy), the whole module: its chat and completion protocol checks. The checks are
re-expressed here against this project's demo server; each upstream assertion is kept, except these deliberate
differences (docs/api.md, "The peers' tests, ported"):

- answers are short (max_tokens 8 where upstream asks 1024: the demo writes every token) and, where upstream
  expects finish_reason "length", ignore_eos keeps the demo's random text from ending first;
- FastDeploy's prompt_token_ids field is not served (refused by name): the chat tests with messages=[] and that
  field are skipped, those with n send the same 9 token ids as a /v1/completions prompt, and the completion
  tests keep their token-id-prompt cases (their cases through the field and with batches of prompts are
  dropped: one prompt per request); the ids are the demo vocabulary's (ERNIE's are not);
- include_stop_str_in_output: upstream reads ERNIE's end text "</s>"; the end of turn here is a special token
  with no text, so those requests send a stop string (taken from the same request's answer) and the checks read
  it; the whole streamed text is checked as well as the last piece;
- disable_chat_template: the hand-written template is Qwen2.5-VL's (upstream: ERNIE's);
- bad words: the words and ids are the answer's first four tokens from the seventh on that decode to whole
  characters alone (upstream: tokens 6-9, decoded with ERNIE's tokenizer; the demo's byte-level tokens of half a
  character decode to U+FFFD, another token); each token's text comes from /detokenize;
- return_token_ids answers in vLLM's form (see test_fastdeploy_qwen2_5_vl_serving.py): the response's
  prompt_token_ids and each choice's token_ids (FastDeploy: message / delta / choice prompt_token_ids and
  completion_token_ids);
- min_tokens 24 of 34 (upstream: 1000 of 1010: the demo writes every token);
- FastDeploy's own start-up log (test_profile_reset_block_num) has no counterpart: skipped.
"""

from __future__ import annotations

import openai
import pytest
import requests

from peer_server import server  # noqa: F401  (one demo server per module)

CAPITALS = [{"role": "system", "content": "You are a helpful AI assistant."},
            {"role": "user", "content": "List 3 countries and their capitals."}]
SHORT = 8  # upstream: 1024


@pytest.fixture(scope="module")
def openai_client(server):
    return openai.Client(base_url=server.base_url + "/v1", api_key="EMPTY_API_KEY", max_retries=0)


@pytest.fixture(scope="module")
def nine_token_ids(server):
    ids = requests.post(server.base_url + "/tokenize", json={"content": "Hello, how are you today, my friend?"},
                        timeout=10).json()["tokens"][:9]
    assert len(ids) == 9
    return ids


def edit_distance_rate(text1: str, text2: str) -> float:
    """The Levenshtein distance of two texts over the longer one's length (0: equal)."""
    if text1 == text2:
        return 0.0
    previous = list(range(len(text2) + 1))
    for i, a in enumerate(text1, 1):
        current = [i]
        for j, b in enumerate(text2, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (a != b)))
        previous = current
    return previous[-1] / max(len(text1), len(text2))


def test_consistency_between_runs(server):
    payload = {"messages": [{"role": "user", "content": "\u7528\u4e00\u53e5\u8bdd\u4ecb\u7ecd PaddlePaddle"}],
               "temperature": 0.9, "top_p": 0, "seed": 13, "max_tokens": 16}
    contents = []
    for _ in range(2):
        resp = requests.post(server.base_url + "/v1/chat/completions", json=payload, timeout=60)
        assert resp.status_code == 200
        contents.append(resp.json()["choices"][0]["message"]["content"])
    assert edit_distance_rate(*contents) < 0.05


def test_non_streaming_chat(openai_client):
    response = openai_client.chat.completions.create(model="default", messages=CAPITALS, temperature=1,
                                                     max_tokens=SHORT, stream=False)
    assert hasattr(response, "choices") and len(response.choices) > 0
    assert hasattr(response.choices[0], "message") and hasattr(response.choices[0].message, "content")


def test_non_streaming_chat_finish_reason(openai_client):
    for limit in ({"max_tokens": 5}, {"max_completion_tokens": 5}):
        for n in (1, 2):
            response = openai_client.chat.completions.create(model="default", messages=CAPITALS, temperature=1,
                                                             stream=False, n=n, extra_body={"ignore_eos": True},
                                                             **limit)
            assert len(response.choices) == n
            for choice in response.choices:
                assert choice.finish_reason == "length"


def test_streaming_chat(openai_client):
    response = openai_client.chat.completions.create(
        model="default", temperature=1, max_tokens=SHORT, stream=True, extra_body={"ignore_eos": True},
        messages=CAPITALS + [{"role": "assistant", "content": "China(Beijing), France(Paris), Australia(Canberra)."},
                             {"role": "user", "content": "OK, tell more."}])
    output = [chunk.choices[0].delta.content for chunk in response
              if hasattr(chunk.choices[0], "delta") and hasattr(chunk.choices[0].delta, "content")]
    assert len(output) > 2


def test_non_streaming(openai_client):
    response = openai_client.completions.create(model="default", prompt="Hello, how are you?", temperature=1,
                                                max_tokens=SHORT, stream=False)
    assert hasattr(response, "choices") and len(response.choices) > 0


def test_streaming(openai_client):
    output = [chunk.choices[0].text for chunk in openai_client.completions.create(
        model="default", prompt="Hello, how are you?", temperature=1, max_tokens=SHORT, stream=True)]
    assert len(output) > 0


def test_non_streaming_chat_with_n(openai_client, nine_token_ids):
    # upstream: chat with messages=[] and FastDeploy's prompt_token_ids; here the ids are a completion's prompt
    response = openai_client.completions.create(model="default", prompt=nine_token_ids, temperature=1, max_tokens=5,
                                                stream=False, n=2)
    assert len(response.choices) == 2
    assert response.usage.prompt_tokens == 9


def test_streaming_chat_with_n(openai_client, nine_token_ids):
    count = [0, 0]
    for chunk in openai_client.completions.create(model="default", prompt=nine_token_ids, temperature=1, max_tokens=5,
                                                  stream=True, stream_options={"include_usage": True}, n=2):
        assert hasattr(chunk, "choices") and hasattr(chunk, "usage")
        if len(chunk.choices) > 0:
            assert chunk.usage is None
            count[chunk.choices[0].index] = 1
        else:
            assert chunk.usage.prompt_tokens == 9
    assert sum(count) == 2


def test_completions_non_streaming_with_n(openai_client):
    response = openai_client.completions.create(model="default", prompt="Hello, how are you?", temperature=1,
                                                max_tokens=SHORT, stream=False, n=2)
    assert len(response.choices) == 2
    assert all(isinstance(choice.text, str) for choice in response.choices)


def test_completions_streaming_with_n(openai_client):
    output_chunks, count = [], [0, 0]
    for chunk in openai_client.completions.create(model="default", prompt="Hello, how are you?", temperature=1,
                                                  max_tokens=SHORT, stream=True, n=2):
        assert len(chunk.choices) > 0
        count[chunk.choices[0].index] = 1
        output_chunks.append(chunk.choices[0].text)
    assert len(output_chunks) > 0 and sum(count) == 2


def test_non_streaming_with_stop_str(openai_client):
    pytest.skip("skipped upstream too: 'Temporarily skip this case due to unstable execution'")


def _last_texts(chunks, field):
    """Every chunk's text (delta content or completion text), and the last one that is not empty."""
    texts = [(c.choices[0].delta.content if field == "content" else c.choices[0].text) or "" for c in chunks]
    return "".join(texts), next((t for t in reversed(texts) if t), "")


def test_streaming_with_stop_str(openai_client):
    # upstream reads ERNIE's end text "</s>"; the end of turn here is a special token with no text, so each request
    # sends a stop string taken from the same request's answer, and the checks read that string instead
    chat = dict(model="default", messages=[{"role": "user", "content": "Hello, how are you?"}], temperature=1,
                max_tokens=5, seed=7)
    answer = openai_client.chat.completions.create(**chat, extra_body={"ignore_eos": True}).choices[0].message.content
    stop = answer.strip()[-2:]
    text, last_token = _last_texts(openai_client.chat.completions.create(
        **chat, stop=[stop], extra_body={"min_tokens": 1, "include_stop_str_in_output": True, "ignore_eos": True},
        stream=True), "content")
    assert last_token and last_token.endswith(stop) and text.endswith(stop)
    text, last_token = _last_texts(openai_client.chat.completions.create(
        **chat, stop=[stop], extra_body={"include_stop_str_in_output": False, "ignore_eos": True}, stream=True),
        "content")
    assert last_token != stop and not text.endswith(stop)

    completion = dict(model="default", prompt="Hello, how are you?", max_tokens=10, seed=7)
    plain = openai_client.completions.create(**completion, extra_body={"ignore_eos": True}).choices[0].text
    stop = plain.strip()[-2:]
    text, last_token = _last_texts(openai_client.completions.create(**completion, stop=[stop], stream=True), "text")
    assert not last_token.endswith(stop) and not text.endswith(stop)
    text, last_token = _last_texts(openai_client.completions.create(
        **completion, stop=[stop], extra_body={"include_stop_str_in_output": True}, stream=True), "text")
    assert last_token.endswith(stop) and text.endswith(stop)


def test_non_streaming_chat_with_return_token_ids(server):
    # FastDeploy answers in message.prompt_token_ids / completion_token_ids; here vLLM's form (see the Qwen2.5-VL port)
    body = {"model": "default", "messages": [{"role": "user", "content": "Hello, how are you?"}], "temperature": 1,
            "max_tokens": 5}
    answer = requests.post(server.base_url + "/v1/chat/completions", json=dict(body, return_token_ids=True),
                           timeout=60).json()
    assert len(answer["choices"]) > 0 and "message" in answer["choices"][0]
    assert isinstance(answer["prompt_token_ids"], list) and isinstance(answer["choices"][0]["token_ids"], list)
    answer = requests.post(server.base_url + "/v1/chat/completions", json=dict(body, return_token_ids=False),
                           timeout=60).json()
    assert answer.get("prompt_token_ids") is None and answer["choices"][0].get("token_ids") is None


def _chunks(response):
    import json

    for line in response.iter_lines(decode_unicode=True):
        if line and line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


def test_streaming_chat_with_return_token_ids(server):
    body = {"model": "default", "messages": [{"role": "user", "content": "Hello, how are you?"}], "temperature": 1,
            "max_tokens": 5, "stream": True}
    is_first_chunk = True
    for chunk in _chunks(requests.post(server.base_url + "/v1/chat/completions", json=dict(body, return_token_ids=True),
                                       stream=True, timeout=60)):
        assert len(chunk["choices"]) > 0 and "delta" in chunk["choices"][0]
        if is_first_chunk:  # FastDeploy: delta.prompt_token_ids a list, delta.completion_token_ids None
            is_first_chunk = False
            assert isinstance(chunk["prompt_token_ids"], list) and chunk["choices"][0].get("token_ids") is None
        else:
            assert chunk.get("prompt_token_ids") is None
            if chunk["choices"][0]["finish_reason"] is None:  # here the finish chunk carries no token
                assert isinstance(chunk["choices"][0]["token_ids"], list)
    for chunk in _chunks(requests.post(server.base_url + "/v1/chat/completions", json=dict(body, return_token_ids=False),
                                       stream=True, timeout=60)):
        assert len(chunk["choices"]) > 0
        assert chunk.get("prompt_token_ids") is None and chunk["choices"][0].get("token_ids") is None


def test_non_streaming_completion_with_return_token_ids(openai_client):
    response = openai_client.completions.create(model="default", prompt="Hello, how are you?", temperature=1,
                                                max_tokens=5, extra_body={"return_token_ids": True}, stream=False)
    assert len(response.choices) > 0
    assert isinstance(response.choices[0].prompt_token_ids, list)
    assert isinstance(response.choices[0].token_ids, list)  # FastDeploy: completion_token_ids
    response = openai_client.completions.create(model="default", prompt="Hello, how are you?", temperature=1,
                                                max_tokens=5, extra_body={"return_token_ids": False}, stream=False)
    assert getattr(response.choices[0], "prompt_token_ids", None) is None
    assert getattr(response.choices[0], "token_ids", None) is None


def test_streaming_completion_with_return_token_ids(openai_client):
    is_first_chunk = True
    for chunk in openai_client.completions.create(model="default", prompt="Hello, how are you?", temperature=1,
                                                  max_tokens=5, extra_body={"return_token_ids": True}, stream=True):
        assert len(chunk.choices) > 0
        if is_first_chunk:
            is_first_chunk = False
            assert isinstance(chunk.choices[0].prompt_token_ids, list)
            # FastDeploy: completion_token_ids None on the first chunk; here the first chunk has a token already
        else:
            assert chunk.choices[0].prompt_token_ids is None
            if chunk.choices[0].finish_reason is None:
                assert isinstance(chunk.choices[0].token_ids, list)
    for chunk in openai_client.completions.create(model="default", prompt="Hello, how are you?", temperature=1,
                                                  max_tokens=5, extra_body={"return_token_ids": False}, stream=True):
        assert getattr(chunk.choices[0], "prompt_token_ids", None) is None
        assert getattr(chunk.choices[0], "token_ids", None) is None


@pytest.mark.parametrize("name", ["test_non_streaming_chat_with_prompt_token_ids",
                                  "test_streaming_chat_with_prompt_token_ids"])
def test_chat_with_prompt_token_ids(openai_client, name):
    pytest.skip("declined: a chat request's prompt is its messages (OpenAI: at least one); FastDeploy's "
                "prompt_token_ids is refused by name there, and a prompt of token ids is /v1/completions' prompt")


def test_non_streaming_completion_with_prompt_token_ids(openai_client, nine_token_ids):
    # upstream's cases through FastDeploy's prompt_token_ids field and its batches of prompts are declined (one
    # prompt per request, as OpenAI's token-id prompt); the token-id prompt itself is served
    response = openai_client.completions.create(model="default", prompt=nine_token_ids, temperature=1, max_tokens=5,
                                                stream=False)
    assert len(response.choices) == 1
    assert response.usage.prompt_tokens == 9


def test_streaming_completion_with_prompt_token_ids(openai_client, nine_token_ids):
    sum_prompt_tokens = 0
    for chunk in openai_client.completions.create(model="default", prompt=nine_token_ids, temperature=1,
                                                  max_tokens=5, stream=True, stream_options={"include_usage": True}):
        if len(chunk.choices) > 0:
            assert chunk.usage is None
        else:
            sum_prompt_tokens += chunk.usage.prompt_tokens
    assert sum_prompt_tokens == 9


def test_non_streaming_chat_completion_disable_chat_template(openai_client):
    enabled_response = openai_client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Hello, how are you?"}], max_tokens=10, temperature=0.0,
        top_p=0, extra_body={"disable_chat_template": False}, stream=False)
    assert hasattr(enabled_response, "choices") and len(enabled_response.choices) > 0
    # upstream writes ERNIE's template by hand; here Qwen2.5-VL's (the demo checkpoint's)
    prompt = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
              "<|im_start|>user\nHello, how are you?<|im_end|>\n<|im_start|>assistant\n")
    disabled_response = openai_client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": prompt}], max_tokens=10, temperature=0, top_p=0,
        extra_body={"disable_chat_template": True}, stream=False)
    assert hasattr(disabled_response, "choices") and len(disabled_response.choices) > 0
    assert enabled_response.choices[0].message.content == disabled_response.choices[0].message.content


def test_non_streaming_chat_with_min_tokens(openai_client):
    min_tokens = 24  # upstream: 1000 of 1010 (the demo writes every token)
    response = openai_client.chat.completions.create(model="default", temperature=1, max_tokens=min_tokens + 10,
                                                     messages=[{"role": "user", "content": "Hello, how are you?"}],
                                                     extra_body={"min_tokens": min_tokens}, stream=False)
    assert response.usage.completion_tokens >= min_tokens


def test_non_streaming_min_max_token_equals_one(openai_client):
    response = openai_client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hello"}],
                                                     max_tokens=1, temperature=0.0, stream=False)
    assert len(response.choices) > 0 and hasattr(response.choices[0].message, "content")
    assert response.usage.completion_tokens == 1


def _detokenized(server, ids):
    """Each token's text, as the server's tokenizer decodes it alone (upstream: ERNIE's tokenizer, in the test)."""
    texts = []
    for i in ids:  # the demo's logits are wider than its vocabulary: an id past it has no text (400)
        answer = requests.post(server.base_url + "/detokenize", json={"tokens": [i]}, timeout=10)
        texts.append(answer.json()["content"] if answer.status_code == 200 else "")
    return texts


def _bad_words_of(tokens, ids):
    """(bad words, their ids): upstream's tokens 6 to 9 of the answer; here the first four from the seventh on
    that decode to whole characters alone (the demo's byte-level tokens of half a character decode to U+FFFD,
    a word that is another token)."""
    whole = [(t, i) for t, i in zip(tokens[6:], ids[6:]) if t.strip() and "\ufffd" not in t][:4]
    assert len(whole) == 4, tokens
    return [t for t, _ in whole], [i for _, i in whole]


ASK_HELLO = [{"role": "user", "content": "Hello, how are you?"}]
NEAR_GREEDY = {"temperature": 1, "max_tokens": 20}  # upstream also sends top_p 0.0: the same here (greedy)


def _chat_ids(server, stream, **extra):
    """(delta texts, token ids) of a chat answer read through vLLM's return_token_ids form (FastDeploy:
    message.completion_token_ids, delta.completion_token_ids), streamed or whole."""
    body = dict(NEAR_GREEDY, model="default", messages=ASK_HELLO, top_p=0.0, return_token_ids=True, stream=stream,
                **extra)
    return _ids_of(server, "/v1/chat/completions", body, stream, "content")


def _completion_ids(server, stream, **extra):
    body = dict(NEAR_GREEDY, model="default", prompt="Hello, how are you?", top_p=0.0, return_token_ids=True,
                stream=stream, **extra)
    return _ids_of(server, "/v1/completions", body, stream, "text")


def _ids_of(server, path, body, stream, field):
    response = requests.post(server.base_url + path, json=body, stream=stream, timeout=120)
    assert response.status_code == 200, response.text
    if not stream:
        choice = response.json()["choices"][0]
        assert isinstance(choice["token_ids"], list)
        return None, choice["token_ids"]
    texts, ids, is_first_chunk = [], [], True
    for chunk in _chunks(response):
        assert len(chunk["choices"]) > 0
        choice = chunk["choices"][0]
        text = choice["delta"].get("content") if field == "content" else choice.get("text")
        if is_first_chunk and field == "content":  # FastDeploy's first chunk carries no token; here neither
            is_first_chunk = False
            continue
        if choice["finish_reason"] is None:  # here the finish chunk carries no token
            assert isinstance(choice["token_ids"], list)
            texts.append(text or "")
            ids.extend(choice["token_ids"])
    return texts, ids


def test_non_streaming_chat_with_bad_words(server):
    _, output_ids_0 = _chat_ids(server, False)
    bad_tokens, bad_token_ids = _bad_words_of(_detokenized(server, output_ids_0), output_ids_0)
    _, ids_1 = _chat_ids(server, False, bad_words=bad_tokens)
    _, ids_2 = _chat_ids(server, False, bad_words_token_ids=bad_token_ids)
    assert not any(ids in ids_1 for ids in bad_token_ids)
    assert not any(ids in ids_2 for ids in bad_token_ids)


def test_streaming_chat_with_bad_words(server):
    _, output_ids_0 = _chat_ids(server, True)
    # upstream takes the chunks' texts as the words; here the tokens' own texts (a chunk may hold several tokens)
    bad_tokens, bad_token_ids = _bad_words_of(_detokenized(server, output_ids_0), output_ids_0)
    _, output_ids_1 = _chat_ids(server, True, bad_words=bad_tokens)
    _, output_ids_2 = _chat_ids(server, True, bad_words_token_ids=bad_token_ids)
    assert not any(ids in output_ids_1 for ids in bad_token_ids)
    assert not any(ids in output_ids_2 for ids in bad_token_ids)


def test_non_streaming_completion_with_bad_words(server):
    _, output_ids_0 = _completion_ids(server, False)
    bad_tokens, bad_token_ids = _bad_words_of(_detokenized(server, output_ids_0), output_ids_0)
    _, ids_1 = _completion_ids(server, False, bad_words=bad_tokens)
    _, ids_2 = _completion_ids(server, False, bad_words_token_ids=bad_token_ids)
    assert not any(ids in ids_1 for ids in bad_token_ids)
    assert not any(ids in ids_2 for ids in bad_token_ids)


def test_streaming_completion_with_bad_words(server):
    _, output_ids_0 = _completion_ids(server, True)
    bad_tokens, bad_token_ids = _bad_words_of(_detokenized(server, output_ids_0), output_ids_0)
    _, output_ids_1 = _completion_ids(server, True, bad_words=bad_tokens)
    _, output_ids_2 = _completion_ids(server, True, bad_words_token_ids=bad_token_ids)
    assert not any(ids in output_ids_1 for ids in bad_token_ids)
    assert not any(ids in output_ids_2 for ids in bad_token_ids)


def test_streaming_chat_finish_reason(openai_client):
    for limit in ({"max_tokens": 5}, {"max_completion_tokens": 5}):
        last_token = None
        for chunk in openai_client.chat.completions.create(model="default", messages=CAPITALS, temperature=1,
                                                           stream=True, extra_body={"ignore_eos": True}, **limit):
            last_token = chunk.choices[0].finish_reason
        assert last_token == "length"
    for limit in ({"max_completion_tokens": 5}, {"max_tokens": 5}):
        finish_reason_1 = finish_reason_2 = ""
        for chunk in openai_client.chat.completions.create(model="default", messages=CAPITALS, temperature=1,
                                                           stream=True, n=2, extra_body={"ignore_eos": True},
                                                           **limit):
            last_token = chunk.choices[0].finish_reason
            if last_token:
                if chunk.choices[0].index == 0:
                    finish_reason_1 = last_token
                else:
                    finish_reason_2 = last_token
        assert finish_reason_1 == "length"
        assert finish_reason_2 == "length"


def test_profile_reset_block_num(server):
    pytest.skip("FastDeploy's own start-up log (its KV-cache block count, ./log/config.log) has no counterpart here")
