#!/usr/bin/env python3
"""Send one question (and optionally an image and/or a video) to the Qwen2.5-VL API and print the answer.

The client of this kit: it checks that a running server (local, or deployed on
AI Studio) answers chat completions. Standard library + requests only.

Examples:
    # the server started by notebooks/04_serve_api.ipynb or `python api.py`
    python test_connection.py --image examples/cat.jpg
    python test_connection.py --image examples/cat.jpg --question "What is in the picture?" --stream

    # text only, OpenAI-style image parts, an image given by URL
    python test_connection.py --question "Hello, who are you?"
    python test_connection.py --format openai --image https://example.com/cat.png

    # a video clip (mp4, webm, mov, ...): a local file is sent as base64, a URL as it is
    python test_connection.py --video clip.mp4 --question "What happens in this video?"
    python test_connection.py --format openai --video https://example.com/clip.mp4

    # grounding: Qwen2.5-VL answers with boxes in the pixels of the image as it saw it (resized); --boxes
    # maps them back onto your image with the sizes the server reports, --draw-boxes also draws them
    python test_connection.py --image examples/cat.jpg --boxes --draw-boxes cat_boxes.png \
        --question "Outline the position of the cat and output its coordinates in JSON format."

    # a deployed AI Studio service: its gateway takes the access token as "Authorization: token ..."
    API_KEY=<access token> python test_connection.py --auth-scheme token \
        --api-url https://<service>/api_serving/8080/v1/chat/completions --image examples/cat.jpg

Payload formats (--format):
    tutorial  {"type": "image", "image": "<raw base64 of the file, or the http(s) URL>"}
              {"type": "video", "video": "<raw base64 of the file, or the http(s) URL>"}
    openai    {"type": "image_url", "image_url": {"url": "data:<mime>;base64,<b64>" or the URL}}
              {"type": "video_url", "video_url": {"url": "data:<mime>;base64,<b64>" or the URL}}

Prints the answer, then a line "time: 1.23 s, prompt_tokens=.., completion_tokens=..".
With --boxes, then one line per box: its label and [x1, y1, x2, y2] in pixels of the image sent.
Exit code 0 on success, 1 on any failure (message on stderr), 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import os
import re
import sys
import time
from typing import Any, Optional, TextIO

import requests

DEFAULT_API_URL = "http://127.0.0.1:8080/v1/chat/completions"
DEFAULT_MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"
DEFAULT_IMAGE_QUESTION = "Describe this image."
DEFAULT_VIDEO_QUESTION = "Describe this video."
VIDEO_MIME = {".mp4": "video/mp4", ".m4v": "video/mp4", ".mov": "video/quicktime", ".webm": "video/webm",
              ".mkv": "video/x-matroska", ".avi": "video/x-msvideo"}
DEFAULT_TEXT_QUESTION = "Hello! Who are you?"


class ClientError(Exception):
    """A failure to report to the user as one clear line (exit code 1)."""


def _is_url(image: str) -> bool:
    return image.startswith(("http://", "https://"))


def _sniff_mime(data: bytes) -> Optional[str]:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data.startswith(b"BM"):
        return "image/bmp"
    return None


def _read_image(path: str) -> bytes:
    if not os.path.exists(path):
        raise ClientError(f"image file not found: {path}")
    if not os.path.isfile(path):
        raise ClientError(f"image path is not a file: {path}")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ClientError(f"cannot read image file {path}: {exc}") from exc


def image_part(image: str, fmt: str = "tutorial") -> dict:
    """The content part for an image given as a local path, an http(s) URL or a data: URL."""
    if fmt not in ("tutorial", "openai"):
        raise ValueError(f"unknown format {fmt!r} (tutorial or openai)")
    if _is_url(image) or image.startswith("data:"):
        if fmt == "openai":
            return {"type": "image_url", "image_url": {"url": image}}
        if image.startswith("data:"):  # the tutorial form carries raw base64
            image = image.split(",", 1)[-1]
        return {"type": "image", "image": image}
    data = _read_image(image)
    b64 = base64.b64encode(data).decode("ascii")
    if fmt == "tutorial":
        return {"type": "image", "image": b64}
    mime = mimetypes.guess_type(image)[0] or _sniff_mime(data) or "application/octet-stream"
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{b64}"}}


def video_part(video: str, fmt: str = "tutorial") -> dict:
    """The content part for a video given as a local path, an http(s) URL or a data: URL."""
    if fmt not in ("tutorial", "openai"):
        raise ValueError(f"unknown format {fmt!r} (tutorial or openai)")
    if _is_url(video) or video.startswith("data:"):
        if fmt == "openai":
            return {"type": "video_url", "video_url": {"url": video}}
        return {"type": "video", "video": video.split(",", 1)[-1] if video.startswith("data:") else video}
    if not os.path.isfile(video):
        raise ClientError(f"video file not found: {video}")
    try:
        with open(video, "rb") as f:
            b64 = base64.b64encode(f.read()).decode("ascii")
    except OSError as exc:
        raise ClientError(f"cannot read video file {video}: {exc}") from exc
    if fmt == "tutorial":
        return {"type": "video", "video": b64}
    mime = VIDEO_MIME.get(os.path.splitext(video)[1].lower()) or mimetypes.guess_type(video)[0] or "video/mp4"
    return {"type": "video_url", "video_url": {"url": f"data:{mime};base64,{b64}"}}


def build_payload(
    question: str,
    image: Optional[str] = None,
    fmt: str = "tutorial",
    model: str = DEFAULT_MODEL,
    temperature: float = 0.7,
    max_tokens: int = 256,
    stream: bool = False,
    video: Optional[str] = None,
) -> dict:
    """The chat-completions request body: one user message, image and video parts first, then the text."""
    content = []
    if image:
        content.append(image_part(image, fmt))
    if video:
        content.append(video_part(video, fmt))
    content.append({"type": "text", "text": question})
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "temperature": temperature,
        "max_tokens": max_tokens,
        "stream": stream,
    }


def _error_detail(resp: requests.Response) -> str:
    """The server's error.message when the body is OpenAI-shaped JSON, else the body's start."""
    try:
        body = json.loads(resp.content)
    except ValueError:
        body = None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
    text = " ".join(resp.content.decode("utf-8", errors="replace").split())
    detail = text[:300] if text else "(empty body)"
    if resp.status_code == 404:
        detail += " (check --api-url; it should end with /v1/chat/completions)"
    return detail


def _message_content(data: Any) -> str:
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ClientError(
            "unexpected answer (no choices[0].message.content): "
            + json.dumps(data, ensure_ascii=False)[:300]
        ) from None
    return content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)


def _read_stream(resp: requests.Response, out: TextIO, started: float) -> dict:
    """Print the deltas of an SSE chat.completion.chunk stream until `data: [DONE]`."""
    parts = []
    usage = None
    image_sizes = None
    first_token = None
    done = False
    # Bytes, decoded as UTF-8 here: requests would guess ISO-8859-1 for text/event-stream.
    for raw in resp.iter_lines():
        line = raw.decode("utf-8", errors="replace").strip()
        if not line.startswith("data:"):
            continue  # blank separators, comments (": ping"), event:/id: fields
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            break
        try:
            chunk = json.loads(data)
        except ValueError:
            raise ClientError(f"invalid JSON in stream event: {data[:200]}") from None
        if isinstance(chunk, dict) and isinstance(chunk.get("error"), dict):
            raise ClientError(f"server error in stream: {chunk['error'].get('message')}")
        if isinstance(chunk, dict) and chunk.get("usage"):
            usage = chunk["usage"]
        if isinstance(chunk, dict) and chunk.get("image_sizes"):
            image_sizes = chunk["image_sizes"]  # this server's extension, on the last chunks
        try:
            delta = chunk["choices"][0].get("delta") or {}
        except (KeyError, IndexError, TypeError, AttributeError):
            continue  # e.g. a final usage-only chunk with empty choices
        text = delta.get("content")
        if text:
            if first_token is None:
                first_token = time.monotonic() - started
            parts.append(text)
            out.write(text)
            out.flush()
    out.write("\n")
    out.flush()
    if not done:
        raise ClientError("the stream ended without 'data: [DONE]' (answer may be cut off)")
    return {"content": "".join(parts), "usage": usage, "first_token": first_token, "image_sizes": image_sizes}


def send(
    api_url: str,
    payload: dict,
    api_key: Optional[str] = None,
    timeout: float = 300,
    out: Optional[TextIO] = None,
    auth_scheme: str = "Bearer",
) -> dict:
    """POST the payload; print the answer to `out`; return {"content", "usage", "seconds", ...}.

    Streams (SSE) when payload["stream"] is true. Raises ClientError on any failure.
    """
    out = out if out is not None else sys.stdout
    stream = bool(payload.get("stream"))
    headers = {"Content-Type": "application/json"}
    if stream:
        headers["Accept"] = "text/event-stream"
    if api_key:
        headers["Authorization"] = f"{auth_scheme} {api_key}"
    started = time.monotonic()
    try:
        resp = requests.post(api_url, json=payload, headers=headers, timeout=timeout, stream=stream)
    except requests.exceptions.ConnectionError as exc:
        raise ClientError(
            f"the server is not reachable at {api_url} (is it running? {type(exc).__name__})"
        ) from None
    except requests.exceptions.Timeout:
        raise ClientError(f"no answer from {api_url} within {timeout:g} s") from None
    except requests.exceptions.RequestException as exc:
        raise ClientError(f"request to {api_url} failed: {exc}") from None

    with resp:
        if not 200 <= resp.status_code < 300:
            raise ClientError(
                f"HTTP {resp.status_code} {resp.reason or ''}".rstrip() + f": {_error_detail(resp)}"
            )
        ctype = resp.headers.get("Content-Type", "")
        try:
            if stream and "text/event-stream" in ctype:
                result = _read_stream(resp, out, started)
            else:
                # Not streamed (or the server ignored "stream"): one JSON body.
                try:
                    data = json.loads(resp.content)
                except ValueError:
                    raise ClientError(
                        "the server's answer is not valid JSON: "
                        + resp.content[:200].decode("utf-8", errors="replace")
                    ) from None
                content = _message_content(data)
                out.write(content + "\n")
                out.flush()
                usage = data.get("usage") if isinstance(data, dict) else None
                result = {"content": content, "usage": usage, "first_token": None,
                          "image_sizes": data.get("image_sizes") if isinstance(data, dict) else None}
        except requests.exceptions.Timeout:
            raise ClientError(f"no answer from {api_url} within {timeout:g} s") from None
        except requests.exceptions.RequestException as exc:
            raise ClientError(f"the connection broke while reading the answer: {exc}") from None
    result["seconds"] = time.monotonic() - started
    return result


def format_stats(result: dict) -> str:
    """`time: 1.23 s, prompt_tokens=.., completion_tokens=..` (token counts when usage is known)."""
    parts = [f"time: {result['seconds']:.2f} s"]
    if result.get("first_token") is not None:
        parts.append(f"first_token: {result['first_token']:.2f} s")
    usage = result.get("usage")
    if isinstance(usage, dict):
        for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
            if key in usage:
                parts.append(f"{key}={usage[key]}")
    return ", ".join(parts)


# ---------------------------------------------------------------- grounding (a standalone copy of serving/notebook/grounding.py)

_NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
_BOX_OBJECT = re.compile(r"\{[^{}]*\"bbox_2d\"[^{}]*\}")
_BBOX = re.compile(r"\"bbox_2d\"\s*:\s*\[" + ",".join([_NUMBER] * 4) + r"\]")
_LABEL = re.compile(r"\"label\"\s*:\s*(\"(?:[^\"\\]|\\.)*\")")


def find_boxes(text: str) -> list:
    """Qwen2.5-VL's boxes in an answer: [{"bbox_2d": [x1, y1, x2, y2], "label": ...}, ...] (complete ones only)."""
    boxes = []
    for match in _BOX_OBJECT.finditer(text or ""):
        bbox = _BBOX.search(match.group(0))
        if bbox is None:
            continue
        x1, y1, x2, y2 = (float(v) for v in bbox.groups())
        label = _LABEL.search(match.group(0))
        try:
            name = json.loads(label.group(1)) if label else ""
        except ValueError:
            name = ""
        boxes.append({"bbox_2d": [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)], "label": str(name)})
    return boxes


