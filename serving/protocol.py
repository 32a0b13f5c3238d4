"""The wire format: pydantic models for requests, responses and stream chunks.

Every content-part form a client may send is normalised here into one internal shape:
OpenAI's {"type":"image_url","image_url":{"url":...}}, the bare-string image_url, the
tutorial's {"type":"image","image":...}, text parts, and plain string content; videos as
{"type":"video_url","video_url":{"url":...}} (vLLM's, FastDeploy's) or {"type":"video","video":...}
(a file, or a list of images that are its frames, as qwen-vl-utils takes them).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer

from serving.errors import InvalidRequest


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


class _VideoOptions(_Part):
    """qwen-vl-utils' per-video sampling keys; each is kept within the server's limits (serving.intake.video)."""

    fps: Optional[float] = Field(default=None, gt=0, le=120)
    max_frames: Optional[int] = Field(default=None, ge=2)
    min_pixels: Optional[int] = Field(default=None, ge=1)
    max_pixels: Optional[int] = Field(default=None, ge=1)
    total_pixels: Optional[int] = Field(default=None, ge=1)


class VideoURL(BaseModel):
    model_config = ConfigDict(extra="allow")
    url: str


class VideoURLPart(_VideoOptions):
    """vLLM's and FastDeploy's form: {"type": "video_url", "video_url": {"url": "<data URL or http(s) URL>"}}."""

    type: Literal["video_url"]
    video_url: Union[VideoURL, str]


class VideoPart(_VideoOptions):
    """The tutorial's style and qwen-vl-utils': {"type": "video", "video": "<base64 or URL>" or a list of
    images (base64, data URLs or URLs) that are the video's frames}; for a list, `fps` is the frames' rate."""

    type: Literal["video"]
    video: Union[str, Annotated[list[str], Field(min_length=1)]]


ContentPart = Annotated[Union[TextPart, ImageURLPart, ImagePart, VideoURLPart, VideoPart], Field(discriminator="type")]


Content = Union[str, list[ContentPart]]


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: Optional[str] = None


class SystemMessage(_Message):
    role: Literal["system", "developer"]  # developer: OpenAI's newer name for system
    content: Content


class UserMessage(_Message):
    role: Literal["user"]
    content: Content


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    arguments: str


class ToolCall(BaseModel):
    """A tool call the model made earlier in the conversation (an assistant message's tool_calls)."""

    model_config = ConfigDict(extra="allow")
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class AssistantMessage(_Message):
    role: Literal["assistant"]
    content: Optional[Content] = None  # may be absent: an earlier answer that only called tools
    refusal: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None  # honoured only by engines whose info.features name "tools"


class ToolMessage(_Message):
    """A tool's result; honoured only by engines whose info.features name "tools" (serving.chat refuses it else)."""

    role: Literal["tool"]
    content: Content
    tool_call_id: str


# content is required where the server requires it (every role but assistant), and /openapi.json says so
Message = Annotated[Union[SystemMessage, UserMessage, AssistantMessage, ToolMessage], Field(discriminator="role")]
_ROLE_TAGS = {"system", "developer", "user", "assistant", "tool"}


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: the usage so far on every chunk (with include_usage)


def continuous_usage(options: Optional[StreamOptions]) -> bool:
    """vLLM's continuous_usage_stats asked for, with include_usage (vLLM needs both)."""
    return bool(options and options.include_usage and options.continuous_usage_stats)


# ---- fields that change the answer: honoured only by engines whose info.features name them
# (serving.chat refuses them with 400 unsupported_parameter otherwise; typed here so wrong types are a 400)

class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    description: Optional[str] = None
    parameters: Optional[dict] = None
    strict: Optional[bool] = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"]
    function: FunctionDefinition


class NamedToolChoice(BaseModel):
    """{"type": "function", "function": {"name": ...}} (or another object form OpenAI defines)."""

    model_config = ConfigDict(extra="allow")
    type: str


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str
    description: Optional[str] = None
    schema_: Optional[dict] = Field(default=None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JSONSchemaFormat] = None  # for type json_schema


def _token_ids(value):
    if value is not None:
        bad = [key for key in value if not key.lstrip("-").isdigit()]
        if bad:
            raise ValueError(f"logit_bias keys must be token ids (integers as strings); got {bad[0]!r}")
    return value


INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
MAX_CHOICES = 16  # n: each choice is a row of the running batch
# the peers' bad words (vLLM's strings, FastDeploy's token ids): bounded, since every step checks each of them
BadWords = Annotated[list[Annotated[str, Field(min_length=1, max_length=200)]], Field(max_length=64)]
BadWordIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=1024)]


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat completion request, the fields this server honours.

    Unknown fields are kept (extra="allow") so the app can log them; they do not fail a request.
    Numbers must be finite: JSON's 1e309 parses as infinity, and an infinite repetition_penalty passed every
    range check and failed in the engine (500) or upstream (502).
    """

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    messages: list[Message] = Field(min_length=1)
    model: Optional[str] = None
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, ge=0, le=1)  # 0: the smallest nucleus, the most likely token
    top_k: Optional[int] = Field(default=None, ge=-1, le=INT64_MAX)  # above the vocabulary: no filtering
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    stop: Union[str, list[str], None] = None  # at most 4 (the validator below says so in words)
    seed: Optional[int] = Field(default=None, ge=INT64_MIN, le=INT64_MAX)  # a signed 64-bit integer, as vLLM takes
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)  # choice i samples with seed + i (serving.chat.Choices)
    repetition_penalty: Optional[float] = Field(default=None, gt=0)
    presence_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)  # needs logprobs: true (checked in serving.chat)
    # change the answer; honoured only by engines whose info.features name them (serving.chat.FEATURES)
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list[Tool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    functions: Optional[list[FunctionDefinition]] = None  # the deprecated form of tools
    function_call: Union[Literal["none", "auto"], dict, None] = None  # the deprecated form of tool_choice
    logit_bias: Optional[dict[str, Annotated[float, Field(ge=-100, le=100)]]] = None
    # the peers' extensions this server honours (docs/api.md: vLLM, llama.cpp, FastDeploy); engines without the
    # feature refuse them (serving.chat.unsupported_fields), other peer fields are refused by name (PEER_REFUSED)
    continue_final_message: Optional[bool] = None  # vLLM: the answer continues the final assistant message
    add_generation_prompt: Optional[bool] = None  # vLLM: open the assistant's turn after the last message
    min_tokens: Optional[int] = Field(default=None, ge=0)  # vLLM, FastDeploy: no end of turn before this many
    ignore_eos: Optional[bool] = None  # vLLM, llama.cpp: never end on the end-of-turn token
    stop_token_ids: Optional[list[Annotated[int, Field(ge=0)]]] = Field(default=None, max_length=64)  # vLLM, FastDeploy
    min_p: Optional[float] = Field(default=None, ge=0, le=1)  # vLLM, llama.cpp: drop tokens below min_p x the top one
    return_token_ids: Optional[bool] = None  # vLLM, FastDeploy: prompt_token_ids and each choice's token_ids
    prompt_logprobs: Optional[int] = Field(default=None, ge=0, le=20)  # vLLM: the prompt's tokens scored
    include_stop_str_in_output: Optional[bool] = None  # vLLM, FastDeploy: the stop string stays in the text
    bad_words: Optional[BadWords] = None  # vLLM: strings never generated (serving.engines.builtin.row_rules)
    bad_words_token_ids: Optional[BadWordIds] = None  # FastDeploy: token ids never generated
    disable_chat_template: Optional[bool] = None  # FastDeploy: the one message's text is the prompt, as written
    guided_json: Union[dict, str, None] = None  # vLLM (before structured_outputs), FastDeploy: a JSON schema
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = Field(default=None, min_length=1)
    guided_grammar: Optional[str] = None  # a Lark or GBNF grammar
    guided_json_object: Optional[bool] = None  # FastDeploy: any JSON object
    structured_outputs: Optional[dict] = None  # vLLM: {"json" | "regex" | "choice" | "grammar" | "json_object": ...}
    json_schema: Optional[dict] = None  # llama.cpp: a JSON schema
    grammar: Optional[str] = None  # llama.cpp: a GBNF grammar
    # accepted and ignored: they do not change the answer
    user: Optional[str] = None
    metadata: Optional[dict[str, str]] = None
    store: Optional[bool] = None
    service_tier: Optional[str] = None
    parallel_tool_calls: Optional[bool] = None
    prompt_cache_key: Optional[str] = None
    safety_identifier: Optional[str] = None

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias_keys(cls, value):
        return _token_ids(value)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        if value is None:
            return []
        items = [value] if isinstance(value, str) else value
        if len(items) > 4:
            raise ValueError(f"at most 4 stop sequences; got {len(items)}")
        return [s for s in items if s]


# ---------------------------------------------------------------- normalised form

@dataclass
class ImageRef:
    source: str  # data URL, raw base64 or http(s) URL, as sent
    param: str  # where it was in the request, for error messages
    min_pixels: Optional[int] = None
    max_pixels: Optional[int] = None


@dataclass
class VideoRef:
    source: Union[str, list]  # data URL, raw base64 or http(s) URL, as sent; or a list of such images (its frames)
    param: str  # where it was in the request, for error messages
    options: dict = field(default_factory=dict)  # fps, max_frames, min_pixels, max_pixels, total_pixels as sent


@dataclass
class ChatTurn:
    role: str  # system, user or assistant (tool: for engines with the "tools" feature)
    parts: list = field(default_factory=list)  # str (text), ImageRef or VideoRef, in order
    tool_calls: Optional[list] = None  # an assistant turn's calls, as OpenAI's JSON (passed on by upstream engines)
    tool_call_id: Optional[str] = None  # a tool turn's answer to that call


def parse_request(body) -> ChatCompletionRequest:
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object", code="invalid_body")
    try:
        req = ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        deepest = max(exc.errors(), key=lambda e: len(e["loc"]))
        raise InvalidRequest(_describe(exc), param=_param(deepest), code="invalid_value") from exc
    if req.stream_options is not None and not req.stream:  # as OpenAI answers it
        raise InvalidRequest("The 'stream_options' parameter is only allowed when 'stream' is enabled",
                             param="stream_options", code="invalid_value")
    return req


def normalise_messages(request: ChatCompletionRequest) -> list[ChatTurn]:
    turns = []
    for i, message in enumerate(request.messages):
        role = "system" if message.role == "developer" else message.role
        turn = ChatTurn(role=role, tool_call_id=getattr(message, "tool_call_id", None))
        if not isinstance(message, AssistantMessage) and (message.model_extra or {}).get("tool_calls") is not None:
            raise InvalidRequest(f"messages[{i}] ({message.role}) has tool_calls: only assistant messages carry the "
                                 "calls a model made", param=f"messages[{i}].tool_calls", code="invalid_value")
        if getattr(message, "tool_calls", None):
            turn.tool_calls = [call.model_dump(mode="json") for call in message.tool_calls]
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
                elif isinstance(part, (VideoURLPart, VideoPart)):
                    source = part.video if isinstance(part, VideoPart) else (
                        part.video_url if isinstance(part.video_url, str) else part.video_url.url)
                    options = part.model_dump(include=set(_VideoOptions.model_fields), exclude_none=True)
                    turn.parts.append(VideoRef(source, where, options))
                else:
                    turn.parts.append(ImageRef(part.image, where, part.min_pixels, part.max_pixels))
        if role != "user" and any(isinstance(p, (ImageRef, VideoRef)) for p in turn.parts):
            raise InvalidRequest(f"messages[{i}]: images and videos are accepted in user messages only",
                                 param=f"messages[{i}].content", code="invalid_value")
        turns.append(turn)
    if all(t.role != "user" for t in turns):
        raise InvalidRequest("messages must contain at least one user message", param="messages")
    return turns


_PART_TAGS = {"text", "image_url", "image", "video_url", "video"}


def _is_label(item) -> bool:
    """A union-branch label pydantic puts in an error's location ('str', 'list[...]', 'literal[...]', a class name)."""
    return isinstance(item, str) and (item == "str" or item.startswith(("list[", "dict[", "literal[")) or item[:1].isupper())


