"""Structured output in the built-in engine: grammars compiled by llguidance, enforced per row, token by token.

GrammarCompiler, one per engine:
  - llguidance's tokenizer, built once from the checkpoint's tokenizer (its tokenizer.json), as wide as the
    logits, with the model's end-of-turn tokens as its EOS;
  - `compile(spec)`: the grammar of a serving.structured.OutputSpec (a JSON schema, Qwen's tool calls, or
    both) -> CompiledOutput, through an LRU of compiled grammars. Every failure is an InvalidRequest naming
    the request field (the unsupported keyword, the grammar too complex), raised before any model work.
RowConstraint, one per row: its own copy of the compiled matcher, its bitmask and its logit bias.
  `adjust(scores)` is the per-row callback serving.engines.builtin.sampling applies to the row's penalized
  scores (after the penalties, before temperature, top-k and top-p); a greedy row's `adjust_greedy` masks only
  when the grammar rejects the row's argmax (the same token; measured on 151,936 tokens, ~45 us a row against
  ~140 us for the full mask); `accept(token)` advances the matcher.

JSON is written compact (", " and ": ", no other whitespace) unless JSON_WHITESPACE=pretty (at most 8
spaces or newlines between items): llguidance's default unbounded whitespace lets a model emit whitespace
forever (measured on random weights: 0 of 20 answers finished).

Tool calls follow Qwen2.5's format: `<tool_call>` "\\n" {"name": ..., "arguments": {...}} "\\n" `</tool_call>`,
calls separated by "\\n", then the end of the turn. `<tool_call>` and `</tool_call>` are single tokens, named
by id in the grammar. tool_choice "auto" (without a response_format) leaves the row free until it samples
`<tool_call>`; from then on its calls are held to the grammar.
"""

from __future__ import annotations

import collections
import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from serving.errors import InvalidRequest

log = logging.getLogger(__name__)

COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
PRETTY = {"whitespace_flexible": True, "whitespace_pattern": r"[\x20\x0A]{0,8}", "item_separator": ",",
          "key_separator": ":"}
WHITESPACE = {"compact": COMPACT, "pretty": PRETTY}
TOOL_CALL_TOKENS = ("<tool_call>", "</tool_call>")
# a mask allowing fewer than 1/SPARSE_MASK_RATIO of the vocabulary copies the allowed scores into a row of -inf:
# measured on 151,936 tokens (a loaded machine), 40-85 us against np.where's 79-177 us at 0.1% allowed, ~110
# against ~220 at 1%, even at 3%; on 576 tokens both take a few us
SPARSE_MASK_RATIO = 64


@dataclass
class GrammarStats:
    """Numbers for the metrics (plain numbers, read from other threads)."""

    compiles: int = 0  # grammars compiled (cache misses)
    compile_seconds: float = 0.0
    cache_hits: int = 0
    constrained_rows: int = 0  # rows admitted with a grammar or a logit bias
    masks: int = 0  # token masks computed
    mask_seconds: float = 0.0


@dataclass
class CompiledOutput:
    """A request's compiled output form, ready for its row (serving.structured.OutputSpec -> this)."""

    spec: object  # the serving.structured.OutputSpec
    matcher: object = None  # llguidance.LLMatcher at the grammar's start, or None (logit_bias only)
    trigger: Optional[int] = None  # the matcher starts with this token (tool_choice auto), None: at once
    bias: Optional[tuple] = None  # (int64 token ids, float32 amounts)
    tool_call_ids: Optional[tuple] = None  # (<tool_call>, </tool_call>) ids when the answer may call tools

    @property
    def tools(self) -> list:
        """The request's tools as sent (for the prompt), when the answer may call them."""
        return self.spec.prompt_tools


