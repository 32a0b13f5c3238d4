"""What the benchmark sends and how it times it: test images, the tutorial's payload, HTTP timing.

Both servers get byte-identical request bodies in the tutorial's format
(`{"type": "image", "image": "data:image/jpeg;base64,..."}` then `{"type": "text", ...}`).
Every request carries an image nobody has sent before, unless the workload is about a
repeated image, so no server's cache helps where it should not.
"""

from __future__ import annotations

import base64
import io
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import numpy as np
import requests
from PIL import Image, ImageDraw

QUESTIONS = [
    "Describe this image.",
    "What colours dominate the picture?",
    "Is there any text in the image?",
    "How many distinct shapes can you see?",
    "What is in the top left corner?",
    "Write a one-line caption for this picture.",
    "Which object is the largest?",
    "Is this a photograph or a drawing?",
]
STORY = "Tell me a long story about a lighthouse keeper and a storm."


# ---------------------------------------------------------------------------- images

def make_image(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like test image: smooth colour gradients, a few shapes and sensor-like noise.

    Pure noise would compress to an unrealistically large JPEG; a flat colour to an
    unrealistically small one. This lands near a real photo's size at quality 90.
    """
    rng = np.random.default_rng(seed)
    small_w, small_h = max(8, width // 8), max(8, height // 8)  # smooth: computed small, scaled up
    y = np.linspace(0.0, 1.0, small_h, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, small_w, dtype=np.float32)[None, :]
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(0.5, 3.0), rng.uniform(0.5, 3.0), rng.uniform(0, 6.3)
        channels.append(127 + 90 * np.sin(2 * np.pi * (fx * x + fy * y) + phase) * (0.6 + 0.4 * x))
    base = np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8)
    img = Image.fromarray(base, "RGB").resize((width, height), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = int(rng.integers(width // 20, width // 3)), int(rng.integers(height // 20, height // 3))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=colour)
        else:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=colour)
    # sensor-like noise: a random tile repeated (cheap for 12 megapixels), sigma about 6
    tile = rng.normal(0.0, 6.0, size=(min(height, 509), min(width, 509), 3)).astype(np.int16)
    reps = (-(-height // tile.shape[0]), -(-width // tile.shape[1]), 1)
    noise = np.tile(tile, reps)[:height, :width]
    pixels = np.asarray(img, dtype=np.int16) + noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def data_url(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()


class ImageFactory:
    """Unique JPEGs of one size: the base picture once, then a different corner patch per image."""

    def __init__(self, width: int, height: int, seed: int):
        self.base = make_image(width, height, seed)
        self.seed = seed
        self.count = 0

    def next(self) -> str:
        self.count += 1
        rng = np.random.default_rng((self.seed, self.count))
        img = self.base.copy()
        patch = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        img.paste(Image.fromarray(patch, "RGB"), (0, 0))
        return data_url(jpeg_bytes(img))


# ---------------------------------------------------------------------------- payloads

def tutorial_payload(image: Optional[str], question: str, *, max_tokens: int, stream: bool = False) -> dict:
    """The tutorial client's request (test_connection.py), with temperature 0 and max_tokens."""
    content = []
    if image is not None:
        content.append({"type": "image", "image": image})
    content.append({"type": "text", "text": question})
    payload = {"model": "Qwen/Qwen2.5-VL-3B-Instruct", "temperature": 0, "max_tokens": max_tokens,
               "stream": stream, "messages": [{"role": "user", "content": content}]}
    if stream:
        payload["stream_options"] = {"include_usage": True}
    return payload


# ---------------------------------------------------------------------------- one timed request

@dataclass
class Timing:
    latency: float  # seconds from sending the request to the last byte of the answer
    completion_tokens: int
    ttft: Optional[float] = None  # streaming only: seconds to the first chunk with answer text
    first_byte: Optional[float] = None  # streaming only: seconds to the first event of any kind
    text: str = ""


class BenchError(RuntimeError):
    pass


def post(url: str, payload: dict, *, kind: str, session: Optional[requests.Session] = None,
         timeout: float = 1800) -> Timing:
    """Send one chat request and time it. kind: 'baseline' (raw text back) or 'ours' (OpenAI JSON / SSE)."""
    body = json.dumps(payload).encode()  # serialised before the clock starts
    http = session or requests
    headers = {"Content-Type": "application/json"}
    if payload.get("stream"):
        return _post_stream(http, url, body, headers, timeout)
    started = time.perf_counter()
    response = http.post(url, data=body, headers=headers, timeout=timeout)
    content = response.content
    latency = time.perf_counter() - started
    if response.status_code != 200:
        raise BenchError(f"{kind} server answered {response.status_code}: {content[:300]!r}")
    if kind == "baseline":
        return Timing(latency, int(response.headers.get("X-Completion-Tokens", "0")), text=response.text)
    reply = json.loads(content)
    return Timing(latency, int(reply["usage"]["completion_tokens"]), text=reply["choices"][0]["message"]["content"])


def _post_stream(http, url, body, headers, timeout) -> Timing:
    started = time.perf_counter()
    ttft = first_byte = None
    pieces, tokens = [], 0
    with http.post(url, data=body, headers=headers, timeout=timeout, stream=True) as response:
        if response.status_code != 200:
            raise BenchError(f"stream answered {response.status_code}: {response.content[:300]!r}")
        for line in response.iter_lines():
            if not line.startswith(b"data: "):
                continue
            now = time.perf_counter() - started
            if first_byte is None:
                first_byte = now
            data = line[len(b"data: "):]
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise BenchError(f"stream error: {event['error']}")
            if event.get("usage"):
                tokens = int(event["usage"]["completion_tokens"])
            for choice in event.get("choices") or []:
                text = (choice.get("delta") or {}).get("content")
                if text:
                    if ttft is None:
                        ttft = now
                    pieces.append(text)
    latency = time.perf_counter() - started
    return Timing(latency, tokens, ttft=ttft if ttft is not None else latency, first_byte=first_byte,
                  text="".join(pieces))


# ---------------------------------------------------------------------------- workloads

def median(values) -> float:
    return float(statistics.median(values)) if values else 0.0


def summary(timings: list) -> dict:
    out = {
        "n": len(timings),
        "latency_s": [round(t.latency, 4) for t in timings],
        "median_latency_s": round(median([t.latency for t in timings]), 4),
        "completion_tokens": [t.completion_tokens for t in timings],
    }
    if any(t.ttft is not None for t in timings):
        out["ttft_s"] = [round(t.ttft, 4) for t in timings]
        out["median_ttft_s"] = round(median([t.ttft for t in timings]), 4)
    return out


def sequential(url: str, kind: str, images: list, *, max_tokens: int) -> dict:
    """One request after another; each an image and a question."""
    with requests.Session() as session:
        timings = [post(url, tutorial_payload(img, QUESTIONS[i % len(QUESTIONS)], max_tokens=max_tokens),
                        kind=kind, session=session) for i, img in enumerate(images)]
    result = summary(timings)
    total = sum(t.latency for t in timings)
    result["requests_per_s"] = round(len(timings) / total, 4)
    return result


def concurrent(url: str, kind: str, images: list, *, clients: int, max_tokens: int) -> dict:
    """`clients` threads, each sending its share of the requests back to back."""
    shares = [images[i::clients] for i in range(clients)]
    start = threading.Barrier(clients + 1)

    def client(k: int) -> list:
        out = []
        with requests.Session() as session:
            start.wait()
            for j, img in enumerate(shares[k]):
                out.append(post(url, tutorial_payload(img, QUESTIONS[(k + j) % len(QUESTIONS)],
                                                      max_tokens=max_tokens), kind=kind, session=session))
        return out

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client, k) for k in range(clients)]
        start.wait()
        began = time.perf_counter()
        timings = [t for f in futures for t in f.result()]
        wall = time.perf_counter() - began
    result = summary(timings)
    tokens = sum(t.completion_tokens for t in timings)
    result.update(clients=clients, wall_s=round(wall, 4), requests_per_s=round(len(timings) / wall, 4),
                  completion_tokens_per_s=round(tokens / wall, 4))
    return result


