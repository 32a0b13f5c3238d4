"""Side-by-side benchmark: the AI Studio tutorial's server against ours, on one model, in one run.

    python -m bench                 # the full run (model demo-bench), writes docs/bench/
    python -m bench --quick         # small sizes (model demo), about two minutes; what CI runs
    python -m bench --out /tmp/b    # write results.json, results.md and chart.png elsewhere
    python -m bench --only staggered,join --clients 4     # some sections only (written to a temporary folder)

Both servers are started here as subprocesses on free loopback ports, loading the same
checkpoint through the same loader: the baseline (`bench/baseline_server.py`) and ours
(`python api.py`). Then the same requests, in the tutorial's payload format, go to each in
turn. Sections: `classic`: (a) single requests in sequence, (b) concurrent clients, (c) several
questions about one image, (d) a 12-megapixel JPEG, (e) a long streamed answer (ours only), and
the overhead of our HTTP layer over a direct engine call (in this process); `staggered`: (f)
clients sending back to back a mix of answer lengths, images and streams; `join`: (g) a short
request sent while a long answer is generating (ours only); `memory`: (h) our server's RSS after
a first count of mixed requests and after many more; `prefix`: (j) a 4-turn chat about one image, each
turn's time to first token and tokens prefilled with the earlier turns reusable (the prefix cache) and
with nothing reusable (ours only); `structured`: (k) decoding tokens/s of rows held to a JSON schema
against free rows, and a first schema compile's time to first token (in this process); `crowd`: (l) a
short request's time to first token while 3 and 15 long answers fill the batch (ours only, its own server
with MAX_BATCH_TOKENS at 4x the long answers' max_tokens, as 16384 is to 4096).
See docs/bench/results.md.
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

SECTIONS = ("classic", "staggered", "join", "memory", "prefix", "gateway", "structured", "crowd")
NEEDS_BASELINE = {"classic", "staggered"}  # join and memory are ours only: the baseline cannot stream
OWN_SERVERS = {"gateway", "structured", "crowd"}  # own servers (gateway) or in this process (structured), after the above


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(plan, out: Path, quick: bool, sections=SECTIONS) -> dict:
    started = time.perf_counter()
    load_before = report.load_average()
    from serving.model import demo

    if demo.is_demo_name(plan.model):
        say(f"demo checkpoint {plan.model}: {demo.demo_path(plan.model)}")  # built once, before two servers race

    w, parameters = {}, None
    if set(sections) - OWN_SERVERS:
        parameters = shared_servers_sections(plan, sections, w)
    if "gateway" in sections:
        w["gateway"] = gateway(plan, quick)
    if "structured" in sections:
        w["structured"] = structured_output(plan, quick)
    if "crowd" in sections:
        w["crowd"] = crowd(plan)

    results = {
        "schema": 2,
        "quick": quick,
        "sections": list(sections),
        "plan": plan_dict(plan),
        "parameters": parameters or checkpoint_parameters(plan.model),
        "machine": report.machine_info(),
        "load_before": load_before,
        "load_after": report.load_average(),
        "seconds": round(time.perf_counter() - started, 1),
        "workloads": w,
        "notes": notes(plan, sections),
    }
    results["summary"] = report.summary_rows(w, plan)
    report.write_all(results, out)
    return results


def shared_servers_sections(plan, sections, w: dict):
    """The sections run against one pair of servers (the baseline only when a section needs it), into `w`;
    returns the parameter count when (classic) loaded the engine in this process."""
    parameters = None
    with tempfile.TemporaryDirectory(prefix="qwenvl-bench-") as tmp:
        servers = {}
        try:
            servers = start_servers(plan.model, Path(tmp), baseline=bool(NEEDS_BASELINE & set(sections)))
            urls = {k: s.url + "/v1/chat/completions" for k, s in servers.items()}
            warm_up(urls, ImageFactory(*plan.image_size, seed=1))
            if "classic" in sections:
                parameters = classic(plan, urls, w)
            if "staggered" in sections:
                w["staggered"] = staggered(plan, urls)
            if "join" in sections:
                w["join"] = join(plan, urls["ours"])
            if "memory" in sections:
                w["memory"] = memory(plan, servers["ours"])
            if "prefix" in sections:
                w["prefix"] = prefix(plan, servers["ours"])
        finally:
            for server in servers.values():
                server.stop()
    return parameters


def start_servers(model: str, tmp: Path, *, baseline: bool) -> dict:
    say("starting " + ("both servers" if baseline else "our server"))
    servers = {}
    if baseline:
        servers["baseline"] = ServerProcess("baseline", ["-m", "bench.baseline_server", "--model", model,
                                                         "--host", "127.0.0.1"], tmp, "/", tmp)
    servers["ours"] = ServerProcess("ours", [str(ROOT / "api.py"), "--model", model, "--host", "127.0.0.1"],
                                    ROOT, "/health", tmp)
    try:
        for server in servers.values():
            server.wait_ready(900)
    except BaseException:
        for server in servers.values():
            server.stop()
        raise
    say("ready: " + ", ".join(f"{k} {s.url}" for k, s in servers.items()))
    return servers


def warm_up(urls: dict, images: ImageFactory) -> None:
    """First requests pay one-off costs (kernels, allocator): two with an image, one text only."""
    warm = [images.next() for _ in range(2)] + [None]
    for kind, url in urls.items():
        for img in warm:
            workloads.post(url, workloads.tutorial_payload(img, "Warm up.", max_tokens=4), kind=kind)


def classic(plan, urls: dict, w: dict) -> int:
    """(a)-(e) and the overhead: the workloads from before issue 9, into `w`; returns the parameter count."""
    say("making test images")
    small = ImageFactory(*plan.image_size, seed=1)
    large = ImageFactory(*plan.large_size, seed=2)
    for _ in range(2):
        small.next()  # the warm-up's images: keep every image below unseen
    seq = {k: [small.next() for _ in range(plan.sequential_n)] for k in ("baseline", "ours")}
    conc = {k: [small.next() for _ in range(plan.concurrent_n)] for k in ("baseline", "ours")}
    same = {k: small.next() for k in ("baseline", "ours", "ours_stream")}
    big = {k: [large.next() for _ in range(plan.large_n)] for k in ("baseline", "ours", "intake")}
    streamed = [small.next() for _ in range(plan.stream_n)]
    over = [small.next() for _ in range(2 * plan.overhead_n + 2)]  # one process, two sides: own images
    over_proc = [small.next() for _ in range(plan.overhead_n + 1)]

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
        "ours": workloads.streamed(urls["ours"], streamed, workloads.QUESTIONS[0], max_tokens=plan.stream_tokens),
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
    return engine.loaded.parameter_count


def staggered(plan, urls: dict) -> dict:
    """(f) Idle time to first token on our server, then the same mixed workload on each server."""
    images = ImageFactory(*plan.image_size, seed=4)
    specs = workloads.staggered_specs(plan.clients, plan.requests_per_client, plan.token_mix)
    say(f"(f) idle time to first token: {plan.idle_repeats} streamed requests of each kind, one at a time")
    result = {"idle": workloads.idle_ttft(urls["ours"], [images.next() for _ in range(plan.idle_repeats)],
                                          repeats=plan.idle_repeats, max_tokens=plan.join_short_tokens)}
    # the same unseen images for both servers (two processes: neither has seen them), so both answer
    # the same prompts and greedy answers run to the same lengths
    fresh = [images.next() for spec in specs if spec.image]
    for kind in ("ours", "baseline"):
        if kind not in urls:
            continue
        say(f"(f) {kind}: {plan.clients} clients back to back, {len(specs)} requests, max_tokens "
            f"{'/'.join(map(str, plan.token_mix))}, half with images, half streamed"
            + ("" if kind == "ours" else " (sent non-streamed: the tutorial's server cannot stream)"))
        result[kind] = workloads.staggered(urls[kind], kind, specs, fresh, clients=plan.clients,
                                           can_stream=kind == "ours")
    result.update(staggered_ratios(result))
    return result


def staggered_ratios(result: dict) -> dict:
    """Throughput ours / baseline; p95 time to first token of our streamed requests / the same kinds idle."""
    ours, idle = result["ours"], result["idle"]["ttft_s"]["p95"]
    streamed = (ours["streamed_ttft_s"] or {}).get("p95")
    out = {"p95_ttft_over_idle": round(streamed / idle, 2) if streamed and idle else None}
    if "baseline" in result:
        out["throughput_ratio"] = round(ours["requests_per_s"] / result["baseline"]["requests_per_s"], 2)
    return out


def gateway(plan, quick: bool) -> dict:
    """(i) The gateway's overhead: bench.gateway's run, on the same model (its own two servers)."""
    from bench import gateway as gw

    gplan = dataclasses.replace(gw.QUICK if quick else gw.Plan(), model=plan.model)
    say(f"(i) gateway overhead: --backend openai in front of an upstream against the upstream directly, "
        f"1 and {gplan.clients} clients")
    result = gw.run(gplan)
    for line in gw.report(result).splitlines():
        say("(i) " + line.strip())
    return result


def structured_output(plan, quick: bool) -> dict:
    """(j) Structured output's cost in the built-in engine: bench.structured's run, on the same model."""
    from bench import structured

    splan = dataclasses.replace(structured.QUICK if quick else structured.Plan(), model=plan.model)
    say(f"(j) structured output: {splan.rows} JSON-schema rows against {splan.rows} free rows, and a first "
        "schema compile's time to first token (in this process)")
    result = structured.run(splan)
    for line in structured.report(result).splitlines():
        say("(j) " + line.strip())
    return result


def crowd(plan) -> dict:
    """(l) Head-of-line blocking: a short request beside long answers that fill the KV budget or every row, on
    our own server with MAX_BATCH_TOKENS = 4 x the long answers' max_tokens."""
    budget = 4 * plan.crowd_long_tokens
    counts = plan.crowd_long_counts
    say(f"(l) crowd: a {plan.crowd_short_tokens}-token streamed request, idle and while "
        f"{' and '.join(map(str, counts))} streamed {plan.crowd_long_tokens}-token answers generate "
        f"(MAX_BATCH_TOKENS {budget}), {plan.crowd_repeats} time(s) each")
    with tempfile.TemporaryDirectory(prefix="qwenvl-bench-") as tmp:
        server = ServerProcess("ours", [str(ROOT / "api.py"), "--model", plan.model, "--host", "127.0.0.1",
                                        "--max-batch-tokens", str(budget), "--max-queue", str(max(counts) + 8)],
                               ROOT, "/health", Path(tmp))
        try:
            server.wait_ready(900)
            url = server.url + "/v1/chat/completions"
            warm_up({"ours": url}, ImageFactory(*plan.image_size, seed=1))
            result = workloads.short_beside_long(url, long_counts=counts, long_tokens=plan.crowd_long_tokens,
                                                 short_tokens=plan.crowd_short_tokens, repeats=plan.crowd_repeats,
                                                 metrics_url=server.url + "/metrics")
        finally:
            server.stop()
    result["max_batch_tokens"] = budget
    say(f"(l) idle: time to first token {result['median_idle_ttft_s']:.3f} s")
    for c in result["crowds"]:
        say(f"(l) beside {c['long_requests']} long answers: {c['median_short_ttft_s']:.3f} s ({c['ratio']:.2f}x idle), "
            f"long answers still running: {c['longs_running']}, preemptions: "
            f"{[r['preemptions'] for r in c['runs']]}, shortest long answer {c['min_long_tokens']} tokens")
    return result


