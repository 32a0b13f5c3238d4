"""Ported from vLLM tests/entrypoints/openai/chat_completion/test_video.py at commit
41c5903d049b80b83a6e570f52f0f55e31316e49 (github.com/vllm-project/vllm), the whole module.
The checks are re-expressed here with the synchronous OpenAI client against this project's demo server (a tiny
Qwen2.5-VL with random weights, served with MAX_VIDEOS 3 as upstream's --limit-mm-per-prompt video=3, and small
frames), its videos fetched from a loopback host; each upstream assertion is kept, except these deliberate
differences:

- the three videos are made here (one mp4 / H.264, two avi / MPEG-4 Part 2, as upstream's formats), 4 s of small
  frames, instead of upstream's downloads;
- expected prompt tokens (upstream: llava-onevision's 6287 at 32 frames) come from the checkpoint's own
  processor loaded apart from the server, on the frames Qwen's sampling takes (2 per second, an even count);
- the demo's words are random: answers are asked with ignore_eos so they run to max_completion_tokens;
- use_beam_search is refused by name (docs/api.md): the beam-search tests are skipped;
- media_io_kwargs is refused by name (400, docs/api.md): fewer frames are asked per video with the part's
  max_frames (qwen-vl-utils' key) in the override test; the invalid-num_frames test's 400 is that refusal;
- a video_url given as a bare string (not {"url": ...}) is accepted here, as this server normalises every
  content-part form: that test checks it is read as the object form (upstream: 400);
- a stream's finish chunk carries no text here (OpenAI's form, docs/api.md): the streaming test checks that the
  last text chunk has content (upstream: the finishing chunk's delta).
"""

from __future__ import annotations

import base64
import io
from dataclasses import replace

import numpy as np
import openai
import pytest
from openai import OpenAI
from paddleformers.transformers import AutoProcessor

from bench.loopback import FileHost
from serving.web.app import create_app
from serving.web.server import BackgroundServer

av = pytest.importorskip("av")

MAXIMUM_VIDEOS = 3
SECONDS, FPS, SIZE = 4, 8, (84, 56)  # 84x56 is a multiple of 28 both ways: the frames are not resized
CONTENT_TEXT = "What's in this video?"


def make_video(fmt: str, codec: str, shade: int) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = SIZE[0], SIZE[1], "yuv420p"
        for i in range(SECONDS * FPS):
            pixels = np.zeros((SIZE[1], SIZE[0], 3), np.uint8)
            pixels[:, :, 0] = shade
            pixels[:, (i * 2) % SIZE[0]:(i * 2) % SIZE[0] + 8, 1] = 255  # a bar moving right
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


VIDEOS = {"slow_traffic_small.mp4": (make_video("mp4", "libx264", 40), "video/mp4"),
          "vtest.avi": (make_video("avi", "mpeg4", 120), "video/x-msvideo"),
          "Megamind.avi": (make_video("avi", "mpeg4", 200), "video/x-msvideo")}
TEST_VIDEO_URLS = list(VIDEOS)


@pytest.fixture(scope="module")
def url_of():
    host = FileHost(VIDEOS)
    yield lambda name: f"{host.url}/{name}"
    host.stop()


@pytest.fixture(scope="module")
def server(settings, engine):
    small = replace(settings, port=0, max_videos=MAXIMUM_VIDEOS, image_url_allow_hosts=("127.0.0.1",),
                    video_min_pixels=4 * 28 * 28, video_max_pixels=SIZE[0] * SIZE[1],
                    video_total_pixels=SIZE[0] * SIZE[1] * 16)
    live = BackgroundServer(create_app(small, engine), small).start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(api_key="dummy", base_url=server.base_url + "/v1", max_retries=0)


@pytest.fixture(scope="module")
def expected_prompt_tokens(engine):
    """The checkpoint's own template and video processor on the frames Qwen's sampling takes from one video."""
    processor = AutoProcessor.from_pretrained(engine.info.source)
    frames = max(4, round(SECONDS * 2 / 2) * 2)  # 2 frames per second, an even count, at least 4
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": CONTENT_TEXT}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    clip = np.zeros((frames, SIZE[1], SIZE[0], 3), np.uint8)
    out = processor(text=[prompt], videos=[clip], do_resize=False, do_sample_frames=False, return_tensors="pd")
    return int(out["input_ids"].shape[1])


def data_url(name: str) -> str:
    data, mime = VIDEOS[name]
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def dummy_messages_from_video_url(video_urls, content_text: str = CONTENT_TEXT, **options) -> list:
    video_urls = [video_urls] if isinstance(video_urls, str) else video_urls
    return [{"role": "user", "content": [*({"type": "video_url", "video_url": {"url": url}, **options}
                                           for url in video_urls),
                                         {"type": "text", "text": content_text}]}]


LONG = {"ignore_eos": True}


def single_chat_session(client, expected_prompt_tokens, video_url: str) -> None:
    messages = dummy_messages_from_video_url(video_url)
    chat_completion = client.chat.completions.create(model="demo", messages=messages, max_completion_tokens=10,
                                                     logprobs=True, temperature=0.0, top_logprobs=5, extra_body=LONG)
    assert len(chat_completion.choices) == 1
    choice = chat_completion.choices[0]
    assert choice.finish_reason == "length"
    usage = chat_completion.usage
    assert (usage.completion_tokens, usage.prompt_tokens, usage.total_tokens) == (
        10, expected_prompt_tokens, expected_prompt_tokens + 10)  # upstream: 10, 6287, 6297
    message = choice.message
    assert message.content is not None and len(message.content) >= 10
    assert message.role == "assistant"
    messages.append({"role": "assistant", "content": message.content})
    messages.append({"role": "user", "content": "express your result in json"})
    chat_completion = client.chat.completions.create(model="demo", messages=messages, max_completion_tokens=10,
                                                     temperature=0.0)
    message = chat_completion.choices[0].message
    assert message.content is not None and len(message.content) >= 0


