"""Ported from FastDeploy tests/e2e/test_Qwen2_5_VL_serving.py at commit 09283b779e6fb7de631f59f5fe17f613171e34c0
(github.com/PaddlePaddle/FastDeploy): its chat-completions checks of Qwen2.5-VL, the model this project serves.
FastDeploy's tests/ci_use/Qwen2_5_VL/test_qwen2_5_vl_serving.py (commit 485a41eae634e080b6dafe614fde3ddabc85d984)
makes the same checks (its recorded answer read from a file, its server started with other flags): this file
stands for both.
The checks are re-expressed here against this project's demo server; each upstream assertion is kept, except
these deliberate differences (README, "Differences from the peers' tests"):

- asset URLs: the picture is a generated PNG sent as a data URL (upstream's are on Baidu's hosts);
- the demo model's answers are random text: the check against Qwen2.5-VL-7B's recorded description is skipped;
- return_token_ids answers in vLLM's form (the response's prompt_token_ids, each choice's token_ids; in a stream,
  the first chunk's prompt_token_ids and each chunk's choice token_ids), not FastDeploy's message / delta fields
  prompt_token_ids and completion_token_ids: one form, the one vLLM's clients read;
- FastDeploy's own start-up log (KV-cache block count) is not this server's: that test is skipped.
"""

from __future__ import annotations

import base64
import io

import openai
import pytest
import requests

from peer_server import server  # noqa: F401  (one demo server per module)


def picture_url() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (96, 64), (200, 30, 30)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def describe_picture() -> list:
    return [{"type": "image_url", "image_url": {"url": picture_url(), "detail": "high"}},
            {"type": "text", "text": "\u8bf7\u63cf\u8ff0\u56fe\u7247\u5185\u5bb9"}]  # "describe the picture"


@pytest.fixture(scope="module")
def openai_client(server):
    return openai.Client(base_url=server.base_url + "/v1", api_key="EMPTY_API_KEY", max_retries=0)


def test_consistency_between_runs(server):
    pytest.skip("model meaning: compares with Qwen2.5-VL-7B's recorded description of upstream's picture")


def test_non_streaming_chat(openai_client):
    response = openai_client.chat.completions.create(
        model="default", temperature=1, max_tokens=53, stream=False,
        messages=[{"role": "system", "content": "You are a helpful AI assistant."},
                  {"role": "user", "content": describe_picture()}])
    assert hasattr(response, "choices") and len(response.choices) > 0
    assert hasattr(response.choices[0], "message") and hasattr(response.choices[0].message, "content")


def test_streaming_chat(openai_client):
    response = openai_client.chat.completions.create(
        model="default", temperature=1, max_tokens=24, stream=True,  # upstream: 512 (time: the demo writes them all)
        extra_body={"ignore_eos": True},
        messages=[{"role": "system", "content": "You are a helpful AI assistant."},
                  {"role": "user", "content": "List 3 countries and their capitals."},
                  {"role": "assistant", "content": "China(Beijing), France(Paris), Australia(Canberra)."},
                  {"role": "user", "content": describe_picture()}])
    output = []
    for chunk in response:
        if hasattr(chunk.choices[0], "delta") and hasattr(chunk.choices[0].delta, "content"):
            output.append(chunk.choices[0].delta.content)
    assert len(output) > 2


def _ask(server, stream, return_token_ids):
    body = {"model": "default", "temperature": 1, "max_tokens": 12, "stream": stream,
            "return_token_ids": return_token_ids,
            "messages": [{"role": "system", "content": "You are a helpful AI assistant."},
                         {"role": "user", "content": describe_picture()}]}
    return requests.post(server.base_url + "/v1/chat/completions", json=body, stream=stream, timeout=120)


def test_non_streaming_chat_with_return_token_ids(server):
    body = _ask(server, False, True).json()
    assert len(body["choices"]) > 0 and "message" in body["choices"][0]
    assert isinstance(body["prompt_token_ids"], list)  # FastDeploy: message.prompt_token_ids
    assert isinstance(body["choices"][0]["token_ids"], list)  # FastDeploy: message.completion_token_ids
    body = _ask(server, False, False).json()
    assert len(body["choices"]) > 0 and "message" in body["choices"][0]
    assert body.get("prompt_token_ids") is None and body["choices"][0].get("token_ids") is None


def _chunks(response):
    import json

    for line in response.iter_lines(decode_unicode=True):
        if line and line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


def test_streaming_chat_with_return_token_ids(server):
    is_first_chunk = True
    for chunk in _chunks(_ask(server, True, True)):
        assert len(chunk["choices"]) > 0 and "delta" in chunk["choices"][0]
        if is_first_chunk:  # FastDeploy: delta.prompt_token_ids a list, delta.completion_token_ids None
            is_first_chunk = False
            assert isinstance(chunk["prompt_token_ids"], list)
            assert chunk["choices"][0].get("token_ids") is None
        else:  # FastDeploy: delta.prompt_token_ids None, delta.completion_token_ids a list
            assert chunk.get("prompt_token_ids") is None
            if chunk["choices"][0]["finish_reason"] is None:  # here the finish chunk carries no token
                assert isinstance(chunk["choices"][0]["token_ids"], list)
    for chunk in _chunks(_ask(server, True, False)):
        assert len(chunk["choices"]) > 0 and "delta" in chunk["choices"][0]
        assert chunk.get("prompt_token_ids") is None and chunk["choices"][0].get("token_ids") is None


def test_profile_reset_block_num(server):
    pytest.skip("FastDeploy's own start-up log (its KV-cache block count, ./log/config.log) has no counterpart here")