def join(plan, url: str) -> dict:
    """(g) The join delay, on our server only (the baseline cannot stream)."""
    say(f"(g) join delay: a {plan.join_short_tokens}-token streamed request, idle and {plan.join_after_s:g} s "
        f"into a {plan.join_long_tokens}-token streamed answer, {plan.join_repeats} times each")
    result = workloads.join_delay(url, repeats=plan.join_repeats, long_tokens=plan.join_long_tokens,
                                  short_tokens=plan.join_short_tokens, join_after=plan.join_after_s)
    if not result["long_running_when_sent"]:
        say("(g) WARNING: a long answer had ended before the short request was sent; that repetition "
            "measured no join (lower --join-after)")
    return result


def prefix(plan, server: ServerProcess) -> dict:
    """(j) Reusing earlier turns (the prefix cache), on our server only; then its RSS over many conversations."""
    url = server.url + "/v1/chat/completions"
    images = ImageFactory(*plan.image_size, seed=5)
    say(f"(j) prefix reuse: {plan.prefix_chats} chat(s) of {plan.prefix_turns} turns about one "
        f"{plan.image_size[0]}x{plan.image_size[1]} image, {plan.prefix_tokens}-token answers, with the earlier "
        "turns reusable and with the system message changed every turn (nothing reusable)")
    result = workloads.prefix_reuse(url, [images.next() for _ in range(3 * plan.prefix_chats)], turns=plan.prefix_turns,
                                    max_tokens=plan.prefix_tokens)
    per_turn = result["per_turn"]
    for turn, (none, reuse, free) in enumerate(zip(per_turn["none"], per_turn["reuse"],
                                                   per_turn["reuse_random_answers"]), start=1):
        say(f"(j) turn {turn}: {reuse['prompt_tokens']:.0f} prompt tokens; prefilled {none['prefilled_tokens']:.0f} "
            f"-> {reuse['prefilled_tokens']:.0f}, time to first token {none['ttft_s']:.3f} -> {reuse['ttft_s']:.3f} s "
            f"({result['speedup'][turn - 1]:.2f}x); with the demo's random answers sent back: prefilled "
            f"{free['prefilled_tokens']:.0f}, {free['ttft_s']:.3f} s")
    say(f"(j) a short text request's time to first token: {result['short_text_ttft_s']:.3f} s; turns 2-{plan.prefix_turns} "
        f"took {max(result['reuse_over_short_text'][1:]):.2f}x of it at most "
        f"({max(result['random_answers_over_short_text'][1:]):.2f}x with the random answers)")
    say(f"(j) memory: {plan.prefix_memory_chats} distinct 2-turn chats about one image, "
        f"{plan.prefix_memory_tokens}-token answers")
    result["memory"] = workloads.prefix_memory(
        url, server.process.pid, images.next(), conversations=plan.prefix_memory_chats, turns=2,
        max_tokens=plan.prefix_memory_tokens,
        on_reading=lambda r: say(f"(j) RSS after {r['conversations']} chats: {r['rss_mb']:.1f} MB (prefix cache "
                                 f"{r['prefix_cache_mb']:.1f} MB, {r['prefix_cache_evictions']:.0f} evictions)"))
    m = result["memory"]
    say(f"(j) RSS grew {m['growth_mb']:.1f} MB over {m['conversations']} chats; bound PREFIX_CACHE_MB "
        f"({m['prefix_cache_capacity_mb']:.0f}) + 100 = {m['bound_mb']:.0f} MB: "
        f"{'within' if m['within_bound'] else 'OVER'}")
    return result


