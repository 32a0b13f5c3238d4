"""The benchmark's outputs: machine facts, the summary table (console and markdown), JSON, a chart."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
from pathlib import Path


def machine_info() -> dict:
    info = {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": _memory_gb(),
        "gpu": "none (CPU only)",
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
    }
    for package in ("paddlepaddle", "paddleformers", "flask", "waitress", "pillow"):
        info[package] = _version(package)
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gb():
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ---------------------------------------------------------------------------- summary rows

def _ratio(a, b):
    return round(a / b, 2) if a and b else 0.0


def summary_rows(w: dict, plan) -> list:
    """One row per headline figure: what, baseline, ours, gain (x, higher is better), target, met."""
    rows = []

    def row(name, unit, baseline, ours, gain=None, how="ours only", target=None, met=None):
        rows.append({"workload": name, "unit": unit, "baseline": baseline, "ours": ours, "gain": gain,
                     "gain_is": how, "target": target, "met": met})

    if "sequential" in w:
        _classic_rows(w, plan, row)
    if "staggered" in w:
        _staggered_rows(w["staggered"], row)
    if "join" in w:
        _join_rows(w["join"], row)
    if "memory" in w:
        _memory_rows(w["memory"], row)
    if "prefix" in w:
        _prefix_rows(w["prefix"], row)
    if "gateway" in w:
        _gateway_rows(w["gateway"], row)
    if "structured" in w:
        _structured_rows(w["structured"], row)
    if "crowd" in w:
        _crowd_rows(w["crowd"], row)
    return rows


def _crowd_rows(c: dict, row) -> None:
    short = f"{c['short_tokens']}-token streamed request"
    row(f"(l) a {short} on an idle server: time to first token", "s", None, c["median_idle_ttft_s"])
    for crowd in c["crowds"]:
        n, ended = crowd["long_requests"], crowd["min_long_tokens"]
        shorter = "" if ended >= c["long_tokens"] else f"; the shortest ended at {ended}"
        row(f"(l) the same, while {n} streamed {c['long_tokens']}-token answers generate (MAX_BATCH_TOKENS "
            f"{c['max_batch_tokens']}{shorter})", "s", None, crowd["median_short_ttft_s"])
        # the long answers ran to max_tokens: then a first token after one of them ended means it waited for it
        valid, waited = ended >= c["long_tokens"], not crowd["longs_running"]
        row(f"(l) beside {n} long answers / idle" + ("; it waited for a whole long answer" if waited else "")
            + ("" if valid else "; NOT MEASURED: a long answer ended early (eos)"),
            "x", None, crowd["ratio"], target="<= 2x", met=(crowd["ratio"] <= 2 and not waited) if valid else None)


def _prefix_rows(j: dict, row) -> None:
    none, reuse = j["per_turn"]["none"], j["per_turn"]["reuse"]
    for turn, (n, r) in enumerate(zip(none, reuse), start=1):
        row(f"(j) chat about one image, turn {turn} ({r['prompt_tokens']:.0f} prompt tokens): time to first token with "
            f"the earlier turns reused ({r['prefilled_tokens']:.0f} prefilled; nothing reusable: "
            f"{n['prefilled_tokens']:.0f} prefilled, {n['ttft_s']:.3f} s)", "s", None, r["ttft_s"],
            j["speedup"][turn - 1], "nothing reusable / reused", target=">= 3x" if turn == len(none) and turn > 1 else None,
            met=j["speedup"][turn - 1] >= 3 if turn == len(none) and turn > 1 else None)
    later = j["reuse_over_short_text"][1:]
    if later:
        row("(j) turns 2+ with reuse: worst time to first token / a short text request's "
            f"({j['short_text_ttft_s']:.3f} s)", "x", None, max(later), target="<= 1.5x", met=max(later) <= 1.5)
        row("(j) the same with the demo's random answers sent back (they do not tokenize back to what it wrote, so "
            "reuse stops at each answer)", "x", None, max(j["random_answers_over_short_text"][1:]))
    m = j.get("memory")
    if m:
        row(f"(j) RSS growth over {m['conversations']} distinct 2-turn chats ({m['readings'][-1]['prefix_cache_evictions']:.0f} "
            f"prefix cache evictions; cache capacity {m['prefix_cache_capacity_mb']:.0f} MB)", "MB", None, m["growth_mb"],
            target=f"<= {m['bound_mb']:.0f} MB (PREFIX_CACHE_MB + 100)", met=m["within_bound"])


def _structured_rows(j: dict, row) -> None:
    n = j["plan"]["rows"]
    row(f"(k) {n} free rows: decoding throughput", "tokens/s", None, j["free_decode_tokens_per_s"])
    row(f"(k) {n} rows held to a JSON schema: decoding throughput", "tokens/s", None,
        j["constrained_decode_tokens_per_s"])
    row("(k) structured output's slowdown", "%", None, j["slowdown_percent"],
        target=f"<= {j['target_slowdown_percent']}%", met=j["slowdown_percent"] <= j["target_slowdown_percent"])
    row("(k) time to first token added by a first schema compile", "ms", None, j["first_compile_added_ttft_ms"],
        target=f"< {j['target_compile_ttft_ms']} ms", met=j["first_compile_added_ttft_ms"] < j["target_compile_ttft_ms"])


def _gateway_rows(i: dict, row) -> None:
    one, eight, target, n = i["one_client"], i["eight_clients"], i["target_percent"], i["plan"]["clients"]
    row("(i) 1 client, asking the upstream directly: median latency", "s", None, one["direct_median_s"])
    row("(i) 1 client, through the gateway (--backend openai): median latency", "s", None, one["gateway_median_s"])
    row("(i) gateway overhead, 1 client (decomposed: the hop's added cost / latency)", "%", None,
        one["overhead_percent"], target=f"<= {target:g}%", met=one["overhead_percent"] <= target)
    row(f"(i) {n} clients, asking the upstream directly: throughput", "requests/s", None, eight["direct_requests_per_s"])
    row(f"(i) {n} clients, through the gateway: throughput", "requests/s", None, eight["gateway_requests_per_s"])
    row(f"(i) gateway overhead, {n} clients (decomposed: added latency + the gateway's CPU)", "%", None,
        eight["overhead_percent"], target=f"<= {target:g}%", met=eight["overhead_percent"] <= target)


def _classic_rows(w: dict, plan, row) -> None:
    s = w["sequential"]
    row(f"(a) single requests in sequence, median latency ({plan.max_tokens}-token answers)", "s",
        s["baseline"]["median_latency_s"], s["ours"]["median_latency_s"],
        _ratio(s["baseline"]["median_latency_s"], s["ours"]["median_latency_s"]), "baseline / ours")
    c = w["concurrent"]
    gain = _ratio(c["ours"]["requests_per_s"], c["baseline"]["requests_per_s"])
    row(f"(b) {plan.concurrent_clients} concurrent clients, throughput", "requests/s",
        c["baseline"]["requests_per_s"], c["ours"]["requests_per_s"], gain, "ours / baseline", ">= 3x", gain >= 3)
    row(f"(b) {plan.concurrent_clients} concurrent clients, completion tokens", "tokens/s",
        c["baseline"]["completion_tokens_per_s"], c["ours"]["completion_tokens_per_s"],
        _ratio(c["ours"]["completion_tokens_per_s"], c["baseline"]["completion_tokens_per_s"]), "ours / baseline")
    r = w["repeated_image"]
    gain = _ratio(r["baseline"]["median_repeated_s"], r["ours"]["median_repeated_s"])
    row(f"(c) {plan.repeat_questions} questions about one image: time to first token, questions 2-"
        f"{plan.repeat_questions} (max_tokens=1)", "s",
        r["baseline"]["median_repeated_s"], r["ours"]["median_repeated_s"], gain, "baseline / ours", ">= 2x",
        gain >= 2)
    row("(c) same, ours streamed: time to first streamed token, questions 2-5", "s",
        r["baseline"]["median_repeated_s"], r["ours_stream"]["median_repeated_s"],
        _ratio(r["baseline"]["median_repeated_s"], r["ours_stream"]["median_repeated_s"]), "baseline / ours")
    g = w["large_jpeg"]
    width, height = plan.large_size
    gain = _ratio(g["baseline"]["median_latency_s"], g["ours"]["median_latency_s"])
    row(f"(d) {width}x{height} JPEG, end to end with max_tokens=1", "s",
        g["baseline"]["median_latency_s"], g["ours"]["median_latency_s"], gain, "baseline / ours", ">= 4x",
        gain >= 4)
    i = g["intake"]
    row(f"(d) {width}x{height} JPEG, intake only: request bytes -> model input tensors", "s",
        i["median_baseline_s"], i["median_ours_s"], i["speedup"], "baseline / ours", ">= 4x", i["speedup"] >= 4)
    for key, what in (("ours", "image + question"), ("ours_text_only", "text-only question")):
        share = w["streaming"][key]["ttft_share_pct"]
        row(f"(e) streamed {plan.stream_tokens}-token answer, {what}: time to first token / whole answer",
            "%", None, share, None, "ours only", "<= 10%", share <= 10)
    o = w["overhead"]
    row(f"our HTTP server's overhead over a direct engine call ({plan.max_tokens}-token answers, one process)",
        "%", None, o["overhead_pct"], None, "ours only", "<= 5%", o["overhead_pct"] <= 5)
    o = w["overhead_server_process"]
    row("same, against our separate server process (adds variation between processes)", "%",
        None, o["overhead_pct"], None, "ours only")


def _staggered_rows(f: dict, row) -> None:
    ours, base = f["ours"], f.get("baseline")
    n = ours["clients"]
    head = f"(f) {n} clients back to back, mixed"

    def both(key, sub=None):
        pick = (lambda r: r[key][sub]) if sub else (lambda r: r[key])
        return (pick(base) if base else None), pick(ours)

    b, o = both("requests_per_s")
    gain = _ratio(o, b)
    row(f"{head}: throughput", "requests/s", b, o, gain or None, "ours / baseline", ">= 3x",
        gain >= 3 if base else None)
    b, o = both("completion_tokens_per_s")
    row(f"{head}: completion tokens", "tokens/s", b, o, _ratio(o, b) or None, "ours / baseline")
    for q in ("p50", "p95"):
        b, o = both("ttft_s", q)
        row(f"{head}: time to first token {q}, all requests (non-streamed: whole answer)", "s", b, o,
            _ratio(b, o) or None, "baseline / ours")
    if ours["streamed_ttft_s"]:
        for q in ("p50", "p95"):
            row(f"{head}: time to first token {q}, streamed (ours; the tutorial cannot stream)",
                "s", None, ours["streamed_ttft_s"][q])
    idle = f["idle"]
    row("(f) idle server, the same kinds streamed one at a time: time to first token p95", "s",
        None, idle["ttft_s"]["p95"])
    ratio = f.get("p95_ttft_over_idle")
    row(f"(f) p95 time to first token of streamed requests, {n} clients / idle", "x", None, ratio,
        target="<= 4x", met=ratio <= 4 if ratio else None)


def _join_rows(g: dict, row) -> None:
    short = f"{g['short_tokens']}-token streamed request"
    row(f"(g) a {short} on an idle server: time to first token", "s", None, g["median_idle_ttft_s"])
    produced = min(j["long_tokens"] for j in g["joined"])
    ended = "" if produced >= g["long_tokens"] else f" (it ended at {produced})"
    row(f"(g) the same, sent {g['join_after_s']:g} s into a {g['long_tokens']}-token streamed answer{ended}", "s",
        None, g["median_joined_ttft_s"])
    valid = g["long_running_when_sent"]
    row("(g) join delay: joining / idle (ours; the tutorial cannot stream)"
        + ("" if valid else "; NOT MEASURED: the long answer had ended"), "x", None, g["ratio"],
        target="<= 2x", met=(g["ratio"] <= 2) if valid else None)


def _memory_rows(h: dict, row) -> None:
    first, last = h["readings"][0], h["readings"][-1]
    row(f"(h) our server's RSS after {first['requests']:,} mixed requests", "MB", None, first["rss_mb"])
    row(f"(h) our server's RSS after {last['requests']:,} mixed requests", "MB", None, last["rss_mb"])
    if "growth_apart_from_prefix_cache_mb" not in h:  # a run from before the prefix cache
        row(f"(h) RSS growth from {first['requests']:,} to {last['requests']:,} requests", "MB", None,
            h["growth_mb"], target="<= 300 MB", met=h["growth_mb"] <= 300)
        return
    row(f"(h) RSS growth from {first['requests']:,} to {last['requests']:,} requests", "MB", None, h["growth_mb"])
    row("(h) of which the prefix cache's KV (bounded by PREFIX_CACHE_MB, fills by design)", "MB", None,
        h["prefix_cache_growth_mb"])
    apart = h["growth_apart_from_prefix_cache_mb"]
    row("(h) RSS growth apart from the prefix cache", "MB", None, apart, target="<= 300 MB", met=apart <= 300)


def _fmt(value, unit):
    if value is None:
        return "-"
    if unit == "%":
        return f"{value:.1f}%"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "MB":
        return f"{value:+.1f}" if value < 0 else f"{value:.1f}"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def _met(row: dict, fail: str = "FAIL") -> str:
    return "-" if row["met"] is None else ("PASS" if row["met"] else fail)


def console_table(rows: list) -> str:
    lines = [f"{'workload':<110} {'unit':>11} {'baseline':>9} {'ours':>9} {'gain':>7}  {'target':<9} met"]
    for r in rows:
        gain = f"{r['gain']:.2f}x" if r["gain"] else "-"
        lines.append(f"{r['workload'][:110]:<110} {r['unit']:>11} {_fmt(r['baseline'], r['unit']):>9} "
                     f"{_fmt(r['ours'], r['unit']):>9} {gain:>7}  {r['target'] or '-':<9} {_met(r)}")
    return "\n".join(lines)


def command(results: dict) -> str:
    """The command line that produced `results` (sections and --quick; other flags are in the plan)."""
    words = ["python -m bench"] + (["--quick"] if results["quick"] else [])
    sections = results.get("sections") or []
    if 0 < len(sections) < 4:  # of classic, staggered, join, memory
        words.append("--only " + ",".join(sections))
    return " ".join(words)


def markdown(results: dict) -> str:
    m, plan = results["machine"], results["plan"]
    out = [
        f"Measured {m['date'][:10]} on {m['cpu_model']}, {m['usable_cores']} cores, {m['memory_gb']} GB RAM, "
        f"no GPU; Python {m['python']}, PaddlePaddle {m['paddlepaddle']}, PaddleFormers {m['paddleformers']}. "
        f"Model `{plan['model']}` (random weights, {results.get('parameters') or 0:,} parameters), greedy "
        f"decoding, both servers on loopback in one run (`{command(results)}`). "
        f"Load average before/after: {results.get('load_before')} / {results.get('load_after')}.",
        "",
        "| workload | unit | baseline (tutorial) | ours | gain | target | met |",
        "| --- | --- | ---: | ---: | ---: | --- | --- |",
    ]
    for r in results["summary"]:
        gain = f"{r['gain']:.2f}x ({r['gain_is']})" if r["gain"] else "-"
        out.append(f"| {r['workload']} | {r['unit']} | {_fmt(r['baseline'], r['unit'])} | "
                   f"{_fmt(r['ours'], r['unit'])} | {gain} | {r['target'] or '-'} | {_met(r, '**FAIL**')} |")
    out += ["", "Gain is written so that higher is better: baseline / ours for times, ours / baseline for "
            "throughputs. Medians; the raw figures are in `results.json`."]
    for note in results.get("notes", []):
        out.append(f"- {note}")
    return "\n".join(out) + "\n"


def chart(results: dict, path: Path) -> None:
    """Top: gains over the baseline (targets marked) and ours-only timings. Bottom, for the sections run:
    (f) time to first token under load, (f, g) latency ratios against their targets, (h) memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = results["workloads"]
    top = [(p, width) for p, width, present in (
        (_gains_panel, 8, bool(_gain_bars(w))), (_timings_panel, 5, "streaming" in w)) if present]
    bottom = [(p, 1) for p, present in (
        (_ttft_panel, "staggered" in w), (_ratio_panel, "staggered" in w or "join" in w or "crowd" in w),
        (_memory_panel, "memory" in w), (_prefix_panel, "prefix" in w)) if present]
    rows = [r for r in (top, bottom) if r]
    heights = [max(2.4, 0.75 * len(_gain_bars(w)) + 1.2) if r is top else 4.6 for r in rows]  # inches
    fig = plt.figure(figsize=(14, sum(heights)))
    grid = fig.add_gridspec(len(rows), 1, height_ratios=heights)
    for cell, panels in zip(grid, rows):
        inner = cell.subgridspec(1, len(panels), width_ratios=[width for _, width in panels])
        for spot, (draw, _) in zip(inner, panels):
            draw(fig.add_subplot(spot), w)

    m = results["machine"]
    fig.suptitle(f"Tutorial server vs ours, model {results['plan']['model']}, {m['cpu_model']}, "
                 f"{m['usable_cores']} cores, no GPU, {m['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _gain_bars(w: dict) -> list:
    """label, baseline, ours, unit, gain (higher is better), target: every figure with a baseline."""
    bars = []
    if "sequential" in w:
        c, r, g, s = w["concurrent"], w["repeated_image"], w["large_jpeg"], w["sequential"]
        bars += [
            ("(a) single request, median latency", s["baseline"]["median_latency_s"],
             s["ours"]["median_latency_s"], "s",
             _ratio(s["baseline"]["median_latency_s"], s["ours"]["median_latency_s"]), None),
            (f"(b) {c['ours']['clients']} concurrent clients, throughput", c["baseline"]["requests_per_s"],
             c["ours"]["requests_per_s"], "req/s",
             _ratio(c["ours"]["requests_per_s"], c["baseline"]["requests_per_s"]), 3),
            ("(c) repeated image, time to first token", r["baseline"]["median_repeated_s"],
             r["ours"]["median_repeated_s"], "s",
             _ratio(r["baseline"]["median_repeated_s"], r["ours"]["median_repeated_s"]), 2),
            ("(d) large JPEG, end to end", g["baseline"]["median_latency_s"], g["ours"]["median_latency_s"], "s",
             _ratio(g["baseline"]["median_latency_s"], g["ours"]["median_latency_s"]), 4),
            ("(d) large JPEG, intake only", g["intake"]["median_baseline_s"], g["intake"]["median_ours_s"], "s",
             g["intake"]["speedup"], 4),
        ]
    f = w.get("staggered") or {}
    if "baseline" in f:
        bars.append((f"(f) {f['ours']['clients']} clients back to back, throughput",
                     f["baseline"]["requests_per_s"], f["ours"]["requests_per_s"], "req/s",
                     f["throughput_ratio"], 3))
    return bars


def _gains_panel(ax, w: dict) -> None:
    bars = _gain_bars(w)
    y = list(range(len(bars)))[::-1]
    gains = [b[4] for b in bars]
    ax.barh(y, gains, color="#1f77b4", height=0.6)
    ax.axvline(1.0, color="#555555", linestyle="--", linewidth=1)
    for yi, (label, base, ours, unit, gain, target) in zip(y, bars):
        ax.annotate(f"  {gain:.2f}x  ({base:.3g} -> {ours:.3g} {unit})", (max(gain, target or 0), yi),
                    va="center", fontsize=8)
        if target:
            ax.plot([target], [yi], marker="|", markersize=22, color="#d62728", markeredgewidth=2)
    ax.plot([], [], marker="|", linestyle="none", markersize=12, color="#d62728", markeredgewidth=2,
            label="target")
    ax.set_yticks(y, [b[0] for b in bars], fontsize=9)
    ax.set_xlim(0, max(gains + [4]) * 1.45)
    ax.set_xlabel("gain over the tutorial's server (x, higher is better; dashed: parity)")
    ax.legend(fontsize=8, loc="lower right")


def _timings_panel(ax, w: dict) -> None:
    st, tx, o = w["streaming"]["ours"], w["streaming"]["ours_text_only"], w["overhead"]
    names = ["(e) streamed,\nimage", "(e) streamed,\ntext only", "overhead:\ndirect vs HTTP"]
    first = [st["median_ttft_s"], tx["median_ttft_s"], o["median_direct_s"]]
    total = [st["median_total_s"], tx["median_total_s"], o["median_http_s"]]
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], first, 0.4, label="first token / direct engine call", color="#ff7f0e")
    ax.bar([i + 0.2 for i in x], total, 0.4, label="whole answer / through HTTP", color="#1f77b4")
    for i, (a, b) in enumerate(zip(first, total)):
        text = f"{100 * a / b:.0f}%" if i < 2 and b else f"{o['overhead_pct']:+.1f}%"
        ax.annotate(text, (i, max(a, b)), ha="center", va="bottom", fontsize=9, fontweight="bold")
    ax.set_xticks(list(x), names, fontsize=8)
    ax.set_ylabel("seconds (ours only)")
    ax.set_ylim(0, max(total + first) * 1.35)
    ax.legend(fontsize=8, loc="upper left")