def to_original(box: dict, size: dict) -> dict:
    """A box in pixels of the image the model saw -> pixels of the image sent, with one entry of the response's
    image_sizes ({"width", "height", "model_width", "model_height"}): x * width / model_width, likewise y."""
    sx, sy = size["width"] / size["model_width"], size["height"] / size["model_height"]
    x1, y1, x2, y2 = box["bbox_2d"]
    clamp = lambda v, high: round(max(0.0, min(float(high), v)), 1)  # noqa: E731
    return {"bbox_2d": [clamp(x1 * sx, size["width"]), clamp(y1 * sy, size["height"]),
                        clamp(x2 * sx, size["width"]), clamp(y2 * sy, size["height"])], "label": box["label"]}


def report_boxes(result: dict, out: TextIO, draw_to: Optional[str] = None, image: Optional[str] = None) -> list:
    """Print the answer's boxes in pixels of the image sent (and draw them on a copy of it); return them."""
    sizes = result.get("image_sizes") or []
    found = find_boxes(result.get("content", ""))
    if not found:
        out.write("boxes: none in the answer\n")
        return []
    if not sizes:
        raise ClientError("the answer has boxes but the server reported no image_sizes: they are in pixels of "
                          "the image as the model saw it, which this client cannot map back")
    size = sizes[-1]  # the image this client sent (the only one)
    boxes = [to_original(box, size) for box in found]
    out.write(f"boxes in pixels of the {size['width']}x{size['height']} image sent (the model saw it at "
              f"{size['model_width']}x{size['model_height']}):\n")
    for box in boxes:
        out.write(f"  {box['label'] or 'box'}: {box['bbox_2d']}\n")
    if draw_to:
        _draw(image, boxes, draw_to)
        out.write(f"drawn on a copy of the image: {draw_to}\n")
    return boxes


