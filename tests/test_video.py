"""Video input, on videos these tests encode themselves with PyAV (a red square moving right over a
background that changes each frame): sampling counts and timestamps, decoding of mp4/H.264, webm/VP9
and mov, rotation, every limit's 4xx, truncated, corrupt, audio-only and zero-frame files, lists of
images as a video, the prompt's video tokens and time positions, greedy answers equal to PaddleFormers'
own generate alone and in a running batch, the caches, the API, metrics, the chat widget and the client."""

from __future__ import annotations

import base64
import http.server
import io
import math
import subprocess
import sys
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from bench.loopback import LoopbackServer
from conftest import ROOT, b64, png_bytes
from serving.intake import video
from serving.web.app import create_app
from serving.chat import ChatService
from serving.protocol import ChatTurn
from serving.intake.video import VideoError, VideoLimits
from test_continuous_batching import collect, greedy, reference, wait_idle

av = pytest.importorskip("av")

CHAT = "/v1/chat/completions"
# small frames, so the demo model's prompts stay short: 56x84 is 6 tokens per pair of frames
SMALL = VideoLimits(min_pixels=4 * 28 * 28, max_pixels=56 * 84, total_pixels=56 * 84 * 8)
SMALL_SETTINGS = dict(video_min_pixels=4 * 28 * 28, video_max_pixels=56 * 84, video_total_pixels=56 * 84 * 8)


# ---------------------------------------------------------------- test videos

