"""A table of bad requests against live servers: each gets its status and OpenAI-shaped error, and
the server is healthy afterwards. Classes: JSON, schema, semantics, limits, images, image URLs,
auth, routes, loading."""

import json
from dataclasses import dataclass, field
from typing import Any, Optional

import pytest
import requests

from conftest import b64, png_bytes, png_header_only

KEY = "k2"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = "/v1/chat/completions"
LIMITS = dict(api_key=("k1", KEY), max_images=2, max_image_bytes=100_000, max_image_pixels=4_000_000,
              max_request_bytes=2_000_000, image_url_allow_hosts=("127.0.0.1",), image_fetch_timeout=1.0,
              max_tokens_limit=64, default_max_tokens=4, max_messages=50, max_content_parts=60)
TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found", 405: "invalid_request_error",
         415: "invalid_request_error",
         413: "invalid_request_error", 503: "service_unavailable"}


def say(content, **extra):
    return {"messages": [{"role": "user", "content": content}], **extra}


def image(source, **extra):
    return say([{"type": "image", "image": source, **extra}, {"type": "text", "text": "What is it?"}])


def url(path):
    """An image_url part whose URL is built from the local image host's base URL."""
    return lambda host: say([{"type": "image_url", "image_url": {"url": path.format(host=host.url, port=host.port)}}])


@dataclass
class Bad:
    name: str
    body: Any  # dict (sent as JSON), bytes (sent raw) or a function of the image host giving either
    status: int
    code: Optional[str]
    param: Optional[str] = None
    server: str = "main"
    method: str = "POST"
    path: str = CHAT
    headers: dict = field(default_factory=lambda: dict(AUTH))
    words: Optional[str] = None  # the message must hold these (it names the real cause)
    not_words: tuple = ()  # ... and none of these (a wrong cause, a library's own text)


def _noise(size):
    import os

    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)).save(buf, "PNG")
    return buf.getvalue()


TRUNCATED = png_bytes((64, 64), color=(1, 2, 3))[:60]
LIBRARY_TEXT = ("Traceback", "TextEncodeInput", "178956970", "height and width must be")  # library text, not ours


def raw(text: str) -> bytes:
    """A body written by hand: JSON escapes such as a lone surrogate survive as sent."""
    return text.encode()