def memory(plan, server: ServerProcess) -> dict:
    """(h) Our server's RSS (psutil, its process) after memory_checkpoint and after memory_requests mixed requests."""
    from bench import load

    say(f"(h) memory: {plan.memory_requests} mixed requests from {plan.memory_clients} clients (the load "
        f"test's mix), RSS after {plan.memory_checkpoint} and after {plan.memory_requests}")
    result = load.rss_after_requests(load.Server(server.url, pid=server.process.pid),
                                     (plan.memory_checkpoint, plan.memory_requests),
                                     token_mix=plan.memory_token_mix, concurrency=plan.memory_clients,
                                     on_reading=lambda r: say(f"(h) RSS after {r['requests']} requests: "
                                                              f"{r['rss_mb']:.1f} MB"))
    first, last = result["readings"][0], result["readings"][-1]
    result["growth_mb"] = round(last["rss_mb"] - first["rss_mb"], 1)
    # the prefix cache fills up to PREFIX_CACHE_MB by design (every request leaves its KV): the leak question is the rest
    result["prefix_cache_growth_mb"] = round(last["prefix_cache_mb"] - first["prefix_cache_mb"], 1)
    result["growth_apart_from_prefix_cache_mb"] = round(result["growth_mb"] - result["prefix_cache_growth_mb"], 1)
    return result


