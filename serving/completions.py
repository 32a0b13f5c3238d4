"""The legacy text-completion endpoint (/v1/completions) and the tokenizer endpoints (/tokenize, /detokenize).

Evaluation harnesses and older clients use /v1/completions: a raw prompt (a string or token ids, no chat
template), `logprobs` (0..20 most likely alternatives per token, in the legacy form: tokens, token_logprobs,
top_logprobs, text_offset), `echo` (the prompt's text before the answer; with `logprobs`, the prompt's tokens
scored too, the first with null, as OpenAI and vLLM do; `max_tokens: 0` then scores the prompt alone: a
harness's loglikelihood request), vLLM's `prompt_logprobs`, `n`, streaming, and the answer's form as on chat
(response_format, structured_outputs, guided_*: serving.structured.completion_spec, the engine's grammar path).
llama.cpp and vLLM serve /tokenize and /detokenize; both forms of their bodies are taken. All of it needs an
engine that builds prompts itself from token ids (the built-in one: `start_ids`, `tokenizer`).
"""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass
from typing import Annotated, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from serving import protocol, structured
from serving.chat import Reply, choice_of, refuse_peer_fields, word_rules
from serving.errors import InvalidRequest
from serving.jobs import Finished

MAX_LOGPROBS = 20


class CompletionRequest(BaseModel):
    """OpenAI's (legacy) completion request, the fields this server honours; see module docstring."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    prompt: Union[str, list[int], list[str], list[list[int]]]
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(default=16, ge=0)  # OpenAI's default for this endpoint; 0: echo only
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, ge=0, le=1)
    top_k: Optional[int] = Field(default=None, ge=-1)
    n: int = Field(default=1, ge=1, le=protocol.MAX_CHOICES)
    stream: bool = False
    stream_options: Optional[protocol.StreamOptions] = None
    logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(default=None, ge=protocol.INT64_MIN, le=protocol.INT64_MAX)
    presence_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    repetition_penalty: Optional[float] = Field(default=None, gt=0)
    min_tokens: Optional[int] = Field(default=None, ge=0)
    ignore_eos: Optional[bool] = None
    stop_token_ids: Optional[list[int]] = Field(default=None, max_length=64)
    min_p: Optional[float] = Field(default=None, ge=0, le=1)
    return_token_ids: Optional[bool] = None  # vLLM, FastDeploy: each choice's prompt_token_ids and token_ids
    prompt_logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_LOGPROBS)  # vLLM's, on each choice
    logit_bias: Optional[dict[str, Annotated[float, Field(ge=-100, le=100)]]] = None  # token id -> bias (OpenAI's)
    include_stop_str_in_output: Optional[bool] = None  # vLLM, FastDeploy (serving.chat.word_rules)
    bad_words: Optional[protocol.BadWords] = None
    bad_words_token_ids: Optional[protocol.BadWordIds] = None
    user: Optional[str] = None
    # the answer's form, as on chat (serving.structured.answer_form): vLLM's response_format and structured
    # outputs, the peers' guided_* and llama.cpp's json_schema / grammar
    response_format: Optional[protocol.ResponseFormat] = None
    guided_json: Union[dict, str, None] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = Field(default=None, min_length=1)
    guided_grammar: Optional[str] = None
    guided_json_object: Optional[bool] = None
    structured_outputs: Optional[dict] = None
    json_schema: Optional[dict] = None
    grammar: Optional[str] = None

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias_keys(cls, value):
        return protocol._token_ids(value)


REFUSED = {"suffix": "suffix (insertion) is not supported by this model's server",
           "best_of": "best_of other than n is not supported"}


def parse_completion(body) -> CompletionRequest:
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object", code="invalid_body")
    try:
        req = CompletionRequest.model_validate(body)
    except ValidationError as exc:
        deepest = max(exc.errors(), key=lambda e: len(e["loc"]))
        raise InvalidRequest(protocol._describe(exc), param=protocol._param(deepest), code="invalid_value") from exc
    if req.stream_options is not None and not req.stream:
        raise InvalidRequest("The 'stream_options' parameter is only allowed when 'stream' is enabled",
                             param="stream_options")
    extra = req.model_extra or {}
    for name, why in REFUSED.items():
        value = extra.get(name)
        if value is not None and not (name == "best_of" and value in (1, req.n)):
            raise InvalidRequest(why, param=name, code="unsupported_parameter")
    refuse_peer_fields(req)
    if req.max_tokens == 0 and not req.echo:
        raise InvalidRequest("max_tokens 0 asks for no answer; it is accepted only with echo (the prompt alone, "
                             "scored when logprobs is set)", param="max_tokens", code="invalid_value")
    if req.prompt_logprobs is not None and req.stream:
        raise InvalidRequest("prompt_logprobs is not available when stream is true (as in vLLM); use echo with "
                             "logprobs for the prompt's logprobs in a stream", param="prompt_logprobs")
    try:
        req.stop = protocol.ChatCompletionRequest._stop_list(req.stop)
    except ValueError as exc:  # more than 4 (found by the /openapi.json fuzzing: it was a 500)
        raise InvalidRequest(str(exc), param="stop", code="invalid_value") from None
    return req


def prompt_ids(req: CompletionRequest, engine) -> list:
    """The prompt's token ids: a string encoded (added tokens such as <|im_start|> recognised), or ids as sent."""
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            raise InvalidRequest(f"prompt holds {len(prompt)} prompts; this server takes one per request "
                                 "(ask n for several answers to it)", param="prompt")
        prompt = prompt[0]
    ids = engine.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise InvalidRequest("prompt is empty", param="prompt")
    engine.check_token_ids(ids, "prompt")
    return ids


