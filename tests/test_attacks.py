"""The attack harness's short run (python -m bench.attacks --quick): every attack on a demo server of its own,
each held, with its figures written. The figures themselves (latencies, RSS) are printed, not asserted
beyond what "held" means; the full run is `python -m bench.attacks` (docs/security.md, "The attack harness")."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("attacks") / "attacks.json"
    proc = subprocess.run([sys.executable, "-m", "bench.attacks", "--quick", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    return proc, json.loads(out.read_text()) if out.exists() else None


def test_every_attack_held(quick_run):
    proc, results = quick_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    names = [a["name"] for a in results["attacks"]]
    assert names == ["idle", "slowloris", "slow_image", "costly", "json_shapes", "bombs", "video_bombs", "mistakes",
                     "expect", "web", "memory", "hangups", "gateway", "shutdown"]
    assert all(a["held"] and a["checks"] for a in results["attacks"])
    assert "14 of 14 attacks held" in proc.stdout


def test_each_attack_reports_what_was_held(quick_run):
    _, results = quick_run
    attacks = {a["name"]: a for a in results["attacks"]}
    for name, a in attacks.items():
        if name not in ("hangups", "gateway", "shutdown"):  # these run on servers of their own: no probes
            assert a["health"]["n"] >= 1 and a["health"]["max"] < 2.0, name
            assert a["rss_mb"]["before"] > 0 and a["rss_mb"]["after"] > 0, name
    assert attacks["idle"]["figures"]["closed by the server after"].startswith("300 of 300")
    assert attacks["slow_image"]["by_status"] == {"400": 8}
    assert attacks["costly"]["by_status"] == {"400": 3}
    assert attacks["json_shapes"]["by_status"] == {"400": 2}
    assert attacks["video_bombs"]["by_status"] == {"400": 2}
    assert attacks["mistakes"]["by_status"].get("500") is None
    assert attacks["expect"]["by_status"] == {"413": 1}
    assert attacks["web"]["by_status"] == {"415": 2, "404": 1}
    assert attacks["memory"]["by_status"] == {"200": 4}
    assert attacks["hangups"]["checks"] and attacks["hangups"]["held"]
    assert attacks["gateway"]["by_status"] == {"200": 8, "502": 1}
    assert attacks["shutdown"]["figures"]["exit status"] == 0
