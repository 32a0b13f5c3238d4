"""What a request asks of the answer's form: JSON (response_format), tool calls (tools, tool_choice,
parallel_tool_calls) and logit_bias, checked and gathered into one OutputSpec.

Everything here is checked before any model work, and fails closed: a field this server cannot enforce is
a 400 naming it, never an answer in free text. Compiling the spec into a grammar is the engine's work
(serving.engines.builtin.grammar), which names the schema keywords it cannot enforce.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Optional

from serving import protocol
from serving.errors import InvalidRequest

FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for a function's name
EMPTY_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class ToolSpec:
    name: str
    parameters: dict  # the JSON schema of its arguments (an object)
    param: str  # where its parameters are in the request, for errors: tools[3].function.parameters


@dataclass
class OutputSpec:
    """The answer's required form. `schema`: the JSON schema the whole answer follows (json_object:
    {"type": "object"}); `tools`: the functions it may call, `tool_choice` "auto", "required" or "named"
    (then `named` is the function), `parallel`: more than one call allowed; `tool_dicts`: the request's
    tools as sent, for the prompt; `logit_bias`: token id -> bias."""

    schema: Optional[dict] = None
    schema_param: str = "response_format"
    tools: list = field(default_factory=list)
    tool_dicts: list = field(default_factory=list)
    tool_choice: str = "none"
    named: Optional[str] = None
    parallel: bool = True
    logit_bias: dict = field(default_factory=dict)
    grammar: Optional[tuple] = None  # ("regex" | "choice" | "grammar", the regex, the choices, Lark or GBNF text)
    grammar_param: str = ""  # where it was in the request

    @property
    def calls(self) -> bool:
        """The answer may hold tool calls."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def prompt_tools(self) -> list:
        """The tools the prompt lists (as sent): those the answer may call, none when it may call none."""
        return self.tool_dicts if self.calls else []


def output_spec(req: protocol.ChatCompletionRequest, *, max_tools: int, max_schema_bytes: int) -> Optional[OutputSpec]:
    """The OutputSpec of `req`, or None when it asks for free text; InvalidRequest (400) naming the field
    when a part of it cannot be served."""
    spec = answer_form(req, max_schema_bytes=max_schema_bytes)
    _tools(req, spec, max_tools, max_schema_bytes)
    if spec.grammar is not None and spec.calls:
        raise InvalidRequest(f"{spec.grammar_param} cannot be combined with tools (tool_choice other than 'none')",
                             param=spec.grammar_param)
    return _with_bias(spec, req)


def answer_form(req, *, max_schema_bytes: int) -> OutputSpec:
    """An OutputSpec holding the answer's form alone: `response_format` or one of the peers' fields
    (peer_forms), never two. Shared by /v1/chat/completions and /v1/completions (which have no tools)."""
    spec = OutputSpec()
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        spec.schema = {"type": "object"}
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise InvalidRequest("response_format of type 'json_schema' needs a json_schema object "
                                 "({\"name\": ..., \"schema\": {...}})", param="response_format.json_schema")
        schema = fmt.json_schema.schema_
        spec.schema = {"type": "object"} if schema is None else schema
        spec.schema_param = "response_format.json_schema.schema"
        _check_size(spec.schema, max_schema_bytes, spec.schema_param)
    forms = peer_forms(req)
    if forms and spec.schema is not None:
        raise InvalidRequest(f"{forms[0][0]} and response_format both set the answer's form; send one",
                             param=forms[0][0])
    if len(forms) > 1:
        raise InvalidRequest(f"{forms[0][0]} and {forms[1][0]} both set the answer's form; send one",
                             param=forms[1][0])
    for param, kind, value in forms:
        if kind == "json":
            spec.schema, spec.schema_param = value, param
            _check_size(value, max_schema_bytes, param)
        else:
            spec.grammar, spec.grammar_param = (kind, value), param
            _check_size(value, max_schema_bytes, param)
    return spec


def completion_spec(req, *, max_schema_bytes: int) -> Optional[OutputSpec]:
    """The OutputSpec of a /v1/completions request (its form and logit_bias), or None when it asks for free text."""
    return _with_bias(answer_form(req, max_schema_bytes=max_schema_bytes), req)


def _with_bias(spec: OutputSpec, req) -> Optional[OutputSpec]:
    """`spec` with the request's logit_bias; None when it then asks for nothing but free text."""
    if req.logit_bias:
        spec.logit_bias = {int(k): float(v) for k, v in req.logit_bias.items()}
    if spec.schema is None and spec.grammar is None and not spec.calls and not spec.logit_bias:
        return None
    return spec


STRUCTURED_KEYS = {"json": "json", "regex": "regex", "choice": "choice", "grammar": "grammar",
                   "json_object": "json_object"}


