"""A live server on a free port: the official openai client, test_connection.py, real streaming."""

import json
import subprocess
import sys
import time

import openai
import pytest
import requests

from conftest import ROOT, b64, png_bytes


@pytest.fixture(scope="module")
def client(live_server):
    return openai.OpenAI(base_url=live_server.base_url + "/v1", api_key="unused", max_retries=0)


def image_message(question="Describe this image."):
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(png_bytes())}},
        {"type": "text", "text": question}]}]


def test_openai_client(client):
    models = client.models.list()
    assert models.data[0].id == "demo"
    completion = client.chat.completions.create(model="Qwen/Qwen2.5-VL-3B-Instruct", messages=image_message(),
                                                max_tokens=10, temperature=0)
    assert completion.object == "chat.completion" and completion.model == "demo"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens <= 10 and completion.usage.prompt_tokens > 0


def test_openai_client_streaming(client):
    stream = client.chat.completions.create(model="x", messages=image_message(), max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    whole = client.chat.completions.create(model="x", messages=image_message(), max_tokens=10, temperature=0)
    assert text == whole.choices[0].message.content


def test_openai_client_reads_logprobs(client):
    """The official client parses our logprobs, streamed and not, into its own types."""
    asked = dict(model="x", messages=image_message(), max_tokens=6, temperature=0, logprobs=True, top_logprobs=2,
                 extra_body={"repetition_penalty": 1.0})
    completion = client.chat.completions.create(**asked)
    tokens = completion.choices[0].logprobs.content
    assert tokens and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in tokens)
    stream = client.chat.completions.create(**asked, stream=True)
    streamed = [t for c in stream if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in tokens]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in tokens], abs=1e-4)


def test_openai_client_sees_errors(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])
    assert info.value.body["code"] == "invalid_image"


@pytest.mark.parametrize("fmt", ["tutorial", "openai"])
@pytest.mark.parametrize("stream", [False, True])
def test_test_connection_script(live_server, tmp_path, fmt, stream):
    image = tmp_path / "photo.jpg"
    image.write_bytes(png_bytes((120, 80), fmt="JPEG"))
    cmd = [sys.executable, str(ROOT / "test_connection.py"), "--api-url",
           live_server.base_url + "/v1/chat/completions", "--image", str(image), "--question", "What is this?",
           "--format", fmt, "--max-tokens", "8", "--temperature", "0"]
    if stream:
        cmd.append("--stream")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "time:" in done.stdout


def test_test_connection_sends_the_key_in_either_scheme(engine, settings, tmp_path):
    from dataclasses import replace

    from conftest import LiveServer
    from serving.web.app import create_app

    keyed = LiveServer(create_app(replace(settings, api_key=("s3cret",)), engine),
                       settings).start()
    try:
        base = [sys.executable, str(ROOT / "test_connection.py"), "--api-url", keyed.base_url + "/v1/chat/completions",
                "--question", "hi", "--max-tokens", "2"]
        for scheme in ("Bearer", "token"):
            done = subprocess.run(base + ["--api-key", "s3cret", "--auth-scheme", scheme], capture_output=True,
                                  text=True, timeout=120)
            assert done.returncode == 0, done.stderr
        wrong = subprocess.run(base + ["--api-key", "nope"], capture_output=True, text=True, timeout=120)
        assert wrong.returncode != 0 and "401" in wrong.stderr
        from_env = subprocess.run(base, capture_output=True, text=True, timeout=120,
                                  env={**__import__("os").environ, "API_KEY": "s3cret"})  # no --api-key: API_KEY
        assert from_env.returncode == 0, from_env.stderr
    finally:
        keyed.stop()


def test_test_connection_help_gives_every_option_a_help_and_one_default():
    import os
    import re

    done = subprocess.run([sys.executable, str(ROOT / "test_connection.py"), "--help"], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "API_KEY": "the-key-from-the-environment",
                                                      "COLUMNS": "100"})
    assert done.returncode == 0, done.stderr
    options = done.stdout.split("options:", 1)[1]
    entries = re.split(r"\n  (?=-)", "\n" + options.strip("\n"))[1:]  # one per option, its help included
    flags = [e.split()[0].rstrip(",") for e in entries]
    assert {"--api-url", "--api-key", "--temperature", "--max-tokens", "--model", "--timeout"} <= set(flags)
    for entry in entries:
        words = " ".join(entry.split())
        assert len(words.split()) > 3, f"an option without help: {words}"
        assert words.count("(default:") <= 1 and "default: None" not in words, words
    assert "the-key-from-the-environment" not in done.stdout  # the key is never printed


def test_test_connection_fails_loudly_when_unreachable(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "test_connection.py"), "--api-url",
                           "http://127.0.0.1:9/v1/chat/completions", "--timeout", "5"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and done.stderr


def test_streaming_is_incremental(live_server, engine):
    """The first chunk reaches the client while the model is still generating the rest."""
    body = {"messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 64,
            "temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 11, "repetition_penalty": 1.0, "stream": True}
    start = time.perf_counter()
    arrivals = []
    with requests.post(live_server.base_url + "/v1/chat/completions", json=body, stream=True, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                event = json.loads(line[6:])
                if event["choices"] and event["choices"][0]["delta"].get("content"):
                    arrivals.append(time.perf_counter() - start)
    total = time.perf_counter() - start
    assert len(arrivals) >= 10, "expected many content chunks"
    # chunks arrive spread over the generation, not in one burst at the end
    assert arrivals[0] < total / 2
    assert arrivals[-1] - arrivals[0] > total / 4


def test_concurrent_requests_all_served(live_server):
    import concurrent.futures

    def one(i):
        body = {"messages": [{"role": "user", "content": f"Question {i}"}], "max_tokens": 4, "stream": i % 2 == 0}
        r = requests.post(live_server.base_url + "/v1/chat/completions", json=body, timeout=120)
        return r.status_code

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        assert list(pool.map(one, range(12))) == [200] * 12
