"""vLLM's media_io_kwargs, prompt_embeds and logprob_token_ids (found by the ported tests/peers/test_vllm_video.py,
test_vllm_prompt_validation.py and test_vllm_logprob_token_ids_validation.py): they change the answer, so they are
refused by name instead of ignored; their neutral values pass, and a video's frames are still chosen per video with
the part's max_frames."""

from __future__ import annotations

import io

import numpy as np
import pytest

CHAT = "/v1/chat/completions"
ASK = [{"role": "user", "content": "What is in the video?"}]

av = pytest.importorskip("av")


def small_mp4(seconds=4, fps=8, size=(84, 56)) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.options = {"preset": "ultrafast"}
        for i in range(seconds * fps):
            pixels = np.full((size[1], size[0], 3), (i * 9) % 255, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def video_message(**options) -> list:
    import base64

    url = "data:video/mp4;base64," + base64.b64encode(small_mp4()).decode()
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}, **options},
                                         {"type": "text", "text": "What is in the video?"}]}]


@pytest.mark.parametrize("value", [{"video": {"num_frames": 4}}, {"video": {"num_frames": "invalid"}}])
def test_media_io_kwargs_is_refused_by_name(client, value):
    response = client.post(CHAT, json={"messages": video_message(), "max_tokens": 1, "media_io_kwargs": value})
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert (error["param"], error["code"]) == ("media_io_kwargs", "unsupported_parameter")
    assert "vLLM" in error["message"]


def test_prompt_embeds_is_refused_by_name_on_both_endpoints(client):
    embeds = "AAAA"  # vLLM's base64 of a torch-saved tensor: never read here
    for path, body in ((CHAT, {"messages": ASK}), ("/v1/completions", {"prompt": "Hello"})):
        response = client.post(path, json={**body, "max_tokens": 1, "prompt_embeds": embeds})
        assert response.status_code == 400, path
        assert response.get_json()["error"]["param"] == "prompt_embeds"


def test_neutral_values_pass_and_max_frames_sets_the_frames(client):
    default = client.post(CHAT, json={"messages": video_message(), "max_tokens": 1, "temperature": 0,
                                      "media_io_kwargs": {}, "prompt_embeds": []})
    assert default.status_code == 200, default.get_json()
    fewer = client.post(CHAT, json={"messages": video_message(max_frames=4), "max_tokens": 1, "temperature": 0})
    assert fewer.status_code == 200, fewer.get_json()
    assert fewer.get_json()["usage"]["prompt_tokens"] < default.get_json()["usage"]["prompt_tokens"]


@pytest.mark.parametrize("path,body", [(CHAT, {"messages": ASK, "logprobs": True, "top_logprobs": 1}),
                                       ("/v1/completions", {"prompt": "Hello", "logprobs": 1})])
def test_logprob_token_ids_is_refused_by_name(client, path, body):
    response = client.post(path, json={**body, "max_tokens": 1, "logprob_token_ids": [5, 7]})
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert (error["param"], error["code"]) == ("logprob_token_ids", "unsupported_parameter")