def _truncated_jpeg(side=7000) -> bytes:
    """3 KB of a JPEG whose header declares side x side, closed with an end marker (decodes to grey)."""
    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.new("RGB", (side // 10, side // 10), (120, 30, 40)).resize((side, side)).save(buf, "JPEG", quality=90)
    return buf.getvalue()[:3000] + b"\xff\xd9"


def _damaged_jpeg_base64() -> str:
    """Base64 of a JPEG (so it starts with /9j/, like a path) with its end replaced by characters base64 lacks."""
    return b64(png_bytes((64, 64), fmt="JPEG"))[:-30] + "@@@@"


def _thin(size, max_pixels):
    return image(b64(png_bytes(size)), max_pixels=max_pixels)
TABLE = [
    # ---- the body is not a JSON object
    Bad("not json", b"{not json", 400, "invalid_json"),
    Bad("empty body", b"", 400, "invalid_json"),
    Bad("deeply nested", b"[" * 50_000, 400, "json_too_deep", words="64 levels"),
    Bad("invalid utf-8", b"\xff\xfe\x00garbage", 400, "invalid_json"),
    Bad("array body", b"[1, 2]", 400, "invalid_body"),
    Bad("string body", b'"hello"', 400, "invalid_body"),
    Bad("null body", b"null", 400, "invalid_body"),
    Bad("body over MAX_REQUEST_BYTES", b"{" + b" " * 2_100_000 + b"}", 413, "request_too_large"),
    # a page in a browser may send these to a local server without a CORS preflight (the "Also" of issue 21)
    Bad("text/plain body", say("x"), 415, "unsupported_media_type", headers=dict(AUTH, **{"Content-Type": "text/plain"}),
        words="application/json"),
    Bad("form body", say("x"), 415, "unsupported_media_type",
        headers=dict(AUTH, **{"Content-Type": "application/x-www-form-urlencoded"})),
    Bad("no Content-Type", say("x"), 415, "unsupported_media_type", headers=dict(AUTH, **{"Content-Type": ""}),
        words="not declared"),
    # ---- schema
    Bad("no messages", {}, 400, "invalid_value", "messages"),
    Bad("empty messages", {"messages": []}, 400, "invalid_value", "messages"),
    Bad("messages not a list", {"messages": "hi"}, 400, "invalid_value", "messages"),
    Bad("unknown role", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "invalid_value", "messages[0].role"),
    Bad("content a number", say(12), 400, "invalid_value", "messages[0].content"),
    Bad("unknown part type", say([{"type": "audio", "audio": "x"}]), 400, "invalid_value", "messages[0].content[0]"),
    Bad("part without type", say([{"text": "x"}]), 400, "invalid_value", "messages[0].content[0]"),
    Bad("text not a string", say([{"type": "text", "text": 5}]), 400, "invalid_value", "messages[0].content[0].text"),
    Bad("image_url without url", say([{"type": "image_url", "image_url": {}}]), 400, "invalid_value",
        "messages[0].content[0].image_url.url"),
    Bad("temperature a word", say("x", temperature="hot"), 400, "invalid_value", "temperature"),
    Bad("temperature too high", say("x", temperature=3), 400, "invalid_value", "temperature"),
    Bad("temperature NaN", b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400,
        "invalid_value", "temperature"),
    Bad("top_p below zero", say("x", top_p=-0.1), 400, "invalid_value", "top_p"),
    Bad("top_p above one", say("x", top_p=1.5), 400, "invalid_value", "top_p"),
    Bad("top_k below -1", say("x", top_k=-2), 400, "invalid_value", "top_k"),
    Bad("max_tokens zero", say("x", max_tokens=0), 400, "invalid_value", "max_tokens"),
    Bad("max_tokens a word", say("x", max_tokens="many"), 400, "invalid_value", "max_tokens"),
    Bad("max_tokens huge float", say("x", max_tokens=1e100), 400, "invalid_value", "max_tokens"),
    Bad("n of 17", say("x", n=17), 400, "invalid_value", "n"),
    Bad("five stop strings", say("x", stop=["a", "b", "c", "d", "e"]), 400, "invalid_value", "stop",
        words="at most 4 stop sequences; got 5"),
    Bad("stop a number", say("x", stop=5), 400, "invalid_value", "stop"),
    Bad("stream a list", say("x", stream=[1]), 400, "invalid_value", "stream"),
    Bad("stream_options a string", say("x", stream_options="x"), 400, "invalid_value", "stream_options"),
    Bad("stream_options without stream", say("x", stream_options={"include_usage": True}), 400, "invalid_value",
        "stream_options", words="only allowed when 'stream' is enabled"),
    Bad("repetition_penalty zero", say("x", repetition_penalty=0), 400, "invalid_value", "repetition_penalty"),
    Bad("repetition_penalty 1e309 (infinity)", b'{"messages": [{"role": "user", "content": "x"}], '
        b'"repetition_penalty": 1e309}', 400, "invalid_value", "repetition_penalty", words="finite"),
    Bad("repetition_penalty Infinity", b'{"messages": [{"role": "user", "content": "x"}], '
        b'"repetition_penalty": Infinity}', 400, "invalid_value", "repetition_penalty"),
    Bad("tool_calls on a user message", {"messages": [{"role": "user", "content": "x", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, 400, "invalid_value",
        "messages[0].tool_calls", words="only assistant messages"),
    Bad("tool_calls on a system message", {"messages": [{"role": "system", "content": "x", "tool_calls": "yes"},
                                                        {"role": "user", "content": "x"}]}, 400, "invalid_value",
        "messages[0].tool_calls"),
    Bad("a tools schema nested 300 deep", say("x", tools=[{"type": "function", "function": {
        "name": "f", "parameters": json.loads('{"a":' * 300 + "1" + "}" * 300)}}]), 400, "json_too_deep"),
    Bad("a frame list at fps 5e-324", say([{"type": "video", "video": [b64(png_bytes((56, 56)))] * 4,
                                            "fps": 5e-324}]), 400, "video_too_long"),
    Bad("seed a word", say("x", seed="abc"), 400, "invalid_value", "seed"),
    Bad("seed 2^64", say("x", seed=2**64, temperature=1.0), 400, "invalid_value", "seed"),
    Bad("seed 10^100", say("x", seed=10**100, temperature=1.0), 400, "invalid_value", "seed"),
    Bad("top_k 2^63", say("x", top_k=2**63, temperature=1.0), 400, "invalid_value", "top_k"),
    Bad("lone surrogate in the content", raw('{"messages": [{"role": "user", "content": "a\\ud800b"}]}'), 400,
        "invalid_value", "messages[0].content", words="surrogate"),
    Bad("lone surrogate, streamed", raw('{"messages": [{"role": "user", "content": "\\udfff"}], "stream": true}'),
        400, "invalid_value", "messages[0].content", words="surrogate"),
    Bad("lone surrogate in a text part", raw('{"messages": [{"role": "user", "content": [{"type": "text", '
                                             '"text": "x\\udc00"}]}]}'), 400, "invalid_value",
        "messages[0].content[0].text", words="surrogate"),
    Bad("lone surrogate in a stop string", raw('{"messages": [{"role": "user", "content": "x"}], '
                                              '"stop": ["\\ud801"]}'), 400, "invalid_value", "stop[0]"),
    Bad("presence_penalty above 2", say("x", presence_penalty=2.5), 400, "invalid_value", "presence_penalty"),
    Bad("frequency_penalty below -2", say("x", frequency_penalty=-3), 400, "invalid_value", "frequency_penalty"),
    Bad("frequency_penalty a word", say("x", frequency_penalty="lots"), 400, "invalid_value", "frequency_penalty"),
    Bad("logprobs a word", say("x", logprobs="maybe"), 400, "invalid_value", "logprobs"),
    Bad("top_logprobs above 20", say("x", logprobs=True, top_logprobs=21), 400, "invalid_value", "top_logprobs"),
    Bad("top_logprobs negative", say("x", logprobs=True, top_logprobs=-1), 400, "invalid_value", "top_logprobs"),
    Bad("top_logprobs without logprobs", say("x", top_logprobs=3), 400, "invalid_value", "top_logprobs"),
    Bad("top_logprobs with logprobs false", say("x", logprobs=False, top_logprobs=0), 400, "invalid_value",
        "top_logprobs"),
    Bad("min_pixels zero", image(b64(png_bytes()), min_pixels=0), 400, "invalid_value",
        "messages[0].content[0].min_pixels"),
    # ---- semantics
    Bad("empty user content", say(""), 400, "empty_content", "messages[0].content"),
    Bad("no user message", {"messages": [{"role": "system", "content": "be brief"}]}, 400, "invalid_value", "messages"),
    Bad("image in an assistant message", {"messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": [{"type": "image", "image": b64(png_bytes())}]},
        {"role": "user", "content": "y"}]}, 400, "invalid_value", "messages[1].content"),
    Bad("continuing without a last assistant message", {"messages": [{"role": "user", "content": "x"}],
        "continue_final_message": True}, 400, "invalid_value", "continue_final_message"),
    # ---- limits
    Bad("max_tokens over the limit", say("x", max_tokens=65), 400, "max_tokens_too_large", "max_tokens"),
    Bad("max_completion_tokens over the limit", say("x", max_completion_tokens=1000), 400, "max_tokens_too_large"),
    Bad("prompt longer than the context", say("word " * 26_000), 400, "context_length_exceeded", "messages"),
    Bad("three images (limit 2)", say([{"type": "image", "image": b64(png_bytes())}] * 3), 400, "too_many_images",
        "messages"),
    Bad("image over MAX_IMAGE_BYTES", image(b64(_noise((250, 250)))), 400, "image_too_large",
        "messages[0].content[0]"),
    Bad("20000x20000 PNG header", image(b64(png_header_only(20000, 20000))), 400, "image_too_many_pixels",
        "messages[0].content[0]"),
    Bad("3000x2000 over MAX_IMAGE_PIXELS", image("data:image/png;base64," + b64(png_header_only(3000, 2000))), 400,
        "image_too_many_pixels", "messages[0].content[0]"),
    Bad("aspect ratio over 200", image(b64(png_bytes((600, 2)))), 400, "invalid_image_size",
        "messages[0].content[0]", words="aspect ratio"),
    Bad("max_pixels 3136 on a 199:1 image", _thin((28 * 199, 28), 3136), 400, "invalid_image_size",
        "messages[0].content[0]", words="raise max_pixels or crop"),
    Bad("max_pixels 100000 on a 166:1 image", _thin((5000, 30), 100_000), 400, "invalid_image_size",
        "messages[0].content[0]", words="5000x30"),
    Bad("max_pixels 50000 on a tall 190:1 image", _thin((20, 3800), 50_000), 400, "invalid_image_size",
        words="max_pixels"),
    Bad("51 messages (limit 50)", {"messages": [{"role": "user", "content": "x"}] * 51}, 400, "too_many_messages",
        "messages", words="at most 50"),
    Bad("40,000 messages, refused unparsed", raw('{"messages": [' + ",".join(['{"role":"user","content":"a"}'] * 40_000)
                                                    + "]}"), 400, "too_many_messages", "messages"),
    Bad("61 content parts (limit 60)", say([{"type": "text", "text": "x"}] * 61), 400, "too_many_content_parts",
        "messages", words="at most 60"),
    Bad("parts over the limit across messages", {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "x"}] * 31}] * 2}, 400, "too_many_content_parts"),
    # ---- image data
    Bad("image not base64", image("%%%"), 400, "invalid_image", "messages[0].content[0]"),
    Bad("base64 of text", image(b64(b"these bytes are not an image")), 400, "invalid_image"),
    Bad("data URL without base64", image("data:image/png,rawdata"), 400, "invalid_image"),
    Bad("data URL with bad base64", image("data:image/png;base64,@@@@"), 400, "invalid_image"),
    Bad("truncated PNG", image(b64(TRUNCATED)), 400, "invalid_image"),
    Bad("3 KB JPEG declaring 1990x1990", image(b64(_truncated_jpeg(1990))), 400, "invalid_image",
        "messages[0].content[0]", words="truncated"),
    Bad("damaged base64 JPEG (starts with /9j/)", image(_damaged_jpeg_base64()), 400, "invalid_image",
        words="base64", not_words=("local file",)),
    Bad("image declaring more than Pillow's own limit", image(b64(png_header_only(20000, 20000))), 400,
        "image_too_many_pixels", words="MAX_IMAGE_PIXELS"),
    Bad("empty image", image(""), 400, "invalid_image"),
    Bad("local path", image("/etc/passwd"), 400, "unsupported_image_source", "messages[0].content[0]"),
    Bad("file URL", image("file:///etc/passwd"), 400, "unsupported_image_source"),
    Bad("ftp URL", image("ftp://example.com/cat.png"), 400, "unsupported_image_source"),
    Bad("gopher URL", image("gopher://127.0.0.1:70/_x"), 400, "unsupported_image_source"),
    Bad("windows path", image("C:\\images\\cat.png"), 400, "unsupported_image_source"),
    # ---- image URLs: refused before any connection
    Bad("localhost", url("http://localhost:{port}/img.png"), 400, "image_url_refused", "messages[0].content[0]"),
    Bad("another loopback address", url("http://127.0.0.2:{port}/img.png"), 400, "image_url_refused"),
    Bad("loopback as a decimal number", url("http://2130706433:{port}/img.png"), 400, "image_url_refused"),
    Bad("loopback in hex and short form", url("http://0x7f.1:{port}/img.png"), 400, "image_url_refused"),
    Bad("loopback in octal", url("http://0177.0.0.1:{port}/img.png"), 400, "image_url_refused"),
    Bad("IPv6 loopback", url("http://[::1]:{port}/img.png"), 400, "image_url_refused"),
    Bad("IPv4-mapped IPv6 loopback", url("http://[::ffff:127.0.0.1]:{port}/img.png"), 400, "image_url_refused"),
    Bad("IPv4-mapped in hex", url("http://[::ffff:7f00:1]:{port}/img.png"), 400, "image_url_refused"),
    Bad("cloud metadata", url("http://169.254.169.254/latest/meta-data/"), 400, "image_url_refused"),
    Bad("private 10/8", url("http://10.0.0.1/cat.png"), 400, "image_url_refused"),
    Bad("private 192.168/16", url("http://192.168.1.1/cat.png"), 400, "image_url_refused"),
    Bad("private 172.16/12", url("https://172.16.0.1/cat.png"), 400, "image_url_refused"),
    Bad("shared 100.64/10", url("http://100.64.0.1/cat.png"), 400, "image_url_refused"),
    Bad("unspecified", url("http://0.0.0.0:{port}/img.png"), 400, "image_url_refused"),
    Bad("IPv6 link-local", url("http://[fe80::1]/cat.png"), 400, "image_url_refused"),
    Bad("IPv6 unique local", url("http://[fd00::1]/cat.png"), 400, "image_url_refused"),
    Bad("multicast", url("http://224.0.0.1/cat.png"), 400, "image_url_refused"),
    Bad("6to4 around loopback", url("http://[2002:7f00:1::1]/cat.png"), 400, "image_url_refused"),
    Bad("credentials in the URL", url("http://user:pw@127.0.0.1:{port}/img.png"), 400, "image_url_refused"),
    # ---- image URLs on an allowed host that go wrong
    Bad("redirect to a private address", url("{host}/to-private"), 400, "image_url_refused"),
    Bad("redirect to cloud metadata", url("{host}/to-metadata"), 400, "image_url_refused"),
    Bad("redirect loop", url("{host}/loop"), 400, "image_fetch_failed"),
    Bad("404", url("{host}/missing.png"), 400, "image_fetch_failed"),
    Bad("nothing listening", url("http://127.0.0.1:1/img.png"), 400, "image_fetch_failed"),
    Bad("slow server", url("{host}/slow.png"), 400, "image_fetch_failed"),
    Bad("server sending its headers slowly", url("{host}/slow-headers.png"), 400, "image_fetch_failed",
        words="IMAGE_FETCH_TIMEOUT"),
    Bad("URL body over MAX_IMAGE_BYTES", url("{host}/big.png"), 400, "image_too_large"),
    Bad("unsized URL body over MAX_IMAGE_BYTES", url("{host}/big-unsized.png"), 400, "image_too_large"),
    Bad("URL to a decompression bomb", url("{host}/bomb.png"), 400, "image_too_many_pixels"),
    Bad("URL to a web page", url("{host}/page.html"), 400, "invalid_image"),
    Bad("URLs turned off", url("{host}/img.png"), 400, "image_url_disabled", "messages[0].content[0]",
        server="no_urls"),
    # ---- auth
    Bad("no API key", say("x"), 401, "missing_api_key", headers={}),
    Bad("wrong API key", say("x"), 401, "invalid_api_key", headers={"Authorization": "Bearer nope"}),
    Bad("basic auth instead of bearer", say("x"), 401, "missing_api_key", headers={"Authorization": "Basic k1"}),
    Bad("models with a wrong key", None, 401, "invalid_api_key", method="GET", path="/v1/models",
        headers={"Authorization": "Bearer k3"}),
    # ---- routes
    Bad("GET on chat", None, 405, "method_not_allowed", method="GET"),
    Bad("DELETE on models", None, 405, "method_not_allowed", method="DELETE", path="/v1/models"),
    Bad("unknown /v1 path", say("x"), 404, "not_found", path="/v1/completions/nothing"),
    Bad("unknown path", None, 404, "not_found", method="GET", path="/admin"),
    # ---- while the model loads
    Bad("chat while loading", say("x"), 503, "model_loading", server="loading"),
    Bad("models while loading", None, 503, "model_loading", method="GET", path="/v1/models", server="loading"),
]