def frame_image(i: int, n: int, size=(160, 120)) -> np.ndarray:
    width, height = size
    img = np.zeros((height, width, 3), np.uint8)
    img[:, :, 2] = 40 + (i * 7) % 180  # the background's blue changes every frame
    img[:, :, 1] = np.linspace(0, 120, width, dtype=np.uint8)[None, :]
    x = int(i * (width - width // 8) / max(1, n - 1))
    img[height // 3: height // 3 + height // 6, x: x + width // 8] = (255, 0, 0)  # the moving square
    img[: height // 8, : width // 8] = 255  # a white mark in the top-left corner (for rotation)
    return img


def make_video(seconds=3.0, fps=24, size=(160, 120), fmt="mp4", codec="libx264", audio=False, rotation=None,
               frames=None) -> bytes:
    n = int(round(seconds * fps)) if frames is None else frames
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"preset": "ultrafast"}
        elif codec == "libvpx-vp9":
            stream.options = {"deadline": "realtime", "cpu-used": "8"}
        if rotation is not None:
            stream.set_display_rotation(rotation)
        sound = container.add_stream("aac" if fmt in ("mp4", "mov") else "libopus", rate=48000) if audio else None
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(frame_image(i, n, size), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        if sound is not None:
            mux_silence(container, sound, int(seconds * 50))
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def mux_silence(container, sound, blocks: int) -> None:
    """`blocks` 20 ms blocks of mono silence at 48 kHz into the audio stream `sound`, then its flush."""
    for k in range(blocks):
        chunk = av.AudioFrame.from_ndarray(np.zeros((1, 960), np.float32), format="fltp", layout="mono")
        chunk.sample_rate, chunk.pts = 48000, k * 960
        for packet in sound.encode(chunk):
            container.mux(packet)
    for packet in sound.encode():
        container.mux(packet)


def audio_only(seconds=1.0) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        mux_silence(container, container.add_stream("aac", rate=48000), int(seconds * 50))
    return buf.getvalue()


def zero_frames() -> bytes:
    """A webm whose video stream has no frames (its audio stream has some)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="webm") as container:
        stream = container.add_stream("libvpx-vp9", rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        mux_silence(container, container.add_stream("libopus", rate=48000), 10)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def red_x(frame: np.ndarray) -> float:
    """The moving square's horizontal centre in a frame, as a share of the width."""
    mask = (frame[:, :, 0] > 150) & (frame[:, :, 1] < 110) & (frame[:, :, 2] < 110)
    assert mask.any(), "the red square is not in the frame"
    return float(np.nonzero(mask)[1].mean()) / frame.shape[1]


@pytest.fixture(scope="module")
def clips():
    return {"mp4": make_video(), "webm": make_video(fmt="webm", codec="libvpx-vp9"),
            "mov": make_video(seconds=2.0, fps=30, fmt="mov", codec="mpeg4", audio=True)}


def data_url(data: bytes, mime="video/mp4") -> str:
    return f"data:{mime};base64,{b64(data)}"


# ---------------------------------------------------------------- sampling (qwen-vl-utils' rules)

def qwen_nframes(total_frames, video_fps, fps=2.0, min_frames=4, max_frames=768):
    """qwen-vl-utils' smart_nframes (Qwen2.5-VL), written out as the reference."""
    min_frames = math.ceil(min_frames / 2) * 2
    max_frames = math.floor(min(max_frames, total_frames) / 2) * 2
    nframes = total_frames / video_fps * fps
    nframes = min(min(max(nframes, min_frames), max_frames), total_frames)
    return math.floor(nframes / 2) * 2


@pytest.mark.parametrize("seconds", [0.5, 1, 2.9, 3, 10, 61.7, 300])
@pytest.mark.parametrize("source_fps", [10, 23.976, 25, 30, 60])
@pytest.mark.parametrize("fps", [0.5, 1.0, 2.0, 4.0])
def test_frame_count_is_qwen_vl_utils(seconds, source_fps, fps):
    total = max(2, int(seconds * source_fps))
    limits = VideoLimits(fps=fps, total_pixels=10**12)  # a budget that never binds: the rule alone
    assert video.frame_count(total, source_fps, limits) == qwen_nframes(total, source_fps, fps=fps)


@pytest.mark.parametrize("seconds, source_fps, fps, expected", [
    (3, 24, 2.0, 6), (1, 30, 2.0, 4), (10, 25, 2.0, 20), (10, 25, 1.0, 10), (10, 25, 0.5, 4), (7, 30, 1.0, 6),
    (0.1, 30, 2.0, 2), (120, 30, 2.0, 240), (600, 30, 2.0, 242)])
def test_frame_counts(seconds, source_fps, fps, expected):
    """Even counts, MIN_FRAMES, the frames a short clip has, and (600 s) the total pixel budget's cap."""
    total = int(round(seconds * source_fps))
    assert video.frame_count(total, source_fps, VideoLimits(fps=fps)) == expected


def test_the_total_budget_caps_frames_and_tokens():
    limits = VideoLimits()
    count = video.frame_count(18000, 30, limits)  # ten minutes
    assert count == video.budget_frames(limits) < limits.max_frames
    height, width = video.frame_size(1080, 1920, count, limits)
    assert height % 28 == 0 and width % 28 == 0
    tokens = count // 2 * (height // 28) * (width // 28)
    assert tokens <= limits.total_pixels / 784


@pytest.mark.parametrize("count", [4, 16, 64, 200])
def test_frame_size_within_the_per_frame_and_total_budgets(count):
    limits = VideoLimits()
    height, width = video.frame_size(1080, 1920, count, limits)
    assert height % 28 == 0 and width % 28 == 0
    assert limits.min_pixels <= height * width <= limits.max_pixels
    assert count * height * width / 2 <= limits.total_pixels * 1.06  # the floor's 5% margin, as qwen-vl-utils
    assert abs(width / height - 16 / 9) < 0.2


def test_frame_indices_spread_evenly_ends_included():
    assert video.frame_indices(72, 6) == [0, 14, 28, 43, 57, 71]
    assert video.frame_indices(1, 2) == [0, 0]
    indices = video.frame_indices(1000, 40)
    assert indices[0] == 0 and indices[-1] == 999 and len(set(indices)) == 40


def test_a_request_narrows_the_sampling_within_the_servers_limits():
    limits = VideoLimits(max_frames=16, max_pixels=100_000)
    mine = limits.narrowed(fps=1.0, max_frames=1000, max_pixels=10**9, min_pixels=10)
    assert mine.fps == 1.0 and mine.max_frames == 16 and mine.max_pixels == 100_000 and mine.min_pixels >= 3136
    assert limits.narrowed(max_frames=4).max_frames == 4


# ---------------------------------------------------------------- decoding

@pytest.mark.parametrize("kind", ["mp4", "webm", "mov"])
def test_decodes_containers_and_codecs(clips, kind):
    started = time.perf_counter()
    clip = video.decode(clips[kind], SMALL)
    seconds = time.perf_counter() - started
    total = 72 if kind != "mov" else 60
    source_fps = 24 if kind != "mov" else 30
    count = video.frame_count(total, source_fps, SMALL)
    assert clip.frames.shape[0] == count and count % 2 == 0
    assert clip.frames.dtype == np.uint8 and clip.frames.shape[1] % 28 == 0 and clip.frames.shape[2] % 28 == 0
    assert clip.decoded_frames == total and clip.source_frames == total
    assert clip.fps == pytest.approx(count / total * source_fps)
    assert clip.seconds_per_grid == pytest.approx(2 / clip.fps)
    assert clip.duration == pytest.approx(total / source_fps)
    expected = np.array(video.frame_indices(total, count)) / source_fps
    assert np.allclose(clip.timestamps, expected, atol=1e-3)
    xs = [red_x(f) for f in clip.frames]
    assert xs == sorted(xs) and xs[-1] - xs[0] > 0.5  # the square moves right, frame after frame
    assert clip.mime == {"mp4": "video/mp4", "webm": "video/webm", "mov": "video/quicktime"}[kind]
    assert seconds < 5


@pytest.mark.parametrize("seconds, source_fps, fps", [(1.0, 30, 2.0), (4.0, 25, 2.0), (4.0, 25, 1.0), (6.5, 12, 4.0)])
def test_sampled_counts_and_timestamps(seconds, source_fps, fps):
    data = make_video(seconds=seconds, fps=source_fps, size=(64, 48))
    limits = replace(SMALL, fps=fps, total_pixels=10**9)  # a budget that does not bind: qwen-vl-utils' counts
    clip = video.decode(data, limits)
    total = int(round(seconds * source_fps))
    count = qwen_nframes(total, source_fps, fps=fps)
    assert len(clip.frames) == count
    assert np.allclose(clip.timestamps, np.array(video.frame_indices(total, count)) / source_fps, atol=1e-3)
    assert clip.timestamps[0] == 0 and clip.timestamps[-1] == pytest.approx((total - 1) / source_fps, abs=1e-3)
    assert clip.fps == pytest.approx(count / seconds)


def test_large_frames_are_scaled_into_the_budget():
    clip = video.decode(make_video(seconds=1.0, fps=8, size=(640, 360)), VideoLimits())
    height, width = clip.frames.shape[1:3]
    assert VideoLimits().min_pixels <= height * width <= VideoLimits().max_pixels
    assert abs(width / height - 16 / 9) < 0.15


def test_rotation_is_applied():
    clip = video.decode(make_video(seconds=1.0, fps=8, size=(160, 96), rotation=90), SMALL)
    frame = clip.frames[0]
    assert frame.shape[0] > frame.shape[1]  # stored landscape, shown portrait
    h, w = frame.shape[:2]
    corners = {"top-left": frame[: h // 6, : w // 6], "bottom-left": frame[-h // 6:, : w // 6]}
    # turned 90 degrees counterclockwise: the stored top-left mark is shown at the bottom left
    assert corners["bottom-left"].mean() > corners["top-left"].mean() + 60


def test_a_one_frame_video_is_that_frame_twice():
    clip = video.decode(make_video(frames=1, fps=4, size=(64, 48)), SMALL)
    assert len(clip.frames) == 2 and np.array_equal(clip.frames[0], clip.frames[1])


def gif_bomb(side: int, frames: int) -> bytes:
    """A GIF with a side x side screen and `frames` 1x1 frames 10 ms apart: a few KB that FFmpeg decodes into
    side x side pixels a frame (the issue's 14 KB GIF had a 7000x7000 screen)."""
    import struct

    out = io.BytesIO()
    out.write(b"GIF89a" + struct.pack("<HHBBB", side, side, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff")
    for k in range(frames):
        out.write(b"!\xf9\x04\x00\x01\x00\x00\x00")  # graphic control: 1/100 s
        out.write(b"," + struct.pack("<HHHHB", k % side, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00")  # one pixel
    return out.getvalue() + b";"


@pytest.mark.parametrize("side, frames, code", [(7000, 200, "video_too_many_pixels"), (5000, 400, "video_too_costly")])
def test_a_gif_that_costs_more_than_its_bytes_is_refused_before_decoding(side, frames, code):
    """A few KB of GIF whose screen makes every 1x1 frame a side x side picture: refused from the container's
    declared size before a frame is decoded (it used to run past its request deadline, 49 MP a frame)."""
    from serving.config import Settings

    limits = VideoLimits.from_settings(Settings(model="demo"))
    started = time.perf_counter()
    with pytest.raises(VideoError) as caught:
        video.decode(gif_bomb(side, frames), limits, param="p", deadline=started + 3)
    assert caught.value.code == code, caught.value.message
    assert time.perf_counter() - started < 1.0


def test_the_deadline_holds_within_a_second_while_decoding():
    """Decoding within every budget but slower than the deadline: stopped within a second of it (the deadline
    was checked every 32 frames: 32 large frames past it)."""
    from serving.errors import RequestTimeout

    limits = replace(VideoLimits(), max_decode_pixels=10**12)
    data = gif_bomb(5000, 400)
    started = time.perf_counter()
    with pytest.raises(RequestTimeout):
        video.decode(data, limits, param="p", deadline=started + 0.5)
    assert time.perf_counter() - started < 0.5 + 1.0


@pytest.mark.parametrize("name, data, limits, code", [
    ("audio only", audio_only, SMALL, "no_video_stream"),
    ("zero frames", zero_frames, SMALL, "empty_video"),
    ("not a video", lambda: b"hello, this is not a video at all" * 10, SMALL, "invalid_video"),
    ("empty", lambda: b"", SMALL, "invalid_video"),
    ("truncated mp4", lambda: make_video()[:3000], SMALL, "invalid_video"),
    ("truncated webm, header only", lambda: make_video(fmt="webm", codec="libvpx-vp9")[:300], SMALL, None),
    ("too long", lambda: make_video(seconds=3.0, fps=8, size=(64, 48)), replace(SMALL, max_seconds=2.0),
     "video_too_long"),
    ("too many bytes", lambda: make_video(), replace(SMALL, max_bytes=1000), "video_too_large"),
    ("frames too large", lambda: make_video(seconds=0.5, fps=4, size=(640, 480)),
     replace(SMALL, max_frame_pixels=100_000), "video_too_many_pixels"),
    ("too many frames to decode", lambda: make_video(seconds=1.0, fps=120, size=(64, 48)),
     replace(SMALL, max_seconds=1.2), "too_many_frames"),
    ("too many pixels to decode", lambda: make_video(seconds=1.0, fps=8, size=(64, 48)),
     replace(SMALL, max_decode_pixels=7 * 64 * 48), "video_too_costly"),
])
def test_bad_videos_are_refused_with_a_reason(name, data, limits, code):
    with pytest.raises(VideoError) as caught:
        video.decode(data(), limits, param="messages[0].content[0]")
    assert caught.value.param == "messages[0].content[0]"
    assert caught.value.code in ((code,) if code else ("invalid_video", "empty_video")), caught.value.message
    assert caught.value.message


def test_a_truncated_webm_decodes_the_frames_it_has():
    full = make_video(seconds=4.0, fps=12, size=(64, 48), fmt="webm", codec="libvpx-vp9")
    clip = video.decode(full[: len(full) * 3 // 5], SMALL)
    assert 0 < clip.source_frames < 48 and len(clip.frames) % 2 == 0
    assert clip.duration < 4.0


def test_a_damaged_stream_is_decoded_around_the_damage():
    data = bytearray(make_video(seconds=3.0, fps=12, size=(64, 48), fmt="webm", codec="libvpx-vp9"))
    middle = len(data) // 2
    data[middle: middle + 64] = bytes(64)  # zeros over part of a frame
    try:
        clip = video.decode(bytes(data), SMALL)
    except VideoError as exc:  # either way: a 4xx with a reason, never a crash
        assert exc.code in ("invalid_video", "empty_video")
    else:
        assert len(clip.frames) >= 2 and len(clip.frames) % 2 == 0


def test_decoding_stops_at_the_deadline():
    from serving.errors import RequestTimeout

    with pytest.raises(RequestTimeout):
        video.decode(make_video(seconds=3.0, fps=24, size=(64, 48)), SMALL, deadline=time.perf_counter() - 1)


def test_decoding_holds_only_the_sampled_frames():
    """A 40 s 640x360 clip (1200 frames: 830 MB as full-size RGB) decodes within a small memory rise."""
    data = make_video(seconds=40.0, fps=30, size=(640, 360))
    code = f"""
import sys, threading, time
sys.path.insert(0, {str(ROOT)!r})
import numpy
from serving.intake import video

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

data = open(sys.argv[1], "rb").read()
video.decode(video.encode_mp4(numpy.zeros((2, 56, 56, 3), "uint8"), 2.0))  # warm up FFmpeg
peak, done = [rss()], threading.Event()

def watch():
    while not done.is_set():
        peak.append(rss())
        time.sleep(0.002)

before = rss()
watcher = threading.Thread(target=watch)
watcher.start()
started = time.perf_counter()
clip = video.decode(data, video.VideoLimits())
seconds = time.perf_counter() - started
done.set()
watcher.join()
print(len(clip.frames), clip.frames.nbytes, max(peak) - before, seconds)
"""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
        f.write(data)
        f.flush()
        done = subprocess.run([sys.executable, "-c", code, f.name], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    frames, kept, rise, seconds = done.stdout.split()
    assert int(frames) == 80
    assert int(rise) < 150 * 2**20, f"peak memory rose by {int(rise) / 2**20:.0f} MB"  # vs 830 MB for every frame
    print(f"decoded 1200 frames of 640x360 in {float(seconds):.2f} s, peak memory +{int(rise) / 2**20:.0f} MB, "
          f"{int(frames)} frames kept ({int(kept) / 2**20:.1f} MB)")


def test_a_list_of_images_is_a_video():
    images = [Image.fromarray(frame_image(i, 5, (120, 90))) for i in range(5)]
    clip = video.from_images(iter(images), SMALL, count=5, fps=1.0)
    assert len(clip.frames) == 6 and np.array_equal(clip.frames[4], clip.frames[5])  # odd: the last one twice
    assert clip.fps == 1.0 and clip.timestamps == (0.0, 1.0, 2.0, 3.0, 4.0, 4.0) and clip.data is None
    xs = [red_x(f) for f in clip.frames[:5]]
    assert xs == sorted(xs)
    with pytest.raises(VideoError) as caught:
        video.from_images(images, replace(SMALL, max_frames=4))
    assert caught.value.code == "too_many_frames"


def test_sources_and_their_refusals(clips):
    data, mime = video.read_source(data_url(clips["webm"], "video/webm"), param="p")
    assert data == clips["webm"] and mime == "video/webm"
    assert video.read_source(b64(clips["mp4"]), param="p") == (clips["mp4"], None)
    for source, code in [("/etc/passwd", "unsupported_video_source"), ("file:///tmp/x.mp4", "unsupported_video_source"),
                         ("ftp://example.com/x.mp4", "unsupported_video_source"), ("not base64 !!", "invalid_video"),
                         ("http://127.0.0.1:1/x.mp4", "video_url_refused"), ("", "invalid_video")]:
        with pytest.raises(VideoError) as caught:
            video.read_source(source, param="p")
        assert caught.value.code == code, source
    with pytest.raises(VideoError) as caught:
        video.read_source("https://example.com/x.mp4", param="p", allow_urls=False)
    assert caught.value.code == "video_url_disabled"
    with pytest.raises(VideoError) as caught:
        video.read_source(b64(clips["mp4"]), param="p", max_bytes=100)
    assert caught.value.code == "video_too_large"


def test_the_frames_go_to_another_server_as_a_video(clips):
    clip = video.decode(clips["mp4"], SMALL)
    assert clip.data_url() == data_url(clips["mp4"])
    from_frames = video.from_images([Image.fromarray(f) for f in clip.frames], SMALL)
    url = from_frames.data_url()
    assert url.startswith("data:video/mp4;base64,")
    again = video.decode(base64.b64decode(url.split(",", 1)[1]), SMALL)
    assert len(again.frames) >= 4


# ---------------------------------------------------------------- the model: prompt, positions, answers

@pytest.fixture(scope="module")
def clip(clips):
    return video.decode(clips["mp4"], replace(SMALL, fps=4.0))  # 12 frames


@pytest.fixture(scope="module")
def video_prompts(engine, clip, clips):
    other = video.decode(clips["webm"], SMALL)
    photo = Image.new("RGB", (84, 56), (10, 200, 10))
    cases = {
        "video": [ChatTurn("user", [clip, "What happens in this video?"])],
        "video and image": [ChatTurn("user", [photo, other, "Compare the picture with the clip."])],
        "video, later turn": [ChatTurn("system", ["Be brief."]), ChatTurn("user", ["Hi."]),
                              ChatTurn("assistant", ["Hello!"]), ChatTurn("user", [other, "And this?"])],
        "two videos": [ChatTurn("user", [clip, "first", other, "second: which is longer?"])],
    }
    return {name: engine.build_prompt(turns) for name, turns in cases.items()}


def test_the_prompts_video_tokens_match_the_frames_grid(engine, clip, video_prompts):
    prompt = video_prompts["video"]
    arrays = prompt.arrays
    frames, height, width = clip.frames.shape[:3]
    assert arrays["video_grid_thw"].tolist() == [[frames // 2, height // 14, width // 14]]
    video_pad = engine.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    tokens = int((arrays["input_ids"] == video_pad).sum())
    assert tokens == frames // 2 * (height // 28) * (width // 28)
    assert arrays["pixel_values_videos"].shape == (frames // 2 * (height // 14) * (width // 14), 3 * 2 * 14 * 14)
    assert arrays["second_per_grid_ts"].tolist() == pytest.approx([2 / clip.fps])
    assert prompt.video_keys == (clip.key,) and "<|vision_start|><|video_pad|><|vision_end|>" in prompt.text


def test_time_positions_follow_the_sampled_rate(engine, clip, video_prompts):
    """Qwen2.5-VL's time position of a temporal patch is its start in seconds x tokens_per_second."""
    from serving.engines.builtin.decode import Prefill

    wait_idle(engine)
    prompt = video_prompts["video"]
    prefill = Prefill(engine.model, prompt.arrays)
    ids = prompt.arrays["input_ids"][0]
    video_pad = engine.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    where = np.flatnonzero(ids == video_pad)
    time_ids = prefill.positions.numpy()[0, 0, where]
    per_patch = (clip.frames.shape[1] // 28) * (clip.frames.shape[2] // 28)
    starts = time_ids[::per_patch] - time_ids[0]
    per_second = engine.model.config.vision_config.tokens_per_second
    assert starts.tolist() == [int(k * clip.seconds_per_grid * per_second) for k in range(len(clip.frames) // 2)]


@pytest.mark.parametrize("case", ["video", "video and image", "video, later turn", "two videos"])
def test_video_alone_equals_paddleformers_generate(engine, video_prompts, case):
    text, finish = collect(engine.submit(video_prompts[case], greedy()))
    assert (text, finish.completion_tokens) == reference(engine, video_prompts[case])


def test_video_in_a_running_batch_changes_no_token(engine, video_prompts):
    from test_continuous_batching import CASES

    alone = {name: collect(engine.submit(p, greedy())) for name, p in video_prompts.items()}
    text_prompt = engine.build_prompt(CASES["one image"])
    long_job = engine.submit(text_prompt, greedy(max_tokens=200, stop=[]))
    events = iter(long_job)
    for _ in range(3):
        next(events)
    jobs = {}
    for name, p in video_prompts.items():
        jobs[name] = engine.submit(p, greedy())
        time.sleep(0.03)
    together = {name: collect(job) for name, job in jobs.items()}
    long_job.cancel()
    for name in video_prompts:
        assert together[name][0] == alone[name][0], name
        assert together[name][1].completion_tokens == alone[name][1].completion_tokens, name


def test_chunked_prefill_of_a_video_changes_no_token(engine, video_prompts, no_prefix_cache):
    from test_continuous_batching import CASES

    scheduler = engine.scheduler
    prompt = video_prompts["two videos"]
    alone = collect(engine.submit(prompt, greedy()))
    blocker = engine.submit(engine.build_prompt(CASES["text"]), greedy(max_tokens=200))
    next(iter(blocker))
    saved = scheduler.prefill_tokens
    scheduler.prefill_tokens = 9
    try:
        chunked = collect(engine.submit(prompt, greedy()))
    finally:
        scheduler.prefill_tokens = saved
        blocker.cancel()
    assert prompt.prompt_tokens > 9 * 3
    assert chunked[0] == alone[0] and chunked[1].completion_tokens == alone[1].completion_tokens


def test_a_second_question_about_a_video_skips_the_processor_and_the_tower(engine, clips, no_prefix_cache):
    fresh = video.decode(clips["mp4"], replace(SMALL, fps=1.0))
    before = engine.cache_stats()
    first = collect(engine.submit(engine.build_prompt([ChatTurn("user", [fresh, "What moves?"])]), greedy(max_tokens=4)))
    again = video.decode(clips["mp4"], replace(SMALL, fps=1.0))  # the same clip sent again: the same key
    second = collect(engine.submit(engine.build_prompt([ChatTurn("user", [again, "Which way?"])]), greedy(max_tokens=4)))
    after = engine.cache_stats()
    assert again.key == fresh.key
    assert after["pixels"]["hits"] - before["pixels"]["hits"] >= 1
    assert after["vision"]["hits"] - before["vision"]["hits"] >= 1
    assert first[1] is not None and second[1] is not None


# ---------------------------------------------------------------- the API

API_SETTINGS = dict(max_videos=2, max_frames=16, max_video_seconds=5.0, max_video_bytes=400_000,
                    image_url_allow_hosts=("127.0.0.1",), **SMALL_SETTINGS)


@pytest.fixture(scope="module")
def api(settings, engine):
    return create_app(replace(settings, **API_SETTINGS), engine).test_client()


class VideoHost(LoopbackServer):
    """A local HTTP server with a video on it (127.0.0.1: allowed only through IMAGE_URL_ALLOW_HOSTS)."""

    def __init__(self, files: dict):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = files.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args):
                pass

        super().__init__(Handler)


@pytest.fixture(scope="module")
def video_host(clips):
    host = VideoHost({"/clip.mp4": clips["mp4"], "/big.mp4": b"\0" * 500_000})
    yield host
    host.server.shutdown()


def ask(*parts, text="What happens in the video?", role="user", max_tokens=4):
    return {"messages": [{"role": role, "content": [*parts, {"type": "text", "text": text}]}], "max_tokens": max_tokens,
            "temperature": 0}


def test_api_request_forms(api, engine, clips, video_host, settings):
    forms = {
        "video_url, data URL": {"type": "video_url", "video_url": {"url": data_url(clips["mp4"])}},
        "video_url, bare string": {"type": "video_url", "video_url": data_url(clips["webm"], "video/webm")},
        "video, raw base64": {"type": "video", "video": b64(clips["webm"])},
        "video, URL": {"type": "video", "video": video_host.url + "/clip.mp4"},
        "video_url, URL": {"type": "video_url", "video_url": {"url": video_host.url + "/clip.mp4"}},
        "video, list of frames": {"type": "video", "video": [b64(png_bytes((90, 60), (20 * i, 40, 200)))
                                                             for i in range(5)], "fps": 1.0},
        "video with its own fps": {"type": "video", "video": b64(clips["mov"]), "fps": 1.0},
    }
    service = ChatService(engine, replace(settings, **API_SETTINGS))
    for name, part in forms.items():
        response = api.post(CHAT, json=ask(part))
        assert response.status_code == 200, (name, response.get_json())
        body = response.get_json()
        # the prompt the server built is the one the chat service builds for the same part
        from serving import protocol

        turns = protocol.normalise_messages(protocol.parse_request(ask(part)))
        reply = service.start(turns, service.sampling_params(max_tokens=4, temperature=0)).collect()
        assert body["usage"]["prompt_tokens"] == reply.finished.prompt_tokens, name
        assert body["choices"][0]["message"]["content"] == reply.text, name


def test_api_answer_equals_the_engines_on_the_same_video(api, engine, clips, settings):
    body = api.post(CHAT, json=ask({"type": "video_url", "video_url": {"url": data_url(clips["mp4"])}},
                                   max_tokens=12)).get_json()
    clip = video.decode(clips["mp4"], VideoLimits.from_settings(replace(settings, **API_SETTINGS)))
    prompt = engine.build_prompt([ChatTurn("user", [clip, "What happens in the video?"])])
    text, finish = collect(engine.submit(prompt, greedy(max_tokens=12)))
    assert body["choices"][0]["message"]["content"] == text
    assert body["usage"]["prompt_tokens"] == prompt.prompt_tokens


@pytest.mark.parametrize("name, body, code", [
    ("too many videos", lambda c, h: ask(*[{"type": "video", "video": b64(c["webm"])}] * 3), "too_many_videos"),
    ("too long", lambda c, h: ask({"type": "video", "video": b64(make_video(seconds=6, fps=4, size=(64, 48)))}),
     "video_too_long"),
    ("too large", lambda c, h: ask({"type": "video", "video": b64(b"\0" * 500_000)}), "video_too_large"),
    ("too large at the URL", lambda c, h: ask({"type": "video", "video": h.url + "/big.mp4"}), "video_too_large"),
    ("too many frames", lambda c, h: ask({"type": "video", "video": [b64(png_bytes())] * 17}), "too_many_frames"),
    ("audio only", lambda c, h: ask({"type": "video", "video": b64(audio_only())}), "no_video_stream"),
    ("zero frames", lambda c, h: ask({"type": "video", "video": b64(zero_frames())}), "empty_video"),
    ("corrupt", lambda c, h: ask({"type": "video", "video": b64(b"garbage" * 100)}), "invalid_video"),
    ("truncated", lambda c, h: ask({"type": "video", "video": b64(c["mp4"][: len(c["mp4"]) // 2])}), "invalid_video"),
    ("a local path", lambda c, h: ask({"type": "video", "video": "/etc/passwd"}), "unsupported_video_source"),
    ("a missing URL", lambda c, h: ask({"type": "video_url", "video_url": {"url": h.url + "/none.mp4"}}),
     "video_fetch_failed"),
    ("a private URL", lambda c, h: ask({"type": "video_url", "video_url": {"url": "http://10.0.0.1/x.mp4"}}),
     "video_url_refused"),
    ("a frame that is not an image", lambda c, h: ask({"type": "video", "video": [b64(b"nope" * 10)]}),
     "invalid_image"),
    ("in an assistant message", lambda c, h: {"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "video", "video": b64(c["mp4"])}]},
        {"role": "user", "content": "and?"}]}, "invalid_value"),
    ("an empty list of frames", lambda c, h: ask({"type": "video", "video": []}), "invalid_value"),
    ("fps out of range", lambda c, h: ask({"type": "video", "video": b64(c["mp4"]), "fps": 0}), "invalid_value"),
])
def test_api_limits_answer_400_with_a_reason(api, clips, video_host, name, body, code):
    response = api.post(CHAT, json=body(clips, video_host))
    error = response.get_json()["error"]
    assert response.status_code == 400 and error["code"] == code, (name, error)
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] and error["param"].startswith("messages"), error
    assert api.get("/health").status_code == 200


def test_videos_can_be_turned_off(settings, engine, clips):
    client = create_app(replace(settings, max_videos=0), engine).test_client()
    error = client.post(CHAT, json=ask({"type": "video", "video": b64(clips["mp4"])})).get_json()["error"]
    assert error["code"] == "too_many_videos"
    client = create_app(replace(settings, allow_image_urls=False), engine).test_client()
    error = client.post(CHAT, json=ask({"type": "video", "video": "https://example.com/a.mp4"})).get_json()["error"]
    assert error["code"] == "video_url_disabled"


def test_api_streams_an_answer_about_a_video(api, clips):
    body = {**ask({"type": "video_url", "video_url": {"url": data_url(clips["webm"], "video/webm")}}), "stream": True}
    response = api.post(CHAT, json=body)
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    lines = [line for line in response.get_data(as_text=True).splitlines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]" and len(lines) >= 3


def test_metrics_count_videos_and_frames(api, clips):
    def value(text, name):
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))

    before = api.get("/metrics").get_data(as_text=True)
    assert api.post(CHAT, json=ask({"type": "video", "video": b64(clips["mp4"])})).status_code == 200
    after = api.get("/metrics").get_data(as_text=True)
    assert value(after, 'qwenvl_videos_processed_total{source="base64"}') - \
        value(before, 'qwenvl_videos_processed_total{source="base64"}') == 1
    assert value(after, 'qwenvl_video_frames_total{kind="decoded"}') - \
        value(before, 'qwenvl_video_frames_total{kind="decoded"}') == 72
    sampled = value(after, 'qwenvl_video_frames_total{kind="sampled"}') - \
        value(before, 'qwenvl_video_frames_total{kind="sampled"}')
    assert sampled == 6


def test_video_settings_are_flags_and_environment_variables():
    from serving.config import load_settings

    s = load_settings(["--video-fps", "1.5", "--max-frames", "64"], {"MAX_VIDEOS": "3", "VIDEO_TOTAL_PIXELS": "1000000",
                                                                     "MAX_VIDEO_SECONDS": "30", "MIN_FRAMES": "2"})
    limits = VideoLimits.from_settings(s)
    assert (limits.fps, limits.max_frames, limits.total_pixels, limits.max_seconds, limits.min_frames) == \
        (1.5, 64, 1_000_000, 30.0, 2)
    assert s.max_videos == 3
    readme = (ROOT / "README.md").read_text()
    for flag in ("--video-fps", "--min-frames", "--max-frames", "--video-min-pixels", "--video-max-pixels",
                 "--video-total-pixels", "--max-video-seconds", "--max-video-bytes", "--max-videos"):
        assert f"`{flag}`" in readme, flag


# ---------------------------------------------------------------- the chat widget and the client

def test_widget_upload_a_video_and_ask(engine, settings, clips):
    from serving.notebook.widgets import ChatWidget

    custom = replace(settings, **SMALL_SETTINGS)
    chat = ChatWidget(engine, custom, temperature=0.0, max_tokens=8)
    try:
        assert chat.add_upload("clip.mp4", clips["mp4"])
        assert chat.error == "" and len(chat.pending) == 1
        pending = chat.pending[0]
        assert isinstance(pending.image, video.Video)
        strip = Image.open(io.BytesIO(pending.thumbnail))
        assert strip.width > 4 * strip.height  # a strip of the sampled frames side by side
        assert "6 frames" in chat.status
        assert chat.add_upload("red.png", png_bytes((90, 60)))
        assert not chat.add_upload("broken.mp4", clips["mp4"][:2000]) and "broken.mp4" in chat.error
        chat.question.value = "What happens?"
        assert chat.send() and chat.wait(120) and chat.error == ""
        user = chat.history[0]
        assert isinstance(user.parts[0], video.Video) and user.parts[-1] == "What happens?"
        service = ChatService(engine, custom)
        expected = service.start([user], service.sampling_params(max_tokens=8, temperature=0)).collect().text
        assert chat.answer == expected
        def texts(widget):  # every text the transcript shows, whatever its layout
            value = getattr(widget, "value", None)
            found = [value] if isinstance(value, str) else []
            for child in getattr(widget, "children", ()):
                found += texts(child)
            return found

        assert any("clip.mp4" in text and "frames" in text for text in texts(chat.transcript))  # its caption
    finally:
        chat.clear()
        chat.wait(60)


def test_widget_refuses_more_videos_than_the_limit(engine, settings, clips):
    from serving.notebook.widgets import ChatWidget

    chat = ChatWidget(engine, replace(settings, max_videos=1, **SMALL_SETTINGS), max_tokens=2)
    assert chat.add_upload("a.webm", clips["webm"])
    assert not chat.add_upload("b.webm", clips["webm"]) and "at most 1 videos" in chat.error


def test_test_connection_sends_a_video(live_server, tmp_path, clips, capsys):
    sys.path.insert(0, str(ROOT))
    import test_connection

    path = tmp_path / "clip.webm"
    path.write_bytes(clips["webm"])
    part = test_connection.video_part(str(path), "openai")
    assert part["video_url"]["url"].startswith("data:video/webm;base64,")
    assert test_connection.video_part(str(path), "tutorial") == {"type": "video", "video": b64(clips["webm"])}
    assert test_connection.video_part("https://example.com/a.mp4", "openai") == \
        {"type": "video_url", "video_url": {"url": "https://example.com/a.mp4"}}
    api_url = live_server.base_url + "/v1/chat/completions"
    for fmt in ("tutorial", "openai"):
        code = test_connection.main(["--api-url", api_url, "--video", str(path), "--format", fmt, "--max-tokens", "3",
                                     "--temperature", "0"])
        out = capsys.readouterr()
        assert code == 0, out.err
        assert "prompt_tokens=" in out.out
    assert test_connection.main(["--api-url", api_url, "--video", str(tmp_path / "missing.mp4")]) == 1
    assert "video file not found" in capsys.readouterr().err


def test_the_upstream_engine_passes_video_url_on(settings, serve_app, clips):
    """--backend openai: the video goes on as a video_url part holding the file as received, and the answer
    through the gateway equals the upstream's own (it samples the same file with the same settings)."""
    import requests

    from serving.jobs import SamplingParams
    from serving.engines.upstream import UpstreamEngine

    replica = serve_app(**SMALL_SETTINGS)
    gateway_settings = replace(settings, backend="openai", upstream=(replica.base_url,), **SMALL_SETTINGS)
    engine = UpstreamEngine.from_settings(gateway_settings)
    try:
        clip = video.decode(clips["webm"], SMALL)
        payload = engine.payload([ChatTurn("user", [clip, "What happens?"])], SamplingParams(max_tokens=4))
        part = payload["messages"][0]["content"][0]
        assert part == {"type": "video_url", "video_url": {"url": data_url(clips["webm"], "video/webm")}}
        client = create_app(gateway_settings, engine).test_client()
        for form in ({"type": "video", "video": b64(clips["webm"])},
                     {"type": "video_url", "video_url": {"url": data_url(clips["mp4"])}}):
            body = ask(form, max_tokens=8)
            via = client.post(CHAT, json=body)
            direct = requests.post(replica.base_url + CHAT, json=body, timeout=120).json()
            assert via.status_code == 200, via.get_json()
            assert via.get_json()["choices"][0]["message"] == direct["choices"][0]["message"]
            assert via.get_json()["usage"]["prompt_tokens"] == direct["usage"]["prompt_tokens"]
        frames = ask({"type": "video", "video": [b64(png_bytes((90, 60), (30 * i, 60, 90))) for i in range(4)]})
        assert client.post(CHAT, json=frames).status_code == 200  # sent on as an mp4 of the frames
    finally:
        engine.close()


def test_serving_a_video_imports_no_torch():
    code = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from serving.intake import video
clip = video.decode(video.encode_mp4(__import__("numpy").zeros((4, 56, 56, 3), "uint8"), 2.0))
assert len(clip.frames) == 4
bad = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
assert not bad, bad
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize("data", [
    lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="100" height="100"><rect width="50" height="50"/></svg>',
    lambda: make_video(seconds=0.5, fps=4, size=(64, 48)).replace(b"avc1", b"zzzz"),  # a fourcc FFmpeg cannot decode
], ids=["svg", "unknown fourcc"])
def test_a_stream_ffmpeg_cannot_decode_is_a_400(data):
    """FFmpeg opens these but has no decoder for their stream (no codec context): it was an AttributeError, a 500."""
    with pytest.raises(VideoError) as caught:
        video.decode(data(), SMALL, param="p")
    assert caught.value.code == "invalid_video" and "no decoder" in caught.value.message


def test_a_video_prompt_prints_no_paddle_type_promotion_warning(engine, clips, capfd):
    """PaddleFormers' get_rope_index multiplies int64 positions by the seconds per patch: given a float32
    tensor, Paddle's C++ logged "got different data type, run type promotion automatically" on every video
    request (seen in the notebooks). The seconds go in as Python floats: the same positions, no warning."""
    from serving.jobs import SamplingParams

    clip = video.decode(clips["mp4"], VideoLimits(), param="p")
    prompt = engine.build_prompt([ChatTurn("user", [clip, "What happens?"])])
    capfd.readouterr()
    engine.generate(prompt, SamplingParams(max_tokens=1, temperature=0))
    assert "type promotion" not in capfd.readouterr().err
