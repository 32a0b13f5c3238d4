"""Ported from vLLM tests/entrypoints/openai/basic/test_chat_logit_bias_validation.py at commit
0ccf651ac3f16f87c51197d5aaf06ee6b94d9d37 (github.com/vllm-project/vllm), the whole module.
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


def vocab_size(engine) -> int:
    return engine.vocab_size  # the model's (config vocab_size), as vLLM checks


def test_chat_logit_bias_valid(client, engine):
    valid_token_id = vocab_size(engine) - 1
    completion = client.chat.completions.create(model="demo", max_tokens=5, logit_bias={str(valid_token_id): 1.0},
                                                messages=[{"role": "user", "content": "Testing valid logit bias"}])
    assert completion.choices[0].message.content is not None


def test_chat_logit_bias_invalid(client, engine):
    size = vocab_size(engine)
    invalid_token_id = size + 1
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.chat.completions.create(model="demo", max_tokens=5, logit_bias={str(invalid_token_id): 1.0},
                                       messages=[{"role": "user", "content": "Testing invalid logit bias"}])
    error = excinfo.value
    error_message = str(error)
    assert error.status_code == 400
    assert str(invalid_token_id) in error_message
    assert str(size) in error_message
