"""Videos from a request -> sampled frames sized for the model, in memory, with PyAV. Never written to disk.

A video arrives as a data URL, raw base64, a guarded http(s) URL (the image URL guard and fetch
limits), or as a list of images that are its frames (as qwen-vl-utils allows). Local paths and
file:// are refused. PyAV (`av` on PyPI) brings FFmpeg in its wheel: whatever container and codec
that FFmpeg decodes (mp4/H.264, webm/VP9, mov, ...) works, and no ffmpeg command line is needed.

Sampling is qwen-vl-utils' for Qwen2.5-VL (`smart_nframes`, `fetch_video`):
- frames = the video's frames / its frame rate x FPS, within MIN_FRAMES..MAX_FRAMES and the frames
  the video has, rounded down to an even count (the vision tower takes frames in pairs: temporal
  patch size 2); taken evenly over the video (`linspace(0, frames - 1, n)`, rounded);
- every frame is resized to one size, sides multiples of 28, within the per-frame budget
  VIDEO_MIN_PIXELS..VIDEO_MAX_PIXELS and, with the others, within VIDEO_TOTAL_PIXELS
  (per frame at most VIDEO_TOTAL_PIXELS / frames x 2);
- the sampled rate (frames / source frames x source fps) is what the model's time positions use:
  `second_per_grid_ts` = 2 / that rate.
One difference, so a video can never cost more than VIDEO_TOTAL_PIXELS / 784 prompt tokens: the
frame count is also capped at what the total budget holds at VIDEO_MIN_PIXELS a frame (qwen-vl-utils
lets the per-frame floor break its total budget for long videos).

Decoding is bounded in memory and time: a first pass only reads packets (counting frames, no
decoding); the second decodes one frame at a time and keeps only the sampled ones, already scaled
down (FFmpeg's swscale, bicubic) and turned by the stream's rotation; the deadline is checked after
every packet. What decoding costs is set by the pixels the decoder produces, not by the file's bytes
(a 14 KB GIF with a 7000x7000 screen and 1x1 frames made FFmpeg paint 49 megapixels a frame for
minutes), so before anything is decoded the stored frame size is held to MAX_FRAME_PIXELS (and
MAX_IMAGE_PIXELS) and frames x width x height to MAX_VIDEO_DECODE_PIXELS; the frames actually decoded
are counted against the same budget.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
import re
import time
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Optional

import numpy as np

from serving.intake import urlguard
from serving.errors import InvalidRequest, RequestTimeout

PATCH_FACTOR = 28  # patch 14 x spatial merge 2: frame sides are multiples of this
TEMPORAL_PATCH = 2  # frames per temporal patch of the vision tower: the frame count is even
TOKEN_PIXELS = PATCH_FACTOR * PATCH_FACTOR  # pixels of one frame pair that make one prompt token
MAX_ASPECT_RATIO = 200
DECODE_RATE_CAP = 60  # frames decoded at most: MAX_VIDEO_SECONDS x this (a 60 fps video of the longest length)
MAX_BAD_PACKETS = 32  # packets the decoder may refuse before the video is called corrupt
MAX_FRAME_PIXELS = 7680 * 4320  # a stored frame at most 8K UHD: one frame's decoding stays well under a second

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w-]+=[^;,]*)*)(?P<b64>;base64)?,(?P<data>.*)$",
                       re.DOTALL)
_B64_WHITESPACE = re.compile(r"\s+")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_MIME_BY_FORMAT = {"mp4": "video/mp4", "mov": "video/quicktime", "webm": "video/webm", "matroska": "video/x-matroska",
                   "avi": "video/x-msvideo", "gif": "image/gif", "mpegts": "video/mp2t", "flv": "video/x-flv",
                   "ogg": "video/ogg"}


class VideoError(InvalidRequest):
    """A video could not be read or used; `param` names where it was in the request."""

    default_code = "invalid_video"


@dataclass(frozen=True)
class VideoLimits:
    """How videos are sampled and how large they may be (serving.config.Settings owns the defaults)."""

    fps: float = 2.0  # frames sampled per second of video
    min_frames: int = 4
    max_frames: int = 768
    min_pixels: int = 128 * TOKEN_PIXELS  # per frame
    max_pixels: int = 768 * TOKEN_PIXELS  # per frame
    total_pixels: int = 16384 * TOKEN_PIXELS  # all frames together, counted per frame pair
    max_seconds: float = 600.0
    max_bytes: int = 32 * 1024 * 1024
    max_frame_pixels: int = MAX_FRAME_PIXELS  # a frame's width x height as stored (read before decoding)
    max_decode_pixels: int = 4_000_000_000  # all decoded frames' pixels together (frames x width x height)

    @classmethod
    def from_settings(cls, s) -> "VideoLimits":
        return cls(fps=s.video_fps, min_frames=s.min_frames, max_frames=s.max_frames, min_pixels=s.video_min_pixels,
                   max_pixels=s.video_max_pixels, total_pixels=s.video_total_pixels, max_seconds=s.max_video_seconds,
                   max_bytes=s.max_video_bytes, max_frame_pixels=min(s.max_image_pixels, MAX_FRAME_PIXELS),
                   max_decode_pixels=s.max_video_decode_pixels)

    def narrowed(self, *, fps=None, max_frames=None, min_pixels=None, max_pixels=None,
                 total_pixels=None) -> "VideoLimits":
        """A request's own sampling choices (qwen-vl-utils' per-video keys), kept within these limits."""
        low = _within(min_pixels, PATCH_FACTOR * PATCH_FACTOR * 4, self.max_pixels, self.min_pixels)
        return replace(self, fps=self.fps if fps is None else float(fps),
                       max_frames=_within(max_frames, TEMPORAL_PATCH, self.max_frames, self.max_frames),
                       min_frames=min(self.min_frames, _within(max_frames, TEMPORAL_PATCH, self.max_frames,
                                                               self.max_frames)),
                       min_pixels=low, max_pixels=max(low, _within(max_pixels, low, self.max_pixels, self.max_pixels)),
                       total_pixels=_within(total_pixels, low, self.total_pixels, self.total_pixels))

    @property
    def max_decoded_frames(self) -> int:
        return math.ceil(self.max_seconds * DECODE_RATE_CAP)


@dataclass(eq=False)
class Video:
    """A video as the engines take it: its sampled frames, sized, and the rate they were sampled at."""

    frames: np.ndarray  # uint8 [T, H, W, 3]; T even, H and W multiples of 28: what the video processor takes
    fps: float  # sampled frames per second of the source (qwen-vl-utils' sample fps)
    timestamps: tuple  # seconds into the source of each frame
    duration: float  # seconds of the source
    decoded_frames: int = 0  # frames the decoder produced (0 for a list of images)
    source_frames: int = 0  # frames in the source (images given, for a list of images)
    data: Optional[bytes] = None  # the encoded file as received, for engines that pass videos on (None: images)
    mime: str = "video/mp4"
    _key: Optional[str] = None

    @property
    def seconds_per_grid(self) -> float:
        """Seconds of video one temporal patch (two frames) covers: the model's `second_per_grid_ts`."""
        return TEMPORAL_PATCH / self.fps

    @property
    def width(self) -> int:
        return int(self.frames.shape[2])

    @property
    def height(self) -> int:
        return int(self.frames.shape[1])

    @property
    def key(self) -> str:
        """Content digest of the frames (the pixel and vision-tower caches' key)."""
        if self._key is None:
            digest = hashlib.blake2b(np.ascontiguousarray(self.frames).data, digest_size=16)
            digest.update(f"video{self.frames.shape}".encode())
            self._key = "video:" + digest.hexdigest()
        return self._key

    def thumbnails(self, count: int = 8) -> list:
        """Up to `count` of the sampled frames, evenly spread, as PIL images."""
        from PIL import Image

        picks = np.unique(np.linspace(0, len(self.frames) - 1, min(count, len(self.frames))).round().astype(int))
        return [Image.fromarray(self.frames[i]) for i in picks]

    def data_url(self) -> str:
        """The video as a data URL for another server: the file as received, else the frames encoded as mp4."""
        data, mime = (self.data, self.mime) if self.data is not None else (encode_mp4(self.frames, self.fps), "video/mp4")
        return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")

    def describe(self) -> str:
        return f"{self.duration:.1f} s, {len(self.frames)} frames at {self.fps:.2f} fps, {self.width}x{self.height}"