def peer_forms(req) -> list:
    """(param, kind, value) of each output form the peers' fields ask for: kind "json" (value: a schema),
    "regex", "choice" (a list of strings) or "grammar" (Lark or GBNF text). vLLM's guided_* and
    structured_outputs, FastDeploy's guided_* and guided_json_object, llama.cpp's json_schema and grammar."""
    found = []
    fields = [("guided_json", "json", req.guided_json), ("guided_regex", "regex", req.guided_regex),
              ("guided_choice", "choice", req.guided_choice), ("guided_grammar", "grammar", req.guided_grammar),
              ("json_schema", "json", req.json_schema), ("grammar", "grammar", req.grammar)]
    if req.guided_json_object:
        fields.append(("guided_json_object", "json", {"type": "object"}))
    if req.structured_outputs is not None:
        chosen = {k: v for k, v in req.structured_outputs.items() if v is not None and v is not False}
        unknown = sorted(set(chosen) - set(STRUCTURED_KEYS))
        if unknown:
            raise InvalidRequest(f"structured_outputs.{unknown[0]} is not supported here; this server takes "
                                 "json, regex, choice, grammar or json_object", param=f"structured_outputs.{unknown[0]}",
                                 code="unsupported_parameter")
        for key, value in chosen.items():
            kind = "json" if key in ("json", "json_object") else key
            fields.append((f"structured_outputs.{key}", kind, {"type": "object"} if key == "json_object" else value))
    for param, kind, value in fields:
        if value is None:
            continue
        found.append((param, kind, _form_value(param, kind, value)))
    return found


def _form_value(param: str, kind: str, value):
    """A peer form's value, checked: a schema (an object, or JSON text of one), a string, or a list of strings."""
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise InvalidRequest(f"{param} must be a JSON schema (an object, or its JSON text)", param=param) from None
        if not isinstance(value, dict):
            raise InvalidRequest(f"{param} must be a JSON schema (an object)", param=param)
        return value
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise InvalidRequest(f"{param} must be a list of non-empty strings", param=param)
        return list(value)
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{param} must be a non-empty string", param=param)
    return value


def _tools(req, spec: OutputSpec, max_tools: int, max_schema_bytes: int) -> None:
    tools, where = req.tools, "tools"
    if tools is None and req.functions:  # the deprecated form: functions + function_call
        tools, where = [protocol.Tool(type="function", function=f) for f in req.functions], "functions"
    choice = req.tool_choice if req.tool_choice is not None else _old_choice(req.function_call)
    choice_param = "tool_choice" if req.tool_choice is not None else "function_call"
    if not tools:
        if choice not in (None, "none"):
            raise InvalidRequest(f"{choice_param} needs tools to choose from; the request has none", param=choice_param)
        return
    if len(tools) > max_tools:
        raise InvalidRequest(f"the request has {len(tools)} tools; this server takes at most {max_tools} (MAX_TOOLS)",
                             param=where, code="too_many_tools")
    names = set()
    for i, tool in enumerate(tools):
        fn = tool.function
        base = f"{where}[{i}]" + (".function" if where == "tools" else "")
        if not FUNCTION_NAME.match(fn.name):
            raise InvalidRequest(f"{base}.name {fn.name!r} must be 1-64 letters, digits, underscores or dashes",
                                 param=f"{base}.name")
        if fn.name in names:
            raise InvalidRequest(f"two tools are named {fn.name!r}", param=f"{base}.name")
        names.add(fn.name)
        parameters = EMPTY_PARAMETERS if fn.parameters is None else fn.parameters
        _check_size(parameters, max_schema_bytes, f"{base}.parameters")
        if parameters.get("type", "object") != "object":
            raise InvalidRequest(f"{base}.parameters must describe a JSON object (type 'object'), not "
                                 f"{parameters.get('type')!r}", param=f"{base}.parameters")
        spec.tools.append(ToolSpec(fn.name, parameters, f"{base}.parameters"))
        spec.tool_dicts.append(tool.model_dump(mode="json", by_alias=True, exclude_unset=True))
    spec.parallel = req.parallel_tool_calls is not False
    if choice is None:
        choice = "auto"
    if isinstance(choice, str):
        spec.tool_choice = choice
        return
    name = _named(choice, choice_param)
    if name not in names:
        raise InvalidRequest(f"{choice_param} names the function {name!r}, which is not among the request's tools "
                             f"({', '.join(sorted(names))})", param=choice_param, code="unknown_tool")
    spec.tool_choice, spec.named = "named", name


def _old_choice(function_call):
    if function_call is None or isinstance(function_call, str):
        return function_call
    return {"type": "function", "function": function_call}


def _named(choice, param: str) -> str:
    """The function a named tool_choice ({"type": "function", "function": {"name": ...}}) names."""
    data = choice.model_dump() if hasattr(choice, "model_dump") else dict(choice)
    function = data.get("function")
    if data.get("type") != "function" or not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise InvalidRequest(f"{param} must be 'none', 'auto', 'required' or "
                             "{\"type\": \"function\", \"function\": {\"name\": ...}}", param=param)
    return function["name"]


def _check_size(schema, limit: int, param: str) -> None:
    size = len(json.dumps(schema, ensure_ascii=False).encode())
    if size > limit:
        raise InvalidRequest(f"{param} is {size} bytes of JSON; this server takes schemas of at most {limit} bytes "
                             "(MAX_SCHEMA_BYTES)", param=param, code="schema_too_large")