class GrammarCompiler:
    def __init__(self, tokenizer, vocab: int, eos_ids, *, cache_size: int = 64, whitespace: str = "compact"):
        import llguidance

        self._llg = llguidance
        started = time.perf_counter()
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json(tokenizer), n_vocab=vocab, eos_token=list(eos_ids))
        self.vocab = vocab
        ids = [tokenizer.convert_tokens_to_ids(t) for t in TOOL_CALL_TOKENS]
        self.tool_call_ids = tuple(ids) if all(isinstance(i, int) and 0 <= i < vocab for i in ids) else None
        self.options = WHITESPACE[whitespace]
        # bounded work per grammar: a schema past these is "too complex", not a stalled server
        self.limits = llguidance.LLParserLimits(max_grammar_size=200_000, initial_lexer_fuel=2_000_000,
                                                verbose_errors=False)
        self.cache_size = max(1, cache_size)
        self._cache: collections.OrderedDict = collections.OrderedDict()  # grammar text -> pristine LLMatcher
        self._lock = threading.Lock()
        self.stats = GrammarStats()
        log.info("structured output: llguidance %s tokenizer built in %.0f ms (%d tokens)", llguidance.__version__,
                 (time.perf_counter() - started) * 1000, vocab)

    # ------------------------------------------------------------------ compile

    def compile(self, spec) -> CompiledOutput:
        """`spec` (serving.structured.OutputSpec) -> CompiledOutput; InvalidRequest naming the field when it
        cannot be enforced."""
        out = CompiledOutput(spec, bias=self._bias(spec.logit_bias))
        LLMatcher = self._llg.LLMatcher
        if spec.calls:
            if self.tool_call_ids is None:
                raise InvalidRequest("this model's vocabulary has no <tool_call> token, so it cannot call tools",
                                     param="tools", code="unsupported_parameter")
            for tool in spec.tools:  # each on its own first: an error names its tool
                self._matcher(LLMatcher.grammar_from_json_schema(tool.parameters, overrides=self.options), tool.param)
            chosen = [tool for tool in spec.tools if spec.named in (None, tool.name)]
            lark = self._calls_lark(chosen, spec.parallel and spec.named is None)  # named: that one call
            if spec.tool_choice == "auto" and spec.schema is not None:  # JSON text or calls
                lark = f"start: answer | calls\nanswer: %json{_dump(_with_options(spec.schema, self.options))}\n" + lark
            else:
                lark = "start: calls\n" + lark
                out.trigger = self.tool_call_ids[0] if spec.tool_choice == "auto" else None
            out.tool_call_ids = self.tool_call_ids
            param = "tool_choice" if spec.named else "tools"
            out.matcher = self._matcher(LLMatcher.grammar_from_lark(lark), param).deep_copy()
        elif spec.schema is not None:
            grammar = LLMatcher.grammar_from_json_schema(spec.schema, overrides=self.options)
            out.matcher = self._matcher(grammar, spec.schema_param).deep_copy()
        elif spec.grammar is not None:
            out.matcher = self._matcher(self._peer_grammar(*spec.grammar, spec.grammar_param),
                                        spec.grammar_param, what="grammar").deep_copy()
        return out

    def _peer_grammar(self, kind: str, value, param: str) -> str:
        """The peers' regex, choice and grammar forms as llguidance grammars (a grammar: Lark, or llama.cpp's
        GBNF translated by llguidance's own converter)."""
        LLMatcher = self._llg.LLMatcher
        if kind == "regex":
            return LLMatcher.grammar_from_regex(value)
        if kind == "choice":
            return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in value))
        from llguidance.gbnf_to_lark import any_to_lark

        try:  # both read the client's text alone; the converter raises a bare Exception for some faults
            return LLMatcher.grammar_from_lark(any_to_lark(value))  # ("Rule 'x' not found": it was a 500)
        except Exception as exc:
            raise InvalidRequest(f"{param} is not a Lark or GBNF grammar this server can read: "
                                 f"{str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}",
                                 param=param, code="invalid_grammar") from None

    def _calls_lark(self, tools, parallel: bool) -> str:
        opening, closing = self.tool_call_ids
        rules = [f"tool_{k}: %json{_dump(call_schema(tool, self.options))}" for k, tool in enumerate(tools)]
        either = " | ".join(f"tool_{k}" for k in range(len(tools)))
        calls = 'calls: call ("\\n" call)*' if parallel else "calls: call"
        return "\n".join([calls, f'call: <[{opening}]> "\\n" ({either}) "\\n" <[{closing}]>', *rules]) + "\n"

    def _matcher(self, grammar: str, param: str, what: str = "a JSON schema"):
        """The pristine matcher of `grammar` (compiled, or from the cache); InvalidRequest naming `param`."""
        with self._lock:
            found = self._cache.get(grammar)
            if found is not None:
                self._cache.move_to_end(grammar)
                self.stats.cache_hits += 1
                return found
        started = time.perf_counter()
        matcher = self._llg.LLMatcher(self.tokenizer, grammar, log_level=0, limits=self.limits)
        seconds = time.perf_counter() - started
        if matcher.is_error():
            raise _schema_error(matcher.get_error(), param, what)
        with self._lock:
            self.stats.compiles += 1
            self.stats.compile_seconds += seconds
            self._cache[grammar] = matcher
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return matcher

    def _bias(self, logit_bias: dict) -> Optional[tuple]:
        if not logit_bias:
            return None
        bad = [t for t in logit_bias if not 0 <= t < self.vocab]  # any id the model can write, as vLLM
        if bad:
            raise InvalidRequest(f"logit_bias: token id {bad[0]} is not in the model's vocabulary of {self.vocab} "
                                 f"ids (0..{self.vocab - 1})", param="logit_bias")
        ids = np.fromiter(logit_bias.keys(), dtype=np.int64, count=len(logit_bias))
        return ids, np.fromiter(logit_bias.values(), dtype=np.float32, count=len(logit_bias))

    # ------------------------------------------------------------------ rows

    def row(self, compiled: Optional[CompiledOutput]) -> Optional["RowConstraint"]:
        """A new row's constraint (None for a request without one)."""
        if compiled is None or (compiled.matcher is None and compiled.bias is None):
            return None
        self.stats.constrained_rows += 1
        return RowConstraint(compiled, self.vocab, self.stats)


