"""Ported from vLLM tests/entrypoints/openai/test_root_path.py at commit 113ff7d50f5aa2e6dd8463a3e52c4b15a755f74e
(github.com/vllm-project/vllm), the whole module.
The checks are re-expressed here with the synchronous OpenAI client against this project's demo server started
with an API key (vLLM's VLLM_API_KEY is API_KEY here); each upstream assertion is kept, except these deliberate
differences:

- vLLM's --root-path (its app mounted under /llm as well) has no counterpart here: the two /llm/v1 cases are
  skipped;
- the demo's continuation of the saying is random text: it may run to max_tokens, so finish_reason is "stop" or
  "length" (upstream: "stop") and the answer is asked with ignore_eos so it is not empty.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import openai
import pytest

from serving.web.app import create_app
from serving.web.server import BackgroundServer

API_KEY = "abc-123"
ERROR_API_KEY = "abc"
ROOT_PATH = "llm"
SAYING = "Here is a common saying about apple. An apple a day, keeps"


@pytest.fixture(scope="module")
def server(settings, engine):
    keyed = replace(settings, port=0, api_key=(API_KEY,))
    live = BackgroundServer(create_app(keyed, engine), keyed).start()
    yield live
    live.stop()


@pytest.mark.parametrize("base_url,api_key,expected_error", [
    (["v1"], ERROR_API_KEY, openai.AuthenticationError),
    ([ROOT_PATH, "v1"], ERROR_API_KEY, openai.AuthenticationError),
    (["v1"], API_KEY, None),
    ([ROOT_PATH, "v1"], API_KEY, None)])
def test_chat_session_root_path_with_api_key(server, base_url, api_key, expected_error):
    if base_url[0] == ROOT_PATH:
        pytest.skip("vLLM CLI flag: --root-path has no counterpart in this server")
    context = pytest.raises(expected_error) if expected_error is not None else contextlib.nullcontext()
    with context:
        client = openai.OpenAI(api_key=api_key, base_url=server.base_url + "/" + "/".join(base_url), max_retries=0)
        chat_completion = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "tell me a common saying"},
                                    {"role": "assistant", "content": SAYING}],
            extra_body={"continue_final_message": True, "add_generation_prompt": False, "ignore_eos": True})
        assert chat_completion.id is not None
        assert len(chat_completion.choices) == 1
        choice = chat_completion.choices[0]
        assert choice.finish_reason in ("stop", "length")  # upstream: "stop"
        assert len(choice.message.content) > 0
        assert choice.message.role == "assistant"
