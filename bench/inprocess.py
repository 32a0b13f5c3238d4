"""Measurements inside the benchmark's own process: our server's overhead over a direct call of
the chat service (serving.chat, the pipeline the server runs), and the image intake stage of both
servers (request bytes -> the model's inputs).
"""

from __future__ import annotations

import base64
import shutil
import tempfile
import time

import requests

from . import baseline_server
from .workloads import QUESTIONS, median, post, tutorial_payload

PATCH = 14  # Qwen2.5-VL's vision patch side: an image's grid is (1, height / 14, width / 14)


def load_engine(model: str):
    """Our engine, built exactly as our server builds it (default settings)."""
    from serving.config import Settings
    from serving.web.server import build_engine

    settings = Settings(model=model)
    return build_engine(settings), settings


def _turns(data_url: str, question: str) -> list:
    """The tutorial's request as the chat service takes it: one user turn, an image and a question."""
    from serving.protocol import ChatTurn, ImageRef

    return [ChatTurn("user", [ImageRef(data_url, "messages[0].content[0]"), question])]


def direct_call(service, data_url: str, question: str, max_tokens: int) -> tuple:
    """(seconds, completion tokens): what our server does for the request, minus HTTP, JSON and the protocol layer."""
    started = time.perf_counter()
    reply = service.start(_turns(data_url, question), service.sampling_params(max_tokens=max_tokens, temperature=0))
    answer = reply.collect()
    return time.perf_counter() - started, answer.finished.completion_tokens


def overhead(engine, settings, url: str, images: list, *, max_tokens: int) -> dict:
    """The same requests through our server's HTTP API and as direct engine calls, alternating
    so that drift on the machine hits both alike.

    url None: serve the in-process engine with our app and waitress (serving.web.app.create_app,
    serving.web.server.BackgroundServer) on a free loopback port, so both sides share one process and
    one engine; each side then gets its own images (the engine's caches would otherwise serve
    the second side). With a url (a separate server process), each image goes to both.
    """
    from serving.chat import ChatService

    service = ChatService(engine, settings)
    local = None
    if url is None:  # images: 2n + 2
        from dataclasses import replace

        from serving.web.app import create_app
        from serving.web.server import BackgroundServer

        local = BackgroundServer(create_app(settings, engine), replace(settings, port=0))
        url = local.start().base_url + "/v1/chat/completions"
        warm_direct, warm_http, body = images[-2], images[-1], images[:-2]
        direct_images, http_images = body[0::2], body[1::2]
    else:  # images: n + 1
        warm_direct = warm_http = images[-1]
        direct_images = http_images = images[:-1]
    direct, http, tokens = [], [], []
    try:
        direct_call(service, warm_direct, "Warm up.", 4)
        with requests.Session() as session:
            post(url, tutorial_payload(warm_http, "Warm up.", max_tokens=4), kind="ours", session=session)
            for i, (d_img, h_img) in enumerate(zip(direct_images, http_images)):
                question = QUESTIONS[i % len(QUESTIONS)]
                for which in (("direct", "http") if i % 2 == 0 else ("http", "direct")):
                    if which == "direct":
                        seconds, n = direct_call(service, d_img, question, max_tokens)
                        direct.append(seconds)
                    else:
                        t = post(url, tutorial_payload(h_img, question, max_tokens=max_tokens), kind="ours",
                                 session=session)
                        http.append(t.latency)
                        n = t.completion_tokens
                    tokens.append(n)
    finally:
        if local is not None:
            local.stop()
    d, h = median(direct), median(http)
    return {
        "n": len(direct), "max_tokens": max_tokens, "same_process": local is not None,
        "direct_s": [round(x, 4) for x in direct], "http_s": [round(x, 4) for x in http],
        "median_direct_s": round(d, 4), "median_http_s": round(h, 4),
        "overhead_s": round(h - d, 4),
        "overhead_pct": round(100.0 * (h - d) / h, 2) if h > 0 else 0.0,
        "completion_tokens": tokens,
    }


def intake(engine, settings, images: list) -> dict:
    """Request image (data URL) -> model inputs, on each server's code path, no generation.

    Baseline: base64 -> PIL -> PNG file -> read back and resized by process_vision_info ->
    processor (tutorial pixel budget). Ours: the chat service's image intake (decode, resize to
    MAX_PIXELS) -> engine.start (chat template, image processor, queued), cancelled before
    generation; the next image waits until the engine has let go of it.
    """
    from paddleformers.transformers import AutoProcessor

    from serving.chat import ChatService

    service = ChatService(engine, settings)
    params = service.sampling_params(max_tokens=1, temperature=0)
    processor = baseline_server.tutorial_pixels(AutoProcessor.from_pretrained(engine.info.source))
    folder = tempfile.mkdtemp(prefix="bench-intake-")
    baseline, ours, shapes = [], [], {}
    try:
        for i, img in enumerate(images):
            body = {"messages": [{"role": "user", "content": [{"type": "image", "image": img},
                                                              {"type": "text", "text": QUESTIONS[0]}]}]}
            started = time.perf_counter()
            messages = baseline_server.process_request_data(body, save_dir=folder, verbose=False)
            inputs = baseline_server.model_inputs(processor, messages)
            baseline.append(time.perf_counter() - started)
            shapes["baseline_grid_thw"] = inputs["image_grid_thw"].numpy().tolist()

            turns = _turns(img, QUESTIONS[0])
            started = time.perf_counter()
            reply = service.start(turns, params)
            ours.append(time.perf_counter() - started)
            reply.cancel()
            for _ in reply:  # ends once the engine has dropped it
                pass
            width, height = turns[0].parts[0].size
            shapes["ours_grid_thw"] = [[1, height // PATCH, width // PATCH]]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    b, o = median(baseline), median(ours)
    return {
        "n": len(images), "image_bytes": len(base64.b64decode(images[0].split(",", 1)[1])),
        "baseline_s": [round(x, 4) for x in baseline], "ours_s": [round(x, 4) for x in ours],
        "median_baseline_s": round(b, 4), "median_ours_s": round(o, 4),
        "speedup": round(b / o, 2) if o > 0 else 0.0, **shapes,
    }