def _loc(loc) -> str | None:
    """pydantic's error location as a request path, without its union-branch labels."""
    names = [item for item in loc if not _is_label(item)]
    out = ""
    for k, item in enumerate(names):
        if isinstance(item, int):
            out += f"[{item}]"
        elif item in _PART_TAGS and k >= 2 and isinstance(names[k - 1], int) and names[k - 2] == "content":
            continue  # the discriminator's tag value (the part's type), not a field
        elif item in _ROLE_TAGS and k >= 2 and isinstance(names[k - 1], int) and names[k - 2] == "messages":
            continue  # the message's role, the discriminator of the message kinds
        else:
            out += ("." if out else "") + str(item)
    return out or None


def _role_error(err) -> bool:
    return err["type"] in ("union_tag_invalid", "union_tag_not_found") and err.get("ctx", {}).get("discriminator") == "'role'"


def _param(err) -> str | None:
    where = _loc(err["loc"])
    return f"{where}.role" if _role_error(err) else where


def _form(label) -> str:
    """What a union-branch label stands for, in words."""
    if label == "str":
        return "a string"
    if label.startswith("list["):
        return "a list"
    if label.startswith("literal["):
        return "one of " + label[len("literal["):-1].replace(",", ", ")
    return "an object"


def _describe(exc: ValidationError) -> str:
    errors = exc.errors()
    err = max(errors, key=lambda e: len(e["loc"]))  # the deepest error is the most specific
    where = _param(err) or "body"
    if len(errors) > 1 and len({len(e["loc"]) for e in errors}) == 1:
        forms = [_form(e["loc"][-1]) for e in errors if _is_label(e["loc"][-1])]
        return (f"{where}: expected one of several forms ({' or '.join(forms) or 'see /openapi.json'}); "
                f"got {type(err.get('input')).__name__}")
    if _role_error(err):
        if err["type"] == "union_tag_not_found":
            return f"{where}: each message needs a role (system, developer, user, assistant or tool)"
        return (f"{where}: unknown role {err.get('ctx', {}).get('tag')!r}; expected system, developer, user, "
                "assistant or tool")
    if err["type"] == "union_tag_invalid":
        tag = err.get("ctx", {}).get("tag")
        return f"{where}: unknown content part type {tag!r}; expected 'text', 'image_url', 'image', 'video_url' or 'video'"
    if err["type"] == "union_tag_not_found":
        return f"{where}: a content part needs a 'type' ('text', 'image_url', 'image', 'video_url' or 'video')"
    if err["type"] == "missing":
        return f"{where}: field required"
    return f"{where}: {err['msg'].removeprefix('Value error, ')}"


