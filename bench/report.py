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

    def row(name, unit, baseline, ours, gain, how, target=None, met=None):
        rows.append({"workload": name, "unit": unit, "baseline": baseline, "ours": ours, "gain": gain,
                     "gain_is": how, "target": target, "met": met})

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
    row(f"our HTTP server's overhead over a direct engine call ({plan.max_tokens}-token answers, one process)", "%", None, o["overhead_pct"], None, "ours only", "<= 5%", o["overhead_pct"] <= 5)
    o = w["overhead_server_process"]
    row("same, against our separate server process (adds variation between processes)", "%",
        None, o["overhead_pct"], None, "ours only")
    return rows


def _fmt(value, unit):
    if value is None:
        return "-"
    if unit == "%":
        return f"{value:.1f}%"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def console_table(rows: list) -> str:
    lines = [f"{'workload':<100} {'unit':>11} {'baseline':>9} {'ours':>9} {'gain':>7}  target  met"]
    for r in rows:
        gain = f"{r['gain']:.2f}x" if r["gain"] else "-"
        met = "-" if r["met"] is None else ("yes" if r["met"] else "NO")
        lines.append(f"{r['workload'][:100]:<100} {r['unit']:>11} {_fmt(r['baseline'], r['unit']):>9} "
                     f"{_fmt(r['ours'], r['unit']):>9} {gain:>7}  {r['target'] or '-':<7} {met}")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    m, plan = results["machine"], results["plan"]
    out = [
        f"Measured {m['date'][:10]} on {m['cpu_model']}, {m['usable_cores']} cores, {m['memory_gb']} GB RAM, "
        f"no GPU; Python {m['python']}, PaddlePaddle {m['paddlepaddle']}, PaddleFormers {m['paddleformers']}. "
        f"Model `{plan['model']}` (random weights, {results.get('parameters', 0):,} parameters), greedy "
        f"decoding, both servers on loopback in one run (`python -m bench{' --quick' if results['quick'] else ''}`). "
        f"Load average before/after: {results.get('load_before')} / {results.get('load_after')}.",
        "",
        "| workload | unit | baseline (tutorial) | ours | gain | target | met |",
        "| --- | --- | ---: | ---: | ---: | --- | --- |",
    ]
    for r in results["summary"]:
        gain = f"{r['gain']:.2f}x ({r['gain_is']})" if r["gain"] else "-"
        met = "-" if r["met"] is None else ("yes" if r["met"] else "**no**")
        out.append(f"| {r['workload']} | {r['unit']} | {_fmt(r['baseline'], r['unit'])} | "
                   f"{_fmt(r['ours'], r['unit'])} | {gain} | {r['target'] or '-'} | {met} |")
    out += ["", "Gain is written so that higher is better: baseline / ours for times, ours / baseline for "
            "throughputs. Medians; the raw figures are in `results.json`."]
    for note in results.get("notes", []):
        out.append(f"- {note}")
    return "\n".join(out) + "\n"


def chart(results: dict, path: Path) -> None:
    """Left: gains over the baseline (higher is better, targets marked). Right: ours-only timings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = results["workloads"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.2), gridspec_kw={"width_ratios": [1.6, 1]})

    c, r, g, s = w["concurrent"], w["repeated_image"], w["large_jpeg"], w["sequential"]
    bars = [  # label, baseline, ours, unit, gain, target
        ("(a) single request, median latency", s["baseline"]["median_latency_s"], s["ours"]["median_latency_s"],
         "s", _ratio(s["baseline"]["median_latency_s"], s["ours"]["median_latency_s"]), None),
        (f"(b) {c['ours']['clients']} concurrent clients, throughput", c["baseline"]["requests_per_s"],
         c["ours"]["requests_per_s"], "req/s", _ratio(c["ours"]["requests_per_s"], c["baseline"]["requests_per_s"]), 3),
        ("(c) repeated image, time to first token", r["baseline"]["median_repeated_s"],
         r["ours"]["median_repeated_s"], "s", _ratio(r["baseline"]["median_repeated_s"],
                                                     r["ours"]["median_repeated_s"]), 2),
        ("(d) large JPEG, end to end", g["baseline"]["median_latency_s"], g["ours"]["median_latency_s"], "s",
         _ratio(g["baseline"]["median_latency_s"], g["ours"]["median_latency_s"]), 4),
        ("(d) large JPEG, intake only", g["intake"]["median_baseline_s"], g["intake"]["median_ours_s"], "s",
         g["intake"]["speedup"], 4),
    ]
    y = list(range(len(bars)))[::-1]
    gains = [b[4] for b in bars]
    left.barh(y, gains, color="#1f77b4", height=0.6)
    left.axvline(1.0, color="#555555", linestyle="--", linewidth=1)
    for yi, (label, base, ours, unit, gain, target) in zip(y, bars):
        left.annotate(f"  {gain:.2f}x  ({base:.3g} -> {ours:.3g} {unit})", (max(gain, target or 0), yi),
                      va="center", fontsize=8)
        if target:
            left.plot([target], [yi], marker="|", markersize=22, color="#d62728", markeredgewidth=2)
    left.plot([], [], marker="|", linestyle="none", markersize=12, color="#d62728", markeredgewidth=2,
              label="target")
    left.set_yticks(y, [b[0] for b in bars], fontsize=9)
    left.set_xlim(0, max(gains + [4]) * 1.45)
    left.set_xlabel("gain over the tutorial's server (x, higher is better; dashed: parity)")
    left.legend(fontsize=8, loc="lower right")

    st, tx, o = w["streaming"]["ours"], w["streaming"]["ours_text_only"], w["overhead"]
    names = ["(e) streamed,\nimage", "(e) streamed,\ntext only", "overhead:\ndirect vs HTTP"]
    first = [st["median_ttft_s"], tx["median_ttft_s"], o["median_direct_s"]]
    total = [st["median_total_s"], tx["median_total_s"], o["median_http_s"]]
    x = range(len(names))
    right.bar([i - 0.2 for i in x], first, 0.4, label="first token / direct engine call", color="#ff7f0e")
    right.bar([i + 0.2 for i in x], total, 0.4, label="whole answer / through HTTP", color="#1f77b4")
    for i, (a, b) in enumerate(zip(first, total)):
        text = f"{100 * a / b:.0f}%" if i < 2 and b else f"{o['overhead_pct']:+.1f}%"
        right.annotate(text, (i, max(a, b)), ha="center", va="bottom", fontsize=9, fontweight="bold")
    right.set_xticks(list(x), names, fontsize=8)
    right.set_ylabel("seconds (ours only)")
    right.set_ylim(0, max(total + first) * 1.35)
    right.legend(fontsize=8, loc="upper left")

    m = results["machine"]
    fig.suptitle(f"Tutorial server vs ours, model {results['plan']['model']}, {m['cpu_model']}, "
                 f"{m['usable_cores']} cores, no GPU, {m['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    (out / "results.md").write_text(markdown(results))
    chart(results, out / "chart.png")
