"""A chat widget conversation saved as JSON, and read back.

The file is an OpenAI chat request's `messages` (a system message first when there is a system prompt;
images as `image_url` parts and videos as `video_url` parts, each a data URL of the file as uploaded), so
an exported conversation can also be sent to the API as it is. Beside the messages: the files' names and
the sampling settings, so an import restores the captions and the sliders.

    data = to_json(turns, files, system="...", sampling={...})      # files: {id(part): (name, bytes, mime)}
    messages = read(text)                                             # -> Conversation
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from dataclasses import dataclass, field
from typing import Optional

FORMAT = "qwen-vl-notebook-chat/1"
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+);base64,(?P<data>.*)$", re.DOTALL)


class ConversationError(ValueError):
    """The file is not a conversation this widget can read; the message says why, in plain words."""


@dataclass
class Part:
    """One content part read back: text, or a file (an image or a video) with its name and bytes."""

    text: Optional[str] = None
    name: str = ""
    data: bytes = b""
    video: bool = False


@dataclass
class Conversation:
    system: str = ""
    turns: list = field(default_factory=list)  # (role, [Part]) in order, user and assistant only
    sampling: dict = field(default_factory=dict)


def to_json(turns: list, files: dict, *, system: str = "", sampling: Optional[dict] = None, model: str = "") -> dict:
    """`turns`: ChatTurns whose parts are text and uploaded images / videos; `files`: id(part) -> (name, bytes,
    mime) of each upload. Parts without a file (none, normally) are left out."""
    messages = [{"role": "system", "content": system}] if system else []
    names = []
    for turn in turns:
        if all(isinstance(p, str) for p in turn.parts):
            messages.append({"role": turn.role, "content": "".join(turn.parts)})
            continue
        content = []
        for part in turn.parts:
            if isinstance(part, str):
                content.append({"type": "text", "text": part})
                continue
            name, data, mime = files.get(id(part), (None, b"", ""))
            if not data:
                continue
            url = f"data:{mime};base64," + base64.b64encode(data).decode()
            if mime.startswith("video/"):
                content.append({"type": "video_url", "video_url": {"url": url}})
            else:
                content.append({"type": "image_url", "image_url": {"url": url}})
            names.append({"message": len(messages), "part": len(content) - 1, "name": name})
        messages.append({"role": turn.role, "content": content})
    return {"format": FORMAT, "model": model, "messages": messages, "files": names, "sampling": dict(sampling or {})}


def read(text) -> Conversation:
    """A file written by to_json (as text, bytes or the parsed dict) -> Conversation; ConversationError if not."""
    try:
        data = json.loads(text) if isinstance(text, (str, bytes, bytearray)) else text
    except ValueError as exc:
        raise ConversationError(f"not JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise ConversationError("it has no \"messages\" list")
    names = {(f.get("message"), f.get("part")): str(f.get("name") or "")
             for f in data.get("files") or [] if isinstance(f, dict)}
    out = Conversation(sampling=data.get("sampling") if isinstance(data.get("sampling"), dict) else {})
    for i, message in enumerate(data["messages"]):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise ConversationError(f"message {i + 1} is not a system, user or assistant message")
        content = message.get("content")
        if message["role"] == "system":
            out.system = content if isinstance(content, str) else ""
            continue
        parts = []
        if isinstance(content, str):
            parts.append(Part(text=content))
        elif isinstance(content, list):
            for j, part in enumerate(content):
                parts.append(_part(part, names.get((i, j)) or f"file {i + 1}.{j + 1}", i))
        else:
            raise ConversationError(f"message {i + 1} has no content")
        out.turns.append((message["role"], parts))
    return out


def _part(part, name: str, i: int) -> Part:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        return Part(text=str(part.get("text", "")))
    if kind in ("image_url", "video_url"):
        value = part[kind]
        url = value.get("url", "") if isinstance(value, dict) else str(value)
        match = _DATA_URL.match(url)
        if not match:
            raise ConversationError(f"message {i + 1} refers to a file by URL; only files kept in the "
                                    "conversation (data URLs) can be imported")
        try:
            data = base64.b64decode(match.group("data"), validate=True)
        except (binascii.Error, ValueError):
            raise ConversationError(f"message {i + 1} holds a file that is not valid base64") from None
        return Part(name=name, data=data, video=kind == "video_url" or match.group("mime").startswith("video/"))
    raise ConversationError(f"message {i + 1} has a part of type {kind!r}")


def image_mime(data: bytes) -> str:
    """The MIME type of an image file's bytes (image/png, image/jpeg, ...), as its data URL needs."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return Image.MIME.get(img.format or "", "image/png")
    except Exception:  # read already once by the upload; a guess will do
        return "image/png"