def _ttft_panel(ax, w: dict) -> None:
    f = w["staggered"]
    groups = [("idle\nours,\nstreamed", f["idle"]["ttft_s"])]
    if f["ours"]["streamed_ttft_s"]:
        groups.append(("loaded\nours,\nstreamed", f["ours"]["streamed_ttft_s"]))
    groups.append(("loaded\nours,\nall", f["ours"]["ttft_s"]))
    if "baseline" in f:
        groups.append(("loaded\ntutorial,\nall", f["baseline"]["ttft_s"]))
    x = range(len(groups))
    for offset, q, colour in ((-0.2, "p50", "#ff7f0e"), (0.2, "p95", "#1f77b4")):
        values = [g[q] for _, g in groups]
        ax.bar([i + offset for i in x], values, 0.4, label=q, color=colour)
        for i, v in zip(x, values):
            ax.annotate(f"{v:.2g}", (i + offset, v), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(x), [name for name, _ in groups], fontsize=7)
    ax.set_ylabel("seconds to first token (non-streamed: whole answer)", fontsize=8)
    ax.set_title(f"(f) time to first token, idle and {f['ours']['clients']} clients (loaded)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")


def _prefix_panel(ax, w: dict) -> None:
    """(j) Time to first token per turn of a chat about one image: nothing reusable against earlier turns reused."""
    j = w["prefix"]
    turns = range(1, j["turns"] + 1)
    for offset, kind, label, colour in ((-0.2, "none", "nothing reusable", "#aaaaaa"),
                                        (0.2, "reuse", "earlier turns reused", "#1f77b4")):
        ax.bar([t + offset for t in turns], [p["ttft_s"] for p in j["per_turn"][kind]], 0.4, label=label, color=colour)
    ax.axhline(j["short_text_ttft_s"], color="#d62728", linestyle="--", linewidth=1, label="short text request")
    ax.set_xticks(list(turns))
    ax.set_xlabel("turn")
    ax.set_ylabel("s")
    ax.set_title("(j) chat about one image: time to first token", fontsize=9)
    ax.legend(fontsize=7)


