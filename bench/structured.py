"""(j) Structured output's cost in the built-in engine, in this process (the engine loaded as the server loads it):

- decoding tokens/s of `rows` rows held to a JSON schema against `rows` free rows, the two batches alternating
  in one run (issue 17's target: constrained within 10%). Tokens/s counts the tokens of decoding steps only
  (each row's first token comes from its prefill) over the steps' time, which includes sampling and the
  grammar's masks. The schema is an array of exactly `max_tokens` digits, so every constrained row decodes to
  max_tokens as the free rows do. Sampling rows (temperature 1) apply the full mask at every step; greedy rows
  (temperature 0, one prompt each) mask only when the grammar rejects their argmax, measured the same way,
  with a logit_bias of -100 on the end tokens for both kinds (a free greedy row may end early: fewer rows
  per step would make its rate lower);
- the time to first token a never-seen schema adds (its compile, before the request is queued) against the
  same request whose schema is cached (target: < 50 ms), and the compile alone.

    python -m bench.structured                  # demo-bench
    python -m bench.structured --quick          # the demo model, a few rows: a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGET_SLOWDOWN_PERCENT = 10
TARGET_COMPILE_TTFT_MS = 50


@dataclass(frozen=True)
class Plan:
    model: str = "demo-bench"
    rows: int = 8
    max_tokens: int = 64
    repeats: int = 3
    ttft_repeats: int = 5


QUICK = Plan(model="demo", rows=4, max_tokens=16, repeats=1, ttft_repeats=2)


def _schema(tag: str, length: int) -> dict:
    """An array of exactly `length` digits (bounded: every row runs to max_tokens); `tag` makes it a new schema."""
    return {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": length,
            "maxItems": length, "description": tag}


def _request(schema=None, *, max_tokens: int, seed: int, stream: bool = False, greedy: bool = False, ends=()):
    from serving import protocol

    body = {"messages": [{"role": "user", "content": "List some digits."}], "max_tokens": max_tokens,
            "temperature": 1.0, "top_p": 1.0, "top_k": -1, "seed": seed, "stream": stream}
    if greedy:  # one prompt per row: greedy rows of one prompt would all be the same answer
        body.update(temperature=0, messages=[{"role": "user", "content": f"List some digits ({seed})."}],
                    logit_bias={str(token): -100 for token in ends})
    if schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "digits", "schema": schema}}
    return protocol.parse_request(body)


def _batch(service, engine, requests) -> dict:
    """Start every request at once (they decode side by side), read them all; tokens/s of the decoding steps."""
    before = engine.stats()
    replies = [service.start_request(req) for req in requests]
    tokens = sum(reply.collect().finished.completion_tokens for reply in replies)
    after = engine.stats()
    seconds = after["step_seconds"] - before["step_seconds"]
    decoded = tokens - len(requests)  # each first token comes from a prefill, not a decoding step
    return {"tokens": tokens, "steps": after["steps"] - before["steps"], "step_seconds": round(seconds, 4),
            "decode_tokens_per_s": round(decoded / seconds, 1) if seconds > 0 else None,
            "mask_seconds": round(after.get("grammar_mask_seconds", 0) - before.get("grammar_mask_seconds", 0), 4)}


def _ttft(service, req) -> float:
    started = time.perf_counter()
    reply = service.start_request(req, started=started)
    first = None
    for event in reply:
        if first is None and isinstance(event, str) and event:
            first = time.perf_counter() - started
    return first


def run(plan: Plan = Plan()) -> dict:
    from bench.inprocess import load_engine
    from serving import structured
    from serving.chat import ChatService

    engine, settings = load_engine(plan.model)
    service = ChatService(engine, settings)
    try:
        schema = _schema("bench", plan.max_tokens // 2)  # two tokens per digit (the digit, then ", ")
        _batch(service, engine, [_request(schema, max_tokens=8, seed=0), _request(max_tokens=8, seed=0)])  # warm up
        free, held, greedy_free, greedy_held = [], [], [], []
        for k in range(plan.repeats):
            seeds = range(k * plan.rows, (k + 1) * plan.rows)
            free.append(_batch(service, engine, [_request(max_tokens=plan.max_tokens, seed=s) for s in seeds]))
            held.append(_batch(service, engine, [_request(schema, max_tokens=plan.max_tokens, seed=s) for s in seeds]))
            greedy_free.append(_batch(service, engine, [_request(max_tokens=plan.max_tokens, seed=s, greedy=True,
                                                                 ends=engine.eos_token_ids) for s in seeds]))
            greedy_held.append(_batch(service, engine, [_request(schema, max_tokens=plan.max_tokens, seed=s,
                                                                 greedy=True, ends=engine.eos_token_ids)
                                                        for s in seeds]))
        free_rate, held_rate = _median_rate(free), _median_rate(held)
        slowdown = round(100 * (1 - held_rate / free_rate), 1)
        greedy_free_rate, greedy_held_rate = _median_rate(greedy_free), _median_rate(greedy_held)
        greedy_slowdown = round(100 * (1 - greedy_held_rate / greedy_free_rate), 1)

        cached = _schema("cached", 4)
        _ttft(service, _request(cached, max_tokens=4, seed=1, stream=True))
        warm, cold, compile_ms = [], [], []
        for k in range(plan.ttft_repeats):
            warm.append(_ttft(service, _request(cached, max_tokens=4, seed=k, stream=True)))
            cold.append(_ttft(service, _request(_schema(f"new {time.time()} {k}", 4), max_tokens=4, seed=k, stream=True)))
            spec = structured.output_spec(_request(_schema(f"compile {time.time()} {k}", plan.max_tokens // 2),
                                                   max_tokens=plan.max_tokens, seed=k),
                                          max_tools=settings.max_tools, max_schema_bytes=settings.max_schema_bytes)
            started = time.perf_counter()
            engine.compile_output(spec)
            compile_ms.append((time.perf_counter() - started) * 1000)
        added = round((statistics.median(cold) - statistics.median(warm)) * 1000, 2)
        return {
            "plan": plan.__dict__,
            "vocabulary": engine.grammar.vocab,
            "free": free, "constrained": held,
            "free_decode_tokens_per_s": free_rate, "constrained_decode_tokens_per_s": held_rate,
            "slowdown_percent": slowdown, "target_slowdown_percent": TARGET_SLOWDOWN_PERCENT,
            "greedy_free": greedy_free, "greedy_constrained": greedy_held,
            "greedy_free_decode_tokens_per_s": greedy_free_rate,
            "greedy_constrained_decode_tokens_per_s": greedy_held_rate, "greedy_slowdown_percent": greedy_slowdown,
            "mask_percent_of_steps": _mask_percent(held), "greedy_mask_percent_of_steps": _mask_percent(greedy_held),
            "cached_schema_ttft_ms": round(statistics.median(warm) * 1000, 2),
            "new_schema_ttft_ms": round(statistics.median(cold) * 1000, 2),
            "first_compile_added_ttft_ms": added, "compile_ms": round(statistics.median(compile_ms), 2),
            "target_compile_ttft_ms": TARGET_COMPILE_TTFT_MS,
        }
    finally:
        engine.close()


def _median_rate(batches) -> float:
    return statistics.median(b["decode_tokens_per_s"] for b in batches)


def _mask_percent(batches) -> float:
    """The grammar's share of the constrained steps' time (its masks, the bias and the argmax test): less
    sensitive to the machine's load than two rates measured apart."""
    return round(100 * sum(b["mask_seconds"] for b in batches) / sum(b["step_seconds"] for b in batches), 2)


