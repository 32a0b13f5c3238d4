"""/metrics: Prometheus text with requests, latency, time to first token, tokens, queue, images, rejections."""

import json

import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import b64, png_bytes
from serving.web.metrics import ENGINE_COUNTERS, ENGINE_GAUGES

CHAT = "/v1/chat/completions"


def samples(text):
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(found, name, **labels):
    return found.get((name, tuple(sorted(labels.items()))), 0)


def test_metrics_count_what_happened(serve_app, engine):
    server = serve_app()
    url = server.base_url
    image = b64(png_bytes())
    usage = 0
    r = requests.post(url + CHAT, json={"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4,
                                        "temperature": 0}, timeout=60)
    usage += r.json()["usage"]["completion_tokens"]
    r = requests.post(url + CHAT, json={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image}}, {"type": "text", "text": "?"}]}],
        "max_tokens": 4, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}, timeout=60)
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    usage += events[-1]["usage"]["completion_tokens"]
    r = requests.post(url + CHAT, json={"messages": [{"role": "user", "content": [{"type": "image", "image": image}]}],
                                        "max_tokens": 4, "temperature": 0}, timeout=60)
    usage += r.json()["usage"]["completion_tokens"]
    bad = requests.post(url + CHAT, json={"messages": [{"role": "user", "content": [{"type": "image", "image": "%"}]}]})
    assert bad.status_code == 400
    requests.get(url + "/health", timeout=10)

    response = requests.get(url + "/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/plain")
    found = samples(response.text)
    assert value(found, "qwenvl_requests_total", endpoint=CHAT, status="200") == 3
    assert value(found, "qwenvl_requests_total", endpoint=CHAT, status="400") == 1
    assert value(found, "qwenvl_requests_total", endpoint="/health", status="200") >= 1
    assert value(found, "qwenvl_request_duration_seconds_count", endpoint=CHAT) == 4
    assert 1 <= value(found, "qwenvl_time_to_first_token_seconds_count") <= 3
    assert value(found, "qwenvl_generated_tokens_total") == usage > 0
    assert value(found, "qwenvl_tokens_per_second_count") == 3
    assert value(found, "qwenvl_prompt_tokens_total") > 0
    assert value(found, "qwenvl_images_processed_total", source="data_url") == 1
    assert value(found, "qwenvl_images_processed_total", source="base64") == 1
    assert value(found, "qwenvl_rejected_requests_total", reason="invalid_image") == 1
    assert ("qwenvl_queue_depth", ()) in found and value(found, "qwenvl_requests_in_flight") == 0
    assert value(found, "process_resident_memory_bytes") > 0
    # the image caches and the batcher report too (the same image was sent twice above)
    assert value(found, "qwenvl_image_cache_lookups_total", cache="pixels", result="hit") >= 1
    assert value(found, "qwenvl_image_cache_lookups_total", cache="pixels", result="miss") >= 1
    assert ("qwenvl_image_cache_bytes", (("cache", "vision"),)) in found
    # and every number the engine gives (engine.stats()) is there under its metric's name
    stats = engine.stats()
    for key, (name, _) in ENGINE_GAUGES.items():
        assert ((name, ()) in found) == (key in stats), name
    for key, (name, _) in ENGINE_COUNTERS.items():
        assert ((name + "_total", ()) in found) == (key in stats), name
    if "batches" in stats:
        assert value(found, "qwenvl_batched_requests_total") >= value(found, "qwenvl_batches_total") > 0
    if "steps" in stats:
        assert value(found, "qwenvl_decode_steps_total") > 0 and value(found, "qwenvl_prefill_tokens_total") > 0


def test_metrics_is_open_when_keys_are_set(serve_app):
    server = serve_app(api_key=("secret",))
    assert requests.get(server.base_url + "/metrics", timeout=10).status_code == 200
    assert requests.get(server.base_url + "/v1/models", timeout=10).status_code == 401
