"""PaddleFormers' own code against the engine's speedups (serving/engines/builtin/speedups/), in one process.

    python -m bench.speedups                  # demo-bench, about 2 minutes; prints the table
    python -m bench.speedups --quick          # the demo model, a few repetitions (a smoke run)
    python -m bench.speedups --out f.json     # also write the figures as JSON

One model, loaded as the server loads it, with the speedups installed; each measurement alternates
between the library's code (`speedups.library_code`) and ours, so drift on the machine hits both
alike. Measured: the vision tower on one image's patches, a text prompt's prefill, and one decoding
step of a running batch of 1 and of 8 rows (prompts of 37 to 410 tokens), each the median of its
repetitions, with the engine's CPU math threads. No HTTP, no scheduler: the model's own work.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@dataclass
class Plan:
    model: str = "demo-bench"
    image_side: int = 448  # pixels: (side / 14)^2 patches
    prompt_tokens: int = 300
    repeats: int = 7
    steps: int = 8  # decoding steps timed per repetition
    batch_prompts: tuple = (400, 330, 37, 300, 350, 64, 410, 90)


QUICK = Plan(model="demo", repeats=2, steps=2)


def run(plan: Plan) -> dict:
    import numpy as np
    import paddle

    from serving.config import Settings
    from serving.engines.builtin import cpu_math, decode, speedups
    from serving.engines.builtin.engine import available_cores
    from serving.model.loader import load_model

    loaded = load_model(Settings(model=plan.model))
    model = loaded.model
    cpu_math.use_threads(available_cores())  # as the engine's model worker
    speedups.install(model, "cpu")
    rng = np.random.default_rng(0)
    vocab = min(int(model.config.vocab_size), 5000)

    def ids(n):
        return {"input_ids": rng.integers(10, vocab, size=(1, n)).astype("int64")}

    visual = model.model.visual
    side = plan.image_side // 14
    vc = visual.config
    patch = int(getattr(vc, "in_chans", None) or getattr(vc, "in_channels", 3)) * vc.temporal_patch_size * vc.patch_size ** 2
    pixels = paddle.to_tensor(rng.standard_normal((side * side, patch)).astype("float32"))
    grid = paddle.to_tensor(np.array([[1, side, side]], dtype="int64"))
    prompt = ids(plan.prompt_tokens)
    prompts = [ids(n) for n in plan.batch_prompts]

    def prefill(arrays):
        p = decode.Prefill(model, arrays)
        result = None
        while result is None:
            result = p.run(10 ** 6)
        return result

    def batch(rows):
        b = decode.RunningBatch(model)
        for r in range(rows):
            b.add(r, prefill(prompts[r]), 5)
        return b

    def timed(fn) -> float:
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started

    times = {}
    with paddle.no_grad():
        for repeat in range(plan.repeats + 1):  # the first round warms both up and is not counted
            for side_name in ("library", "ours"):
                code = speedups.library_code(model) if side_name == "library" else contextlib.nullcontext()
                with code:
                    got = {
                        "vision tower": timed(lambda: visual(pixels, grid)),
                        "prefill": timed(lambda: prefill(prompt)),
                    }
                    for rows in (1, 8):
                        b = batch(rows)
                        got[f"step {rows}"] = statistics.median(timed(b.step) for _ in range(plan.steps))
                if repeat:
                    for k, v in got.items():
                        times.setdefault(k, {}).setdefault(side_name, []).append(v)
    rows = []
    for name, what in (("vision tower", f"vision tower, one {plan.image_side}x{plan.image_side} image "
                                        f"({side * side} patches)"),
                       ("prefill", f"prefill of a {plan.prompt_tokens}-token text prompt"),
                       ("step 1", "one decoding step, 1 row"),
                       ("step 8", f"one decoding step, 8 rows ({min(plan.batch_prompts)}-{max(plan.batch_prompts)}"
                                  "-token prompts)")):
        library = statistics.median(times[name]["library"]) * 1000
        ours = statistics.median(times[name]["ours"]) * 1000
        rows.append({"what": what, "library_ms": round(library, 1), "ours_ms": round(ours, 1),
                     "speedup": round(library / ours, 2)})
    return {"plan": asdict(plan), "cpu_threads": available_cores(), "rows": rows,
            "paddlepaddle": paddle.__version__}


def report(result: dict) -> str:
    lines = [f"PaddleFormers' code against ours, {result['plan']['model']}, {result['cpu_threads']} CPU math threads, "
             f"medians of {result['plan']['repeats']} alternating repetitions",
             f"  {'':<62} {'library':>9} {'ours':>9} {'speedup':>8}"]
    for r in result["rows"]:
        lines.append(f"  {r['what']:<62} {r['library_ms']:>7.1f}ms {r['ours_ms']:>7.1f}ms {r['speedup']:>7.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.speedups", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the demo model, a few repetitions")
    parser.add_argument("--model", help="default demo-bench (--quick: demo)")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else Plan()
    if args.model:
        plan = Plan(**{**asdict(plan), "model": args.model})
    result = run(plan)
    print(report(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
