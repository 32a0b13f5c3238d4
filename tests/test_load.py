"""A short run of the load and fault script (bench/load.py) against its own demo server."""

import subprocess
import sys

from conftest import ROOT


def test_short_load_and_fault_run():
    cmd = [sys.executable, "-m", "bench.load", "--requests", "80", "--concurrency", "6", "--max-queue", "4",
           "--duration", "120", "--warmup", "18", "--request-timeout", "60"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    report = done.stdout + done.stderr[-3000:]
    assert done.returncode == 0, report
    assert "failed unexpectedly      0" in done.stdout and "lost responses           0" in done.stdout, report
    assert "result: PASS" in done.stdout
    for kind in ("bad input", "disconnected"):
        assert kind in done.stdout, report


def test_refuses_non_loopback_targets():
    done = subprocess.run([sys.executable, "-m", "bench.load", "--url", "http://10.0.0.1:8080"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "loopback" in done.stderr
