"""Ported from llama.cpp tools/server/tests/unit/test_vision_api.py at commit
25d5b0c53f9a146f3d7a99a18610d9d623b5041e (github.com/ggml-org/llama.cpp). The checks are re-expressed here
against this project's demo server (started with IMAGE_URL_ALLOW_HOSTS=127.0.0.1 so that the images' URLs can
be on a loopback host); each upstream assertion is kept, except these deliberate differences:

- images are this test's own PNGs, as data URLs, raw base64 or URLs on a loopback host (upstream's are on
  huggingface.co; "https://google.com/404" and "https://ggml.ai" become the host's missing path and its HTML
  page); the answers' words (re_content: "cat", "frog" from upstream's CIFAR-10 model) are the demo's random
  text, so only their form is checked;
- file:// images are refused whatever the folder (docs/api.md): llama.cpp's --allowed-local-media-path rows that
  expect an answer are skipped; those that expect a refusal run;
- llama.cpp's Ollama-style "models" list with "capabilities", its own /completions prompt object
  ({"prompt_string", "multimodal_data"}) and its /embeddings are not served: those tests are skipped.
"""

from __future__ import annotations

import base64

import pytest
import requests

from conftest import png_bytes

OTHER_IMAGE = png_bytes((64, 96), (20, 160, 40))


@pytest.fixture(scope="module")
def server(serve_app):
    return serve_app(image_url_allow_hosts=("127.0.0.1",))


def get_img_url(kind: str, host, tmp_path) -> str:
    """The image each upstream id names, from this test's own PNGs and loopback image host."""
    if kind == "IMG_URL_0":
        return host.url + "/img.png"
    if kind == "IMG_URL_1":
        return host.url + "/big.png"
    if kind.startswith("IMG_BASE64"):
        data = base64.b64encode(png_bytes() if kind.endswith("_0") else OTHER_IMAGE).decode()
        return "data:image/png;base64," + data if "URI" in kind else data
    if kind.startswith("IMG_FILE"):
        path = tmp_path / f"{kind}.png"
        path.write_bytes(png_bytes())
        return f"file://{path}"
    return {"https://google.com/404": host.url + "/404.png", "https://ggml.ai": host.url + "/page.html"}.get(kind, kind)


def chat(server, prompt, url):
    return requests.post(server.base_url + "/v1/chat/completions", timeout=120, json={
        "temperature": 0.0,
        "top_k": 1,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": prompt},
            {"type": "image_url", "image_url": {"url": url}},
        ]}],
    })


def test_models_supports_multimodal_capability(server):
    pytest.skip("llama.cpp's Ollama-style /models list with \"capabilities\": GET /v1/models is OpenAI's list here")


def test_v1_models_supports_multimodal_capability(server):
    pytest.skip("llama.cpp's \"models\" key with \"capabilities\" in /v1/models: this server answers OpenAI's "
                "{\"object\": \"list\", \"data\": [...]}")


@pytest.mark.parametrize("prompt, image_url, success, re_content", [
    ("What is this:\n", "IMG_URL_0", True, "(cat)+"),
    ("What is this:\n", "IMG_BASE64_URI_0", True, "(cat)+"),
    ("What is this:\n", "IMG_URL_1", True, "(frog)+"),
    ("Test test\n", "IMG_URL_1", True, "(frog)+"),  # test invalidate cache
    ("What is this:\n", "malformed", False, None),
    ("What is this:\n", "https://google.com/404", False, None),  # non-existent image
    ("What is this:\n", "https://ggml.ai", False, None),  # non-image data
    ("What is this:\n", "IMG_FILE_0", False, None),
    ("What is this:\n", "IMG_FILE_1", False, None),
    ("What is this:\n", "IMG_FILE_2", False, None),
])
def test_vision_chat_completion(server, image_server, tmp_path, prompt, image_url, success, re_content):
    res = chat(server, prompt, get_img_url(image_url, image_server, tmp_path))
    if success:
        assert res.status_code == 200
        choice = res.json()["choices"][0]
        assert "assistant" == choice["message"]["role"]
        assert isinstance(choice["message"]["content"], str)  # upstream: re_content (a real model's words)
    else:
        assert res.status_code != 200
        assert res.status_code == 400 and "error" in res.json()  # a client's mistake, named (not a 5xx)


@pytest.mark.parametrize("allowed_mb_size, allowed_path, img_dir_path, prompt, image_url, success, re_content", [
    (0, "./tmp", "./tmp", "What is this:\n", "IMG_FILE_0", True, "(cat)+"),
    (0, "./tmp", "./tmp", "What is this:\n", "IMG_FILE_1", True, "(frog)+"),
    (1, "./tmp", "./tmp", "What is this:\n", "IMG_FILE_2", False, None),
    (0, "./tmp/allowed", "./tmp", "What is this:\n", "IMG_FILE_0", False, None),
    (0, "./tm", "./tmp", "What is this:\n", "IMG_FILE_0", False, None),
    (0, "./tmp/allowed", "./tmp/allowed/..", "What is this:\n", "IMG_FILE_0", False, None),
    (0, "./tmp/allowed", "./tmp/allowed/../.", "What is this:\n", "IMG_FILE_0", False, None),
])
def test_vision_chat_completion_local_files(server, image_server, tmp_path, allowed_mb_size, allowed_path,
                                            img_dir_path, prompt, image_url, success, re_content):
    if success:
        pytest.skip("declined: local paths and file:// images are refused whatever the folder (docs/api.md; "
                    "llama.cpp's --allowed-local-media-path)")
    folder = tmp_path / img_dir_path
    folder.mkdir(parents=True, exist_ok=True)
    res = chat(server, prompt, get_img_url(image_url, image_server, folder))
    assert res.status_code != 200


@pytest.mark.parametrize("prompt, image_data, success, re_content", [
    ("What is this: <__media__>\n", "IMG_BASE64_0", True, "(cat)+"),
    ("What is this: <__media__>\n", "IMG_BASE64_1", True, "(frog)+"),
    ("What is this: <__media__>\n", "malformed", False, None),
    ("What is this:\n", "", False, None),
])
def test_vision_completion(server, prompt, image_data, success, re_content):
    pytest.skip("llama.cpp's own /completions prompt object (prompt_string, multimodal_data with <__media__> "
                "markers): images go in chat messages here; /v1/completions takes text or token ids")


@pytest.mark.parametrize("prompt, image_data, success", [
    ("What is this: <__media__>\n", "IMG_BASE64_0", True),
    ("What is this: <__media__>\n", "IMG_BASE64_1", True),
    ("What is this: <__media__>\n", "malformed", False),
    ("What is this:\n", "base64", False),
])
def test_vision_embeddings(server, prompt, image_data, success):
    pytest.skip("llama.cpp's /embeddings: this server does not compute embeddings")