# ---------------------------------------------------------------- sampling (qwen-vl-utils' rules)

def frame_count(total_frames: int, video_fps: float, limits: VideoLimits) -> int:
    """How many frames to sample from a video of `total_frames` at `video_fps` (an even number >= 2)."""
    if total_frames < TEMPORAL_PATCH:
        return TEMPORAL_PATCH  # a one-frame video: that frame twice (qwen-vl-utils would refuse it)
    min_frames = _ceil(limits.min_frames, TEMPORAL_PATCH)
    max_frames = _floor(min(limits.max_frames, total_frames, budget_frames(limits)), TEMPORAL_PATCH)
    wanted = total_frames / video_fps * limits.fps
    count = min(max(wanted, min_frames), max(max_frames, TEMPORAL_PATCH), total_frames)
    return max(TEMPORAL_PATCH, _floor(count, TEMPORAL_PATCH))


def budget_frames(limits: VideoLimits) -> int:
    """The most frames VIDEO_TOTAL_PIXELS holds at the per-frame floor (never fewer than MIN_FRAMES)."""
    return max(_ceil(limits.min_frames, TEMPORAL_PATCH),
               _floor(TEMPORAL_PATCH * limits.total_pixels / (limits.min_pixels * 1.05), TEMPORAL_PATCH))


