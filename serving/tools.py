"""Qwen2.5's tool-call format: tools in the prompt, and the calls read back from the answer's tokens.

The prompt (as Qwen2.5-Instruct's chat template writes it): the system turn gains a `# Tools` block with
one JSON line per tool inside <tools></tools>; an assistant turn's calls are
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` lines after its text; the results of
consecutive `tool` messages go, each in a <tool_response> block, into one user turn. A checkpoint whose
template knows tools (the demo's) renders them itself; for one whose template does not (the published
Qwen2.5-VL's) `render_messages` writes the same text into plain system / assistant / user messages.

The answer: `CallReader` watches a row's token ids. Text before the first `<tool_call>` token is the
content; each `<tool_call>` ... `</tool_call>` span (single tokens, found by id, never by matching text) is
one call, streamed as OpenAI's delta.tool_calls pieces: id, type and name once, then `arguments` fragments
that join to exactly the call's arguments text.
"""

from __future__ import annotations

import json
import uuid
from typing import Callable, Optional

from serving.jobs import ToolCallDelta

DEFAULT_SYSTEM = "You are a helpful assistant."  # Qwen2.5-VL's template's default system turn
TOOLS_INTRO = ("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
               "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_OUTRO = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
               "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
               "<args-json-object>}\n</tool_call>")


def template_knows_tools(template: Optional[str]) -> bool:
    """The chat template renders tools, tool calls and tool results itself."""
    return bool(template) and "tools" in template and "tool_call" in template and "tool_response" in template


def tools_block(system: str, tools: list) -> str:
    """A system turn's text with the tools block (Qwen2.5's), each tool as one JSON line."""
    lines = "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools)
    return system + TOOLS_INTRO + lines + TOOLS_OUTRO


def call_text(call: dict) -> str:
    """One call of an assistant turn as Qwen writes it; `call` is OpenAI's {"function": {"name", "arguments"}}."""
    function = call.get("function", call)
    arguments = function.get("arguments")
    if not isinstance(arguments, str) or not _is_json(arguments):
        # text that is not JSON (a call cut short by max_tokens: '{"city": "Pa') goes in as a JSON string:
        # written raw (as Qwen2.5's template writes any string) it left the call's own JSON unreadable
        arguments = json.dumps(arguments, ensure_ascii=False)
    return f'<tool_call>\n{{"name": "{function["name"]}", "arguments": {arguments}}}\n</tool_call>'


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def template_calls(calls: list) -> list:
    """An assistant turn's tool_calls for a chat template: arguments as objects when they are JSON (Qwen's
    template writes them with tojson), else as JSON text of a string (the template writes a string raw)."""
    out = []
    for call in calls:
        function = dict(call.get("function", {}))
        arguments = function.get("arguments", "")
        try:
            function["arguments"] = json.loads(arguments)
        except (TypeError, ValueError):
            function["arguments"] = json.dumps(arguments, ensure_ascii=False)
        out.append({"type": "function", "id": call.get("id"), "function": function})
    return out


def render_messages(messages: list, tools: list) -> list:
    """Messages (role, content; assistant `tool_calls`; role "tool") -> plain system / user / assistant
    messages whose text is what Qwen2.5's template writes for tools, calls and results."""
    out = []
    if tools:
        first = messages[0] if messages and messages[0]["role"] == "system" else None
        out.append({"role": "system", "content": tools_block(first["content"] if first else DEFAULT_SYSTEM, tools)})
        messages = messages[1:] if first else messages
    for message in messages:
        if message["role"] == "tool":
            block = f"<tool_response>\n{message['content']}\n</tool_response>"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
        elif message["role"] == "assistant" and message.get("tool_calls"):
            text = message.get("content") or ""
            calls = "\n".join(call_text(call) for call in message["tool_calls"])
            out.append({"role": "assistant", "content": (text + "\n" if text else "") + calls})
        else:
            out.append({key: value for key, value in message.items() if key != "tool_calls"})
    for message in out:
        message.pop("_tool_results", None)
    return out


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class CallReader:
    """A tool-calling row's tokens -> content tokens and ToolCallDelta pieces.

    `add(token)` returns None for a content token (the row detokenizes it as text), else the pieces that
    token completes. `new_text()` makes the incremental detokenizer of one call's JSON text."""

    def __init__(self, opening: int, closing: int, new_text: Callable):
        self.opening, self.closing, self.new_text = opening, closing, new_text
        self.current: Optional[_Call] = None
        self.count = 0  # calls begun
        self.in_calls = False  # the first <tool_call> was seen: no more content
        self._pieces: list = []  # every piece so far, for the whole calls at the end

    def add(self, token: int) -> Optional[list]:
        if token == self.opening:
            pieces = self._close() if self.current is not None else []
            self.in_calls = True
            self.current = _Call(self.count, self.new_text())
            self.count += 1
            return self._keep(pieces)
        if not self.in_calls:
            return None
        if token == self.closing:
            return self._keep(self._close())
        if self.current is not None:
            return self._keep(self.current.feed(token))
        return []  # between calls ("\n")

    def finish(self) -> list:
        """The end of the answer: what a call cut short (max_tokens) still holds."""
        return self._keep(self._close()) if self.current is not None else []

    def tool_calls(self) -> list:
        """OpenAI's message.tool_calls: the pieces joined, so they equal what a stream sent."""
        calls: dict = {}
        for piece in self._pieces:
            call = calls.setdefault(piece.index, {"id": piece.id, "type": "function",
                                                  "function": {"name": piece.name, "arguments": ""}})
            call["function"]["arguments"] += piece.arguments
        return [calls[i] for i in sorted(calls)]

    def _close(self) -> list:
        pieces = self.current.close()
        self.current = None
        return pieces

    def _keep(self, pieces: list) -> list:
        self._pieces.extend(pieces)
        return pieces