@pytest.fixture(scope="module")
def servers(serve_app):
    return {"main": serve_app(**LIMITS), "no_urls": serve_app(**LIMITS, allow_image_urls=False),
            "loading": serve_app(engine=None, **LIMITS)}


def send(server, row, image_server):
    body = row.body(image_server) if callable(row.body) else row.body
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    headers = {"Content-Type": "application/json", **row.headers}
    headers = {k: v for k, v in headers.items() if v != ""}  # "": the header left out
    return requests.request(row.method, server.base_url + row.path, data=data, headers=headers, timeout=60)


def test_the_table_is_big_enough():
    assert len(TABLE) >= 40
    assert len({row.name for row in TABLE}) == len(TABLE)


@pytest.mark.parametrize("row", TABLE, ids=[row.name for row in TABLE])
def test_bad_request(servers, image_server, row):
    response = send(servers[row.server], row, image_server)
    assert response.status_code == row.status, response.text[:500]
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == row.code and error["type"] == TYPES[row.status] and error["message"]
    if row.param is not None:
        assert error["param"] == row.param
    if row.words is not None:
        assert row.words in error["message"], error["message"]
    assert not any(w in error["message"] for w in row.not_words + LIBRARY_TEXT), error["message"]
    if row.status == 503:
        assert response.headers["Retry-After"]
    assert response.headers.get("X-Request-Id") or row.status == 413


def test_healthy_after_the_table(servers):
    """Runs after the table (pytest keeps file order): every server still answers normally."""
    main = servers["main"]
    assert requests.get(main.base_url + "/health", timeout=10).json()["status"] == "ok"
    ok = requests.post(main.base_url + CHAT, json=say("still there?", max_tokens=3), headers=AUTH, timeout=60)
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert requests.get(servers["loading"].base_url + "/health", timeout=10).status_code == 503
    metrics = requests.get(main.base_url + "/metrics", timeout=10).text
    assert 'qwenvl_rejected_requests_total{reason="image_url_refused"}' in metrics
