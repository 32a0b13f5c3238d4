"""Limits checked before a request costs anything: on its bytes before JSON parsing, on the parsed JSON
before validation, on the chat turns before templating or tokenizing.

- `parse_json`: the body's JSON, parsed only after a scan of its text (strings skipped by the json module's
  own C scanner, nothing built) found it at most MAX_JSON_DEPTH deep and with at most `max_json_tokens`
  structural tokens (brackets, strings, commas, colons). 3 MB of nested empty objects used to cost 2.7 GB
  and 13 s in the walk below: the scan refuses it in a fraction of a second, holding the text only, and
  what an accepted body parses into is bounded by its size plus a constant (~8 MB at the defaults).
- `check_raw_body` (the bytes, roughly) and `check_body` (the parsed JSON, exactly): at most
  MAX_MESSAGES messages and MAX_CONTENT_PARTS content parts (a million one-letter messages is 30 MB
  of JSON that costs gigabytes once parsed, validated, templated and tokenized); no lone UTF-16
  surrogate in any string (JSON may escape one, "\\ud800", but it is not Unicode text, and the
  tokenizer and the UTF-8 encoder refuse it later with a 500).
- `check_prompt_chars`: the prompt's text within what the model's context can hold at most
  (MAX_CHARS_PER_TOKEN characters a token), so a prompt that surely does not fit is refused
  before the tokenizer spends seconds on it.
"""

from __future__ import annotations

import json
import re
from json.decoder import scanstring

from serving.errors import InvalidRequest

MAX_CHARS_PER_TOKEN = 16  # no BPE token of Qwen's covers more characters than this on average
_SURROGATE = re.compile("[\ud800-\udfff]")


MAX_JSON_DEPTH = 64  # a request's own structure is 6 deep; a tool's schema rarely 20
_STRUCTURAL = re.compile(r'[\[\]{},:"]')


def max_json_tokens(max_messages: int, max_parts: int) -> int:
    """Structural tokens a body may have: ~10 a message or content part, room for tools and their schemas.
    Each token parses into at most ~64 bytes of Python objects, so at the defaults (1024 messages, 2048
    parts: 114,688 tokens) the objects beyond the body's own text are at most ~7 MB."""
    return 16 * (max_messages + max_parts) + 65_536


def json_text(data: bytes) -> str:
    """The body as text, in the encoding JSON allows (UTF-8, -16 or -32, detected as json.loads does)."""
    try:
        return data.decode(json.detect_encoding(data), "surrogatepass")
    except (UnicodeDecodeError, LookupError):
        raise InvalidRequest("the request body is not valid JSON (its bytes are not UTF-8 text)",
                             code="invalid_json") from None


def parse_json(text: str, *, max_depth: int = MAX_JSON_DEPTH, max_tokens: int):
    """The JSON value of `text`, parsed only once check_json_shape let it through."""
    check_json_shape(text, max_depth=max_depth, max_tokens=max_tokens)
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise InvalidRequest("the request body is not valid JSON", code="invalid_json") from None


def check_json_shape(text: str, *, max_depth: int, max_tokens: int) -> None:
    """InvalidRequest when `text` nests containers deeper than `max_depth` or has more than `max_tokens`
    structural tokens (opening brackets, strings, commas, colons), judged before anything is built: what
    json.loads makes of a body (an empty object is 64 bytes for its 3 bytes of JSON) depends on these,
    not on its size. The scan stops at the first limit passed, so it costs at most ~max_tokens steps."""
    opening = text.count("{") + text.count("[")
    if opening <= max_depth and opening + text.count(",") + text.count(":") + text.count('"') <= max_tokens:
        return  # counted with the characters inside strings: an upper bound, so surely within the limits
    depth = tokens = position = 0
    search = _STRUCTURAL.search
    while True:
        found = search(text, position)
        if found is None:
            return
        char, position = found.group(), found.end()
        if char == '"':
            try:
                _, position = scanstring(text, position)  # to the string's end, in C (a copy freed at once)
            except ValueError:
                raise InvalidRequest("the request body is not valid JSON (a string is not closed or holds a "
                                     "control character)", code="invalid_json") from None
        elif char in "]}":
            depth -= 1
            continue
        elif char in "[{":
            depth += 1
            if depth > max_depth:
                raise InvalidRequest(f"the request's JSON nests arrays and objects more than {max_depth} levels "
                                     "deep; this server takes at most that", code="json_too_deep")
        tokens += 1
        if tokens > max_tokens:
            raise InvalidRequest(f"the request's JSON has more than {max_tokens} values, keys and separators; this "
                                 "server takes at most that (a request's messages and content parts need about "
                                 "10 each)", code="json_too_complex")


