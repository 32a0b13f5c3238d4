"""Limits checked before a request costs anything: on its bytes before JSON parsing, on the parsed JSON
before validation, on the chat turns before templating or tokenizing.

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

import re

from serving.errors import InvalidRequest

MAX_CHARS_PER_TOKEN = 16  # no BPE token of Qwen's covers more characters than this on average
_SURROGATE = re.compile("[\ud800-\udfff]")


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
    """(path, index) of the first string within `value` (dicts, lists, strings) holding a lone surrogate, or None."""
    stack = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                found = _SURROGATE.search(item)
                if found:
                    return where, found.start()
        elif isinstance(item, dict):
            for key, child in reversed(list(item.items())):
                if isinstance(key, str) and not key.isascii() and _SURROGATE.search(key):
                    return (where or None), 0
                stack.append((child, f"{where}.{key}" if where else str(key)))
        elif isinstance(item, list):
            stack.extend((child, f"{where}[{k}]") for k, child in reversed(list(enumerate(item))))
    return None


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