def repeated_image(url: str, kind: str, image: str, *, questions: int, max_tokens: int,
                   stream: bool = False) -> dict:
    """Several questions about one image, in sequence: the first is cold, the rest repeat the image."""
    with requests.Session() as session:
        timings = [post(url, tutorial_payload(image, QUESTIONS[i % len(QUESTIONS)], max_tokens=max_tokens,
                                              stream=stream), kind=kind, session=session)
                   for i in range(questions)]
    measure = (lambda t: t.ttft) if stream else (lambda t: t.latency)
    return {
        "n": len(timings), "max_tokens": max_tokens, "stream": stream,
        "first_s": round(measure(timings[0]), 4),
        "repeated_s": [round(measure(t), 4) for t in timings[1:]],
        "median_repeated_s": round(median([measure(t) for t in timings[1:]]), 4),
        "completion_tokens": [t.completion_tokens for t in timings],
    }


def streamed(url: str, images: list, question: str, *, max_tokens: int) -> dict:
    """Long answers streamed from our server: time to first token against the whole answer."""
    with requests.Session() as session:
        timings = [post(url, tutorial_payload(img, question, max_tokens=max_tokens, stream=True), kind="ours",
                        session=session) for img in images]
    result = summary(timings)
    result["median_total_s"] = result.pop("median_latency_s")
    result["ttft_share_pct"] = round(100 * result["median_ttft_s"] / result["median_total_s"], 2)
    return result


@dataclass
class Plan:
    """Request counts and sizes for one run."""

    model: str
    max_tokens: int  # answers in the sequential, concurrent and overhead workloads
    sequential_n: int
    concurrent_clients: int
    concurrent_n: int  # requests in total, spread over the clients
    repeat_questions: int
    large_n: int
    large_size: tuple
    stream_tokens: int  # the long streamed answer
    stream_n: int
    overhead_n: int
    image_size: tuple = (448, 448)  # 256 image tokens; at or above the tutorial's min_pixels (448*448)


FULL = Plan(model="demo-bench", max_tokens=64, sequential_n=5, concurrent_clients=8, concurrent_n=16,
            repeat_questions=5, large_n=3, large_size=(4000, 3000), stream_tokens=128, stream_n=3,
            overhead_n=8)
QUICK = Plan(model="demo", max_tokens=8, sequential_n=2, concurrent_clients=8, concurrent_n=8,
             repeat_questions=5, large_n=1, large_size=(2000, 1500), stream_tokens=16, stream_n=1,
             overhead_n=2)
