"""Ported from FastDeploy tests/e2e/test_EB_Lite_serving.py at commit 02db6694cdd64b19533acdef7d99e9b3ff77bafe
(github.com/PaddlePaddle/FastDeploy), its first part: the chat and completion protocol checks up to
test_non_streaming_chat_with_bad_words (the rest of the module is further work). The checks are re-expressed here
against this project's demo server; each upstream assertion is kept, except these deliberate differences
(README, "Differences from the peers' tests"):

- answers are short (max_tokens 8 where upstream asks 1024: the demo writes every token) and, where upstream
  expects finish_reason "length", ignore_eos keeps the demo's random text from ending first;
- FastDeploy's prompt_token_ids in place of messages (chat with messages=[]) is not served: those n tests send
  the same 9 token ids as a /v1/completions prompt, and the ids are the demo vocabulary's (ERNIE's are not);
- include_stop_str_in_output, bad_words, disable_chat_template and prompt_token_ids are refused by name (400)
  here, so their tests are skipped (they also read ERNIE's "</s>", tokenizer or template);
- return_token_ids answers in vLLM's form (see test_fastdeploy_qwen2_5_vl_serving.py): on a completion, each
  choice's prompt_token_ids and token_ids (FastDeploy: completion_token_ids);
- min_tokens 24 of 34 (upstream: 1000 of 1010: the demo writes every token).
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


def test_streaming_with_stop_str(openai_client):
    pytest.skip("declined: include_stop_str_in_output is refused by name here (400), and the test reads ERNIE's "
                "end text '</s>'")


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
                                  "test_streaming_chat_with_prompt_token_ids",
                                  "test_non_streaming_completion_with_prompt_token_ids",
                                  "test_streaming_completion_with_prompt_token_ids"])
def test_prompt_token_ids(openai_client, name):
    pytest.skip("declined: FastDeploy's prompt_token_ids field (refused by name) and batches of prompts (one prompt "
                "per request); a prompt of token ids is /v1/completions' prompt (see test_non_streaming_chat_with_n)")


def test_non_streaming_chat_completion_disable_chat_template(openai_client):
    pytest.skip("declined: disable_chat_template (refused by name); the test also writes ERNIE's template by hand")


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


def test_non_streaming_chat_with_bad_words(openai_client):
    pytest.skip("declined: bad_words (refused by name); the test also decodes with ERNIE's tokenizer")
