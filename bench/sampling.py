"""The engine's sampling and logprobs at the real vocabulary, the code before (bench/sampling_reference.py)
against today's (serving/engines/builtin/sampling.py), in one process.

    python -m bench.sampling                  # prints the table (about 3 minutes, most of it the old logprobs)
    python -m bench.sampling --quick          # fewer repetitions, the old logprobs left out
    python -m bench.sampling --out f.json     # also write the figures as JSON

`next_tokens` on [B, 151936] float32 logits drawn from N(0, 3) (Qwen2.5-VL's vocabulary), B = 1 and 8,
each row with a 300-token prompt and a few answer tokens seen (what the repetition penalty covers), for
the settings that matter: greedy, the published checkpoint's defaults (do_sample, temperature 1e-06,
repetition_penalty 1.05, top_k 50 filled in by PaddleFormers, top_p 1.0), top_p 0.8 at temperature 0.7,
top_k 1 with top_p 0.001 at temperature 0.1 and repetition_penalty 1.05, and greedy with logprobs and
5 top_logprobs. Old and new alternate; each figure is the median of the repetitions (the old logprobs,
~30 s a call, are timed once). The share is of a decoding step of the 3B model on this CPU (~1.3 s at
batch 1 in float32, --step-ms), used for 8 rows too (a step of 8 rows takes at least as long). Token
names come from a stand-in tokenizer (one piece per id): the maths is what is measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VOCAB = 151_936
PUBLISHED_DEFAULTS = {"do_sample": True, "temperature": 1e-06, "repetition_penalty": 1.05, "top_k": 50, "top_p": 1.0}
SETTINGS = (  # name, request fields, the checkpoint defaults
    ("greedy", {"temperature": 0}, {}),
    ("checkpoint defaults (T 1e-06, top_k 50, rep 1.05)", {}, PUBLISHED_DEFAULTS),
    ("top_p 0.8, T 0.7", {"temperature": 0.7, "top_p": 0.8}, {}),
    ("top_k 1, top_p 0.001, T 0.1, rep 1.05", {"temperature": 0.1, "top_k": 1, "top_p": 0.001,
                                               "repetition_penalty": 1.05}, {}),
    ("greedy + logprobs (top_logprobs 5)", {"temperature": 0, "logprobs": True, "top_logprobs": 5}, {}),
)


class PieceTokenizer:
    """Names every id with one byte-level piece; what TokenNames needs of a tokenizer."""
    added_tokens_decoder: dict = {}

    def convert_ids_to_tokens(self, token_id):
        return "\u0120t" if token_id % 2 else "a"


def run(repeats: int, old_logprobs: bool, step_ms: float) -> dict:
    import numpy as np
    import paddle

    from bench import sampling_reference
    from serving.engines.builtin import sampling
    from serving.jobs import SamplingParams

    rng = np.random.default_rng(0)
    tokenizer = PieceTokenizer()
    rows = []
    for batch in (1, 8):
        logits = paddle.to_tensor((rng.standard_normal((batch, VOCAB)) * 3.0).astype(np.float32))
        for name, fields, defaults in SETTINGS:
            samplers = []
            for row in range(batch):
                sampler = sampling.RowSampler(SamplingParams(max_tokens=16, seed=row, **fields), defaults,
                                              rng.integers(0, VOCAB, 300).tolist())
                for token in rng.integers(0, VOCAB, 5):
                    sampler.accept(int(token))
                samplers.append(sampler)
            asks_logprobs = bool(fields.get("logprobs"))
            sides = {"new": sampling.next_tokens}
            if old_logprobs or not asks_logprobs:
                sides["old"] = sampling_reference.next_tokens
            times = {side: [] for side in sides}
            cpu = []  # the new side's CPU time (all the process's threads): what it costs when not preempted
            for repeat in range(repeats + 1):  # the first round warms up and is not counted
                for side, fn in sides.items():
                    if side == "old" and asks_logprobs and repeat == 0:
                        continue  # seconds per call: measured once
                    if side == "old" and asks_logprobs and repeat > 1:
                        continue
                    started, started_cpu = time.perf_counter(), time.process_time()
                    fn(logits, samplers, tokenizer)
                    if repeat:
                        times[side].append((time.perf_counter() - started) * 1000)
                        if side == "new":
                            cpu.append((time.process_time() - started_cpu) * 1000)
            new = statistics.median(times["new"])
            old = statistics.median(times["old"]) if times.get("old") else None
            rows.append({"setting": name, "rows": batch, "old_ms": None if old is None else round(old, 2),
                         "new_ms": round(new, 2), "new_best_ms": round(min(times["new"]), 2),
                         "new_cpu_ms": round(statistics.median(cpu), 2),
                         "speedup": None if old is None else round(old / new, 1),
                         "share_of_step": round(new / step_ms, 4)})
            print(f"  {batch} x {name}: old {'-' if old is None else f'{old:.2f}'} ms, new {new:.2f} ms", flush=True)
    return {"vocab": VOCAB, "repeats": repeats, "step_ms": step_ms, "rows": rows, "paddlepaddle": paddle.__version__}


def report(result: dict) -> str:
    lines = [f"next_tokens on [B, {result['vocab']}] float32 logits ~ N(0, 3), medians of {result['repeats']} "
             "alternating repetitions of wall time; best: the fastest new one; CPU: the new one's process CPU time",
             f"(a machine under load preempts wall time); share: of a {result['step_ms']:.0f} ms decoding step "
             "(the 3B model on this CPU)",
             f"  {'setting':<52} {'rows':>4} {'old':>11} {'new':>9} {'(best)':>9} {'(CPU)':>9} {'speedup':>8} "
             f"{'of step':>8}"]
    for r in result["rows"]:
        old = "-" if r["old_ms"] is None else f"{r['old_ms']:.1f}ms"
        speedup = "-" if r["speedup"] is None else f"{r['speedup']:.0f}x"
        lines.append(f"  {r['setting']:<52} {r['rows']:>4} {old:>11} {r['new_ms']:>7.2f}ms {r['new_best_ms']:>7.2f}ms "
                     f"{r['new_cpu_ms']:>7.2f}ms {speedup:>8} {100 * r['share_of_step']:>7.2f}%")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sampling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 repetitions, without the old logprobs")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--step-ms", type=float, default=1300.0,
                        help="the decoding step the shares are of (default: the 3B model, batch 1, this CPU)")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    from serving.engines.builtin import cpu_math
    from serving.engines.builtin.engine import available_cores

    cpu_math.use_threads(available_cores())  # as the engine's model worker
    result = run(3 if args.quick else args.repeats, old_logprobs=not args.quick, step_ms=args.step_ms)
    print(report(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
