"""A chat answer in OpenAI's wire format: one chat.completion JSON, or chat.completion.chunk events
over server-sent events ending with `data: [DONE]`.

A stream is committed to only once the answer's first event has arrived, so an error found before
generation starts (a bad image, a prompt too long) is still answered as a plain JSON error.
"""

from __future__ import annotations

import itertools
import json
from typing import Callable, Iterator, Optional

from serving import protocol
from serving.web import http_errors
from serving.chat import Reply, choice_of
from serving.errors import InternalError
from serving.jobs import Finished, ToolCallDelta

LOWEST_LOGPROB = -9999.0  # what OpenAI reports for a token of probability 0 (JSON has no -Infinity)


def completion(reply: Reply, *, model: str, logprobs: bool, fingerprint: Optional[str] = None,
               token_ids: bool = False) -> dict:
    """The whole answer as a chat.completion body (n choices when the request asked for several)."""
    answers = reply.collect_choices()
    if any(answer.finished is None for answer in answers):
        raise InternalError("the generation ended without a result")
    choices = []
    for index, answer in enumerate(answers):
        finished = answer.finished
        tool_calls = finished.tool_calls  # the model called tools
        choice = protocol.Choice(index=index, message=protocol.ResponseMessage(
            content=None if tool_calls and not answer.text.strip() else answer.text),
            finish_reason=finished.finish_reason,
            logprobs=choice_logprobs(answer.logprobs) if logprobs else None).model_dump()
        if tool_calls:
            choice["message"]["tool_calls"] = tool_calls
        if token_ids:  # vLLM's return_token_ids
            choice["token_ids"] = answer.token_ids
        choices.append(choice)
    body = protocol.ChatCompletion(id=protocol.new_completion_id(), created=protocol.now(), model=model,
                                   choices=[], usage=total_usage(a.finished for a in answers),
                                   image_sizes=reply.image_sizes or None, system_fingerprint=fingerprint).model_dump()
    body["choices"] = choices
    if token_ids:
        body["prompt_token_ids"] = reply.prompt_token_ids
    scores = getattr(reply.generation, "prompt_logprobs", None)  # set when the request asked (prompt_logprobs)
    if scores is not None:  # vLLM's form, at the response's top level
        from serving.completions import vllm_prompt_logprobs

        body["prompt_logprobs"] = vllm_prompt_logprobs(scores, len(scores[1].top_logprobs) if len(scores) > 1 else 0)
    return body


def total_usage(finishes) -> protocol.Usage:
    """OpenAI's usage of n choices: the prompt once, the choices' tokens summed (cached tokens: the first's)."""
    finishes = list(finishes)
    first = finishes[0]
    return protocol.usage(first.prompt_tokens, sum(f.completion_tokens for f in finishes), first.cached_tokens)


def stream(reply: Reply, *, model: str, logprobs: bool, include_usage: bool, request_id: str,
           on_end: Callable, fingerprint: Optional[str] = None, token_ids: bool = False,
           continuous_usage: bool = False) -> Iterator[str]:
    """The answer as SSE text, event by event. Waits for the first event here, so errors before it are
    raised to the caller; after it, an error travels in the stream as its last event. `on_end(status,
    problem, completion_tokens)` is called once when the stream ends (499: the client went away), with all
    choices' tokens. `continuous_usage`: vLLM's stream_options.continuous_usage_stats, usage on every chunk."""
    events = iter(reply)
    try:
        first = list(itertools.islice(events, 1))
    except BaseException:
        reply.cancel()
        raise
    # an upstream engine knows the prompt's size only at the end: 0 until then
    chunk = _Chunks(model, fingerprint, (reply.prompt_tokens or 0) if continuous_usage else None)
    return _sse(reply, itertools.chain(first, events), chunk, logprobs, include_usage, request_id, on_end, token_ids)