RAW_SLACK = 4  # check_raw_body refuses only at this many times the limits: a key counted is not always a message


def check_raw_body(data: bytes, *, max_messages: int, max_parts: int) -> None:
    """Before the JSON is parsed (a million tiny messages is 30 MB that parses into 260 MB of objects): every
    message has a "role" key and every content part a "type", so bytes holding far more of those tokens than
    the limits allow are refused unparsed. (Inside a JSON string the quotes would be escaped: a text that
    mentions "role" does not count.) Borderline bodies are parsed and judged exactly by check_body."""
    roles = data.count(b'"role"')
    if roles > RAW_SLACK * max_messages:
        raise InvalidRequest(f"the request has about {roles} messages (\"role\" fields); this server takes at most "
                             f"{max_messages}", param="messages", code="too_many_messages")
    types = data.count(b'"type"')
    if types > RAW_SLACK * max_parts:
        raise InvalidRequest(f"the request has about {types} content parts (\"type\" fields); this server takes at "
                             f"most {max_parts}", param="messages", code="too_many_content_parts")


def check_body(body, *, max_messages: int, max_parts: int) -> None:
    """InvalidRequest when the request (parsed JSON) has too many messages or content parts, or a
    string that is not valid Unicode. Anything else about its shape is the request models' to judge."""
    if not isinstance(body, dict):
        return
    messages = body.get("messages")
    if isinstance(messages, list):
        if len(messages) > max_messages:
            raise InvalidRequest(f"the request has {len(messages)} messages; this server takes at most {max_messages}",
                                 param="messages", code="too_many_messages")
        parts = sum(len(m["content"]) for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list))
        if parts > max_parts:
            raise InvalidRequest(f"the request's messages have {parts} content parts together; this server takes at "
                                 f"most {max_parts}", param="messages", code="too_many_content_parts")
    where = lone_surrogate(body)
    if where is not None:
        path, index = where
        raise InvalidRequest(f"{path or 'the request'} holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff "
                             f"escape) at character {index}: that is not Unicode text. Send text as UTF-8, and "
                             "characters beyond U+FFFF as one escape pair (\\ud83d\\ude00)", param=path,
                             code="invalid_value")


def lone_surrogate(value, path: str = ""):
    """(path, index) of the first string within `value` (dicts, lists, strings) holding a lone surrogate, or None.
    One iterator per level of nesting is kept and the path is spelled out only for the string found, so the walk
    holds memory for the depth, not for every value (it used to keep a path string per value: gigabytes)."""
    if isinstance(value, str):
        found = None if value.isascii() else _SURROGATE.search(value)
        return (path, found.start()) if found else None
    top = _children(value)
    if top is None:
        return None
    stack, keys = [top], []  # keys[k]: (key, is_list_index) of the container open at level k + 1
    while stack:
        for key, child, is_index in stack[-1]:
            if not is_index and isinstance(key, str) and not key.isascii() and _SURROGATE.search(key):
                return (_spell(path, keys) or None), 0
            if isinstance(child, str):
                found = None if child.isascii() else _SURROGATE.search(child)
                if found:
                    return _spell(path, keys + [(key, is_index)]), found.start()
                continue
            below = _children(child)
            if below is not None:
                stack.append(below)
                keys.append((key, is_index))
                break
        else:
            stack.pop()
            if keys:
                keys.pop()
    return None


def _children(item):
    """An iterator of (key or index, child, is_index) over a dict or list; None for anything else."""
    if isinstance(item, dict):
        return ((key, child, False) for key, child in item.items())
    if isinstance(item, list):
        return ((k, child, True) for k, child in enumerate(item))
    return None


def _spell(path: str, keys) -> str:
    for key, is_index in keys:
        path = f"{path}[{key}]" if is_index else f"{path}.{key}" if path else str(key)
    return path


def prompt_chars(turns) -> int:
    """Characters of text in chat turns (parts that are strings)."""
    return sum(len(part) for turn in turns for part in turn.parts if isinstance(part, str))


def check_prompt_chars(turns, context_length: int) -> None:
    """InvalidRequest (context_length_exceeded) when the turns' text surely does not fit the context
    (an engine that does not know its context, 0, is not judged here)."""
    if not context_length:
        return
    chars, limit = prompt_chars(turns), context_length * MAX_CHARS_PER_TOKEN
    if chars > limit:
        raise InvalidRequest(f"the prompt is {chars} characters, more than the model's context of {context_length} "
                             f"tokens can hold (at most {limit} characters)", param="messages",
                             code="context_length_exceeded")