@dataclass
class PromptPart:
    """What a completion's choices show of the prompt: `text` before the answer (echo; "" when not), the prompt's
    tokens scored in the legacy logprobs (echo with logprobs), vLLM's `prompt_logprobs` (its top count, or None),
    and whether the answer follows (max_tokens 0 with echo: the prompt alone)."""

    text: str = ""
    scored: bool = False
    prompt_logprobs: Optional[int] = None
    answer: bool = True
    top: int = 0  # the request's logprobs: alternatives per token in the legacy form
    names: object = None  # serving.engines.builtin.sampling.TokenNames: the first prompt token's text

    def legacy(self, reply) -> dict:
        """The prompt's part of the legacy logprobs: its tokens, the first with null logprobs (nothing comes
        before it), the others scored by the model given the tokens before them."""
        ids, scores = reply.prompt_token_ids, prompt_scores(reply)
        first = {"tokens": [self.names(ids[0])[0]], "token_logprobs": [None], "top_logprobs": [None],
                 "text_offset": [0]}
        rest = legacy_logprobs(scores[1:], len(first["tokens"][0]), self.top)
        return {key: first[key] + rest[key] for key in first}

    def end_offset(self, legacy: dict) -> int:
        """Where the answer's text_offset starts after the prompt's legacy logprobs (vLLM: after its tokens)."""
        return legacy["text_offset"][-1] + len(legacy["tokens"][-1])


def prompt_scores(reply) -> list:
    """The engine's scores of the prompt's tokens (serving.jobs.Job.prompt_logprobs), once its prefill is done."""
    scores = getattr(reply.generation, "prompt_logprobs", None)
    if scores is None:
        from serving.errors import InternalError

        raise InternalError("the prompt's logprobs were asked for but not computed")
    return scores


def vllm_prompt_logprobs(scores: list, top: int) -> list:
    """vLLM's prompt_logprobs form: None for the first token, then per token {token id: {logprob, rank,
    decoded_token}} holding the prompt's token and the `top` most likely ones (so top or top + 1 entries)."""
    out: list = [None]
    for scored in scores[1:]:
        entry = {str(scored.id): _vllm_logprob(scored)}
        for alternative in scored.top_logprobs[:top]:
            entry.setdefault(str(alternative.id), _vllm_logprob(alternative))
        out.append(entry)
    return out


