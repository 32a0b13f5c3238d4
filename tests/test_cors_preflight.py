"""CORS preflight and the headers a browser asks for: OpenAI's JavaScript SDK adds its x-stainless-* headers to
every request, so a fixed Allow-Headers list made every browser call from it fail its preflight."""

from __future__ import annotations

from dataclasses import replace

import pytest

from serving.web.app import create_app

ORIGIN = "https://app.example"
# what openai-node sends from a browser besides Authorization and Content-Type
SDK_HEADERS = ("x-stainless-os", "x-stainless-lang", "x-stainless-arch", "x-stainless-runtime",
               "x-stainless-runtime-version", "x-stainless-package-version", "x-stainless-retry-count",
               "x-stainless-timeout")


@pytest.fixture()
def cors_client(settings, engine):
    return create_app(replace(settings, cors_allow_origins=(ORIGIN,), api_key=("k",)), engine).test_client()


def preflight(client, asked, origin=ORIGIN):
    return client.options("/v1/chat/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": asked})


def allowed(response) -> set:
    return {name.strip().lower() for name in response.headers["Access-Control-Allow-Headers"].split(",")}


def test_the_openai_js_sdk_headers_pass_the_preflight_and_the_call_is_answered(cors_client):
    asked = ", ".join(("authorization", "content-type") + SDK_HEADERS)
    response = preflight(cors_client, asked)
    assert response.status_code == 204
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert set(SDK_HEADERS) | {"authorization", "content-type"} <= allowed(response)
    assert "Access-Control-Allow-Credentials" not in response.headers
    assert {"Origin", "Access-Control-Request-Headers"} <= {v.strip() for v in response.headers.get_all("Vary")
                                                             for v in v.split(",")}
    # the call the browser then makes, with those headers, on the real demo engine
    sdk = {name: "x" for name in SDK_HEADERS}
    answer = cors_client.post("/v1/chat/completions", headers={"Origin": ORIGIN, "Authorization": "Bearer k", **sdk},
                              json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert answer.status_code == 200 and answer.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert answer.get_json()["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize("asked", ["x-a; x-b", "x-a,,x-b", "x a", "x-" * 1100])
def test_a_malformed_header_list_gets_the_fixed_list(cors_client, asked):
    response = preflight(cors_client, asked)
    assert response.status_code == 204
    assert allowed(response) == {"authorization", "content-type", "x-request-id"}


def test_another_origin_gets_no_preflight_answer(cors_client):
    response = preflight(cors_client, "authorization, x-stainless-os", origin="https://evil.example")
    assert response.status_code == 401 and "Access-Control-Allow-Headers" not in response.headers