class RowConstraint:
    """One row's grammar state and logit bias; used by the model thread only."""

    # Tests set this to check the greedy shortcut against the full mask (they must pick the same tokens).
    always_full_mask = False

    def __init__(self, compiled: CompiledOutput, vocab: int, stats: GrammarStats):
        self.matcher = compiled.matcher.deep_copy() if compiled.matcher is not None else None
        self.trigger = compiled.trigger
        self.active = self.matcher is not None and compiled.trigger is None
        self.bias = compiled.bias
        self.bits = np.zeros((vocab + 31) // 32, dtype=np.int32)
        self._bytes = self.bits.view(np.uint8)
        self.stats = stats

    @property
    def shapes(self) -> bool:
        """The next token's scores are changed (a bias, or a grammar in force)."""
        return self.bias is not None or self.active

    def _add_bias(self, scores: np.ndarray) -> None:
        if self.bias is not None:
            ids, amounts = self.bias
            scores[ids] += amounts

    def adjust(self, scores: np.ndarray) -> np.ndarray:
        """float32 [V] scores of this row -> the same with the bias added and the tokens the grammar forbids at
        -inf (in place when it can: the caller hands over a row it owns)."""
        self._add_bias(scores)
        if self.active:
            started = time.perf_counter()
            self._compute_mask()
            scores = self._masked(scores)
            self.stats.masks += 1
            self.stats.mask_seconds += time.perf_counter() - started
        return scores

    def adjust_greedy(self, scores: np.ndarray) -> np.ndarray:
        """adjust for a greedy row, whose token is the argmax of what this returns: when the grammar allows the
        row's own argmax, that argmax is also the first maximum of the masked row (every earlier index scores
        less), so the scores go back unmasked; only a rejected argmax costs the full mask."""
        self._add_bias(scores)
        if self.active:
            started = time.perf_counter()
            self._compute_mask()
            best = int(np.argmax(scores))
            if self.always_full_mask or not (self._bytes[best >> 3] >> (best & 7)) & 1:
                scores = self._masked(scores)
            self.stats.masks += 1
            self.stats.mask_seconds += time.perf_counter() - started
        return scores

    def _compute_mask(self) -> None:
        # On the model thread, not ahead in a thread beside the forward pass: llguidance drops the GIL here, but a
        # mask takes ~12 us a row (measured, 151,936 tokens), well under 1% of a decoding step, and the forward
        # already keeps both of a small machine's cores busy.
        self.matcher.unsafe_compute_mask_ptr(self.bits.ctypes.data, self.bits.nbytes)

    def _masked(self, scores: np.ndarray) -> np.ndarray:
        """scores where the bitmask allows the token, -inf elsewhere (a new array)."""
        vocab = scores.shape[0]
        allowed = np.unpackbits(self._bytes, bitorder="little", count=vocab).view(bool)
        if np.count_nonzero(allowed) * SPARSE_MASK_RATIO < vocab:  # a few allowed (JSON syntax): copy those
            out = np.full(vocab, -np.inf, dtype=np.float32)
            kept = np.flatnonzero(allowed)
            out[kept] = scores[kept]
            return out
        return np.where(allowed, scores, np.float32(-np.inf)).astype(np.float32, copy=False)

    def accept(self, token: int) -> Optional[str]:
        """Advance past a sampled token; an error message when the grammar cannot take it (the row must end)."""
        if self.matcher is None:
            return None
        if not self.active:
            if token != self.trigger:
                return None
            self.active = True
        if self.matcher.consume_token(int(token)):
            return None
        return (self.matcher.get_error() or "the token does not fit the grammar").splitlines()[0][:300]


def call_schema(tool, options: dict) -> dict:
    """The JSON schema of one Qwen tool call of `tool` (serving.structured.ToolSpec): {"name": its name,
    "arguments": its parameters}, name first. The parameters' $defs / definitions move to the root, where
    their "#/$defs/..." references point."""
    parameters = dict(tool.parameters)
    hoisted = {key: parameters.pop(key) for key in ("$defs", "definitions") if key in parameters}
    return {"type": "object", "properties": {"name": {"const": tool.name}, "arguments": parameters},
            "required": ["name", "arguments"], "additionalProperties": False, **hoisted, "x-guidance": options}


def tokenizer_json(tokenizer) -> str:
    """The tokenizer's tokenizer.json (as the Rust tokenizer holds it, added tokens included), as llguidance
    builds its own from it."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        raise ValueError("structured output needs a fast (Rust) tokenizer with a tokenizer.json")
    import copy

    backend = copy.copy(backend)
    backend.no_padding()
    backend.no_truncation()
    return backend.to_str()


def _with_options(schema: dict, options: dict) -> dict:
    return {**schema, "x-guidance": options}


def _dump(schema: dict) -> str:
    return json.dumps(schema, ensure_ascii=False, separators=(",", ":"))


_UNIMPLEMENTED = re.compile(r"Unimplemented keys: \[(.*?)\]")


def _schema_error(message: str, param: str, what: str = "a JSON schema") -> InvalidRequest:
    """llguidance's error -> a 400 naming the field and, for a keyword it cannot enforce, the keyword."""
    text = " ".join(line.strip() for line in (message or "").splitlines() if line.strip())
    found = _UNIMPLEMENTED.search(text)
    if found:
        keys = found.group(1).replace('"', "'")
        return InvalidRequest(f"{param} uses JSON Schema keyword(s) {keys}, which this server cannot enforce",
                              param=param, code="unsupported_schema")
    if re.search(r"too (complex|large|big)|fuel|limit", text, re.IGNORECASE):
        return InvalidRequest(f"{param} makes a grammar too complex to enforce: {text[:300]}", param=param,
                              code="grammar_too_complex")
    return InvalidRequest(f"{param} is not {what} this server can enforce: {text[:300]}", param=param,
                          code="invalid_schema" if what == "a JSON schema" else "invalid_grammar")