def _vllm_logprob(scored) -> dict:
    return {"logprob": max(float(scored.logprob), -9999.0), "rank": scored.rank, "decoded_token": scored.token}


def start(service, req: CompletionRequest, *, started: float) -> tuple:
    """(Reply, PromptPart: what the choices show of the prompt) of a completion request."""
    engine = service.ready_engine()
    if not hasattr(engine, "start_ids"):
        raise InvalidRequest("/v1/completions needs the built-in engine (--backend paddle)", param="prompt",
                             code="unsupported_parameter")
    scored = req.echo and req.logprobs is not None
    wanted = [k for k, asked in ((req.logprobs, scored), (req.prompt_logprobs, req.prompt_logprobs is not None))
              if asked]
    answer = req.max_tokens != 0  # 0 (with echo): the prompt alone; one token is generated and not shown
    params = service.sampling_params(max_tokens=req.max_tokens if answer else 1, temperature=req.temperature,
                                     top_p=req.top_p, top_k=req.top_k, repetition_penalty=req.repetition_penalty,
                                     presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                                     seed=req.seed, stop=req.stop, logprobs=req.logprobs is not None,
                                     top_logprobs=req.logprobs or None, stream=req.stream)
    params.min_tokens, params.ignore_eos = (req.min_tokens or 0) if answer else 0, bool(req.ignore_eos)
    params.stop_token_ids, params.min_p = list(req.stop_token_ids or []), req.min_p or 0.0
    params.prompt_logprobs = max(wanted) if wanted else None
    word_rules(params, req)
    # the deltas' ids: shown (return_token_ids) or counted (continuous_usage_stats)
    params.return_token_ids = bool(req.return_token_ids) or protocol.continuous_usage(req.stream_options)
    spec = structured.completion_spec(req, max_schema_bytes=service.settings.max_schema_bytes)
    if spec is not None:  # enforced per row as on /v1/chat/completions (the engine's grammar path)
        features = getattr(engine.info, "features", ())
        for feature, param, asked in (("response_format", spec.grammar_param or spec.schema_param,
                                       spec.schema is not None or spec.grammar is not None),
                                      ("logit_bias", "logit_bias", bool(spec.logit_bias))):
            if asked and feature not in features:
                raise InvalidRequest(f"{param} is not supported here: structured output is off (see the log)",
                                     param=param, code="unsupported_parameter")
        params.output = engine.compile_output(spec)  # a 400 naming the field for a schema or grammar it refuses
    ids = prompt_ids(req, engine)
    reply = service.start_ids(ids, params, started=started, n=req.n)  # shutdown ends it with the chats
    echo = (req.prompt if isinstance(req.prompt, str) else engine.tokenizer.decode(ids)) if req.echo else ""
    from serving.engines.builtin.sampling import token_names

    return reply, PromptPart(echo, scored, req.prompt_logprobs, answer, req.logprobs or 0,
                             token_names(engine.tokenizer))


