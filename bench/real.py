"""At real size: our server on a checkpoint with the published Qwen2.5-VL-3B-Instruct shape.

    python -m bench.real                       # demo-3b (random weights, the exact 3B shape; built once, ~7.5 GB)
    python -m bench.real --model /path/to/Qwen2.5-VL-3B-Instruct   # any local checkpoint folder
    python -m bench.real --out docs/bench/real.json

Not part of `python -m bench` or `--quick`: loading the 3B model on a 2-core CPU takes minutes
and it needs ~15 GiB of memory in float32. Measured, in one run:

- load: seconds from starting `python api.py --model ...` to /health 200 (model streamed in and a
  warm-up answer made), and the server's peak and settled resident memory, against the
  estimate the memory check makes before loading (serving.model.gpu.host_bytes_to_load);
- time to the first token of a 30-token text question and of a question about a 448x448 and a
  1000x1000 image (a request with max_tokens 1; its prompt tokens from usage);
- decoding tokens/s at 1 and 4 clients (streamed, tokens after each stream's first over the time
  since then), and the batch-1 bound of this machine: language-model weight bytes read per token
  over the memory bandwidth measured here (numpy reading 1 GiB with as many threads as cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.process import ServerProcess  # noqa: E402
from bench.workloads import ImageFactory, post  # noqa: E402

TEXT_QUESTION = ("Explain in two short sentences why the sky looks blue on a clear day, "
                 "and why sunsets are often red or orange.")


def say(message: str) -> None:
    print(f"[bench.real {time.strftime('%H:%M:%S')}] {message}", flush=True)


def memory_bandwidth(threads: int, gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second this machine reads from memory: the best of `repeats` sums of a `gib` GiB
    float32 array split over `threads` threads (numpy releases the GIL while it sums)."""
    import numpy as np

    data = np.ones(int(gib * 2 ** 30) // 4, dtype=np.float32)
    parts = np.array_split(data, threads)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        workers = [threading.Thread(target=np.sum, args=(p,)) for p in parts]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - started)
    return data.nbytes / best