def _ratio_panel(ax, w: dict) -> None:
    """Latency ratios, lower is better, each with its target."""
    bars = []
    if w.get("staggered", {}).get("p95_ttft_over_idle"):
        bars.append(("(f) p95 first token,\nloaded / idle", w["staggered"]["p95_ttft_over_idle"], 4))
    if "join" in w:
        bars.append(("(g) join delay,\njoining / idle", w["join"]["ratio"], 2))
    for crowd in w.get("crowd", {}).get("crowds", []):
        bars.append((f"(l) first token beside\n{crowd['long_requests']} long answers / idle", crowd["ratio"], 2))
    x = range(len(bars))
    ax.bar(list(x), [b[1] for b in bars], 0.5, color="#1f77b4")
    for i, (_, value, target) in enumerate(bars):
        ax.plot([i - 0.35, i + 0.35], [target, target], color="#d62728", linewidth=2)
        ax.annotate(f"{value:.2f}x", (i, value), ha="center", va="bottom", fontsize=9, fontweight="bold")
    ax.plot([], [], color="#d62728", linewidth=2, label="target (at most)")
    ax.set_xticks(list(x), [b[0] for b in bars], fontsize=8)
    top = max([b[1] for b in bars] + [b[2] for b in bars] + [1])
    if top > 10:  # a ratio far past its target would flatten the others
        ax.set_yscale("log")
        ax.set_ylim(0.5, top * 2)
    else:
        ax.set_ylim(0, top * 1.25)
    ax.set_ylabel("ratio (x, lower is better)" + (", log scale" if top > 10 else ""))
    ax.set_title("(f, g) latency under load against idle, ours", fontsize=9)
    ax.legend(fontsize=8, loc="upper right")


def _memory_panel(ax, w: dict) -> None:
    h = w["memory"]
    readings = h["readings"]
    ax.bar(range(len(readings)), [r["rss_mb"] for r in readings], 0.5, color="#1f77b4")
    for i, r in enumerate(readings):
        ax.annotate(f"{r['rss_mb']:.0f} MB", (i, r["rss_mb"]), ha="center", va="bottom", fontsize=9)
    first = readings[0]["rss_mb"]
    ax.axhline(first + 300, color="#d62728", linewidth=2, label="bound: first reading + 300 MB")
    ax.set_xticks(range(len(readings)), [f"after {r['requests']:,}\nrequests" for r in readings], fontsize=8)
    ax.set_ylabel("our server's RSS (MB)")
    ax.set_ylim(0, max([r["rss_mb"] for r in readings] + [first + 300]) * 1.2)
    ax.set_title(f"(h) memory: {h['growth_mb']:+.0f} MB", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")


def write_all(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    (out / "results.md").write_text(markdown(results))
    chart(results, out / "chart.png")