def legacy_logprobs(tokens, offset: int, top: Optional[int] = None) -> dict:
    """serving.jobs.TokenLogprob items -> the completion endpoint's logprobs form. Each top_logprobs map holds
    the `top` most likely tokens (all given when None) and the token itself: up to logprobs + 1 entries, as
    OpenAI documents (and vLLM answers)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t in tokens:
        out["tokens"].append(t.token)
        out["token_logprobs"].append(max(float(t.logprob), -9999.0))
        alternatives = {_alternative_name(a): max(float(a.logprob), -9999.0) for a in t.top_logprobs[:top]}
        alternatives.setdefault(_alternative_name(t), max(float(t.logprob), -9999.0))
        out["top_logprobs"].append(alternatives)
        out["text_offset"].append(offset)
        offset += len(t.token)
    return out


def _alternative_name(alternative) -> str:
    """An alternative's key in the legacy top_logprobs map: its text; for part of a character OpenAI's
    "bytes:\\xe5" form, for a token with no text (a special one) vLLM's "token_id:151645" form. Such tokens
    would otherwise share one key ("") and all but one be lost from the map."""
    raw = bytes(alternative.bytes or b"")
    if not raw and not alternative.token:
        return f"token_id:{alternative.id}" if alternative.id is not None else ""
    try:
        return raw.decode("utf-8") if raw else alternative.token
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _usage(finishes, answer: bool = True) -> dict:
    """As chat's (prompt_tokens_details.cached_tokens: the prefix cache's share), no completion tokens for
    the prompt alone (max_tokens 0 with echo)."""
    finishes = list(finishes)
    first = finishes[0]
    done = sum(f.completion_tokens for f in finishes) if answer else 0
    return protocol.usage(first.prompt_tokens, done, first.cached_tokens).model_dump(exclude_none=True)


def completion(reply: Reply, prompt: PromptPart, *, model: str, logprobs: bool, fingerprint: str,
               token_ids: bool = False) -> dict:
    """The whole completion; `token_ids` (return_token_ids): each choice's prompt_token_ids and token_ids, as vLLM."""
    answers = reply.collect_choices()
    head = prompt.legacy(reply) if logprobs and prompt.scored else None
    scores = (vllm_prompt_logprobs(prompt_scores(reply), prompt.prompt_logprobs)
              if prompt.prompt_logprobs is not None else None)
    choices = []
    for index, answer in enumerate(answers):
        if answer.finished is None:
            from serving.errors import InternalError

            raise InternalError("the generation ended without a result")
        lp = None
        if logprobs:
            offset = prompt.end_offset(head) if head is not None else len(prompt.text)
            lp = legacy_logprobs(answer.logprobs if prompt.answer else [], offset, prompt.top)
            if head is not None:
                lp = {key: head[key] + lp[key] for key in lp}
        choices.append({"text": prompt.text + (answer.text if prompt.answer else ""), "index": index,
                        "logprobs": lp,
                        "finish_reason": answer.finished.finish_reason if prompt.answer else "length"})
        choices[-1]["prompt_logprobs"] = scores  # null when not asked for, as vLLM's choices have it
        if token_ids:
            choices[-1].update(prompt_token_ids=reply.prompt_token_ids,
                               token_ids=list(answer.token_ids) if prompt.answer else [])
    return {"id": new_id(), "object": "text_completion", "created": protocol.now(), "model": model,
            "system_fingerprint": fingerprint, "choices": choices,
            "usage": _usage((a.finished for a in answers), prompt.answer)}


def stream_events(reply: Reply, prompt: PromptPart, *, model: str, logprobs: bool, fingerprint: str,
                  include_usage: bool, continuous_usage: bool = False, token_ids: bool = False):
    """The completion's chunks as JSON bodies (the SSE framing is the caller's); `continuous_usage` (vLLM's
    stream_options.continuous_usage_stats): every chunk carries the usage so far; `token_ids` (return_token_ids):
    each choice's first chunk carries prompt_token_ids, each text chunk its token_ids. With echo, each choice's
    first chunk is the prompt's text (and, with logprobs, its tokens scored: sent once the prompt is prefilled)."""
    prompt_sent = set()
    ident, created = new_id(), protocol.now()
    offsets = [len(prompt.text)] * reply.n
    generated = 0

    def chunk(index, text, finish=None, lp=None, ids=None):
        body = {"id": ident, "object": "text_completion", "created": created, "model": model,
                "system_fingerprint": fingerprint,
                "choices": [{"text": text, "index": index, "logprobs": lp, "finish_reason": finish}]}
        if token_ids:
            first = index not in prompt_sent
            prompt_sent.add(index)
            body["choices"][0].update(prompt_token_ids=reply.prompt_token_ids if first else None, token_ids=ids)
        if continuous_usage:
            body["usage"] = protocol.usage(reply.prompt_tokens or 0, generated).model_dump(exclude_none=True)
        return body

    events = iter(reply)
    waited = []
    if prompt.text:
        head = None
        if logprobs and prompt.scored:  # the scores are set before the generation's first event
            waited = [event for event in [next(events, None)] if event is not None]
            head = prompt.legacy(reply)
            offsets = [prompt.end_offset(head)] * reply.n
        for index in range(reply.n):
            yield chunk(index, prompt.text, lp=head)
    for event in itertools.chain(waited, events):
        index = choice_of(event)
        if isinstance(event, str):
            if not prompt.answer:  # max_tokens 0: the generated token is not shown
                continue
            lp = legacy_logprobs(event.logprobs, offsets[index], prompt.top) if logprobs else None
            offsets[index] += len(event)
            generated += len(getattr(event, "token_ids", ()))
            yield chunk(index, str(event), lp=lp, ids=list(getattr(event, "token_ids", ())))
        elif isinstance(event, Finished):
            yield chunk(index, "", finish=event.finish_reason if prompt.answer else "length")
    if len(reply.finishes) < reply.n:
        from serving.errors import InternalError

        raise InternalError("the generation ended without a result")
    if include_usage:
        yield {"id": ident, "object": "text_completion", "created": created, "model": model,
               "system_fingerprint": fingerprint, "choices": [],
               "usage": _usage((reply.finishes[i] for i in range(reply.n)), prompt.answer)}


