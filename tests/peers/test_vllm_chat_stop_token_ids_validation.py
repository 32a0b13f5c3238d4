"""Ported from vLLM tests/entrypoints/openai/chat_completion/test_chat_stop_token_ids_validation.py at commit
37fa82dee586a01d953581f8937c528b94a2816d (github.com/vllm-project/vllm), the whole module.
The checks are re-expressed here with the synchronous OpenAI client against this project's demo server; each
upstream assertion is kept.
"""

from __future__ import annotations

import openai
import pytest
from openai import OpenAI

from peer_server import server  # noqa: F401  (one demo server per module)


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(api_key="dummy", base_url=server.base_url + "/v1", max_retries=0)


def test_chat_stop_token_ids_valid(client, engine):
    valid_token_id = engine.vocab_size - 1
    completion = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "Testing valid stop token ids"}], max_tokens=5,
        extra_body={"stop_token_ids": [valid_token_id]})
    assert completion.choices[0].message.content is not None


def test_chat_stop_token_ids_out_of_vocab(client, engine):
    size = engine.vocab_size
    invalid_token_id = size + 1
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Testing stop token ids"}],
                                       max_tokens=5, extra_body={"stop_token_ids": [invalid_token_id]})
    error = excinfo.value
    assert error.status_code == 400
    assert str(invalid_token_id) in str(error)
    assert str(size) in str(error)


def test_chat_stop_token_ids_negative(client):
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Testing stop token ids"}],
                                       max_tokens=5, extra_body={"stop_token_ids": [-1]})
    assert excinfo.value.status_code == 400
