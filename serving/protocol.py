"""The wire format: pydantic models for requests, responses and stream chunks.

Every content-part form a client may send is normalised here into one internal shape:
OpenAI's {"type":"image_url","image_url":{"url":...}}, the bare-string image_url, the
tutorial's {"type":"image","image":...}, text parts, and plain string content.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import InvalidRequest


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextPart(_Part):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="allow")
    url: str
    detail: Optional[str] = None


class ImageURLPart(_Part):
    type: Literal["image_url"]
    image_url: Union[ImageURL, str]
    min_pixels: Optional[int] = Field(default=None, ge=1)
    max_pixels: Optional[int] = Field(default=None, ge=1)


class ImagePart(_Part):
    """The tutorial's form: {"type": "image", "image": "<base64 or URL>"}."""

    type: Literal["image"]
    image: str
    min_pixels: Optional[int] = Field(default=None, ge=1)
    max_pixels: Optional[int] = Field(default=None, ge=1)


ContentPart = Annotated[Union[TextPart, ImageURLPart, ImagePart], Field(discriminator="type")]


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat completion request, the fields this server honours.

    Unknown fields are kept (extra="allow") so the app can log them; they do not fail a request.
    """

    model_config = ConfigDict(extra="allow")

    messages: list[Message] = Field(min_length=1)
    model: Optional[str] = None
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    top_k: Optional[int] = Field(default=None, ge=-1)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    stop: Union[str, Annotated[list[str], Field(max_length=4)], None] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(default=1, ge=1, le=1)
    repetition_penalty: Optional[float] = Field(default=None, gt=0)
    presence_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)  # needs logprobs: true (checked in serving.chat)
    user: Optional[str] = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        if value is None:
            return []
        items = [value] if isinstance(value, str) else value
        if len(items) > 4:
            raise ValueError("at most 4 stop sequences")
        return [s for s in items if s]


# ---------------------------------------------------------------- normalised form

@dataclass
class ImageRef:
    source: str  # data URL, raw base64 or http(s) URL, as sent
    param: str  # where it was in the request, for error messages
    min_pixels: Optional[int] = None
    max_pixels: Optional[int] = None


@dataclass
class ChatTurn:
    role: str  # system, user or assistant
    parts: list = field(default_factory=list)  # str (text) or ImageRef, in order


def parse_request(body) -> ChatCompletionRequest:
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object", code="invalid_body")
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        deepest = max(exc.errors(), key=lambda e: len(e["loc"]))
        raise InvalidRequest(_describe(exc), param=_loc(deepest["loc"]), code="invalid_value") from exc


def normalise_messages(request: ChatCompletionRequest) -> list[ChatTurn]:
    turns = []
    for i, message in enumerate(request.messages):
        role = "system" if message.role == "developer" else message.role
        turn = ChatTurn(role=role)
        content = message.content
        if content is None or content == "" or content == []:
            if role == "assistant":
                content = ""
            else:
                raise InvalidRequest(f"messages[{i}] ({role}) has no content",
                                     param=f"messages[{i}].content", code="empty_content")
        if isinstance(content, str):
            turn.parts.append(content)
        else:
            for j, part in enumerate(content):
                where = f"messages[{i}].content[{j}]"
                if isinstance(part, TextPart):
                    turn.parts.append(part.text)
                elif isinstance(part, ImageURLPart):
                    url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
                    turn.parts.append(ImageRef(url, where, part.min_pixels, part.max_pixels))
                else:
                    turn.parts.append(ImageRef(part.image, where, part.min_pixels, part.max_pixels))
        if role != "user" and any(isinstance(p, ImageRef) for p in turn.parts):
            raise InvalidRequest(f"messages[{i}]: images are accepted in user messages only",
                                 param=f"messages[{i}].content", code="invalid_value")
        turns.append(turn)
    if all(t.role != "user" for t in turns):
        raise InvalidRequest("messages must contain at least one user message", param="messages")
    return turns


_PART_TAGS = {"text", "image_url", "image"}


def _loc(loc) -> str | None:
    """pydantic's error location as a request path, without its union-branch labels."""
    names = [item for item in loc
             if not (isinstance(item, str) and (item == "str" or item.startswith(("list[", "dict[")) or item[:1].isupper()))]
    out = ""
    for k, item in enumerate(names):
        if isinstance(item, int):
            out += f"[{item}]"
        elif item in _PART_TAGS and k >= 2 and isinstance(names[k - 1], int) and names[k - 2] == "content":
            continue  # the discriminator's tag value (the part's type), not a field
        else:
            out += ("." if out else "") + str(item)
    return out or None


def _describe(exc: ValidationError) -> str:
    errors = exc.errors()
    err = max(errors, key=lambda e: len(e["loc"]))  # the deepest error is the most specific
    where = _loc(err["loc"]) or "body"
    if len(errors) > 1 and len({len(e["loc"]) for e in errors}) == 1:
        return f"{where}: expected one of several forms (a string or a list); got {type(err.get('input')).__name__}"
    if err["type"] == "union_tag_invalid":
        tag = err.get("ctx", {}).get("tag")
        return f"{where}: unknown content part type {tag!r}; expected 'text', 'image_url' or 'image'"
    if err["type"] == "union_tag_not_found":
        return f"{where}: a content part needs a 'type' ('text', 'image_url' or 'image')"
    if err["type"] == "literal_error" and where.endswith("role"):
        return f"{where}: unknown role {err.get('input')!r}; expected system, user or assistant"
    if err["type"] == "missing":
        return f"{where}: field required"
    return f"{where}: {err['msg']}"


# ---------------------------------------------------------------- responses

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None  # the token's UTF-8 bytes: a token may hold part of a character


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]  # the most likely tokens at that step, most likely first


class ChoiceLogprobs(BaseModel):
    content: Optional[list[TokenLogprob]] = None


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: Literal["stop", "length"]
    logprobs: Optional[ChoiceLogprobs] = None  # when the request asked for logprobs


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: Optional[str] = None


class Delta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Optional[Literal["stop", "length"]] = None
    logprobs: Optional[ChoiceLogprobs] = None  # of the tokens this chunk's delta covers


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Optional[Usage] = None
    system_fingerprint: Optional[str] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "qwenvl-serving"
    root: str
    max_model_len: Optional[int] = None  # prompt + answer tokens the model takes
    demo: bool = False
    description: str = ""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    """Every error, in OpenAI's shape."""

    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok", "loading", "unavailable"]
    model: str
    demo: Optional[bool] = None
    reason: Optional[str] = None


def new_completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)