def new_id() -> str:
    return "cmpl-" + uuid.uuid4().hex


# ---------------------------------------------------------------- /tokenize, /detokenize

# the chat request's fields that shape its prompt: /tokenize with messages renders them as the chat endpoint does
CHAT_PROMPT_FIELDS = ("messages", "add_generation_prompt", "continue_final_message", "tools", "tool_choice",
                      "parallel_tool_calls", "functions", "function_call")


def tokenize(service, body) -> dict:
    """llama.cpp's {"content": ...} (with_pieces) or vLLM's {"prompt": ...} / {"messages": [...]} (return_token_strs;
    with `tools`, the prompt holds them as the chat endpoint's does)."""
    engine = service.ready_engine()
    if not hasattr(engine, "start_ids"):
        raise InvalidRequest("/tokenize needs the built-in engine (--backend paddle)", code="unsupported_parameter")
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object", code="invalid_body")
    if "messages" in body:
        chat = {key: body[key] for key in CHAT_PROMPT_FIELDS if key in body}
        req = service.parse_request(chat)
        from serving.chat import prompt_ending

        go_on, open_turn = prompt_ending(req)
        # the tools the chat endpoint would write into the prompt (checked as there: a 400 names a bad one)
        spec = structured.output_spec(req, max_tools=service.settings.max_tools,
                                      max_schema_bytes=service.settings.max_schema_bytes)
        tools = spec.prompt_tools if spec is not None else None
        turns = service.load_images(protocol.normalise_messages(req))
        ids = engine.build_prompt(turns, tools or None, continue_final=go_on,
                                  generation_prompt=open_turn).arrays["input_ids"][0]
        ids = [int(t) for t in ids]
    else:
        text = body.get("content", body.get("prompt"))
        if not isinstance(text, str):
            raise InvalidRequest("send the text to tokenize as 'content' (or 'prompt'), a string, or 'messages'",
                                 param="content")
        ids = engine.encode(text)
    names = None
    if body.get("with_pieces") or body.get("return_token_strs"):
        names = [engine.tokenizer.convert_ids_to_tokens(i) for i in ids]
    out = {"tokens": [{"id": i, "piece": engine.tokenizer.decode([i])} for i in ids] if body.get("with_pieces")
           else ids, "count": len(ids), "max_model_len": engine.info.context_length}
    if body.get("return_token_strs"):
        out["token_strs"] = names
    return out


def detokenize(service, body) -> dict:
    """{"tokens": [ids]} -> {"content": text} (llama.cpp) and {"prompt": text} (vLLM)."""
    engine = service.ready_engine()
    if not hasattr(engine, "start_ids"):
        raise InvalidRequest("/detokenize needs the built-in engine (--backend paddle)", code="unsupported_parameter")
    tokens = body.get("tokens") if isinstance(body, dict) else None
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise InvalidRequest("tokens must be a list of token ids", param="tokens")
    engine.check_token_ids(tokens, "tokens")
    text = engine.tokenizer.decode(tokens)
    return {"content": text, "prompt": text}