def language_model_bytes_per_token(config: dict, dtype_bytes: int) -> int:
    """Weight bytes one decoding step reads: every decoder layer, the final norm and the lm_head
    (the embedding matrix itself when tied); the embedding lookup reads one row, not counted."""
    from serving.model.gpu import _text

    t = _text(config)
    h, inter, layers, vocab = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"], t["vocab_size"]
    heads = t["num_attention_heads"]
    kv = t.get("num_key_value_heads", heads) * (h // heads)
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * inter + 2 * h
    return (layers * layer + h + vocab * h) * dtype_bytes


def process_memory(pid: int) -> dict:
    """Peak (VmHWM) and current (VmRSS) resident memory of a process, in GiB."""
    out = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[{"VmHWM": "peak_gib", "VmRSS": "rss_gib"}[key]] = round(int(value.split()[0]) / 2 ** 20, 2)
    return out


def chat(url: str, content, *, max_tokens: int, stream: bool = False, system: str = "") -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    payload = {"model": "m", "messages": messages, "temperature": 0, "max_tokens": max_tokens, "stream": stream}
    if stream:
        payload["stream_options"] = {"include_usage": True}
    if not stream:
        import requests

        started = time.perf_counter()
        r = requests.post(url, json=payload, timeout=3600)
        seconds = time.perf_counter() - started
        r.raise_for_status()
        return {"seconds": round(seconds, 2), "prompt_tokens": r.json()["usage"]["prompt_tokens"]}
    timing = post(url, payload, kind="ours", timeout=3600)
    return {"seconds": round(timing.latency, 2), "ttft": timing.ttft, "tokens": timing.completion_tokens}


def first_token(url: str, images, question: str, repeats: int) -> dict:
    """Median seconds of a max_tokens 1 request (its prefill and first token), with its prompt tokens;
    `images` (an ImageFactory or None) gives each repetition a picture of its own (no cache hit)."""
    def content():
        image = [{"type": "image_url", "image_url": {"url": images.next()}}] if images else []
        return image + [{"type": "text", "text": question}]

    # a system message of its own per run: the prefix cache reuses nothing but the template's first tokens
    runs = [chat(url, content(), max_tokens=1, system=f"You are assistant number {i}.") for i in range(repeats)]
    return {"seconds": round(statistics.median(r["seconds"] for r in runs), 2),
            "runs_s": [r["seconds"] for r in runs], "prompt_tokens": runs[0]["prompt_tokens"]}


def decoding(url: str, clients: int, max_tokens: int) -> dict:
    """Tokens per second after each stream's first token, all clients together."""
    content = [{"type": "text", "text": TEXT_QUESTION}]
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        runs = list(pool.map(lambda _: chat(url, content, max_tokens=max_tokens, stream=True), range(clients)))
    wall = time.perf_counter() - started
    last_first = max(r["ttft"] for r in runs)  # from then on every client is decoding
    after_first = sum(r["tokens"] - 1 for r in runs)
    return {"clients": clients, "tokens": [r["tokens"] for r in runs], "wall_s": round(wall, 2),
            "tokens_per_s": round(after_first / max(wall - last_first, 1e-9), 3),
            "per_client_tokens_per_s": round(statistics.median(
                (r["tokens"] - 1) / max(r["seconds"] - r["ttft"], 1e-9) for r in runs), 3)}


def run(model: str, out_dir: Path, repeats: int, max_tokens: int) -> dict:
    from serving.model import demo, gpu

    build_s = None
    if demo.is_demo_name(model):
        say(f"building or finding {model}")
        started = time.perf_counter()
        folder = demo.demo_path(model)
        build_s = round(time.perf_counter() - started, 1)
        say(f"{model}: {folder} ({build_s} s)")
    else:
        folder = Path(model)
    config = gpu.read_config(folder)
    estimate = gpu.host_bytes_to_load(config, "float32")
    cores = len(os.sched_getaffinity(0))
    say(f"memory bandwidth with {cores} threads")
    bandwidth = memory_bandwidth(cores)
    weight_bytes = language_model_bytes_per_token(config, 4)
    bound = bandwidth / weight_bytes

    say("starting the server (float32 on the CPU)")
    started = time.perf_counter()
    # a 1000x1000 image's prefill takes minutes on 2 cores: no request deadline gets in the way
    server = ServerProcess("ours", ["api.py", "--model", str(folder), "--device", "cpu", "--request-timeout", "7200"],
                           ROOT, "/health", out_dir)
    try:
        server.wait_ready(timeout=3600)
        load_s = round(time.perf_counter() - started, 1)
        memory = process_memory(server.process.pid)
        say(f"ready in {load_s} s, {memory}")
        url = server.url + "/v1/chat/completions"
        ttft = {
            "text": first_token(url, None, TEXT_QUESTION, repeats),
            "image_448": first_token(url, ImageFactory(448, 448, 1), "Describe this picture.", repeats),
            "image_1000": first_token(url, ImageFactory(1000, 1000, 2), "Describe this picture.", 1),
        }
        say(f"time to first token: {ttft}")
        decode = {n: decoding(url, n, max_tokens) for n in (1, 4)}
        say(f"decoding: {decode}")
        memory_after = process_memory(server.process.pid)
    finally:
        server.stop()
    one = decode[1]["tokens_per_s"]
    return {
        "model": model, "folder": str(folder), "build_s": build_s, "parameters": gpu.parameter_count(config),
        "dtype": "float32", "cpu_cores": cores,
        "load_s": load_s, "memory_gib": memory, "memory_after_gib": memory_after,
        "estimate_gib": round(estimate / 2 ** 30, 2),
        "peak_over_loaded": round(memory["peak_gib"] / memory["rss_gib"], 2),
        "ttft": ttft, "decoding": {str(k): v for k, v in decode.items()},
        "bandwidth_gb_s": round(bandwidth / 1e9, 2), "weight_bytes_per_token": weight_bytes,
        "bound_tokens_per_s": round(bound, 3), "fraction_of_bound": round(one / bound, 3),
    }


def report(r: dict) -> str:
    t = r["ttft"]
    lines = [
        f"At real size: {r['model']} ({r['parameters'] / 1e9:.2f}B parameters, {r['dtype']}, {r['cpu_cores']} CPU cores)",
        f"  load to /health ok            {r['load_s']:>8.1f} s" + (f" (built in {r['build_s']} s)" if r['build_s'] else ""),
        f"  peak / loaded resident memory {r['memory_gib']['peak_gib']:>8.2f} / {r['memory_gib']['rss_gib']:.2f} GiB "
        f"({r['peak_over_loaded']}x; estimate before loading {r['estimate_gib']} GiB)",
        f"  first token, text question    {t['text']['seconds']:>8.2f} s ({t['text']['prompt_tokens']} prompt tokens)",
        f"  first token, 448x448 image    {t['image_448']['seconds']:>8.2f} s ({t['image_448']['prompt_tokens']} prompt tokens)",
        f"  first token, 1000x1000 image  {t['image_1000']['seconds']:>8.2f} s ({t['image_1000']['prompt_tokens']} prompt tokens)",
    ]
    for n, d in r["decoding"].items():
        lines.append(f"  decoding, {n} client(s)          {d['tokens_per_s']:>8.3f} tokens/s")
    lines.append(f"  batch-1 bound: {r['weight_bytes_per_token'] / 1e9:.2f} GB of weights per token at "
                 f"{r['bandwidth_gb_s']} GB/s = {r['bound_tokens_per_s']:.3f} tokens/s; "
                 f"1 client reaches {r['fraction_of_bound'] * 100:.0f}% of it")
    return "\n".join(lines)


def markdown(r: dict) -> str:
    """The "At real size" table (docs/benchmark.md), from one run's figures."""
    t, d = r["ttft"], r["decoding"]
    rows = [
        ("load: `python api.py` to `/health` ok (weights streamed in, a warm-up answer made)", f"{r['load_s']:.0f} s"),
        ("peak / loaded resident memory (estimate before loading)",
         f"{r['memory_gib']['peak_gib']:.2f} / {r['memory_gib']['rss_gib']:.2f} GiB, {r['peak_over_loaded']}x "
         f"({r['estimate_gib']:.2f} GiB)"),
        (f"first token, text question ({t['text']['prompt_tokens']} prompt tokens)", f"{t['text']['seconds']:.2f} s"),
        (f"first token, 448x448 image ({t['image_448']['prompt_tokens']} prompt tokens)",
         f"{t['image_448']['seconds']:.1f} s"),
        (f"first token, 1000x1000 image ({t['image_1000']['prompt_tokens']} prompt tokens)",
         f"{t['image_1000']['seconds']:.0f} s"),
        ("decoding, 1 client", f"{d['1']['tokens_per_s']:.2f} tokens/s"),
        ("decoding, 4 clients (all together)", f"{d['4']['tokens_per_s']:.2f} tokens/s"),
        (f"batch-1 bound: {r['weight_bytes_per_token'] / 1e9:.2f} GB of float32 weights per token at "
         f"{r['bandwidth_gb_s']:.1f} GB/s measured", f"{r['bound_tokens_per_s']:.2f} tokens/s"),
        ("1 client against that bound", f"{r['fraction_of_bound'] * 100:.0f}%"),
    ]
    return "\n".join(["| measured | figure |", "| --- | ---: |"] + [f"| {a} | {b} |" for a, b in rows])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.real", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo-3b", help="demo-3b (default) or a checkpoint folder")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions of the short first-token requests")
    parser.add_argument("--max-tokens", type=int, default=24, help="answer length of the decoding runs")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / "bench-real-logs"
    logs.mkdir(parents=True, exist_ok=True)
    result = run(args.model, logs, args.repeats, args.max_tokens)
    print(report(result))
    print(markdown(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