def _sse(reply, events, chunk, logprobs, include_usage, request_id, on_end, token_ids=False) -> Iterator[str]:
    status, problem = 200, None
    try:
        for index in range(reply.n):  # each choice's first chunk names the role
            yield chunk(protocol.Delta(role="assistant", content=""), index=index,
                        extra={"prompt_token_ids": reply.prompt_token_ids} if token_ids and index == 0 else None)
        pieces_sent = set()  # choices whose tool calls went out piece by piece
        sizes = reply.image_sizes or None  # on the finish chunks and the last chunk
        for event in events:
            index = choice_of(event)
            if isinstance(event, str):
                tokens = getattr(event, "logprobs", ()) if logprobs else None
                chunk.generated += len(getattr(event, "token_ids", ()))
                yield chunk(protocol.Delta(content=str(event)), index=index,
                            logprobs=choice_logprobs(tokens) if tokens is not None else None,
                            choice_extra={"token_ids": list(event.token_ids)} if token_ids else None)
            elif isinstance(event, ToolCallDelta):  # the built-in engine's calls, piece by piece
                pieces_sent.add(index)
                yield chunk(tool_calls=[event.as_openai()], index=index)
            elif isinstance(event, Finished):
                if event.tool_calls and index not in pieces_sent:  # an upstream's calls, whole, in one delta
                    yield chunk(tool_calls=[dict(call, index=i) for i, call in enumerate(event.tool_calls)],
                                index=index)
                yield chunk(finish=event.finish_reason, image_sizes=sizes, index=index)
        if len(reply.finishes) < reply.n:
            raise InternalError("the generation ended without a result")
        if include_usage:
            yield chunk(usage=total_usage(reply.finishes[i] for i in range(reply.n)), choices=False,
                        image_sizes=sizes)
        yield "data: [DONE]\n\n"
    except GeneratorExit:
        status = 499  # the client went away; cancelling below ends the generation
        raise
    except Exception as exc:  # the stream has started: the error is its last event, then [DONE] (as vLLM ends it)
        problem = http_errors.problem(exc, request_id)
        status = problem.status
        yield _event(problem.body())
        yield "data: [DONE]\n\n"
    finally:
        reply.cancel()
        on_end(status, problem, reply.completion_tokens)


class _Chunks:
    """chat.completion.chunk events of one answer: one id, one creation time. With `prompt_tokens` (vLLM's
    continuous_usage_stats) every chunk carries the usage so far: `generated` counts the tokens sent."""

    def __init__(self, model: str, fingerprint: Optional[str] = None, prompt_tokens: Optional[int] = None):
        self.model, self.fingerprint = model, fingerprint
        self.id, self.created = protocol.new_completion_id(), protocol.now()
        self.prompt_tokens, self.generated = prompt_tokens, 0

    def __call__(self, delta: Optional[protocol.Delta] = None, *, finish: Optional[str] = None, usage=None,
                 logprobs: Optional[protocol.ChoiceLogprobs] = None, choices: bool = True, image_sizes=None,
                 tool_calls: Optional[list] = None, extra: Optional[dict] = None,
                 choice_extra: Optional[dict] = None, index: int = 0) -> str:
        choice = protocol.ChunkChoice(index=index, delta=delta or protocol.Delta(), finish_reason=finish,
                                      logprobs=logprobs)
        if usage is None and self.prompt_tokens is not None:
            usage = protocol.usage(self.prompt_tokens, self.generated)
        body = protocol.ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                            choices=[choice] if choices else [], usage=usage,
                                            image_sizes=image_sizes, system_fingerprint=self.fingerprint).model_dump()
        if tool_calls:
            body["choices"][0]["delta"]["tool_calls"] = tool_calls
        if extra:
            body.update(extra)
        if choice_extra and choices:
            body["choices"][0].update(choice_extra)
        return _event(body)


def _event(body: dict) -> str:
    return "data: " + json.dumps(body, ensure_ascii=False) + "\n\n"


def choice_logprobs(tokens) -> protocol.ChoiceLogprobs:
    """serving.jobs.TokenLogprob items -> OpenAI's `logprobs` of a choice."""
    return protocol.ChoiceLogprobs(content=[
        protocol.TokenLogprob(token=t.token, logprob=_finite(t.logprob), bytes=t.bytes,
                              top_logprobs=[protocol.TopLogprob(token=a.token, logprob=_finite(a.logprob),
                                                                bytes=a.bytes) for a in t.top_logprobs])
        for t in tokens])


def _finite(logprob: float) -> float:
    return max(float(logprob), LOWEST_LOGPROB)