# ---------------------------------------------------------------- responses

class _OmitNone(BaseModel):
    """The fields named in _omit_none are left out of the JSON when None: OpenAI omits them rather than
    sending null (a chunk's delta after the first has no role; system_fingerprint is a string or absent)."""

    _omit_none: ClassVar[frozenset] = frozenset()

    @model_serializer(mode="wrap")
    def _omit(self, handler):
        data = handler(self)
        for name in self._omit_none:
            if name in data and data[name] is None:
                del data[name]
        return data


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens whose KV an earlier request computed (the built-in engine's prefix cache)


class Usage(_OmitNone):
    _omit_none = frozenset({"prompt_tokens_details"})  # engines that do not report it: absent
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: Optional[PromptTokensDetails] = None


class ImageSize(BaseModel):
    """An extension: one image of the request, as sent and as the model saw it (resized to sides that are
    multiples of 28 within the pixel budget). Qwen2.5-VL's boxes (`bbox_2d`) are pixel coordinates in the
    image the model saw: x * width / model_width, y * height / model_height maps them to the image sent."""

    width: int  # the image as sent (after its EXIF orientation)
    height: int
    model_width: int  # the image the model saw
    model_height: int


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str]
    refusal: Optional[str] = None  # this server never refuses by itself; present because OpenAI's schema requires it


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None  # the token's UTF-8 bytes: a token may hold part of a character


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]  # the most likely tokens at that step, most likely first