@pytest.mark.parametrize("video_url", TEST_VIDEO_URLS)
def test_single_chat_session_video(client, expected_prompt_tokens, url_of, video_url):
    single_chat_session(client, expected_prompt_tokens, url_of(video_url))


def test_request_media_io_kwargs_override_uses_fewer_video_frames(client, url_of):
    video_url = url_of(TEST_VIDEO_URLS[0])
    default_resp = client.chat.completions.create(model="demo", messages=dummy_messages_from_video_url(video_url),
                                                  max_completion_tokens=1, temperature=0.0)
    # upstream: extra_body media_io_kwargs {"video": {"num_frames": 4}}; here the part's own max_frames
    override_resp = client.chat.completions.create(
        model="demo", messages=dummy_messages_from_video_url(video_url, max_frames=4), max_completion_tokens=1,
        temperature=0.0)
    assert default_resp.usage is not None
    assert override_resp.usage is not None
    assert override_resp.usage.prompt_tokens < default_resp.usage.prompt_tokens


def test_invalid_num_frames_request_recoverable(client, url_of):
    messages = dummy_messages_from_video_url(url_of(TEST_VIDEO_URLS[0]))
    with pytest.raises((openai.BadRequestError, openai.APIStatusError)):
        client.chat.completions.create(model="demo", messages=messages, max_completion_tokens=1, temperature=0.0,
                                       extra_body={"media_io_kwargs": {"video": {"num_frames": "invalid"}}})
    recovery_resp = client.chat.completions.create(model="demo", messages=messages, max_completion_tokens=1,
                                                   temperature=0.0)
    recovery_msg = recovery_resp.choices[0].message
    assert recovery_msg.content is not None and len(recovery_msg.content) >= 0


@pytest.mark.parametrize("video_url", TEST_VIDEO_URLS)
def test_error_on_invalid_video_url_type(client, url_of, video_url):
    bare = [{"role": "user", "content": [{"type": "video_url", "video_url": url_of(video_url)},
                                         {"type": "text", "text": CONTENT_TEXT}]}]
    # upstream: 400, video_url must be {"url": ...}; here the bare string is read as that object
    answered = client.chat.completions.create(model="demo", messages=bare, max_completion_tokens=10, temperature=0.0)
    as_object = client.chat.completions.create(model="demo", messages=dummy_messages_from_video_url(url_of(video_url)),
                                               max_completion_tokens=10, temperature=0.0)
    assert answered.usage == as_object.usage
    assert answered.choices[0].message.content == as_object.choices[0].message.content


@pytest.mark.parametrize("video_url", TEST_VIDEO_URLS)
def test_single_chat_session_video_beamsearch(client, video_url):
    pytest.skip("use_beam_search is refused by name (docs/api.md)")


@pytest.mark.parametrize("video_url", TEST_VIDEO_URLS)
def test_single_chat_session_video_base64encoded(client, expected_prompt_tokens, video_url):
    single_chat_session(client, expected_prompt_tokens, data_url(video_url))


@pytest.mark.parametrize("video_url", TEST_VIDEO_URLS)
def test_single_chat_session_video_base64encoded_beamsearch(client, video_url):
    pytest.skip("use_beam_search is refused by name (docs/api.md)")


@pytest.mark.parametrize("video_url", TEST_VIDEO_URLS)
def test_chat_streaming_video(client, url_of, video_url):
    messages = dummy_messages_from_video_url(url_of(video_url))
    chat_completion = client.chat.completions.create(model="demo", messages=messages, max_completion_tokens=10,
                                                     temperature=0.0, extra_body=LONG)
    output = chat_completion.choices[0].message.content
    stop_reason = chat_completion.choices[0].finish_reason
    chunks, finish_reason_count, last_content = [], 0, None
    for chunk in client.chat.completions.create(model="demo", messages=messages, max_completion_tokens=10,
                                                temperature=0.0, stream=True, extra_body=LONG):
        delta = chunk.choices[0].delta
        if delta.role:
            assert delta.role == "assistant"
        if delta.content:
            chunks.append(delta.content)
            last_content = delta.content
        if chunk.choices[0].finish_reason is not None:
            finish_reason_count += 1
    assert finish_reason_count == 1
    assert chunk.choices[0].finish_reason == stop_reason
    # upstream asserts the finishing chunk's delta has content; here the finish chunk is empty (OpenAI's form,
    # docs/api.md), so the last text chunk is checked
    assert last_content
    assert "".join(chunks) == output


@pytest.mark.parametrize("video_urls", [TEST_VIDEO_URLS[:i] for i in range(2, len(TEST_VIDEO_URLS))])
def test_multi_video_input(client, url_of, video_urls):
    messages = dummy_messages_from_video_url([url_of(name) for name in video_urls])
    if len(video_urls) > MAXIMUM_VIDEOS:
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="demo", messages=messages, max_completion_tokens=10, temperature=0.0)
        completion = client.completions.create(model="demo", prompt=[0, 0, 0, 0, 0], max_tokens=5, temperature=0.0)
        assert completion.choices[0].text is not None and len(completion.choices[0].text) >= 0
    else:
        chat_completion = client.chat.completions.create(model="demo", messages=messages, max_completion_tokens=10,
                                                         temperature=0.0)
        message = chat_completion.choices[0].message
        assert message.content is not None and len(message.content) >= 0