def frame_indices(total_frames: int, count: int) -> list:
    """`count` frame numbers spread evenly over 0..total_frames-1, ends included (rounded like torch's linspace)."""
    if total_frames <= 1:
        return [0] * count
    return np.linspace(0, total_frames - 1, count).round().astype(int).tolist()


def frame_size(height: int, width: int, count: int, limits: VideoLimits, *, param: Optional[str] = None) -> tuple:
    """(height, width) every sampled frame is resized to: sides multiples of 28 within the budgets."""
    ceiling = max(min(limits.max_pixels, limits.total_pixels / count * TEMPORAL_PATCH), int(limits.min_pixels * 1.05))
    try:
        return smart_resize(height, width, PATCH_FACTOR, limits.min_pixels, ceiling)
    except ValueError as exc:
        raise VideoError(f"video frames of {width}x{height} cannot be used: {exc}", param=param,
                         code="invalid_video_size") from None


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: float) -> tuple:
    """qwen-vl-utils' rule, as serving.intake.images has it (here with a float ceiling, as fetch_video computes it)."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, "
                         f"got {max(height, width) / min(height, width):.1f}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# ---------------------------------------------------------------- sources

def read_source(source: str, *, param: str, allow_urls: bool = True, timeout: float = 10.0,
                max_bytes: int = VideoLimits.max_bytes, allow_hosts=()) -> tuple:
    """(bytes, declared mime or None) of a video given as a data URL, raw base64 or an http(s) URL."""
    if not isinstance(source, str) or not source.strip():
        raise VideoError("video is empty", param=param)
    source = source.strip()
    scheme = _SCHEME.match(source)
    scheme = scheme.group(1).lower() if scheme else ""
    if scheme == "data":
        match = _DATA_URL.match(source)
        if not match or not match.group("b64"):
            raise VideoError("a data URL must look like data:video/mp4;base64,<data>", param=param)
        return _from_base64(match.group("data"), param, max_bytes), match.group("mime")
    if scheme in ("http", "https"):
        if not allow_urls:
            raise VideoError("video URLs are turned off on this server; send the video as base64",
                             param=param, code="video_url_disabled")
        try:
            return urlguard.fetch(source, timeout=timeout, max_bytes=max_bytes, allow_hosts=allow_hosts), None
        except urlguard.FetchError as exc:
            code = {"image_url_refused": "video_url_refused", "image_too_large": "video_too_large"}.get(
                exc.code, "video_fetch_failed")
            raise VideoError(exc.message.replace("image", "video"), param=param, code=code) from None
    if scheme:
        raise _unsupported(param, f"{scheme}: URLs are not accepted")
    if source.startswith(("/", "./", "../", "~")):  # no video container's base64 starts so ("/9j/" is a JPEG)
        raise _unsupported(param, "local file paths are not accepted")
    return _from_base64(source, param, max_bytes), None


def _unsupported(param: str, what: str) -> VideoError:
    return VideoError(f"{what}; send the video as base64, a data URL or an http(s) URL",
                      param=param, code="unsupported_video_source")


def _too_large(size: int, max_bytes: int, param: str) -> None:
    if size > max_bytes:
        raise VideoError(f"video is {size} bytes, more than the limit of {max_bytes}", param=param,
                         code="video_too_large")


def _from_base64(text: str, param: str, max_bytes: int) -> bytes:
    compact = _B64_WHITESPACE.sub("", text)
    _too_large(len(compact) * 3 // 4 - 2, max_bytes, param)  # before decoding anything
    compact += "=" * (-len(compact) % 4)
    try:
        if "-" in compact or "_" in compact:
            data = base64.b64decode(compact, altchars=b"-_", validate=True)
        else:
            data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise VideoError("video data is not valid base64 (nor a data: or http(s) URL)", param=param) from None
    _too_large(len(data), max_bytes, param)
    return data


# ---------------------------------------------------------------- decoding

@dataclass
class _Probe:
    stream_index: int
    frames: int  # packets of the video stream: its frames, as the container holds them
    rate: float  # frames per second
    duration: float  # seconds
    mime: str


def decode(data: bytes, limits: VideoLimits = VideoLimits(), *, param: str = "video",
           deadline: Optional[float] = None, mime: Optional[str] = None) -> Video:
    """Sample and size the frames of an encoded video. `deadline` (time.perf_counter()) bounds the work."""
    _too_large(len(data), limits.max_bytes, param)
    probe = _probe(data, limits, param, deadline)
    count = frame_count(probe.frames, probe.rate, limits)
    budget = _DecodeBudget(limits, param)  # both passes of _grab spend from it
    frames, times, decoded = _grab(data, probe, frame_indices(probe.frames, count), count, limits, param, deadline,
                                   budget)
    total = probe.frames
    if decoded != probe.frames:  # the decoder made more or fewer frames than the packets promised: sample those
        if decoded == 0:
            raise VideoError("the video has no frames that can be decoded (truncated or corrupt?)", param=param,
                             code="empty_video")
        total = decoded
        count = frame_count(decoded, probe.rate, limits)
        frames, times, decoded = _grab(data, probe, frame_indices(decoded, count), count, limits, param, deadline,
                                       budget)
        if len(frames) != count:
            raise VideoError("the video decodes differently each time (corrupt?)", param=param)
    fps = count / total * probe.rate
    return Video(frames=frames, fps=fps, timestamps=tuple(times), duration=total / probe.rate,
                 decoded_frames=decoded, source_frames=total, data=data, mime=mime or probe.mime)


def _open(data: bytes, param: str):
    import av

    try:
        return av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, ValueError, OSError, EOFError) as exc:
        raise VideoError("the data is not a video this server can decode (mp4, webm, mov, mkv, ...)", param=param) from None


def _video_stream(container, param: str):
    import av

    streams = [s for s in container.streams.video if not (s.disposition & av.stream.Disposition.attached_pic)]
    if not streams:
        others = ", ".join(sorted({s.type for s in container.streams})) or "nothing"
        raise VideoError(f"the file has no video stream (it holds {others})", param=param, code="no_video_stream")
    return streams[0]


def _probe(data: bytes, limits: VideoLimits, param: str, deadline) -> _Probe:
    """Read the packets (no decoding): frame count, rate and duration, checked against the limits."""
    import av

    with _open(data, param) as container:
        stream = _video_stream(container, param)
        context = stream.codec_context
        if context is None:  # FFmpeg has no decoder for it (an SVG, an unknown fourcc)
            raise VideoError("the file's video stream is in a format FFmpeg has no decoder for here", param=param,
                             code="invalid_video")
        width, height = int(context.width or 0), int(context.height or 0)
        _check_frame_pixels(width, height, limits, param)
        declared = _declared_seconds(container, stream)
        _check_seconds(declared, limits, param)
        frames, first, last = 0, None, None
        try:
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue  # the end-of-stream marker
                frames += 1
                if packet.pts is not None:
                    start = float(packet.pts * packet.time_base)
                    end = start + float((packet.duration or 0) * packet.time_base)
                    first = start if first is None else min(first, start)
                    last = end if last is None else max(last, end)
                if frames > limits.max_decoded_frames:
                    raise VideoError(f"the video has more than {limits.max_decoded_frames} frames, more than this "
                                     f"server decodes ({DECODE_RATE_CAP} per second of MAX_VIDEO_SECONDS)",
                                     param=param, code="too_many_frames")
                if frames * width * height > limits.max_decode_pixels:  # before a single frame is decoded
                    raise _too_costly(f"{frames}+ frames of {width}x{height}", limits, param)
                if frames % 256 == 0:
                    _check_deadline(deadline)
        except av.FFmpegError:
            pass  # a damaged tail: the packets before it still count
        if frames == 0:
            raise VideoError("the video stream has no frames", param=param, code="empty_video")
        span = (last - first) if first is not None and last is not None and last > first else 0.0
        rate = _rate(stream, frames, span or declared)
        if rate is None:
            raise VideoError("the video's frame rate cannot be told", param=param)
        _check_seconds(max(frames / rate, span), limits, param)
        return _Probe(stream.index, frames, rate, frames / rate, _mime(container, data))


class _DecodeBudget:
    """The pixels the decoder may still produce for one video (MAX_VIDEO_DECODE_PIXELS), frame by frame: a
    stream whose frames come out larger or more numerous than its container said is stopped at the budget."""

    def __init__(self, limits: VideoLimits, param: str):
        self.limits, self.param, self.spent, self.frames = limits, param, 0, 0

    def spend(self, frame) -> None:
        _check_frame_pixels(frame.width, frame.height, self.limits, self.param)
        self.spent += frame.width * frame.height
        self.frames += 1
        if self.spent > self.limits.max_decode_pixels:
            raise _too_costly(f"{self.frames} decoded frames", self.limits, self.param)


def _check_frame_pixels(width: int, height: int, limits: VideoLimits, param: str) -> None:
    if width * height > limits.max_frame_pixels:
        raise VideoError(f"video frames are {width}x{height} = {width * height} pixels, more than the limit of "
                         f"{limits.max_frame_pixels} (8K, or MAX_IMAGE_PIXELS when lower)", param=param,
                         code="video_too_many_pixels")


def _too_costly(what: str, limits: VideoLimits, param: str) -> VideoError:
    return VideoError(f"the video's {what} are more than {limits.max_decode_pixels} pixels to decode, this server's "
                      "limit (MAX_VIDEO_DECODE_PIXELS: frames x width x height, as stored); send it shorter or smaller",
                      param=param, code="video_too_costly")


def _grab(data, probe: _Probe, indices: list, count: int, limits: VideoLimits, param: str, deadline,
          budget: _DecodeBudget) -> tuple:
    """Decode the stream once, keeping the frames at `indices` (sorted) scaled to the sampled size.
    (frames [count, H, W, 3] uint8, their times, frames decoded)."""
    import av

    out, times = None, []
    size = rotation = None
    taken = decoded = bad = 0
    with _open(data, param) as container:
        stream = container.streams[probe.stream_index]
        stream.thread_type = "AUTO"  # the codec's own threads: frame or slice threading
        for packet in container.demux(stream):
            _check_deadline(deadline)  # each packet: one frame's decoding is bounded by MAX_FRAME_PIXELS
            try:
                frames = packet.decode()
            except av.FFmpegError:
                bad += 1
                if bad > MAX_BAD_PACKETS:
                    raise VideoError(f"the video is corrupt: more than {MAX_BAD_PACKETS} packets could not be "
                                     "decoded", param=param) from None
                continue
            for frame in frames:
                budget.spend(frame)
                if taken < count and indices[taken] == decoded:
                    if out is None:
                        rotation = int(round((frame.rotation or 0) / 90)) % 4
                        height, width = (frame.width, frame.height) if rotation % 2 else (frame.height, frame.width)
                        size = frame_size(height, width, count, limits, param=param)
                        out = np.empty((count, size[0], size[1], 3), dtype=np.uint8)
                    rgb = _rgb(frame, size, rotation)
                    while taken < count and indices[taken] == decoded:
                        out[taken] = rgb
                        times.append(float(frame.time) if frame.time is not None else decoded / probe.rate)
                        taken += 1
                decoded += 1
    if taken < count:
        return (out[:taken] if out is not None else np.empty((0, 0, 0, 3), np.uint8)), times, decoded
    return out, times, decoded


def _rgb(frame, size: tuple, rotation: int) -> np.ndarray:
    """One decoded frame scaled to (height, width) as displayed, RGB uint8 (rotation: quarter turns counterclockwise)."""
    height, width = size
    stored = (width, height) if rotation % 2 == 0 else (height, width)
    rgb = frame.reformat(width=stored[0], height=stored[1], format="rgb24", interpolation="BICUBIC").to_ndarray()
    if rotation:
        rgb = np.ascontiguousarray(np.rot90(rgb, k=rotation))
    return rgb


def _declared_seconds(container, stream) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000
    return 0.0


def _check_seconds(seconds: float, limits: VideoLimits, param: str) -> None:
    if seconds > limits.max_seconds:
        raise VideoError(f"the video is {seconds:.1f} seconds long, more than the limit of {limits.max_seconds:g}",
                         param=param, code="video_too_long")


def _check_deadline(deadline: Optional[float]) -> None:
    if deadline is not None and time.perf_counter() > deadline:
        raise RequestTimeout("decoding the video took longer than this server's time limit", code="request_timeout")


def _rate(stream, frames: int, seconds: float) -> Optional[float]:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate and Fraction(rate) > 0:
            return float(rate)
    return frames / seconds if seconds > 0 else None


def _mime(container, data: bytes) -> str:
    names = container.format.name.split(",")
    if "mp4" in names:
        return "video/quicktime" if data[8:12] == b"qt  " else "video/mp4"
    if "matroska" in names:
        return "video/webm" if b"webm" in data[:64] else "video/x-matroska"  # the EBML header's DocType
    for name in names:
        if name in _MIME_BY_FORMAT:
            return _MIME_BY_FORMAT[name]
    return "application/octet-stream"


# ---------------------------------------------------------------- a list of images as a video

def from_images(images, limits: VideoLimits = VideoLimits(), *, count: Optional[int] = None, param: str = "video",
                fps: Optional[float] = None) -> Video:
    """A video whose frames are `images` (PIL images, a list or an iterable of `count`), taken at `fps`
    (default VIDEO_FPS): all resized to the size the first one gets within the budgets, each as it
    arrives (one full-size image at a time); an odd count gets its last frame twice, as qwen-vl-utils does."""
    from PIL import Image

    given = len(images) if count is None else count
    if given < 1:
        raise VideoError("a video given as images needs at least one image", param=param, code="empty_video")
    if given > limits.max_frames:
        raise VideoError(f"the video has {given} frames; this server takes at most {limits.max_frames}",
                         param=param, code="too_many_frames")
    total = _ceil(given, TEMPORAL_PATCH)
    rate = float(fps or limits.fps)
    _check_seconds(given / rate, limits, param)  # a tiny fps makes a few frames a very long video
    frames = None
    seen = 0
    for img in images:
        if seen == given:
            break
        if frames is None:
            height, width = frame_size(img.height, img.width, total, limits, param=param)
            frames = np.empty((total, height, width, 3), dtype=np.uint8)
        img = img.convert("RGB") if img.mode != "RGB" else img
        if img.size != (width, height):
            img = img.resize((width, height), Image.Resampling.BICUBIC)
        frames[seen] = np.asarray(img)
        seen += 1
    if seen < given:
        raise VideoError(f"the video has {seen} frames, not {given}", param=param, code="empty_video")
    frames[given:] = frames[given - 1]
    times = tuple(min(i, given - 1) / rate for i in range(total))
    return Video(frames=frames, fps=rate, timestamps=times, duration=given / rate, source_frames=given)


def encode_mp4(frames: np.ndarray, fps: float) -> bytes:
    """Frames (uint8 [T, H, W, 3]) as an H.264 mp4, in memory (sides are multiples of 28, so even)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.height, stream.width = int(frames.shape[1]), int(frames.shape[2])
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def looks_like_video(data: bytes) -> bool:
    """True for the signatures of common video containers (mp4/mov, webm/mkv, avi, mpeg-ts, flv, ogg)."""
    head = bytes(data[:16])
    return (head[4:8] == b"ftyp" or head[:4] == b"\x1a\x45\xdf\xa3" or (head[:4] == b"RIFF" and head[8:12] == b"AVI ")
            or head[:1] == b"\x47" and len(data) > 188 and data[188:189] == b"\x47"
            or head[:3] == b"FLV" or head[:4] == b"OggS" or head[4:8] in (b"moov", b"mdat", b"wide", b"free"))


def _ceil(number: float, factor: int) -> int:
    return math.ceil(number / factor) * factor


def _floor(number: float, factor: int) -> int:
    return math.floor(number / factor) * factor


def _within(value, low, high, default):
    return default if value is None else max(low, min(high, value))
