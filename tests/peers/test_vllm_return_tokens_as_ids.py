"""Ported from vLLM tests/entrypoints/openai/test_return_tokens_as_ids.py at commit
0091c9502ffb9f6761588a21b8d917db8ede4990 (github.com/vllm-project/vllm), the whole module.
The checks are re-expressed here with the synchronous OpenAI client against this project's demo server, with
these deliberate differences:

- the server-flag variant (vLLM's --return-tokens-as-token-ids) has no counterpart here: skipped;
- the request field return_tokens_as_token_ids is refused by name (400 unsupported_parameter, docs/api.md lists
  it): the request variant checks that refusal on both endpoints instead of the "token_id:N" logprob names
  (this server already names a token that is no text, a special token, as token_id:N in /v1/completions).
"""

from __future__ import annotations

import pytest
from openai import BadRequestError, OpenAI

from peer_server import server  # noqa: F401  (one demo server per module)

SERVER_FLAG = "vLLM CLI flag: --return-tokens-as-token-ids has no counterpart in this server"
REFUSED = {"return_tokens_as_token_ids": True}


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(api_key="dummy", base_url=server.base_url + "/v1", max_retries=0)


@pytest.mark.parametrize("use_server_flag", [True, False])
def test_completion_return_tokens_as_token_ids_completion(client, use_server_flag):
    if use_server_flag:
        pytest.skip(SERVER_FLAG)
    with pytest.raises(BadRequestError) as caught:
        client.completions.create(model="demo", prompt="Say 'Hello, world! \U0001f389'", echo=True, temperature=0,
                                  max_tokens=10, logprobs=1, extra_body=REFUSED)
    assert caught.value.body["param"] == "return_tokens_as_token_ids"


@pytest.mark.parametrize("use_server_flag", [True, False])
def test_chat_return_tokens_as_token_ids_completion(client, use_server_flag):
    if use_server_flag:
        pytest.skip(SERVER_FLAG)
    with pytest.raises(BadRequestError) as caught:
        client.chat.completions.create(
            model="demo", temperature=0, max_tokens=8, logprobs=True, extra_body=REFUSED,
            messages=[{"role": "system", "content": "You like to respond in only emojis, like \U0001f389"},
                      {"role": "user", "content": "Please write some emojis: \U0001f431\U0001f436\U0001f389"}])
    assert caught.value.body["param"] == "return_tokens_as_token_ids"
