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
    row(f"(c) {plan.repeat_questions} questions about one image: time to first token of questions 2-"
        f"{plan.repeat_questions} (max_tokens=1, both)", "s",
        r["baseline"]["median_repeated_s"], r["ours"]["median_repeated_s"], gain, "baseline / ours", ">= 2x",
        gain >= 2)
    row("(c) same, ours streamed: time to first streamed token, questions 2-5 (first question: cold)", "s",
        r["baseline"]["median_repeated_s"], r["ours_stream"]["median_repeated_s"],
        _ratio(r["baseline"]["median_repeated_s"], r["ours_stream"]["median_repeated_s"]), "baseline / ours")
    g = w["large_jpeg"]
    width, height = plan.large_size
    gain = _ratio(g["baseline"]["median_latency_s"], g["ours"]["median_latency_s"])
    row(f"(d) {width}x{height} JPEG, end to end with max_tokens=1", "s",
        g["baseline"]["median_latency_s"], g["ours"]["median_latency_s"], gain, "baseline / ours", ">= 4x",
        gain >= 4)
    i = g["intake"]
    row(f"(d) {width}x{height} JPEG, intake only: request bytes -> model input tensors (in-process)", "s",
        i["median_baseline_s"], i["median_ours_s"], i["speedup"], "baseline / ours", ">= 4x", i["speedup"] >= 4)
    for key, what in (("ours", "image + question"), ("ours_text_only", "text-only question")):
        share = w["streaming"][key]["ttft_share_pct"]
        row(f"(e) streamed {plan.stream_tokens}-token answer to a {what}: time to first token / full answer "
            "time (ours)", "%", None, share, None, "ours only", "<= 10%", share <= 10)
    o = w["overhead"]
    row(f"our server's overhead over a direct engine call ({plan.max_tokens}-token answers)", "%",
        None, o["overhead_pct"], None, "ours only", "<= 5%", o["overhead_pct"] <= 5)
    return rows


def _fmt(value, unit):
    if value is None:
        return "-"
    if unit == "%":
        return f"{value:.1f}%"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def console_table(rows: list) -> str:
    lines = [f"{'workload':<96} {'unit':>11} {'baseline':>9} {'ours':>9} {'gain':>7}  target  met"]
    for r in rows:
        gain = f"{r['gain']:.2f}x" if r["gain"] else "-"
        met = "-" if r["met"] is None else ("yes" if r["met"] else "NO")
        lines.append(f"{r['workload'][:96]:<96} {r['unit']:>11} {_fmt(r['baseline'], r['unit']):>9} "
                     f"{_fmt(r['ours'], r['unit']):>9} {gain:>7}  {r['target'] or '-':<7} {met}")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    m, plan = results["machine"], results["plan"]
    out = [
        f"Measured {m['date'][:10]} on {m['cpu_model']}, {m['usable_cores']} cores, {m['memory_gb']} GB RAM, "
        f"no GPU; Python {m['python']}, PaddlePaddle {m['paddlepaddle']}, PaddleFormers {m['paddleformers']}. "
        f"Model `{plan['model']}` (random weights, {results.get('parameters', '?')} parameters), greedy "
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = results["workloads"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), gridspec_kw={"width_ratios": [3, 1.2, 1.6]})
    colours = {"baseline": "#9e9e9e", "ours": "#1f77b4"}

    # seconds, lower is better
    labels = ["(a) single request\nmedian latency", "(c) repeated image\ntime to first token",
              "(d) large JPEG\nend to end", "(d) large JPEG\nintake only"]
    base = [w["sequential"]["baseline"]["median_latency_s"], w["repeated_image"]["baseline"]["median_repeated_s"],
            w["large_jpeg"]["baseline"]["median_latency_s"], w["large_jpeg"]["intake"]["median_baseline_s"]]
    ours = [w["sequential"]["ours"]["median_latency_s"], w["repeated_image"]["ours"]["median_repeated_s"],
            w["large_jpeg"]["ours"]["median_latency_s"], w["large_jpeg"]["intake"]["median_ours_s"]]
    _bars(axes[0], labels, base, ours, colours, "seconds (lower is better)", speedup=True)

    c = w["concurrent"]
    _bars(axes[1], [f"(b) {c['ours']['clients']} clients\nrequests/s"], [c["baseline"]["requests_per_s"]],
          [c["ours"]["requests_per_s"]], colours, "requests/s (higher is better)", speedup=False)

    st, tx, o = w["streaming"]["ours"], w["streaming"]["ours_text_only"], w["overhead"]
    ax = axes[2]
    names = ["(e) streamed,\nimage", "(e) streamed,\ntext only", "overhead:\ndirect vs HTTP"]
    first = [st["median_ttft_s"], tx["median_ttft_s"], o["median_direct_s"]]
    total = [st["median_total_s"], tx["median_total_s"], o["median_http_s"]]
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], first, 0.4, label="first token / direct engine call", color="#ff7f0e")
    ax.bar([i + 0.2 for i in x], total, 0.4, label="whole answer / through HTTP", color=colours["ours"])
    for i, (a, b) in enumerate(zip(first, total)):
        share = 100 * a / b if b else 0
        text = f"{share:.0f}%" if i < 2 else f"{o['overhead_pct']:+.0f}%"
        ax.annotate(text, (i, max(a, b)), ha="center", va="bottom", fontsize=9, fontweight="bold")
    ax.set_xticks(list(x), names, fontsize=8)
    ax.set_ylabel("seconds (ours only)")
    ax.margins(y=0.15)
    ax.legend(fontsize=8)

    m = results["machine"]
    fig.suptitle(f"Tutorial server (grey) vs ours (blue), model {results['plan']['model']}, "
                 f"{m['cpu_model']}, {m['usable_cores']} cores, {m['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bars(ax, labels, base, ours, colours, ylabel, *, speedup):
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], base, 0.4, label="baseline (tutorial)", color=colours["baseline"])
    ax.bar([i + 0.2 for i in x], ours, 0.4, label="ours", color=colours["ours"])
    for i, (b, o) in enumerate(zip(base, ours)):
        ratio = (b / o if speedup else o / b) if b and o else 0
        ax.annotate(f"{ratio:.1f}x", (i, max(b, o)), ha="center", va="bottom", fontsize=9, fontweight="bold")
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.margins(y=0.15)
    ax.legend(fontsize=8)


def write_all(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    (out / "results.md").write_text(markdown(results))
    chart(results, out / "chart.png")
