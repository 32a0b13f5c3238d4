"""Settings: every one is a CLI flag and an environment variable of the same name.

`--max-tokens-limit` on the command line is `MAX_TOKENS_LIMIT` in the environment; the flag
wins over the variable, the variable over the default. README lists them all.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import sys
import textwrap
from dataclasses import dataclass, field, fields
from urllib.parse import urlsplit

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"


def _bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _keys(text: str) -> tuple:
    return tuple(k.strip() for k in str(text).split(",") if k.strip())


BACKENDS = ("paddle", "openai", "fastdeploy")


def _backend(text: str) -> str:
    value = str(text).strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"{text!r} is not one of {', '.join(BACKENDS)}")
    return value


HUBS = ("aistudio", "huggingface", "modelscope")
DTYPES = ("bfloat16", "float16", "float32")


def _hub(text: str) -> str:
    value = str(text).strip().lower() or "aistudio"  # an empty HUB=: the default, as for DEVICE and DTYPE
    if value not in HUBS:
        raise ValueError(f"{text!r} is not one of {', '.join(HUBS)}")
    return value


def _device(text: str) -> str:
    # Only the spelling is checked here; whether this machine has that GPU is the model loader's question.
    value = str(text).strip().lower() or "auto"
    if not re.fullmatch(r"auto|cpu|gpu(:\d+)?", value):
        raise ValueError(f"{text!r} is not auto, cpu, gpu or gpu:N")
    return value


def _dtype(text: str) -> str:
    value = str(text).strip().lower() or "auto"
    if value not in ("auto",) + DTYPES:
        raise ValueError(f"{text!r} is not one of auto, {', '.join(DTYPES)}")
    return value


def _urls(text: str) -> tuple:
    urls = _keys(text)
    for url in urls:
        parts = urlsplit(url if "://" in url else "http://" + url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http(s) URL")
    return urls


def _shell_words(text: str) -> str:
    try:
        shlex.split(str(text))
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a shell-quoted list of flags ({exc})") from None
    return str(text)


def _json_whitespace(text: str) -> str:
    value = str(text).strip().lower()
    if value not in ("compact", "pretty"):
        raise ValueError(f"{text!r} is not compact or pretty")
    return value


def _image_format(text: str) -> str:
    value = str(text).strip().lower()
    if value not in ("png", "jpeg"):
        raise ValueError(f"{text!r} is not png or jpeg")
    return value


@dataclass(frozen=True)
class Settings:
    host: str = field(default="0.0.0.0", metadata={"help": "address to listen on"})
    port: int = field(default=8080, metadata={"help": "port to listen on (AI Studio exposes only 8080)"})
    model: str = field(default=DEFAULT_MODEL, metadata={
        "help": "hub id, local checkpoint folder, or 'demo' for the offline random-weight model"})
    hub: str = field(default="aistudio", metadata={
        "help": "where hub ids are downloaded from: aistudio, huggingface or modelscope", "type": _hub})
    device: str = field(default="auto", metadata={"help": "auto, gpu, gpu:N or cpu", "type": _device})
    dtype: str = field(default="auto", metadata={
        "help": "auto (GPU: bfloat16 where supported, else float16; CPU: float32), bfloat16, float16, float32",
        "type": _dtype})
    served_model_name: str = field(default="", metadata={
        "help": "the model name responses carry"})
    api_key: tuple = field(default=(), metadata={
        "help": "comma-separated API keys; when set, /v1/* needs 'Authorization: Bearer <key>'",
        "type": _keys})
    allowed_hosts: tuple = field(default=(), metadata={
        "help": "comma-separated host names (as in the Host header, without the port) this server answers; others "
                "get 400 (empty: any). Without API keys, set it (127.0.0.1,localhost) so a web page cannot read "
                "answers from it through DNS rebinding", "type": _keys})
    cors_allow_origins: tuple = field(default=(), metadata={
        "help": "comma-separated origins (https://app.example.com, or *) whose web pages may call this server "
                "(CORS; empty: none). Preflight OPTIONS requests are answered without an API key", "type": _keys})
    default_max_tokens: int = field(default=512, metadata={
        "help": "max_tokens when a request gives none"})
    max_tokens_limit: int = field(default=4096, metadata={
        "help": "the largest max_tokens a request may ask for"})
    min_pixels: int = field(default=3136, metadata={
        "help": "smallest pixel count an image is scaled up to before the vision tower"})
    max_pixels: int = field(default=1003520, metadata={
        "help": "largest pixel count an image is scaled down to (the model accepts up to 12845056)"})
    max_images: int = field(default=8, metadata={"help": "most images in one request"})
    max_image_bytes: int = field(default=20 * 1024 * 1024, metadata={
        "help": "largest image in bytes, after base64 decoding or as fetched from a URL"})
    max_image_pixels: int = field(default=50_000_000, metadata={
        "help": "largest image in pixels (width x height), read from its header before decoding"})
    max_request_bytes: int = field(default=32 * 1024 * 1024, metadata={
        "help": "largest request body in bytes (413 above it)"})
    image_fetch_timeout: float = field(default=10.0, metadata={
        "help": "seconds an http(s) image URL may take, every phase included: resolving, connecting, the "
                "response headers and the body (a TLS handshake: each of its reads)"})
    allow_image_urls: bool = field(default=True, metadata={
        "help": "fetch http(s) image URLs (false: only inline base64 images)", "type": _bool})
    image_url_allow_hosts: tuple = field(default=(), metadata={
        "help": "comma-separated hosts (names or IP addresses, as written in URLs) fetched even when they "
                "resolve to loopback or private addresses; other hosts must resolve to public addresses only",
        "type": _keys})
    max_videos: int = field(default=2, metadata={
        "help": "most videos in one request (0: videos are refused); video URLs follow ALLOW_IMAGE_URLS, "
                "IMAGE_URL_ALLOW_HOSTS and IMAGE_FETCH_TIMEOUT"})
    max_video_bytes: int = field(default=32 * 1024 * 1024, metadata={
        "help": "largest video file in bytes, after base64 decoding or as fetched from a URL"})
    max_video_seconds: float = field(default=600.0, metadata={
        "help": "longest video in seconds (read from the container before decoding, checked again while reading)"})
    max_video_decode_pixels: int = field(default=4_000_000_000, metadata={
        "help": "pixels the decoder may produce for one video file: frames x width x height as stored, read from "
                "the container before decoding (4e9: 64 s of 1080p at 30 fps; ~10-25 s of decoding on 2 cores)"})
    video_fps: float = field(default=2.0, metadata={
        "help": "frames sampled per second of video (a request's video part may ask for its own 'fps')"})
    min_frames: int = field(default=4, metadata={"help": "fewest frames sampled from a video"})
    max_frames: int = field(default=768, metadata={
        "help": "most frames sampled from a video, and most images in a video given as a list of frames"})
    video_min_pixels: int = field(default=128 * 28 * 28, metadata={
        "help": "smallest pixel count a sampled video frame is scaled to"})
    video_max_pixels: int = field(default=768 * 28 * 28, metadata={
        "help": "largest pixel count a sampled video frame is scaled to"})
    video_total_pixels: int = field(default=16384 * 28 * 28, metadata={
        "help": "pixels of all sampled frames of a video together, counted per pair of frames (a video takes at "
                "most VIDEO_TOTAL_PIXELS / 784 prompt tokens); frames shrink, then fewer are sampled, to fit"})
    max_queue: int = field(default=16, metadata={
        "help": "most chat completions in the server at once, generating or waiting; more get 429 with Retry-After"})
    request_timeout: float = field(default=300.0, metadata={
        "help": "seconds a chat completion may take, image intake included; then it is cancelled and answered 504 "
                "(a stream ends with an error event and [DONE])"})
    cpu_threads: int = field(default=0, metadata={
        "help": "math threads for the model on a CPU (0: one per core available; Paddle's own default is 1)"})
    max_batch_size: int = field(default=0, metadata={
        "help": "most requests decoding together in the running batch (0: 8 on a CPU, 32 on a GPU)"})
    max_batch_tokens: int = field(default=0, metadata={
        "help": "most KV-cache tokens the running batch holds, padding included: rows x the longest row as it is "
                "now; when it would hold more, the youngest long answer is preempted and resumes later "
                "(0: 16384 on a CPU, 65536 on a GPU)"})
    prefill_chunk_tokens: int = field(default=0, metadata={
        "help": "most prompt tokens prefilled per decoding step while other requests are decoding; a longer "
                "prompt is prefilled over several steps (0: 256 on a CPU, 2048 on a GPU)"})
    image_cache_mb: int = field(default=256, metadata={
        "help": "memory for cached image work (pixel patches and vision-tower outputs), LRU"})
    prefix_cache_mb: int = field(default=-1, metadata={
        "help": "memory on the model's device for the KV of earlier prompts and answers, reused by prompts that start "
                "the same way (a conversation's next turn), LRU (-1: 512 on a CPU, 2048 on a GPU; 0: off); "
                "Qwen2.5-VL-3B's KV is 36 KiB per token in bfloat16, 72 KiB in float32"})
    threads: int = field(default=24, metadata={
        "help": "HTTP worker threads; keep it above MAX_QUEUE so /health and 429s are answered under load"})
    max_connections: int = field(default=1000, metadata={
        "help": "most open HTTP connections; past it each new connection closes the one idle longest "
                "(no request running), so a flood of idle connections cannot lock clients out"})
    idle_timeout: float = field(default=15.0, metadata={
        "help": "seconds a connection may stay open with no request running and nothing received; "
                "then the server closes it"})
    header_timeout: float = field(default=10.0, metadata={
        "help": "seconds a client has to send a request's headers, from its first byte (slow senders are cut off)"})
    body_timeout: float = field(default=60.0, metadata={
        "help": "seconds a client has to send a request's body once its headers have arrived"})
    max_messages: int = field(default=1024, metadata={
        "help": "most messages in one request (checked before anything else is read from it)"})
    max_content_parts: int = field(default=2048, metadata={
        "help": "most content parts (text, image, ...) in all messages of one request together"})
    max_tools: int = field(default=64, metadata={
        "help": "most tools (functions) in one request (built-in engine; each is compiled into the call grammar)"})
    max_schema_bytes: int = field(default=65536, metadata={
        "help": "largest JSON schema (response_format's, or one tool's parameters) in bytes of JSON (built-in engine)"})
    grammar_cache_size: int = field(default=64, metadata={
        "help": "compiled grammars (JSON schemas, tool sets) kept for reuse, LRU (built-in engine)"})
    json_whitespace: str = field(default="compact", metadata={
        "help": "how the built-in engine writes enforced JSON: compact (', ' and ': ', no other whitespace) or "
                "pretty (up to 8 spaces or newlines between items; unbounded whitespace is never allowed: a model "
                "can emit it forever)", "type": _json_whitespace})
    image_decode_mb: int = field(default=512, metadata={
        "help": "memory for images being decoded at once (estimated from their headers); requests wait their "
                "turn within REQUEST_TIMEOUT; an image larger than this is decoded alone"})
    shutdown_grace: float = field(default=20.0, metadata={
        "help": "on SIGTERM or SIGINT: seconds running answers may take to finish; then streams end with an "
                "error event and [DONE], other requests get 503, and the process exits 0"})
    backend: str = field(default="paddle", metadata={
        "help": "paddle (the built-in engine, in this process), openai (forward to the OpenAI-compatible servers "
                "in UPSTREAM) or fastdeploy (start FastDeploy's server as a child process and forward to it)",
        "type": _backend})
    upstream: tuple = field(default=(), metadata={
        "help": "--backend openai: comma-separated base URLs of OpenAI-compatible servers (FastDeploy, vLLM, other "
                "instances of this server), e.g. http://10.0.0.2:8080,http://10.0.0.3:8080", "type": _urls})
    upstream_api_key: str = field(default="", metadata={
        "help": "the key sent to the upstreams as 'Authorization: Bearer <key>'"})
    upstream_health_interval: float = field(default=5.0, metadata={
        "help": "seconds between health checks of each upstream (GET /v1/models); an unhealthy one gets no "
                "requests until a check passes again"})
    upstream_image_format: str = field(default="png", metadata={
        "help": "how images intake resized or turned go to the upstreams, at the size the model sees (others go as "
                "sent): png (lossless, fast compression: the same answers as asking the upstream directly, ~50 ms "
                "a megapixel, 1-2 bytes a pixel for photos) or jpeg (quality 95: fewer bytes still, for upstreams "
                "behind a slow link)", "type": _image_format})
    tensor_parallel: int = field(default=0, metadata={
        "help": "--backend fastdeploy: GPUs the model is split over (--tensor-parallel-size; 0: every visible GPU)"})
    gpu_memory_utilization: float = field(default=0.9, metadata={
        "help": "--backend fastdeploy: share of each GPU's memory FastDeploy may use (weights and KV cache)"})
    fastdeploy_max_model_len: int = field(default=0, metadata={
        "help": "--backend fastdeploy: prompt + answer tokens per request (--max-model-len; 0: the model's "
                "context, at most 32768)"})
    fastdeploy_start_timeout: float = field(default=1800.0, metadata={
        "help": "--backend fastdeploy: seconds FastDeploy may take to load and answer its /health with 200"})
    fastdeploy_args: str = field(default="", metadata={
        "help": "--backend fastdeploy: more flags for FastDeploy's server, as one shell-quoted string "
                "(e.g. '--quantization wint8 --tool-call-parser ...')", "type": _shell_words})
    log_level: str = field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING or ERROR"})

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model


def env_name(name: str) -> str:
    return name.upper()


# The groups of `--help` and of README's settings table, in this order; every setting is in one.
GROUPS = (
    ("server", "where and how the HTTP server listens",
     ("host", "port", "threads", "max_connections", "idle_timeout", "header_timeout", "body_timeout",
      "shutdown_grace", "log_level")),
    ("model", "which model, from where, on which device",
     ("model", "hub", "device", "dtype", "served_model_name")),
    ("engine", "the built-in engine's batching, caches and structured output",
     ("cpu_threads", "max_batch_size", "max_batch_tokens", "prefill_chunk_tokens", "image_cache_mb",
      "prefix_cache_mb", "grammar_cache_size", "json_whitespace")),
    ("limits", "what one request may ask for, and how many may wait",
     ("default_max_tokens", "max_tokens_limit", "max_request_bytes", "max_queue", "request_timeout", "max_messages",
      "max_content_parts", "max_tools", "max_schema_bytes")),
    ("images and video", "sizes, counts and fetching of images and videos",
     ("min_pixels", "max_pixels", "max_images", "max_image_bytes", "max_image_pixels", "image_decode_mb",
      "image_fetch_timeout", "allow_image_urls", "image_url_allow_hosts", "max_videos", "max_video_bytes",
      "max_video_seconds", "max_video_decode_pixels", "video_fps", "min_frames", "max_frames", "video_min_pixels",
      "video_max_pixels", "video_total_pixels")),
    ("backends", "what answers: the built-in engine, other OpenAI-compatible servers, or FastDeploy",
     ("backend", "upstream", "upstream_api_key", "upstream_health_interval", "upstream_image_format",
      "tensor_parallel", "gpu_memory_utilization", "fastdeploy_max_model_len", "fastdeploy_start_timeout",
      "fastdeploy_args")),
    ("security", "who may call the server, and from which web pages",
     ("api_key", "allowed_hosts", "cors_allow_origins")),
)


def default_text(f) -> str:
    """A setting's default as README and --help show it: '(none)' rather than () or ''."""
    if f.name == "served_model_name":
        return "(the --model value)"
    if f.default in ((), ""):
        return "(none)"
    if isinstance(f.default, bool):
        return str(f.default).lower()
    return str(f.default)


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps help text without parting a flag from its value ('--quantization wint8') or breaking at a hyphen."""

    def _split_lines(self, text, width):
        glued = re.sub(r"(--[a-z][\w-]*) (?=[\w<])", "\\1\0", text)
        glued = re.sub(r"\s+", " ", glued).strip()
        return [line.replace("\0", " ") for line in textwrap.wrap(glued, width, break_on_hyphens=False)]


def build_parser(description: str = "Serve Qwen2.5-VL through an OpenAI-compatible API.") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description, usage="%(prog)s [--FLAG VALUE ...]",
        formatter_class=lambda prog: _HelpFormatter(prog, max_help_position=32),
        epilog="Each flag's value is named after its environment variable (--max-pixels MAX_PIXELS, or "
               "MAX_PIXELS=... in the environment); the flag wins over the variable, the variable over the default.")
    by_name = {f.name: f for f in fields(Settings)}
    for title, description_, names in GROUPS:
        group = parser.add_argument_group(title, description_)
        for name in names:
            f = by_name[name]
            group.add_argument("--" + name.replace("_", "-"), dest=name, default=None, type=str,
                               metavar=env_name(name),
                               help=f"{f.metadata['help']} (default: {default_text(f).strip('()')})")
    return parser


def load_settings(argv=None, environ=None) -> Settings:
    """Settings from flags (argv), then environment variables, then defaults."""
    environ = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)
    values = {}
    for f in fields(Settings):
        raw = getattr(args, f.name)
        if raw is None:
            raw = environ.get(env_name(f.name))
        if raw is None:
            continue
        convert = f.metadata.get("type") or type(f.default)
        try:
            try:
                value = convert(raw)
            except ValueError as exc:
                raise ValueError({int: f"{raw!r} is not a whole number", float: f"{raw!r} is not a number"}.get(
                    convert, str(exc))) from None
            values[f.name] = _checked(f.name, value)
        except ValueError as exc:
            raise SettingsError(f"invalid value for --{f.name.replace('_', '-')} / {env_name(f.name)}: {exc}") from None
    settings = Settings(**values)
    if settings.min_pixels > settings.max_pixels:
        raise SettingsError(f"--min-pixels / MIN_PIXELS ({settings.min_pixels}) is larger than --max-pixels / "
                            f"MAX_PIXELS ({settings.max_pixels})")
    if settings.backend == "openai" and not settings.upstream:
        raise SettingsError("--backend openai / BACKEND=openai needs at least one upstream URL "
                            "(--upstream URL[,URL...] / UPSTREAM)")
    return settings


class SettingsError(SystemExit):
    """A setting with a bad value: its one line goes to stderr and the process exits with status 2
    (as argparse does for a bad flag), instead of a traceback."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message
        print(f"error: {message}", file=sys.stderr, flush=True)

    def __str__(self) -> str:
        return self.message