class ChoiceLogprobs(BaseModel):
    content: Optional[list[TokenLogprob]] = None
    refusal: Optional[list[TokenLogprob]] = None  # always null here; OpenAI's schema requires the key


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: Literal["stop", "length", "tool_calls", "content_filter"]  # the last two from upstream engines
    logprobs: Optional[ChoiceLogprobs] = None  # when the request asked for logprobs


IMAGE_SIZES_DESCRIPTION = ("An extension of this server: every image of the request, in order, as sent and as the model "
                           "saw it; present when the request has images. Qwen2.5-VL's bbox_2d coordinates are pixels "
                           "of the image the model saw.")


class ChatCompletion(_OmitNone):
    _omit_none = frozenset({"system_fingerprint", "image_sizes"})

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: Optional[str] = None
    image_sizes: Optional[list[ImageSize]] = Field(default=None, description=IMAGE_SIZES_DESCRIPTION)


class Delta(_OmitNone):
    _omit_none = frozenset({"role", "content"})  # the first chunk has the role, later ones only content

    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Optional[Literal["stop", "length", "tool_calls", "content_filter"]] = None
    logprobs: Optional[ChoiceLogprobs] = None  # of the tokens this chunk's delta covers


class ChatCompletionChunk(_OmitNone):
    _omit_none = frozenset({"system_fingerprint", "image_sizes"})

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Optional[Usage] = None
    system_fingerprint: Optional[str] = None
    image_sizes: Optional[list[ImageSize]] = Field(default=None, description=IMAGE_SIZES_DESCRIPTION + (
        " In a stream: on the chunk with finish_reason and on the usage chunk."))


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


class UpstreamHealth(BaseModel):
    """One upstream server of --backend openai / fastdeploy, as its last health check or request found it."""

    url: str
    status: Literal["ok", "down"]
    reason: Optional[str] = None
    in_flight: int = 0


class Health(BaseModel):
    status: Literal["ok", "loading", "unavailable"]
    model: str
    demo: Optional[bool] = None
    reason: Optional[str] = None
    upstreams: Optional[list[UpstreamHealth]] = None  # the upstream backends: each server and whether it is up


def new_completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: Optional[int] = None) -> Usage:
    details = None if cached_tokens is None else PromptTokensDetails(cached_tokens=cached_tokens)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens, prompt_tokens_details=details)
