"""The benchmark command works: `python -m bench --quick` runs both servers and writes its outputs.

No timing is asserted (CI machines vary); only that every workload ran and produced figures.
Outputs go to a temporary folder, never to docs/bench.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT))

from bench import baseline_server  # noqa: E402
from bench.workloads import ImageFactory, tutorial_payload  # noqa: E402


def positive(value) -> bool:
    return isinstance(value, (int, float)) and value > 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_quick_run_writes_all_outputs(quick_run):
    out, stdout = quick_run
    results = json.loads((out / "results.json").read_text())
    assert results["quick"] is True and results["plan"]["model"] == "demo"
    w = results["workloads"]
    for name in ("sequential", "concurrent", "large_jpeg"):
        for kind in ("baseline", "ours"):
            assert positive(w[name][kind]["median_latency_s"]), (name, kind)
            assert positive(w[name][kind]["requests_per_s"]), (name, kind)
            assert all(n > 0 for n in w[name][kind]["completion_tokens"]), (name, kind)
    for kind in ("baseline", "ours"):
        assert positive(w["concurrent"][kind]["completion_tokens_per_s"])
    assert w["concurrent"]["ours"]["clients"] == 8
    for kind in ("baseline", "ours", "ours_stream"):
        r = w["repeated_image"][kind]
        assert r["n"] == 5 and positive(r["first_s"]) and positive(r["median_repeated_s"]), kind
    intake = w["large_jpeg"]["intake"]
    assert positive(intake["median_baseline_s"]) and positive(intake["median_ours_s"])
    for key in ("ours", "ours_text_only"):
        st = w["streaming"][key]
        assert positive(st["median_ttft_s"]) and st["median_ttft_s"] <= st["median_total_s"], key
        assert all(n > 0 for n in st["completion_tokens"]), key
    for key in ("overhead", "overhead_server_process"):
        o = w[key]
        assert o["n"] == 2 and positive(o["median_direct_s"]) and positive(o["median_http_s"]), key
    for section in ("staggered", "join", "memory", "gateway", "structured"):  # issues 9, 10, 17's sections ride along
        assert section in w, section
    j = w["structured"]  # (j): JSON-schema rows against free rows, and a first compile's time to first token
    assert positive(j["free_decode_tokens_per_s"]) and positive(j["constrained_decode_tokens_per_s"])
    assert positive(j["new_schema_ttft_ms"]) and positive(j["compile_ms"])
    g = w["gateway"]  # (i): our gateway in front of an upstream of ours, against the upstream directly
    assert g["same_greedy_answer"] is True and g["plan"]["model"] == "demo"
    assert positive(g["one_client"]["direct_median_s"]) and positive(g["one_client"]["gateway_median_s"])
    assert positive(g["eight_clients"]["direct_requests_per_s"]) and positive(g["eight_clients"]["gateway_requests_per_s"])
    assert [r["target"] for r in results["summary"] if r["workload"].startswith("(i) gateway overhead")] == ["<= 3%"] * 2
    m = results["machine"]
    assert m["cpu_model"] and positive(m["logical_cores"]) and m["paddlepaddle"] and m["date"]
    assert len(results["summary"]) >= 10
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text()
    assert "| workload |" in table and "concurrent clients" in table
    assert "concurrent clients" in stdout  # the console table


@pytest.fixture(scope="module")
def new_sections_run(tmp_path_factory):
    """Issue 9's sections alone, tiny: 2 clients, short answers, 30 mixed requests for the memory reading."""
    out = tmp_path_factory.mktemp("bench-new")
    cmd = [sys.executable, "-m", "bench", "--quick", "--only", "staggered,join,memory", "--out", str(out),
           "--clients", "2", "--requests-per-client", "4", "--token-mix", "4,8", "--idle-repeats", "1",
           "--join-repeats", "1", "--join-long-tokens", "256", "--join-after", "0.05",
           "--memory-checkpoint", "10", "--memory-requests", "30", "--memory-clients", "4"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), out, proc.stdout


