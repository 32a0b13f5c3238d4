"""Ported from vLLM tests/entrypoints/openai/test_models.py at commit 0091c9502ffb9f6761588a21b8d917db8ede4990
(github.com/vllm-project/vllm), the whole module.
The check is re-expressed here with the synchronous OpenAI client against this project's demo server; each
upstream assertion is kept, except these deliberate differences:

- the served model is the demo (id and root "demo"; root is never a folder path here, docs/api.md /v1/models);
- no LoRA adapters (vLLM's --enable-lora / --lora-modules): the assertions on the adapter's entry are skipped.
"""

from __future__ import annotations

import pytest
from openai import OpenAI

from peer_server import server  # noqa: F401  (one demo server per module)


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(api_key="dummy", base_url=server.base_url + "/v1", max_retries=0)


def test_check_models(client):
    models = client.models.list().data
    served_model = models[0]
    assert served_model.id == "demo"
    assert served_model.root == "demo"
    assert models[1:] == []  # the LoRA adapters' entries: none here


def test_check_models_lora(client):
    pytest.skip("vLLM CLI flag: LoRA adapters (--enable-lora, --lora-modules) are not served by this server")
