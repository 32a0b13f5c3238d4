"""Side-by-side benchmark: the AI Studio tutorial's server against ours, on one model, in one run.

    python -m bench                 # the full run (model demo-bench), writes docs/bench/
    python -m bench --quick         # small sizes (model demo), about two minutes; what CI runs
    python -m bench --out /tmp/b    # write results.json, results.md and chart.png elsewhere

Both servers are started here as subprocesses on free loopback ports, loading the same
checkpoint through the same loader: the baseline (`bench/baseline_server.py`) and ours
(`python api.py`). Then the same requests, in the tutorial's payload format, go to each in
turn: (a) single requests in sequence, (b) concurrent clients, (c) several questions about one
image, (d) a 12-megapixel JPEG, (e) a long streamed answer (ours only), and the overhead of our
HTTP layer over a direct engine call (in this process). See docs/bench/results.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import report, workloads  # noqa: E402
from bench.process import ServerProcess  # noqa: E402
from bench.workloads import FULL, QUICK, ImageFactory  # noqa: E402


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(plan, out: Path, quick: bool) -> dict:
    started = time.perf_counter()
    load_before = report.load_average()
    from serving import demo

    if demo.is_demo_name(plan.model):
        say(f"demo checkpoint {plan.model}: {demo.demo_path(plan.model)}")  # built once, before two servers race

    say("making test images")
    small = ImageFactory(*plan.image_size, seed=1)
    large = ImageFactory(*plan.large_size, seed=2)
    warm = [small.next() for _ in range(2)]
    seq = {k: [small.next() for _ in range(plan.sequential_n)] for k in ("baseline", "ours")}
    conc = {k: [small.next() for _ in range(plan.concurrent_n)] for k in ("baseline", "ours")}
    same = {k: small.next() for k in ("baseline", "ours", "ours_stream")}
    big = {k: [large.next() for _ in range(plan.large_n)] for k in ("baseline", "ours", "intake")}
    streamed = [small.next() for _ in range(plan.stream_n)]
    over = [small.next() for _ in range(2 * plan.overhead_n + 2)]  # one process, two sides: own images
    over_proc = [small.next() for _ in range(plan.overhead_n + 1)]

    with tempfile.TemporaryDirectory(prefix="qwenvl-bench-") as tmp:
        tmp = Path(tmp)
        servers = {}
        try:
            say("starting both servers")
            servers["baseline"] = ServerProcess("baseline", ["-m", "bench.baseline_server", "--model", plan.model,
                                                      "--host", "127.0.0.1"], tmp, "/", tmp)
            servers["ours"] = ServerProcess("ours", [str(ROOT / "api.py"), "--model", plan.model, "--host", "127.0.0.1"],
                                     ROOT, "/health", tmp)
            for server in servers.values():
                server.wait_ready(900)
            urls = {k: s.url + "/v1/chat/completions" for k, s in servers.items()}
            say(f"ready: baseline {servers['baseline'].url}, ours {servers['ours'].url}")
            for kind, url in urls.items():  # first requests pay one-off costs (kernels, allocator)
                for img in warm:
                    workloads.post(url, workloads.tutorial_payload(img, "Warm up.", max_tokens=4), kind=kind)

            w = {}
            say(f"(a) {plan.sequential_n} single requests in sequence, {plan.max_tokens}-token answers")
            w["sequential"] = {k: workloads.sequential(urls[k], k, seq[k], max_tokens=plan.max_tokens) for k in urls}

            say(f"(b) {plan.concurrent_clients} concurrent clients, {plan.concurrent_n} requests")
            w["concurrent"] = {k: workloads.concurrent(urls[k], k, conc[k], clients=plan.concurrent_clients,
                                                       max_tokens=plan.max_tokens) for k in urls}

            say(f"(c) {plan.repeat_questions} questions about one image")
            w["repeated_image"] = {k: workloads.repeated_image(urls[k], k, same[k], questions=plan.repeat_questions,
                                                               max_tokens=1) for k in urls}
            w["repeated_image"]["ours_stream"] = workloads.repeated_image(
                urls["ours"], "ours", same["ours_stream"], questions=plan.repeat_questions,
                max_tokens=plan.max_tokens, stream=True)

            say(f"(d) {plan.large_size[0]}x{plan.large_size[1]} JPEG, max_tokens=1")
            w["large_jpeg"] = {k: workloads.sequential(urls[k], k, big[k], max_tokens=1) for k in urls}

            say(f"(e) streamed {plan.stream_tokens}-token answers (ours), with an image and text only")
            w["streaming"] = {
                "ours": workloads.streamed(urls["ours"], streamed, workloads.QUESTIONS[0],
                                           max_tokens=plan.stream_tokens),
                "ours_text_only": workloads.streamed(urls["ours"], [None] * plan.stream_n, workloads.STORY,
                                                     max_tokens=plan.stream_tokens),
            }

            say("our server's overhead over a direct engine call (loading the engine in this process)")
            from bench import inprocess

            engine, settings = inprocess.load_engine(plan.model)
            w["overhead"] = inprocess.overhead(engine, settings, None, over, max_tokens=plan.max_tokens)
            say("the same against our server process (adds process-to-process variation)")
            w["overhead_server_process"] = inprocess.overhead(engine, settings, urls["ours"], over_proc,
                                                              max_tokens=plan.max_tokens)
            say("(d) intake stage, in this process")
            w["large_jpeg"]["intake"] = inprocess.intake(engine, settings, big["intake"])
            parameters = engine.loaded.parameter_count
        finally:
            for server in servers.values():
                server.stop()

    notes = [
        "Baseline: the tutorial's api.py rebuilt (bench/baseline_server.py): Flask app.run(threaded=False), "
        "images written as PNG and read back, one request at a time, bare-text answers; it reads max_tokens "
        "and uses greedy decoding for temperature 0 so both servers produce the same number of tokens.",
        "Every request carries an image neither server has seen, except in (c), where one image is asked "
        "about 5 times. Both servers take the same requests, in the tutorial's payload format.",
        "(c) The baseline cannot stream, so time to first token is measured as the whole request with "
        "max_tokens=1 on both servers; the streamed row shows ours measured by streaming (first chunk with "
        f"text) with {plan.max_tokens}-token answers.",
        "(d) The baseline's processor keeps the tutorial's pixel budget (max 1280*28*28), the same as our "
        "MAX_PIXELS, so both feed the vision tower the same number of patches. End to end, that vision-tower "
        "work (identical on both) dominates on a CPU; the intake row times only what differs: request "
        "bytes to model input tensors, each server's own code path, in this process.",
        "(e) Time to first token includes the prompt's prefill: with an image, the vision tower and "
        "~300 prompt tokens; text only, ~30 prompt tokens.",
        "Overhead: requests through our HTTP API (serving.app + waitress, serving the benchmark process's own "
        "engine on a loopback port) against direct calls to that engine (serving.images + Engine.build_prompt "
        "+ Engine.generate), alternating; overhead = (HTTP - direct) / HTTP. results.json also has the same "
        "against the separate server process (overhead_server_process), which adds the variation between two "
        "processes on a shared 2-core machine.",
    ]
    notes.append("Both servers load the model through serving.model.load_model, which applies "
                 "serving/paddle_fixes.py: both decode with the KV cache.")
    machine = report.machine_info()
    results = {
        "schema": 1,
        "quick": quick,
        "plan": dataclasses.asdict(plan) | {"large_size": list(plan.large_size), "image_size": list(plan.image_size)},
        "parameters": parameters,
        "machine": machine,
        "load_before": load_before,
        "load_after": report.load_average(),
        "seconds": round(time.perf_counter() - started, 1),
        "workloads": w,
        "notes": notes,
    }
    results["summary"] = report.summary_rows(w, plan)
    report.write_all(results, out)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (model demo, few requests, 8 tokens)")
    parser.add_argument("--model", default=None, help="model for both servers (default: demo-bench; --quick: demo)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench"), help="folder for results.json, results.md, "
                        "chart.png (default: docs/bench)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.model:
        plan = dataclasses.replace(plan, model=args.model)
    out = Path(args.out)
    say(f"plan: {plan}")
    results = run(plan, out, args.quick)
    print()
    print(report.console_table(results["summary"]))
    print()
    say(f"done in {results['seconds']:.0f} s; wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'chart.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