def test_staggered_clients_on_both_servers(new_sections_run):
    results, _, _ = new_sections_run
    assert results["sections"] == ["staggered", "join", "memory"]
    f = results["workloads"]["staggered"]
    for kind in ("baseline", "ours"):
        r = f[kind]
        assert r["clients"] == 2 and r["n"] == 8, kind
        assert positive(r["requests_per_s"]) and positive(r["completion_tokens_per_s"]), kind
        assert 0 < r["ttft_s"]["p50"] <= r["ttft_s"]["p95"], kind
        mix = r["requests"]
        assert sum(q["image"] for q in mix) == 4 and {q["max_tokens"] for q in mix} == {4, 8}, kind
        assert all(q["completion_tokens"] > 0 and 0 < q["first_token_s"] <= q["latency_s"] for q in mix), kind
    assert sum(q["stream"] for q in f["ours"]["requests"]) == 4
    assert not any(q["stream"] for q in f["baseline"]["requests"])  # the tutorial's server cannot stream
    assert f["baseline"]["streamed_ttft_s"] is None and 0 < f["ours"]["streamed_ttft_s"]["p95"]
    assert positive(f["idle"]["ttft_s"]["p95"]) and f["idle"]["n"] == 2
    assert positive(f["throughput_ratio"]) and positive(f["p95_ttft_over_idle"])


def test_join_delay_and_memory(new_sections_run):
    results, _, _ = new_sections_run
    g = results["workloads"]["join"]
    assert positive(g["median_idle_ttft_s"]) and positive(g["median_joined_ttft_s"]) and positive(g["ratio"])
    assert g["long_running_when_sent"] and g["joined"][0]["long_tokens"] > 0
    h = results["workloads"]["memory"]
    assert [r["requests"] for r in h["readings"]] == [10, 30]
    assert all(positive(r["rss_mb"]) for r in h["readings"])
    assert h["growth_mb"] == round(h["readings"][1]["rss_mb"] - h["readings"][0]["rss_mb"], 1)
    assert not h["problems"] and h["outcomes"].get("ok", 0) > 0


def test_new_sections_report_targets(new_sections_run):
    results, out, stdout = new_sections_run
    targets = {r["target"]: r for r in results["summary"] if r["target"]}
    assert set(targets) == {">= 3x", "<= 4x", "<= 2x", "<= 300 MB"}
    assert all(isinstance(r["met"], bool) for r in targets.values())
    for text in ("back to back", "join delay", "RSS growth"):
        assert text in stdout and text in (out / "results.md").read_text()
    assert "PASS" in stdout or "FAIL" in stdout
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_baseline_keeps_the_tutorial_image_path(tmp_path):
    """The baseline writes each image as PNG under its folder and hands on the file's path."""
    image = ImageFactory(64, 48, seed=3).next()
    body = tutorial_payload(image, "What is this?", max_tokens=4)
    messages = baseline_server.process_request_data(body, save_dir=str(tmp_path), verbose=False)
    parts = messages[0]["content"]
    assert parts[1] == {"type": "text", "text": "What is this?"}
    path = Path(parts[0]["image"])
    assert path.parent == tmp_path and path.suffix == ".png" and path.exists()
    from PIL import Image

    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (64, 48)


