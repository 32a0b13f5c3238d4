"""Settings: every one is a CLI flag and an environment variable of the same name.

`--max-tokens-limit` on the command line is `MAX_TOKENS_LIMIT` in the environment; the flag
wins over the variable, the variable over the default. README lists them all.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields

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


@dataclass(frozen=True)
class Settings:
    host: str = field(default="0.0.0.0", metadata={"help": "address to listen on"})
    port: int = field(default=8080, metadata={"help": "port to listen on (AI Studio exposes only 8080)"})
    model: str = field(default=DEFAULT_MODEL, metadata={
        "help": "hub id, local checkpoint folder, or 'demo' for the offline random-weight model"})
    hub: str = field(default="aistudio", metadata={
        "help": "where hub ids are downloaded from: aistudio, huggingface or modelscope"})
    device: str = field(default="auto", metadata={"help": "auto, gpu, gpu:N or cpu"})
    dtype: str = field(default="auto", metadata={
        "help": "auto (GPU: bfloat16 where supported, else float16; CPU: float32), bfloat16, float16, float32"})
    served_model_name: str = field(default="", metadata={
        "help": "the model name responses carry (default: the --model value)"})
    api_key: tuple = field(default=(), metadata={
        "help": "comma-separated API keys; when set, /v1/* needs 'Authorization: Bearer <key>'",
        "type": _keys})
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
        "help": "seconds to connect to and read an http(s) image URL, and for the whole fetch"})
    allow_image_urls: bool = field(default=True, metadata={
        "help": "fetch http(s) image URLs (false: only inline base64 images)", "type": _bool})
    image_url_allow_hosts: tuple = field(default=(), metadata={
        "help": "comma-separated hosts (names or IP addresses, as written in URLs) fetched even when they "
                "resolve to loopback or private addresses; other hosts must resolve to public addresses only",
        "type": _keys})
    max_queue: int = field(default=16, metadata={
        "help": "most chat completions in the server at once, generating or waiting; more get 429 with Retry-After"})
    request_timeout: float = field(default=300.0, metadata={
        "help": "seconds a chat completion may take; then it is cancelled and answered 504 "
                "(a stream ends with an error event)"})
    cpu_threads: int = field(default=0, metadata={
        "help": "math threads for the model on a CPU (0: one per core available; Paddle's own default is 1)"})
    max_batch_size: int = field(default=0, metadata={
        "help": "most requests decoding together in the running batch (0: 8 on a CPU, 32 on a GPU)"})
    max_batch_tokens: int = field(default=0, metadata={
        "help": "most KV-cache tokens the running batch may come to hold, padding included: rows x the longest "
                "prompt + max_tokens (0: 16384 on a CPU, 65536 on a GPU)"})
    prefill_chunk_tokens: int = field(default=0, metadata={
        "help": "most prompt tokens prefilled per decoding step while other requests are decoding; a longer "
                "prompt is prefilled over several steps (0: 256 on a CPU, 2048 on a GPU)"})
    image_cache_mb: int = field(default=256, metadata={
        "help": "memory for cached image work (pixel patches and vision-tower outputs), LRU"})
    threads: int = field(default=24, metadata={
        "help": "HTTP worker threads; keep it above MAX_QUEUE so /health and 429s are answered under load"})
    log_level: str = field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING or ERROR"})

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model


def env_name(name: str) -> str:
    return name.upper()


def build_parser(description: str = "Serve Qwen2.5-VL through an OpenAI-compatible API.") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        parser.add_argument(flag, dest=f.name, default=None, type=str,
                            help=f"{f.metadata['help']} [env {env_name(f.name)}; default {f.default!r}]")
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
            values[f.name] = convert(raw)
        except ValueError as exc:
            raise SystemExit(f"invalid value for --{f.name.replace('_', '-')} / {env_name(f.name)}: {exc}")
    return Settings(**values)
