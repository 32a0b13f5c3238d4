"""Ported from FastDeploy tests/e2e/test_api_key.py at commit 13ba41f9a1fce8434d08709a408644d6f0256da6
(github.com/PaddlePaddle/FastDeploy): API keys from the command line and the environment. The checks are
re-expressed here against this project's demo server (each test starts its own server, from its own flags and
environment, on the session's demo engine); each upstream assertion is kept, except these deliberate differences
(docs/api.md, "The peers' tests, ported"):

- the keys: this server's --api-key / API_KEY take one comma-separated list (FastDeploy: --api-key repeated, and
  FD_API_KEY comma-separated); the flag wins over the variable, as in FastDeploy;
- the 401 body is OpenAI's error object ({"error": {"message", "type", "param", "code"}}); FastDeploy's "error" is
  a string holding "unauthorized": here the error's code names the cause (missing_api_key, invalid_api_key);
- max_tokens 8 (upstream: 100; the demo writes every token).
"""

from __future__ import annotations

from typing import Optional

import pytest
import requests

from serving.config import load_settings
from serving.web.app import create_app
from serving.web.server import BackgroundServer

PAYLOAD = {"messages": [{"role": "user", "content": "hello"}], "temperature": 0.9, "max_tokens": 8}


@pytest.fixture
def start_api_server(engine):
    """start(api_key_cli, api_key_env) -> the chat URL of a server whose settings come from those flags and that
    environment (load_settings, as `python api.py` reads them); stopped after the test."""
    started = []

    def start(api_key_cli: Optional[list] = None, api_key_env: Optional[str] = None) -> str:
        argv = ["--model", "demo", "--host", "127.0.0.1", "--port", "0"]
        if api_key_cli is not None:
            argv += ["--api-key", ",".join(api_key_cli)]
        environ = {} if api_key_env is None else {"API_KEY": api_key_env}
        live = BackgroundServer(create_app(load_settings(argv, environ), engine), load_settings(argv, environ))
        started.append(live.start())
        return live.base_url + "/v1/chat/completions"

    yield start
    for live in started:
        live.stop()


def bearer(key: str) -> dict:
    return {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}


COMMON = {"Content-Type": "application/json"}


def test_api_key_cli_only(start_api_server):
    test_api_key = ["cli_test_key_123", "cli_test_key_456"]
    api_url = start_api_server(api_key_cli=test_api_key)
    response = requests.post(api_url, json=PAYLOAD, headers=COMMON, timeout=60)
    assert response.status_code == 401
    assert "error" in response.json()
    assert response.json()["error"]["code"] == "missing_api_key"  # FastDeploy: "unauthorized" in its error string
    response = requests.post(api_url, json=PAYLOAD, headers=bearer("wrong_key"), timeout=60)
    assert response.status_code == 401
    assert requests.post(api_url, json=PAYLOAD, headers=bearer(test_api_key[0]), timeout=60).status_code == 200
    assert requests.post(api_url, json=PAYLOAD, headers=bearer(test_api_key[1]), timeout=60).status_code == 200


def test_api_key_env_only(start_api_server):
    api_url = start_api_server(api_key_env="env_test_key_456,env_test_key_789")
    assert requests.post(api_url, json=PAYLOAD, headers=COMMON, timeout=60).status_code == 401
    assert requests.post(api_url, json=PAYLOAD, headers=bearer("env_test_key_456"), timeout=60).status_code == 200
    assert requests.post(api_url, json=PAYLOAD, headers=bearer("env_test_key_789"), timeout=60).status_code == 200


def test_api_key_cli_priority_over_env(start_api_server):
    cli_key, env_key = ["cli_priority_key_789"], "env_low_priority_key_000"
    api_url = start_api_server(api_key_cli=cli_key, api_key_env=env_key)
    assert requests.post(api_url, json=PAYLOAD, headers=bearer(env_key), timeout=60).status_code == 401
    assert requests.post(api_url, json=PAYLOAD, headers=bearer(cli_key[0]), timeout=60).status_code == 200


def test_api_key_not_set(start_api_server):
    api_url = start_api_server(api_key_cli=None, api_key_env=None)
    assert requests.post(api_url, json=PAYLOAD, headers=COMMON, timeout=60).status_code == 200
    assert requests.post(api_url, json=PAYLOAD, headers=bearer("some_api_key"), timeout=60).status_code == 200