def report(result: dict) -> str:
    r = result
    return "\n".join([
        f"{r['plan']['rows']} rows, {r['plan']['max_tokens']}-token answers, model {r['plan']['model']} "
        f"(vocabulary {r['vocabulary']}):",
        f"  free rows:        {r['free_decode_tokens_per_s']} decoding tokens/s",
        f"  JSON-schema rows: {r['constrained_decode_tokens_per_s']} decoding tokens/s "
        f"({r['slowdown_percent']:+g}% slower; target <= {r['target_slowdown_percent']}%)",
        f"  greedy: free rows {r['greedy_free_decode_tokens_per_s']}, JSON-schema rows "
        f"{r['greedy_constrained_decode_tokens_per_s']} decoding tokens/s ({r['greedy_slowdown_percent']:+g}% slower)",
        f"  the grammar's masks took {r['mask_percent_of_steps']}% of the JSON-schema rows' step time "
        f"(greedy: {r['greedy_mask_percent_of_steps']}%)",
        f"  time to first token, cached schema {r['cached_schema_ttft_ms']} ms, new schema {r['new_schema_ttft_ms']} ms: "
        f"a first compile adds {r['first_compile_added_ttft_ms']} ms (target < {r['target_compile_ttft_ms']} ms); "
        f"compile alone {r['compile_ms']} ms",
    ])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.structured", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the demo model, a few rows (a smoke run)")
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else Plan()
    if args.model:
        plan = Plan(**{**plan.__dict__, "model": args.model})
    result = run(plan)
    print(report(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