def checkpoint_parameters(model: str):
    """The parameter count from the checkpoint's safetensors headers (when the engine was not loaded here)."""
    from serving.model import demo
    from serving.model.download import verify_checkpoint

    folder = demo.demo_path(model) if demo.is_demo_name(model) else Path(model)
    return verify_checkpoint(folder).parameters if folder.is_dir() else None


def plan_dict(plan) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(plan).items()}


def notes(plan, sections) -> list:
    out = []
    if "classic" in sections:
        out += classic_notes(plan)
    if "staggered" in sections:
        out.append(
            f"(f) {plan.clients} clients, each sending its next request when its last one ends, "
            f"{plan.clients * plan.requests_per_client} requests in all, the same on both servers: max_tokens cycling "
            f"through {'/'.join(map(str, plan.token_mix))}, half with an image the server has not seen (a new one "
            "each; both servers get the same ones), half streamed, in a fixed shuffled order. The tutorial's "
            "server cannot stream: it gets the streamed requests non-streamed. Time to first token of a non-streamed request is its whole answer; the "
            "streamed rows are ours only. Idle: the same kinds of streamed request (with an image, text only), "
            f"{plan.idle_repeats} of each, one at a time on our otherwise idle server; the target compares p95 "
            "with p95. Answers may end before max_tokens (eos): tokens/s counts the tokens produced.")
    if "join" in sections:
        out.append(
            f"(g) Ours only (the tutorial's server cannot stream): a {plan.join_short_tokens}-token streamed text "
            f"request, first on the idle server, then sent {plan.join_after_s:g} s after a "
            f"{plan.join_long_tokens}-token streamed answer's first token; its time to first token, medians of "
            f"{plan.join_repeats}.")
    if "memory" in sections:
        out.append(
            f"(h) Our server's resident memory (psutil, the server's process) after {plan.memory_checkpoint} and "
            f"after {plan.memory_requests} requests of bench/load.py's mix (text and images, streamed and not, "
            f"max_tokens {'/'.join(map(str, plan.memory_token_mix))}, bad inputs, streams hung up on) from "
            f"{plan.memory_clients} clients, read while no request is in flight. Every request leaves its KV in the "
            "prefix cache, which fills up to PREFIX_CACHE_MB by design: the target is on the growth apart from it.")
    if "prefix" in sections:
        out.append(
            f"(j) Ours only: {plan.prefix_chats} chat(s) of {plan.prefix_turns} turns, each about a fresh "
            f"{plan.image_size[0]}x{plan.image_size[1]} JPEG (another for each kind) sent in turn 1, the whole history sent every turn, "
            f"streamed, greedy, {plan.prefix_tokens}-token answers held to whole English words with logit_bias (a real "
            "model's answers tokenize back to the tokens it wrote, so a client sending them back leaves them reusable; "
            "the demo's random tokens do not: that case is measured too, as 'random answers'). Reusable: one system message throughout, so "
            "each turn's prompt starts with the previous turn's prompt and answer (the prefix cache). Nothing "
            "reusable: the same chat with the system message changed every turn (same length), so no earlier prompt "
            "starts the same way; its image still comes from the vision cache after turn 1 (today's behaviour "
            "without the prefix cache). Tokens prefilled: prompt_tokens - usage.prompt_tokens_details.cached_tokens. "
            "Medians per turn over the chats. Then the server's RSS (psutil) before and after "
            f"{plan.prefix_memory_chats} distinct 2-turn chats about one image ({plan.prefix_memory_tokens}-token "
            "answers), against PREFIX_CACHE_MB (qwenvl_prefix_cache_capacity_bytes) + 100 MB.")
    if "crowd" in sections:
        out.append(
            f"(l) Ours only, on its own server with MAX_BATCH_TOKENS {4 * plan.crowd_long_tokens} (4x the long "
            "answers' max_tokens, as a CPU's default 16384 is to max_tokens 4096): a "
            f"{plan.crowd_short_tokens}-token streamed text request, first on the idle server, then sent once "
            f"{' and '.join(map(str, plan.crowd_long_counts))} streamed greedy answers of max_tokens "
            f"{plan.crowd_long_tokens} (sent at once) are generating; its time to first token, medians of "
            f"{plan.crowd_repeats}. Before rows reserved only what they hold, three such answers took the whole "
            "budget and the short request waited for one of them to end.")
    if "gateway" in sections:
        out.append(
            "(i) Two `api.py` processes of ours on loopback: an upstream (the built-in engine, no image cache) and "
            "a gateway in front of it (--backend openai); the same requests (a new 448x448 JPEG and a question, "
            "greedy) alternate between the gateway and the upstream directly, one at a time and from 8 clients. "
            "Overhead, decomposed: the time the hop costs (client latency minus the upstream's own time, from "
            "its /metrics) through the gateway minus directly, over the gateway's latency; at 8 clients plus "
            "the gateway's CPU per request over the upstream's (from /proc), since both share the 2 cores. "
            "The plain A/B figure is in results.json.")
    return out


