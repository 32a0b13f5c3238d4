"""What the benchmark sends and how it times it: test images, the tutorial's payload, HTTP timing.

Both servers get byte-identical request bodies in the tutorial's format
(`{"type": "image", "image": "data:image/jpeg;base64,..."}` then `{"type": "text", ...}`).
Every request carries an image nobody has sent before, unless the workload is about a
repeated image, so no server's cache helps where it should not.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import random
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
# a long answer that stays long: on both demo checkpoints the greedy answer runs to 256 tokens at least
# (STORY's ends at 123 tokens on demo-bench); the join workload reports the length each time
LONG_QUESTION = "Describe a busy city street in great detail."


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
    started: float = 0.0  # time.perf_counter() when the request was sent
    prompt_tokens: Optional[int] = None  # streaming with include_usage: the usage chunk's figures
    cached_tokens: Optional[int] = None  # its prompt_tokens_details.cached_tokens (the prefix cache's reuse)

    @property
    def first_token(self) -> float:
        """Seconds to the first token the client could read: the whole answer when not streamed."""
        return self.ttft if self.ttft is not None else self.latency


class BenchError(RuntimeError):
    pass


def post(url: str, payload: dict, *, kind: str, session: Optional[requests.Session] = None,
         timeout: float = 1800, first_token: Optional[threading.Event] = None) -> Timing:
    """Send one chat request and time it. kind: 'baseline' (raw text back) or 'ours' (OpenAI JSON / SSE).

    first_token (streams only) is set the moment the first answer text arrives.
    """
    body = json.dumps(payload).encode()  # serialised before the clock starts
    http = session or requests
    headers = {"Content-Type": "application/json"}
    if payload.get("stream"):
        return _post_stream(http, url, body, headers, timeout, first_token)
    started = time.perf_counter()
    response = http.post(url, data=body, headers=headers, timeout=timeout)
    content = response.content
    latency = time.perf_counter() - started
    if response.status_code != 200:
        raise BenchError(f"{kind} server answered {response.status_code}: {content[:300]!r}")
    if kind == "baseline":
        return Timing(latency, int(response.headers.get("X-Completion-Tokens", "0")), text=response.text,
                      started=started)
    reply = json.loads(content)
    return Timing(latency, int(reply["usage"]["completion_tokens"]), text=reply["choices"][0]["message"]["content"],
                  started=started)


def _post_stream(http, url, body, headers, timeout, first_token=None) -> Timing:
    started = time.perf_counter()
    ttft = first_byte = None
    pieces, tokens, usage = [], 0, {}
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
                usage = event["usage"]
                tokens = int(usage["completion_tokens"])
            for choice in event.get("choices") or []:
                text = (choice.get("delta") or {}).get("content")
                if text:
                    if ttft is None:
                        ttft = now
                        if first_token is not None:
                            first_token.set()
                    pieces.append(text)
    latency = time.perf_counter() - started
    return Timing(latency, tokens, ttft=ttft if ttft is not None else latency, first_byte=first_byte,
                  text="".join(pieces), started=started, prompt_tokens=usage.get("prompt_tokens"),
                  cached_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens"))


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


# ---------------------------------------------------------------------------- staggered clients, join delay

SHORT_QUESTION = "Say hello."


def percentile(values, q: float) -> float:
    """The q-th percentile (linear between samples, as numpy's default); 0.0 for no samples."""
    return float(np.percentile(values, q)) if len(values) else 0.0


def spread(values) -> dict:
    return {"p50": round(percentile(values, 50), 4), "p95": round(percentile(values, 95), 4)}


@dataclass(frozen=True)
class RequestSpec:
    """One request of a mixed workload: its answer length, whether it carries an image, whether it streams."""

    max_tokens: int
    image: bool
    stream: bool


def staggered_specs(clients: int, per_client: int, token_mix: tuple, seed: int = 0) -> list:
    """The same mix for every run: half the requests with an image, half streamed (each pairing
    equally often), max_tokens cycling through token_mix, dealt to them in a seeded random order
    (so no max_tokens value sticks to one kind), and the whole list in a seeded shuffled order."""
    rng = random.Random(seed)
    total = clients * per_client
    tokens = [token_mix[i % len(token_mix)] for i in range(total)]
    rng.shuffle(tokens)
    specs = [RequestSpec(tokens[i], image=i % 2 == 0, stream=(i // 2) % 2 == 0) for i in range(total)]
    rng.shuffle(specs)
    return specs


def spec_payload(spec: RequestSpec, image: Optional[str], index: int, *, can_stream: bool) -> dict:
    question = QUESTIONS[index % len(QUESTIONS)] if spec.image else LONG_QUESTION
    return tutorial_payload(image, question, max_tokens=spec.max_tokens, stream=spec.stream and can_stream)


def staggered(url: str, kind: str, specs: list, images: list, *, clients: int, can_stream: bool) -> dict:
    """`clients` threads; client k sends specs[k::clients] back to back (the next when the last ends).

    images: one unseen data URL per image request, used in order. A server that cannot stream
    gets its streamed requests non-streamed (its first token is then the whole answer).
    """
    fresh = iter(images)
    payloads = [spec_payload(spec, next(fresh) if spec.image else None, i, can_stream=can_stream)
                for i, spec in enumerate(specs)]  # built before the clock starts
    start = threading.Barrier(clients + 1)

    def client(k: int) -> list:
        with requests.Session() as session:
            start.wait()
            return [(i, post(url, payloads[i], kind=kind, session=session)) for i in range(k, len(specs), clients)]

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client, k) for k in range(clients)]
        start.wait()
        began = time.perf_counter()
        done = sorted(pair for f in futures for pair in f.result())
        wall = time.perf_counter() - began
    return staggered_summary([specs[i] for i, _ in done], [t for _, t in done], wall, clients, can_stream)


def staggered_summary(specs: list, timings: list, wall: float, clients: int, can_stream: bool) -> dict:
    tokens = sum(t.completion_tokens for t in timings)
    streamed = [t.first_token for s, t in zip(specs, timings) if s.stream and can_stream]
    return {
        "clients": clients, "n": len(timings), "wall_s": round(wall, 4),
        "requests_per_s": round(len(timings) / wall, 4), "completion_tokens_per_s": round(tokens / wall, 4),
        "ttft_s": spread([t.first_token for t in timings]),  # non-streamed: the whole answer
        "streamed_ttft_s": spread(streamed) if streamed else None,
        "latency_s": spread([t.latency for t in timings]),
        "requests": [{"max_tokens": s.max_tokens, "image": s.image, "stream": s.stream and can_stream,
                      "completion_tokens": t.completion_tokens, "first_token_s": round(t.first_token, 4),
                      "latency_s": round(t.latency, 4)} for s, t in zip(specs, timings)],
    }


def idle_ttft(url: str, images: list, *, repeats: int, max_tokens: int) -> dict:
    """Time to first token on an idle server, one streamed request at a time, for each kind the mix
    holds (with an unseen image, text only), `repeats` of each, alternating."""
    by_kind = {"image": [], "text": []}
    with requests.Session() as session:
        for i in range(repeats):
            for kind, image in (("image", images[i]), ("text", None)):
                payload = spec_payload(RequestSpec(max_tokens, image is not None, True), image, i, can_stream=True)
                by_kind[kind].append(post(url, payload, kind="ours", session=session).first_token)
    every = by_kind["image"] + by_kind["text"]
    return {"n": len(every), "max_tokens": max_tokens, "ttft_s": spread(every),
            "median_image_s": round(median(by_kind["image"]), 4), "median_text_s": round(median(by_kind["text"]), 4),
            "image_s": [round(x, 4) for x in by_kind["image"]], "text_s": [round(x, 4) for x in by_kind["text"]]}


def join_delay(url: str, *, repeats: int, long_tokens: int, short_tokens: int, join_after: float) -> dict:
    """A short streamed request alone, then sent `join_after` seconds after a long streamed answer's
    first token: its time to first token in both cases (medians). Streams only: our server."""
    short = tutorial_payload(None, SHORT_QUESTION, max_tokens=short_tokens, stream=True)
    long = tutorial_payload(None, LONG_QUESTION, max_tokens=long_tokens, stream=True)
    with requests.Session() as session:
        idle = [post(url, short, kind="ours", session=session).first_token for _ in range(repeats)]
    joined = [short_during_long(url, short, long, join_after) for _ in range(repeats)]
    idle_s, joined_s = median(idle), median([j["short_ttft_s"] for j in joined])
    return {
        "repeats": repeats, "long_tokens": long_tokens, "short_tokens": short_tokens, "join_after_s": join_after,
        "idle_ttft_s": [round(x, 4) for x in idle], "median_idle_ttft_s": round(idle_s, 4),
        "joined": joined, "median_joined_ttft_s": round(joined_s, 4),
        "ratio": round(joined_s / idle_s, 2) if idle_s > 0 else 0.0,
        # a long answer that ended (eos) before the short one was sent measured no join
        "long_running_when_sent": all(j["long_running_when_sent"] for j in joined),
    }


def short_during_long(url: str, short: dict, long: dict, join_after: float) -> dict:
    first_token = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post, url, long, kind="ours", first_token=first_token)
        while not first_token.wait(0.05) and not pending.done():
            pass
        time.sleep(join_after)
        joining = post(url, short, kind="ours")
        answer = pending.result()
    long_ends = answer.started + answer.latency
    return {"short_ttft_s": round(joining.first_token, 4), "long_ttft_s": round(answer.first_token, 4),
            "long_tokens": answer.completion_tokens, "long_total_s": round(answer.latency, 4),
            "long_running_when_sent": long_ends > joining.started}


def short_beside_long(url: str, *, long_counts: tuple, long_tokens: int, short_tokens: int, repeats: int,
                      metrics_url: Optional[str] = None) -> dict:
    """A short streamed request alone, then sent while `count` long streamed answers (`long_tokens` each, the
    same greedy question) are generating, for each count of `long_counts`: its time to first token (medians of
    `repeats`), whether every long answer was still running when it got its first token, and the server's
    preemptions (from /metrics) meanwhile. Streams only: our server."""
    short = tutorial_payload(None, SHORT_QUESTION, max_tokens=short_tokens, stream=True)
    long = tutorial_payload(None, LONG_QUESTION, max_tokens=long_tokens, stream=True)
    with requests.Session() as session:
        idle = [post(url, short, kind="ours", session=session).first_token for _ in range(repeats)]
    idle_s = median(idle)
    crowds = []
    for count in long_counts:
        runs = []
        for _ in range(repeats):
            before = _preemptions(metrics_url)
            runs.append(_short_in_crowd(url, short, long, count))
            after = _preemptions(metrics_url)
            runs[-1]["preemptions"] = None if before is None or after is None else after - before
        ttft = median([r["short_ttft_s"] for r in runs])
        crowds.append({"long_requests": count, "runs": runs, "median_short_ttft_s": round(ttft, 4),
                       "ratio": round(ttft / idle_s, 2) if idle_s > 0 else 0.0,
                       "longs_running": all(r["longs_running"] for r in runs),
                       "min_long_tokens": min(r["min_long_tokens"] for r in runs)})
    return {"repeats": repeats, "long_tokens": long_tokens, "short_tokens": short_tokens,
            "idle_ttft_s": [round(x, 4) for x in idle], "median_idle_ttft_s": round(idle_s, 4), "crowds": crowds}


def _short_in_crowd(url: str, short: dict, long: dict, count: int) -> dict:
    """`count` long streams sent at once; once the first of them is generating, one short stream."""
    first_token = threading.Event()
    with ThreadPoolExecutor(count) as pool:
        pending = [pool.submit(post, url, long, kind="ours", first_token=first_token) for _ in range(count)]
        while not first_token.wait(0.05) and not all(p.done() for p in pending):
            pass
        time.sleep(0.2)  # the rest of the long prompts are in too
        joining = post(url, short, kind="ours")
        answers = [p.result() for p in pending]
    got_first = joining.started + joining.first_token
    return {"short_ttft_s": round(joining.first_token, 4),
            "longs_running": all(a.started + a.latency > got_first for a in answers),
            "min_long_tokens": min(a.completion_tokens for a in answers),
            "long_total_s": round(max(a.started + a.latency for a in answers) - min(a.started for a in answers), 2)}


def _preemptions(metrics_url: Optional[str]) -> Optional[float]:
    if metrics_url is None:
        return None
    for line in requests.get(metrics_url, timeout=30).text.splitlines():
        if line.startswith("qwenvl_preemptions_total "):
            return float(line.split()[1])
    return None


CHAT_TURNS = ["Describe this image.", "What colours dominate it?", "How many shapes can you see?",
              "Write a one-line caption for it."]


# A real model's answers are text that tokenizes back to the tokens it wrote, so a client sending them back
# leaves the whole answer to the prefix cache. The demo's random tokens are not (broken UTF-8, dropped special
# tokens, pieces BPE would merge), so (j) also runs with the demo's answers held to whole words (logit_bias +100
# on these words' single tokens): a real model's case, which the target is about.
ANSWER_WORDS = ("the", "The", "cat", "dog", "image", "sky", "green", "car", "back", "show", "there", "There",
                "is", "are", "and", "on", "in", "at", "to", "of", "over", "How", "You", "do")


def word_answers_bias(url: str) -> dict:
    """A logit_bias that holds answers to ANSWER_WORDS (each with its leading space) where the server's tokenizer
    (its /tokenize) has them as single tokens."""
    base = url.split("/v1/")[0]
    ids = []
    for word in ANSWER_WORDS:
        response = requests.post(base + "/tokenize", json={"content": " " + word}, timeout=30)
        if response.status_code != 200:
            raise BenchError(f"/tokenize answered {response.status_code}: {response.content[:300]!r}")
        tokens = response.json()["tokens"]
        if len(tokens) == 1:
            ids.append(tokens[0])
    if len(ids) < 8:
        raise BenchError(f"only {len(ids)} of the answer words are single tokens in this model's vocabulary")
    return {str(i): 100 for i in ids}


def conversation(url: str, image: str, system: object, *, turns: int, max_tokens: int,
                 logit_bias: Optional[dict] = None, session: Optional[requests.Session] = None) -> list:
    """A chat about one image, sending the whole history each turn as chat clients do (streamed, greedy):
    per turn, its time to first token, prompt tokens and the tokens the server reused (cached_tokens).
    `system(turn)` is the system message of that turn: the same every turn lets the server reuse the earlier
    turns; another one each turn (same length) leaves it nothing to reuse. `logit_bias`: sent with each turn."""
    history, out = [], []
    with requests.Session() if session is None else contextlib.nullcontext(session) as session:
        for turn in range(turns):
            question = CHAT_TURNS[turn % len(CHAT_TURNS)]
            content = [{"type": "image", "image": image}, {"type": "text", "text": question}] if turn == 0 else question
            history.append({"role": "user", "content": content})
            payload = {"temperature": 0, "max_tokens": max_tokens, "stream": True,
                       "stream_options": {"include_usage": True},
                       "messages": [{"role": "system", "content": system(turn)}] + history}
            if logit_bias:
                payload["logit_bias"] = logit_bias
            t = post(url, payload, kind="ours", session=session)
            history.append({"role": "assistant", "content": t.text})
            out.append({"ttft_s": round(t.first_token, 4), "prompt_tokens": t.prompt_tokens,
                        "cached_tokens": t.cached_tokens or 0,
                        "prefilled_tokens": (t.prompt_tokens or 0) - (t.cached_tokens or 0)})
    return out


def prefix_reuse(url: str, images: list, *, turns: int, max_tokens: int) -> dict:
    """(j) Chats about one image, each turn with the earlier turns reusable (one system message throughout)
    and with nothing reusable (the system message changed every turn, same length), the answers held to whole
    words (a real model's case: see ANSWER_WORDS); and reusable with the demo's own random answers. Time to
    first token and tokens prefilled per turn, medians over the chats; plus a short text request's time to
    first token for scale. `images`: three fresh ones per chat (one for each kind: turn 1 runs the vision
    tower in each)."""
    import uuid

    words = word_answers_bias(url)
    kinds = {"none": (True, words), "reuse": (False, words), "reuse_random_answers": (False, None)}
    runs = {kind: [] for kind in kinds}
    for chat in range(len(images) // len(kinds)):
        for (kind, (changing, bias)), image in zip(kinds.items(), images[chat * len(kinds):]):
            tag = uuid.uuid4().hex[:12]
            system = (lambda turn, t=tag: f"[{turn:02d}{t}] You are a helpful assistant.") if changing else \
                (lambda turn, t=tag: f"[00{t}] You are a helpful assistant.")
            runs[kind].append(conversation(url, image, system, turns=turns, max_tokens=max_tokens, logit_bias=bias))
    per_turn = {kind: [{key: median([run[i][key] for run in chats]) for key in chats[0][i]} for i in range(turns)]
                for kind, chats in runs.items()}
    short = [post(url, tutorial_payload(None, f"[{uuid.uuid4().hex[:12]}] Hello!", max_tokens=max_tokens,
                                        stream=True), kind="ours").first_token for _ in range(3 * len(runs["none"]))]
    speedup = [round(n["ttft_s"] / r["ttft_s"], 2) if r["ttft_s"] else 0.0
               for n, r in zip(per_turn["none"], per_turn["reuse"])]
    short_s = median(short)
    return {"turns": turns, "max_tokens": max_tokens, "chats": len(runs["none"]), "per_turn": per_turn, "runs": runs,
            "answer_words": len(words), "speedup": speedup, "short_text_ttft_s": round(short_s, 4),
            "reuse_over_short_text": [round(r["ttft_s"] / short_s, 2) if short_s else 0.0
                                      for r in per_turn["reuse"]],
            "random_answers_over_short_text": [round(r["ttft_s"] / short_s, 2) if short_s else 0.0
                                               for r in per_turn["reuse_random_answers"]]}


def prefix_memory(url: str, pid: int, image: str, *, conversations: int, turns: int, max_tokens: int,
                  readings: int = 4, on_reading=lambda reading: None) -> dict:
    """(j) The server's RSS (psutil, its process) before and after `conversations` distinct chats about one
    image (each its own system message, so each leaves its own prefix cache entry), read `readings` times
    along the way, with the prefix cache's bytes and capacity from /metrics."""
    import uuid

    import psutil

    from bench.load import Server

    server, process = Server(url.split("/v1/")[0]), psutil.Process(pid)

    def reading(done: int) -> dict:
        out = {"conversations": done, "rss_mb": round(process.memory_info().rss / 2**20, 1),
               "prefix_cache_mb": round((server.metric("qwenvl_prefix_cache_bytes") or 0) / 2**20, 1),
               "prefix_cache_evictions": server.metric("qwenvl_prefix_cache_evictions_total") or 0}
        on_reading(out)
        return out

    capacity_mb = round((server.metric("qwenvl_prefix_cache_capacity_bytes") or 0) / 2**20, 1)
    out = [reading(0)]
    with requests.Session() as session:
        for done in range(1, conversations + 1):
            tag = uuid.uuid4().hex[:12]
            conversation(url, image, lambda turn, t=tag: f"[{t}] You are a helpful assistant.", turns=turns,
                         max_tokens=max_tokens, session=session)
            if done % max(1, conversations // readings) == 0 or done == conversations:
                out.append(reading(done))
    growth = round(out[-1]["rss_mb"] - out[0]["rss_mb"], 1)
    return {"conversations": conversations, "turns": turns, "max_tokens": max_tokens, "readings": out,
            "prefix_cache_capacity_mb": capacity_mb, "growth_mb": growth,
            "bound_mb": round(capacity_mb + 100, 1), "within_bound": growth <= capacity_mb + 100}


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
    # (f) staggered clients: each sends its next request when its last one ends
    clients: int = 8
    requests_per_client: int = 3
    token_mix: tuple = (16, 32, 64, 128, 256)  # max_tokens, cycled
    idle_repeats: int = 3  # idle time to first token: this many of each kind (image, text)
    # (g) join delay: a short streamed request sent while a long streamed answer is generating
    join_repeats: int = 3
    join_long_tokens: int = 256
    join_short_tokens: int = 8
    join_after_s: float = 1.0  # after the long answer's first token
    # (h) memory: our server's RSS after a first count of mixed requests and after the whole run
    memory_checkpoint: int = 100
    memory_requests: int = 1000
    memory_token_mix: tuple = (8, 16, 32)
    memory_clients: int = 8
    # (j) prefix reuse: chats about one image, the earlier turns reusable or not
    prefix_turns: int = 4
    prefix_chats: int = 3  # chats of each kind, each about a fresh image
    prefix_tokens: int = 32  # max_tokens of each answer
    prefix_memory_chats: int = 200  # then the RSS before and after this many distinct 2-turn chats
    prefix_memory_tokens: int = 8
    # (l) crowd: a short streamed request while long answers fill the batch; the server's MAX_BATCH_TOKENS is
    # 4 x crowd_long_tokens, the ratio of a CPU's default (16384) to max_tokens 4096
    crowd_long_counts: tuple = (3, 15)
    crowd_long_tokens: int = 1024
    crowd_short_tokens: int = 4
    crowd_repeats: int = 2


FULL = Plan(model="demo-bench", max_tokens=64, sequential_n=5, concurrent_clients=8, concurrent_n=16,
            repeat_questions=5, large_n=3, large_size=(4000, 3000), stream_tokens=128, stream_n=3,
            overhead_n=8)
QUICK = Plan(model="demo", max_tokens=8, sequential_n=2, concurrent_clients=8, concurrent_n=8,
             repeat_questions=5, large_n=1, large_size=(2000, 1500), stream_tokens=16, stream_n=1,
             overhead_n=2, clients=4, requests_per_client=2, token_mix=(4, 8, 16), idle_repeats=2,
             join_repeats=2, join_long_tokens=256, join_after_s=0.1, memory_checkpoint=20, memory_requests=60,
             prefix_chats=1, prefix_tokens=8, prefix_memory_chats=8, crowd_long_tokens=512, crowd_repeats=1)