class _Call:
    """One call's JSON text as it is generated. Once `{"name": "...", "arguments": ` is complete, the name
    goes out; then argument text as it comes, always short of a trailing run of "}" and whitespace (which
    may be the call's own closing brace); at the end, the rest of the arguments' exact text."""

    def __init__(self, index: int, text):
        self.index, self.text = index, text
        self.id = new_call_id()
        self.raw = ""
        self.name: Optional[str] = None
        self.args_at: Optional[int] = None  # where the arguments' value starts in raw
        self.sent = 0  # characters of the arguments already sent

    def feed(self, token: int) -> list:
        self.raw += self.text.add(token)
        return self._advance(final=False)

    def close(self) -> list:
        self.raw += self.text.finish()
        return self._advance(final=True)

    def _advance(self, final: bool) -> list:
        pieces = []
        if self.name is None:
            head = _head(self.raw)
            if head is not None:
                self.name, self.args_at = head
                pieces.append(ToolCallDelta(self.index, id=self.id, name=self.name))
        if self.name is None:
            whole = _whole(self.raw) if final else None  # another key order: the whole call at once
            if whole is not None:
                pieces.append(ToolCallDelta(self.index, id=self.id, name=whole[0], arguments=whole[1]))
            return pieces  # a call cut short before its name: nothing was sent of it, nothing is
        body = self.raw[self.args_at:]
        if final:
            end = _value_end(self.raw, self.args_at)
            ready = body if end is None else self.raw[self.args_at:end]
        else:
            ready = body.rstrip("} \t\r\n")
        if len(ready) > self.sent:
            pieces.append(ToolCallDelta(self.index, arguments=ready[self.sent:]))
            self.sent = len(ready)
        return pieces


def _skip(raw: str, at: int) -> int:
    while at < len(raw) and raw[at] in " \t\r\n":
        at += 1
    return at


_DECODER = json.JSONDecoder()


def _head(raw: str) -> Optional[tuple]:
    """(name, where the arguments' value starts) once raw holds `{"name": "...", "arguments": `, else None."""
    try:
        at = _skip(raw, 0)
        if raw[at:at + 1] != "{":
            return None
        key, at = _DECODER.raw_decode(raw, _skip(raw, at + 1))
        at = _skip(raw, at)
        if key != "name" or raw[at:at + 1] != ":":
            return None
        name, at = _DECODER.raw_decode(raw, _skip(raw, at + 1))
        at = _skip(raw, at)
        if not isinstance(name, str) or raw[at:at + 1] != ",":
            return None
        key, at = _DECODER.raw_decode(raw, _skip(raw, at + 1))
        at = _skip(raw, at)
        if key != "arguments" or raw[at:at + 1] != ":":
            return None
        at = _skip(raw, at + 1)
        return (name, at) if at < len(raw) else None
    except ValueError:
        return None


def _value_end(raw: str, at: int) -> Optional[int]:
    try:
        return _DECODER.raw_decode(raw, at)[1]
    except ValueError:
        return None


def _whole(raw: str) -> Optional[tuple]:
    """(name, arguments text) of a whole call in any key order; None when it is not one."""
    try:
        call = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    return call["name"], json.dumps(call.get("arguments", {}), ensure_ascii=False)