def classic_notes(plan) -> list:
    return [
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
        "Overhead: requests through our HTTP API (serving.web.app + waitress, serving the benchmark process's own "
        "engine on a loopback port) against direct calls of the pipeline the server runs (serving.chat.ChatService: "
        "image intake + engine.start, read to the end), alternating; overhead = (HTTP - direct) / HTTP. results.json also has the same "
        "against the separate server process (overhead_server_process), which adds the variation between two "
        "processes on a shared 2-core machine.",
        "Both servers load the model through serving.model.loader.load_model, which applies "
        "serving/model/paddle_fixes.py: both decode with the KV cache.",
    ]

# flag: (Plan field, parser, help); each overrides the plan chosen by --quick
PLAN_FLAGS = {
    "--clients": ("clients", int, "(f) concurrent clients"),
    "--requests-per-client": ("requests_per_client", int, "(f) requests each client sends"),
    "--token-mix": ("token_mix", "ints", "(f) max_tokens values, cycled, comma-separated"),
    "--idle-repeats": ("idle_repeats", int, "(f) idle requests of each kind"),
    "--join-repeats": ("join_repeats", int, "(g) repetitions, idle and joining"),
    "--join-long-tokens": ("join_long_tokens", int, "(g) max_tokens of the long answer"),
    "--join-short-tokens": ("join_short_tokens", int, "(f, g) max_tokens of the short and idle requests"),
    "--join-after": ("join_after_s", float, "(g) seconds after the long answer's first token"),
    "--memory-requests": ("memory_requests", int, "(h) mixed requests in all"),
    "--memory-checkpoint": ("memory_checkpoint", int, "(h) requests before the first RSS reading"),
    "--memory-token-mix": ("memory_token_mix", "ints", "(h) max_tokens values, comma-separated"),
    "--memory-clients": ("memory_clients", int, "(h) concurrent clients"),
    "--prefix-chats": ("prefix_chats", int, "(j) chats of each kind (nothing reusable, reusable, reusable with random answers)"),
    "--prefix-turns": ("prefix_turns", int, "(j) turns per chat"),
    "--prefix-tokens": ("prefix_tokens", int, "(j) max_tokens of each answer"),
    "--prefix-memory-chats": ("prefix_memory_chats", int, "(j) distinct chats between the RSS readings"),
    "--crowd-long-counts": ("crowd_long_counts", "ints", "(l) long answers running, comma-separated"),
    "--crowd-long-tokens": ("crowd_long_tokens", int, "(l) max_tokens of the long answers"),
    "--crowd-repeats": ("crowd_repeats", int, "(l) repetitions, idle and in each crowd"),
}