def _draw(image: Optional[str], boxes: list, path: str) -> None:
    if not image or _is_url(image) or image.startswith("data:"):
        raise ClientError("--draw-boxes needs --image to be a local file")
    try:
        from PIL import Image, ImageDraw, ImageOps
    except ImportError:
        raise ClientError("--draw-boxes needs Pillow: pip install Pillow") from None
    with Image.open(image) as picture:
        picture = ImageOps.exif_transpose(picture).convert("RGB")  # the upright image, as the server read it
    draw = ImageDraw.Draw(picture)
    line = max(2, round(max(picture.size) / 250))
    for box in boxes:
        draw.rectangle(box["bbox_2d"], outline=(230, 25, 75), width=line)
        if box["label"]:
            draw.text((box["bbox_2d"][0] + line, box["bbox_2d"][1] + line), box["label"], fill=(230, 25, 75))
    picture.save(path)


def _use_utf8() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(encoding="utf-8")  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            pass


def parse_args(argv=None) -> argparse.Namespace:
    # Each default is written in its help by hand: argparse's own "(default: ...)" would print the API key
    # taken from the environment, and "None" for options whose default depends on the others.
    p = argparse.ArgumentParser(
        description="Send a question (and an image or a video) to the OpenAI-compatible Qwen2.5-VL API and print "
                    "the answer. Exit status 0 on success, 1 on any failure, 2 on bad arguments.",
    )
    p.add_argument("--api-url", default=DEFAULT_API_URL, metavar="URL",
                   help=f"the chat completions endpoint (default: {DEFAULT_API_URL})")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="sent as 'Authorization: <scheme> <key>' (default: the environment variable API_KEY; "
                        "none when it is unset)")
    p.add_argument("--auth-scheme", choices=("Bearer", "token"), default="Bearer",
                   help="Bearer (this server, OpenAI) or token (AI Studio's gateway and its access tokens) "
                        "(default: Bearer)")
    p.add_argument("--image", metavar="PATH_OR_URL",
                   help="a local image file or an http(s) URL (default: none, a text-only question)")
    p.add_argument("--video", metavar="PATH_OR_URL",
                   help="a local video file (mp4, webm, mov, ...) or an http(s) URL (default: none)")
    p.add_argument("--question", metavar="TEXT",
                   help=f"the question (default: {DEFAULT_VIDEO_QUESTION!r} with a video, "
                        f"{DEFAULT_IMAGE_QUESTION!r} with an image, {DEFAULT_TEXT_QUESTION!r} with neither)")
    p.add_argument("--stream", action="store_true", help="stream the answer as it is written (server-sent events)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0: greedy (default: 0.7)")
    p.add_argument("--max-tokens", type=int, default=256, metavar="N",
                   help="the longest answer, in tokens (default: 256)")
    p.add_argument("--format", choices=("tutorial", "openai"), default="tutorial",
                   help="how the image and video parts are written: tutorial ({'type': 'image', 'image': ...}) or "
                        "openai ({'type': 'image_url', ...}) (default: tutorial)")
    p.add_argument("--timeout", type=float, default=300, metavar="SECONDS",
                   help="how long to wait for the whole answer (default: 300)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"the request's model field; this server answers with the model it serves whatever it says "
                        f"(default: {DEFAULT_MODEL})")
    p.add_argument("--boxes", action="store_true",
                   help="print the answer's Qwen2.5-VL boxes (bbox_2d) in pixels of --image, mapped back from the "
                        "resized image the model saw with the sizes the server reports (image_sizes)")
    p.add_argument("--draw-boxes", metavar="PNG",
                   help="also save a copy of --image with the boxes drawn (implies --boxes; needs Pillow)")
    args = p.parse_args(argv)
    if args.api_key is None:
        args.api_key = os.environ.get("API_KEY") or None
    if args.draw_boxes:
        args.boxes = True
    return args


def main(argv=None) -> int:
    _use_utf8()
    args = parse_args(argv)
    question = args.question or (DEFAULT_VIDEO_QUESTION if args.video else
                                 DEFAULT_IMAGE_QUESTION if args.image else DEFAULT_TEXT_QUESTION)
    # Under a non-UTF-8 locale argv holds surrogate escapes; recover the UTF-8 text.
    question = question.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    try:
        payload = build_payload(
            question, image=args.image, video=args.video, fmt=args.format, model=args.model,
            temperature=args.temperature, max_tokens=args.max_tokens, stream=args.stream,
        )
        result = send(args.api_url, payload, api_key=args.api_key, timeout=args.timeout,
                      auth_scheme=args.auth_scheme)
    except ClientError as exc:
        sys.stdout.flush()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 1
    print(format_stats(result))
    if args.boxes:
        try:
            report_boxes(result, sys.stdout, draw_to=args.draw_boxes, image=args.image)
        except ClientError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
