"""/openapi.json from the pydantic models, and Schemathesis against a live server: no 5xx, responses
match the spec. Kept small (few examples, max_tokens at most 4) to run in well under two minutes."""

import re

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings as hypothesis_settings
from schemathesis.checks import (content_type_conformance, not_a_server_error, response_headers_conformance,
                                 response_schema_conformance, status_code_conformance)

from serving import protocol
from serving.web.openapi import build_spec

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


def test_spec_comes_from_the_request_models(settings):
    spec = build_spec(settings)
    assert spec["openapi"].startswith("3.1")
    schemas = spec["components"]["schemas"]
    request = protocol.ChatCompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    assert schemas["ChatCompletionRequest"] == {k: v for k, v in request.items() if k != "$defs"}
    for name in ("SystemMessage", "UserMessage", "AssistantMessage", "ToolMessage", "TextPart", "ImageURLPart", "ImagePart", "ChatCompletion", "ChatCompletionChunk",
                 "ErrorResponse", "ModelList", "Health"):
        assert name in schemas
    chat = spec["paths"]["/v1/chat/completions"]["post"]
    assert {"200", "400", "413", "429", "503", "504"} <= set(chat["responses"])
    assert "CompletionRequest" in schemas  # the endpoints added for issue 20 are described too
    for path in ("/v1/completions", "/tokenize", "/detokenize"):
        assert spec["paths"][path]["post"]["requestBody"]["required"] is True, path
    assert "securitySchemes" not in spec["components"]
    keyed = build_spec(settings.__class__(api_key=("k",)))
    assert "bearer" in keyed["components"]["securitySchemes"]
    assert keyed["paths"]["/tokenize"]["post"]["security"] == [{"bearer": []}]


def test_spec_is_served(client):
    spec = client.get("/openapi.json").json
    assert spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]["required"] is True


@pytest.fixture(scope="module")
def fuzz_server(serve_app):
    # short answers and no URL fetching, so each generated request is quick and stays on this machine
    return serve_app(default_max_tokens=2, max_tokens_limit=4, allow_image_urls=False, max_images=2)


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(fuzz_server.base_url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@hypothesis_settings(max_examples=60, deadline=None, derandomize=True,
                     suppress_health_check=list(HealthCheck))
def test_api_conforms(case):
    case.call_and_validate(checks=CHECKS, timeout=60)


def test_server_healthy_after_fuzzing(fuzz_server):
    assert requests.get(fuzz_server.base_url + "/health", timeout=10).json()["status"] == "ok"



def test_fuzzing_reached_the_model(fuzz_server):
    """Runs after the fuzzing: many chat requests were sent, and some were valid enough to generate."""
    text = requests.get(fuzz_server.base_url + "/metrics", timeout=10).text
    counts = {status: float(n) for status, n in re.findall(
        r'qwenvl_requests_total\{endpoint="/v1/chat/completions",status="(\d+)"\} (\S+)', text)}
    assert sum(counts.values()) >= 50 and counts.get("200", 0) >= 1, counts
    assert not any(status.startswith("5") for status in counts), counts