def _ints(text: str) -> tuple:
    values = tuple(int(v) for v in text.split(",") if v.strip())
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"want positive integers, comma-separated: {text!r}")
    return values


def _shown(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else f"{value:g}"


def _sections(text: str) -> tuple:
    chosen = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"sections are {', '.join(SECTIONS)}; got {text!r}")
    return tuple(s for s in SECTIONS if s in chosen)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (model demo, few requests, 8 tokens)")
    parser.add_argument("--model", default=None, help="model for both servers (default: demo-bench; --quick: demo)")
    parser.add_argument("--only", type=_sections, default=SECTIONS,
                        help=f"comma-separated sections to run, of {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--out", default=None, help="folder for results.json, results.md, chart.png (default: "
                        "docs/bench; with --only, a new temporary folder, so docs/bench keeps a whole run)")
    for flag, (field, parse, text) in PLAN_FLAGS.items():
        full, quick = (_shown(getattr(p, field)) for p in (FULL, QUICK))
        parser.add_argument(flag, dest=field, type=_ints if parse == "ints" else parse, default=None,
                            metavar={"ints": "N,N,...", float: "SECONDS"}.get(parse, "N"),
                            help=f"{text} (default {full}; --quick {quick})")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    overrides = {field: getattr(args, field) for field, _, _ in PLAN_FLAGS.values() if getattr(args, field) is not None}
    if args.model:
        overrides["model"] = args.model
    plan = dataclasses.replace(plan, **overrides)
    if "memory" in args.only and not 0 < plan.memory_checkpoint < plan.memory_requests:
        parser.error("--memory-checkpoint must be above 0 and below --memory-requests")
    return args, plan


def main(argv=None) -> int:
    args, plan = parse_args(argv)
    if args.out:
        out = Path(args.out)
    elif args.only != SECTIONS:
        out = Path(tempfile.mkdtemp(prefix="qwenvl-bench-out-"))
    else:
        out = ROOT / "docs" / "bench"
    say(f"plan: {plan}; sections: {', '.join(args.only)}")
    results = run(plan, out, args.quick, args.only)
    print()
    print(report.console_table(results["summary"]))
    print()
    say(f"done in {results['seconds']:.0f} s; wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'chart.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