def test_speedups_against_the_library_in_one_process(tmp_path):
    """python -m bench.speedups --quick: each measurement on both sides, figures and speed-ups written."""
    out = tmp_path / "speedups.json"
    proc = subprocess.run([sys.executable, "-m", "bench.speedups", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["plan"]["model"] == "demo" and len(result["rows"]) == 4
    for row in result["rows"]:
        assert positive(row["library_ms"]) and positive(row["ours_ms"]), row
        # The speed-up comes from the unrounded times; the times are printed to 0.1 ms, so the ratio
        # of the printed times may differ from it by as much as that rounding allows.
        library, ours = row["library_ms"], row["ours_ms"]
        low, high = (library - 0.05) / (ours + 0.05), (library + 0.05) / max(ours - 0.05, 1e-9)
        assert low - 0.005 <= row["speedup"] <= high + 0.005, row
    assert "vision tower" in proc.stdout and "decoding step, 8 rows" in proc.stdout


def test_prefix_section_compares_reuse_with_nothing_reusable(tmp_path):
    """(j): a chat about one image, the earlier turns reused against nothing reusable (no timing asserted)."""
    cmd = [sys.executable, "-m", "bench", "--quick", "--only", "prefix", "--out", str(tmp_path),
           "--prefix-chats", "1", "--prefix-turns", "3", "--prefix-tokens", "4"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    j = results["workloads"]["prefix"]
    none, reuse = j["per_turn"]["none"], j["per_turn"]["reuse"]
    assert len(none) == len(reuse) == 3 and positive(j["short_text_ttft_s"])
    assert all(t["cached_tokens"] == 0 for t in none)  # a changed system message: nothing to reuse
    assert reuse[0]["cached_tokens"] == 0
    for turn in (1, 2):  # answers in whole words come back as the tokens written: all but the last are reused
        assert reuse[turn]["cached_tokens"] >= reuse[turn - 1]["prompt_tokens"] + 4 - 1
        assert reuse[turn]["prefilled_tokens"] < none[turn]["prefilled_tokens"]
        assert all(positive(t["ttft_s"]) for t in (none[turn], reuse[turn]))
    free = j["per_turn"]["reuse_random_answers"]
    assert free[1]["cached_tokens"] >= free[0]["prompt_tokens"]  # the demo's own answers: at least the last prompt
    m = j["memory"]
    assert [r["conversations"] for r in m["readings"]][0] == 0 and m["readings"][-1]["conversations"] == m["conversations"]
    assert m["prefix_cache_capacity_mb"] > 0 and m["bound_mb"] == m["prefix_cache_capacity_mb"] + 100
    assert all(positive(r["rss_mb"]) for r in m["readings"])
    assert [r["target"] for r in results["summary"] if r["target"]] == [">= 3x", "<= 1.5x",
                                                                       f"<= {m['bound_mb']:.0f} MB (PREFIX_CACHE_MB + 100)"]
    assert "(j) turn 3:" in proc.stdout


def test_real_size_bound_counts_the_language_model_weights_once():
    """bench.real's batch-1 bound: every decoder layer, the final norm and the tied lm_head (the
    embedding matrix) per token; the vision tower is not read while decoding."""
    from bench.real import language_model_bytes_per_token
    from serving.model import gpu

    three_b = {**gpu.KNOWN_CONFIGS["3B"], "vision_config": gpu._VISION}
    text_only = {**three_b, "vision_config": {**gpu._VISION, "depth": 0}}
    merger_and_patch = gpu.parameter_count(text_only) - language_model_bytes_per_token(three_b, 1)
    assert language_model_bytes_per_token(three_b, 4) == 12_343_754_752  # 3,085,938,688 float32 weights
    assert merger_and_patch == 38_213_888  # what is left of the count is the vision merger and patch embedding


def test_crowd_section_times_a_short_request_beside_long_answers(tmp_path):
    """(l): a short request's first token beside long answers that fill the KV budget (3) and every row (9);
    its own server with MAX_BATCH_TOKENS at 4x the long answers' max_tokens (no timing asserted)."""
    cmd = [sys.executable, "-m", "bench", "--quick", "--only", "crowd", "--out", str(tmp_path),
           "--crowd-long-counts", "3,9", "--crowd-long-tokens", "256", "--crowd-repeats", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    c = json.loads((tmp_path / "results.json").read_text())["workloads"]["crowd"]
    assert c["max_batch_tokens"] == 1024 and positive(c["median_idle_ttft_s"])
    assert [crowd["long_requests"] for crowd in c["crowds"]] == [3, 9]
    for crowd in c["crowds"]:
        assert positive(crowd["median_short_ttft_s"]) and crowd["min_long_tokens"] > 0
        assert crowd["longs_running"], "the short request waited for a whole long answer"
    assert c["crowds"][1]["runs"][0]["preemptions"] >= 1  # nine long answers do not fit the budget together
    assert "(l) beside 9 long answers" in proc.stdout
