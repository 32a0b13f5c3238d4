"""A first start without surprises: the libraries' known noise is silenced (our own warnings stay), and the 503s
of a normal start-up (the model still loading) are not logged as errors."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import replace

from conftest import ROOT
from fake_engine import FakeEngine
from serving.web.app import create_app

NOISE = ("PyTorch was not found", "No ccache found", "Setuptools is replacing distutils",
         "Due to potential compatibility issues between PaddlePaddle and PyTorch",
         "is now loaded as a fast processor")


def test_library_noise_is_silenced_and_our_warnings_stay():
    code = (
        "import logging, warnings\n"
        "import serving\n"
        "import paddle, paddleformers.transformers\n"
        "import distutils.core\n"  # setuptools' shim speaks on this import
        "from serving.config import Settings\n"
        "from serving.model.loader import load_model\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "load_model(Settings(model='demo'))\n"
        "warnings.warn('our own warning stays')\n"
        "logging.getLogger('PaddleFormers').warning('a PaddleFormers warning of another kind stays')\n"
    )
    env = {k: os.environ[k] for k in ("QWENVL_CACHE", "HOME", "PATH", "VIRTUAL_ENV", "TMPDIR") if k in os.environ}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(env, PYTHONUNBUFFERED="1"))  # no PYTHONWARNINGS or pytest filters: as api.py runs
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    for noise in NOISE:
        assert noise not in output, noise
    assert "our own warning stays" in output
    assert "a PaddleFormers warning of another kind stays" in output
    assert "serving the DEMO model" in output  # our own log lines are kept


def _levels(caplog, path):
    return [r.levelno for r in caplog.records if r.name == "serving.web.app" and f" {path} status=" in r.getMessage()]


def test_loading_503s_are_info_not_errors(settings, caplog):
    client = create_app(settings, None).test_client()  # no engine yet: the model is loading
    with caplog.at_level(logging.DEBUG, logger="serving.web.app"):
        assert client.get("/health").status_code == 503
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and r.json["error"]["code"] == "model_loading"
    assert _levels(caplog, "/health") == [logging.DEBUG]  # a poll, as every /health poll is
    assert _levels(caplog, "/v1/chat/completions") == [logging.INFO]


def test_an_engine_that_cannot_serve_is_still_an_error(settings, caplog):
    client = create_app(replace(settings), FakeEngine(health=(False, "the model worker stopped"))).test_client()
    with caplog.at_level(logging.INFO, logger="serving.web.app"):
        assert client.get("/health").status_code == 503
    assert _levels(caplog, "/health") == [logging.ERROR]


def test_a_full_disk_at_first_start_is_one_line_and_exit_status_2(settings, tmp_path, monkeypatch, caplog):
    """The demo checkpoint is built at first start; on a full disk that was a 20-line traceback and exit status
    1. Now one line naming the cause and what to do, and exit status 2, as docs/backends.md says of start-up errors."""
    import errno
    import threading

    from serving.model import demo
    from serving.web.server import load_in_background

    def full(folder, size):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "model-00001-of-00002.safetensors"))

    monkeypatch.setenv("QWENVL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo, "build_checkpoint", full)
    codes, done = [], threading.Event()
    caplog.set_level("INFO")
    app = create_app(replace(settings, model="demo"))
    load_in_background(app, replace(settings, model="demo"), on_failure=lambda code: (codes.append(code), done.set()))
    assert done.wait(60)
    assert codes == [2]
    errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None, [r.getMessage() for r in errors]
    assert "No space left on device" in errors[0].getMessage() and "QWENVL_CACHE" in errors[0].getMessage()
    assert list((tmp_path / "cache").iterdir()) == []  # the half-built folder was removed