# (lowest, highest) a numeric setting may take; None: unbounded on that side
_RANGES = {
    "port": (0, 65535), "default_max_tokens": (1, None), "max_tokens_limit": (1, None), "min_pixels": (1, None),
    "max_pixels": (1, None), "max_images": (0, None), "max_image_bytes": (1, None), "max_image_pixels": (1, None),
    "max_request_bytes": (1, None), "image_fetch_timeout": (0.001, None), "max_queue": (1, None),
    "request_timeout": (0.001, None), "cpu_threads": (0, None), "max_batch_size": (0, None),
    "max_batch_tokens": (0, None), "prefill_chunk_tokens": (0, None), "image_cache_mb": (0, None),
    "prefix_cache_mb": (-1, None),
    "threads": (1, None), "max_connections": (1, None), "idle_timeout": (0.001, None),
    "header_timeout": (0.001, None), "body_timeout": (0.001, None), "max_messages": (1, None),
    "max_content_parts": (1, None), "image_decode_mb": (1, None), "shutdown_grace": (0, None),
    "max_video_decode_pixels": (1, None),
    "max_tools": (1, None), "max_schema_bytes": (1, None), "grammar_cache_size": (1, None),
}
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _checked(name: str, value):
    """`value` when it is within the setting's range; ValueError naming the range otherwise."""
    if name == "log_level" and str(value).upper() not in _LOG_LEVELS:
        raise ValueError(f"{value!r} is not one of {', '.join(_LOG_LEVELS)}")
    if name not in _RANGES or isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    if not math.isfinite(value):
        raise ValueError(f"{value} is not a finite number")
    low, high = _RANGES[name]
    if name == "port" and not low <= value <= high:
        raise ValueError(f"{value} is not a TCP port (0-65535; 0: any free port)")
    if low is not None and value < low:
        raise ValueError(f"{value} is below the lowest allowed value, {low}")
    if high is not None and value > high:
        raise ValueError(f"{value} is above the highest allowed value, {high}")
    return value
