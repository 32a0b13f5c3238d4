"""serving.deploy.preflight: every check passes on the repo and fails on a folder crafted to break it;
the deployment rehearsal runs end to end and leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from serving.deploy import preflight as pf
from serving.model.demo import demo_path
from serving.deploy.preflight import FAIL, PASS, WARN, Context

# Built from pieces so that this file itself holds no secret-looking string.
FAKE_TOKEN = "3f9a" + "c0e1b7d4a6f8e9c0" + "b1a2d3e4f5a6b7c8d9e0"
COPY_IGNORE = shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", ".benchmarks", "artifacts",
                                     ".ipynb_checkpoints")


@pytest.fixture()
def folder(tmp_path):
    """A copy of the repo as it would be deployed, to break on purpose."""
    target = tmp_path / "project"
    shutil.copytree(ROOT, target, ignore=COPY_IGNORE)
    return target


def ctx(root, **kw) -> Context:
    kw.setdefault("model", "demo")
    return Context(Path(root), **kw)


# --------------------------------------------------------------------------- the repo itself


@pytest.mark.parametrize("check", [
    pf.check_ascii_names, pf.check_build_env, pf.check_port, pf.check_dependencies, pf.check_secrets,
    pf.check_large_files, pf.check_paddle, pf.check_model, pf.check_folder_size, pf.check_api_sync,
])
def test_check_passes_on_the_repo(check):
    result = check(ctx(ROOT))
    assert result.status == PASS, result


def test_torch_and_leftover_checks_on_the_repo():
    assert pf.check_no_torch(ctx(ROOT)).status == PASS
    assert pf.check_leftovers(ctx(ROOT)).status != FAIL  # caches from test runs are only a warning


def test_build_env_was_run_here():
    """This environment was built by build_env.sh, so its dry run has nothing left to do."""
    result = pf.check_build_env_run(ctx(ROOT))
    assert result.status == PASS, result


def test_default_model_is_the_hub_id(monkeypatch):
    monkeypatch.delenv("MODEL", raising=False)
    result = pf.check_model(Context(ROOT))
    assert result.status == PASS and "Qwen/Qwen2.5-VL-3B-Instruct" in result.detail


# --------------------------------------------------------------------------- crafted failures


def test_non_ascii_names_are_listed(folder):
    (folder / "数据").mkdir()
    (folder / "数据" / "说明.txt").write_text("x")
    (folder / "notebooks" / "副本.ipynb").write_text("{}")
    result = pf.check_ascii_names(ctx(folder))
    assert result.status == FAIL
    assert "2 name(s)" in result.detail and "数据" in result.detail and "notebooks/副本.ipynb" in result.detail
    assert "说明" not in result.detail  # the folder is named, not everything inside it
    assert "deploying" in result.fix


def test_broken_build_env(folder):
    script = folder / "build_env.sh"
    script.write_text(script.read_text() + "\nif [ -z \"$X\" ]; then\n  echo broken\n")
    result = pf.check_build_env(ctx(folder))
    assert result.status == FAIL and "bash -n" in result.detail and "syntax" in result.detail

    script.write_bytes(b"#!/usr/bin/env bash\r\necho hi\r\n")
    result = pf.check_build_env(ctx(folder))
    assert result.status == FAIL and "CRLF" in result.detail

    script.unlink()
    assert pf.check_build_env(ctx(folder)).status == FAIL


def test_api_binding_127_0_0_1_port_5000(folder):
    (folder / "api.py").write_text(
        "from flask import Flask\napp = Flask(__name__)\n\n"
        "if __name__ == '__main__':\n    app.run(host='127.0.0.1', port=5000)\n")
    result = pf.check_port(ctx(folder))
    assert result.status == FAIL
    assert "host='127.0.0.1'" in result.detail and "port=5000" in result.detail
    assert "8080" in result.fix


@pytest.mark.parametrize("source, problem", [
    ("app.run()\n", "Flask's default is 127.0.0.1:5000"),
    ("from serving.config import load_settings\ns = load_settings(['--port', '5000'])\n", "'--port', '5000'"),
    ("import os\nos.environ['PORT'] = '8000'\n", "['PORT'] = '8000'"),
    ("import os\nos.environ.setdefault('HOST', 'localhost')\n", "setdefault('HOST', 'localhost')"),
    ("app.run('127.0.0.1', 8080)\n", "run('127.0.0.1', ...)"),
])
def test_api_binding_forms(source, problem):
    assert any(problem in p for p in pf.api_binding_problems(source)), pf.api_binding_problems(source)


def test_api_binding_forms_that_are_fine():
    assert pf.api_binding_problems("app.run(host='0.0.0.0', port=8080)\n") == []
    assert pf.api_binding_problems((ROOT / "api.py").read_text()) == []


def test_settings_default_off_8080(folder):
    config = folder / "serving" / "config.py"
    config.write_text(config.read_text().replace("default=8080", "default=5000"))
    result = pf.check_port(ctx(folder))
    assert result.status == FAIL and "Settings.port defaults to 5000" in result.detail


def test_api_out_of_sync_with_its_notebook(folder):
    (folder / "api.py").write_text((folder / "api.py").read_text() + "\nprint('edited by hand')\n")
    result = pf.check_api_sync(ctx(folder))
    assert result.status == FAIL and "differs" in result.detail and "edited by hand" in result.detail
    assert "python -m serving.notebook.export" in result.fix

    (folder / "serving" / "notebook" / "export.py").unlink()
    result = pf.check_api_sync(ctx(folder))
    assert result.status == FAIL and "exporter missing" in result.detail


def test_api_sync_works_without_nbformat(tmp_path):
    """Right after `bash build_env.sh` (no --dev: no nbformat, no nbconvert), as the deployment guide runs it."""
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    python = str(bare / "bin" / "python")
    assert subprocess.run([python, "-c", "import nbformat"], capture_output=True).returncode != 0
    result = pf.check_api_sync(ctx(ROOT, python=python))
    assert result.status == PASS, result


def test_api_sync_names_a_missing_module(folder):
    export = folder / "serving" / "notebook" / "export.py"
    export.write_text(export.read_text().replace("import argparse\n", "import argparse\nimport no_such_module_here\n", 1))
    result = pf.check_api_sync(ctx(folder))
    assert result.status == FAIL and "'no_such_module_here' is not installed" in result.detail
    assert "differs" not in result.detail and "build_env.sh" in result.fix


def test_token_in_a_file(folder):
    (folder / "notes.txt").write_text("deploy notes\nAISTUDIO_ACCESS_TOKEN=" + FAKE_TOKEN + "\n")
    nb = json.loads((folder / "notebooks" / "04_serve_api.ipynb").read_text())
    nb["cells"][0]["source"] = ['headers = {"Authorization": "Bearer ' + FAKE_TOKEN + '"}\n']
    (folder / "notebooks" / "04_serve_api.ipynb").write_text(json.dumps(nb, indent=1))
    (folder / "client.py").write_text('client = OpenAI(api_key="sk-' + FAKE_TOKEN + '")\n')
    (folder / ".env").write_text("X=1\n")
    result = pf.check_secrets(ctx(folder))
    assert result.status == FAIL
    assert "notes.txt:2 AISTUDIO_ACCESS_TOKEN value" in result.detail
    assert "notebooks/04_serve_api.ipynb" in result.detail and "bearer token" in result.detail
    assert "client.py:1" in result.detail and ".env (a credentials file)" in result.detail
    assert FAKE_TOKEN not in result.detail  # masked
    assert "revoke" in result.fix


@pytest.mark.parametrize("line", [
    "Authorization: Bearer <key>",
    "python test_connection.py --api-key <access token>",
    "API_KEY=...",
    "api_key = settings.api_key[0]",
    "env = dict(os.environ, API_KEY=API_KEY)",
    '"pad_token": "<|endoftext|>"',
    "max_tokens = 4096",
])
def test_placeholders_are_not_secrets(line):
    assert pf.find_secrets(line) == []


def _sparse(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)


def test_big_safetensors_leftover(folder):
    _sparse(folder / "old_run" / "model-00001-of-00002.safetensors", 60 * 1024 ** 2)
    (folder / "images").mkdir()
    (folder / "images" / "upload_1.jpg").write_bytes(b"\xff\xd8\xff")
    (folder / "notebooks" / ".ipynb_checkpoints").mkdir()
    leftovers = pf.check_leftovers(ctx(folder))
    assert leftovers.status == FAIL and "old_run/model-00001-of-00002.safetensors (60.0 MiB)" in leftovers.detail
    large = pf.check_large_files(ctx(folder))
    assert large.status == FAIL and "old_run/model-00001-of-00002.safetensors" in large.detail

    (folder / "old_run" / "model-00001-of-00002.safetensors").unlink()
    leftovers = pf.check_leftovers(ctx(folder))
    assert leftovers.status == WARN
    assert "images/upload_1.jpg" in leftovers.detail and "notebooks/.ipynb_checkpoints" in leftovers.detail


def test_stray_wheels_and_archives(folder):
    """A wheel or tarball would ship with every deployment; packages come from PyPI through requirements.txt."""
    assert not list(ROOT.glob("*.whl")), "the repository itself ships a wheel"
    in_repo = pf.check_leftovers(ctx(ROOT))
    assert "wheel(s)/archive(s)" not in in_repo.detail, in_repo
    _sparse(folder / "py_spy-0.4.3-py2.py3-none-manylinux1_x86_64.whl", 3 * 1024 ** 2)
    (folder / "backup").mkdir()
    (folder / "backup" / "notebooks.tar.gz").write_bytes(b"\x1f\x8b")
    (folder / "upload.zip").write_bytes(b"PK")
    result = pf.check_leftovers(ctx(folder))
    assert result.status == WARN, result
    assert "3 wheel(s)/archive(s)" in result.detail
    for name in ("py_spy-0.4.3-py2.py3-none-manylinux1_x86_64.whl (3.0 MiB)", "backup/notebooks.tar.gz", "upload.zip"):
        assert name in result.detail
    assert "PyPI" in result.fix
    # A test tool's cache of .gz files is one cache, not archives; one meant to ship is not flagged.
    (folder / ".hypothesis" / "unicode_data").mkdir(parents=True, exist_ok=True)
    (folder / ".hypothesis" / "unicode_data" / "charmap.json.gz").write_bytes(b"\x1f\x8b")
    result = pf.check_leftovers(ctx(folder))
    assert "3 wheel(s)/archive(s)" in result.detail and ".hypothesis" in result.detail.split("caches:")[1]
    assert "upload.zip" not in pf.check_leftovers(ctx(folder, allow=("upload.zip",))).detail


def test_virtualenv_in_the_folder(folder):
    (folder / ".venv").mkdir()
    (folder / ".venv" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    result = pf.check_leftovers(ctx(folder))
    assert result.status == FAIL and "virtual environments: .venv" in result.detail


def test_weights_meant_to_ship(folder):
    """The model folder the service is told to load is not a leftover; neither is an --allow pattern."""
    model = folder / "models" / "demo-ckpt"
    shutil.copytree(demo_path("demo"), model)
    context = Context(folder, model="models/demo-ckpt")
    assert pf.check_leftovers(context).status != FAIL
    result = pf.check_model(context)
    assert result.status == PASS and "inside the folder" in result.detail
    _sparse(folder / "assets" / "big.bin", 60 * 1024 ** 2)
    assert pf.check_large_files(ctx(folder)).status == FAIL
    assert pf.check_large_files(ctx(folder, allow=("assets/*",))).status == PASS
    assert pf.check_leftovers(Context(folder, model="models/demo-ckpt", allow=("assets",))).status != FAIL


def test_torch_import_in_a_serving_module(folder):
    engine = folder / "serving" / "engines" / "builtin" / "engine.py"
    engine.write_text(engine.read_text() + "\n\ndef _helper():\n    import torch\n    return torch\n")
    result = pf.check_no_torch(ctx(folder))
    assert result.status == FAIL and "serving/engines/builtin/engine.py:" in result.detail and "imports torch" in result.detail
    assert "PaddlePaddle" in result.fix


def test_torch_in_requirements(folder):
    (folder / "requirements.txt").write_text((folder / "requirements.txt").read_text() + "torch==2.5.1\n")
    result = pf.check_no_torch(ctx(folder))
    assert result.status == FAIL and "requirements.txt" in result.detail and "torch==2.5.1" in result.detail


def test_dependency_missing_from_requirements(folder):
    app = folder / "serving" / "web" / "app.py"
    app.write_text(app.read_text() + "\n\ndef _extra():\n    import pytest\n    import surely_not_installed_pkg\n"
                   "    try:\n        import another_missing_one\n    except ImportError:\n        pass\n")
    result = pf.check_dependencies(ctx(folder))
    assert result.status == FAIL
    assert "surely_not_installed_pkg (serving/web/app.py:" in result.detail
    assert "pytest from pytest" in result.detail  # installed here, but only by requirements-dev.txt
    assert "another_missing_one" not in result.detail  # optional: guarded by except ImportError


def test_paddle_check_without_paddle(folder, tmp_path):
    """A Python without PaddlePaddle: fine when build_env.sh installs 3.3+, a failure when it pins older."""
    venv = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    bare = str(venv / "bin" / "python")
    result = pf.check_paddle(ctx(folder, python=bare))
    assert result.status == WARN and "build_env.sh installs 3.3.1" in result.detail
    script = folder / "build_env.sh"
    script.write_text(script.read_text().replace('PADDLE_VERSION="3.3.1"', 'PADDLE_VERSION="3.1.0"'))
    result = pf.check_paddle(ctx(folder, python=bare))
    assert result.status == FAIL and "PADDLE_VERSION=3.1.0" in result.detail


def test_model_checks(folder, tmp_path):
    assert pf.check_model(ctx(folder, model="Qwen/Qwen2.5-VL-7B-Instruct", hub="modelscope")).status == PASS
    assert pf.check_model(ctx(folder, model="Qwen/Qwen2.5-VL-7B-Instruct", hub="nowhere")).status == FAIL
    missing = pf.check_model(ctx(folder, model="/no/such/Qwen2.5-VL"))
    assert missing.status == FAIL and "neither a folder" in missing.detail

    outside = tmp_path / "outside-ckpt"
    shutil.copytree(demo_path("demo"), outside)
    result = pf.check_model(ctx(folder, model=str(outside), load=True))
    assert result.status == WARN and "outside the folder" in result.detail and "loads (" in result.detail

    shard = next(outside.glob("model-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-10])
    result = pf.check_model(ctx(folder, model=str(outside)))
    assert result.status == FAIL and "incomplete" in result.detail


def test_folder_size_warns(folder, monkeypatch):
    monkeypatch.setattr("serving.deploy.checks.files.FOLDER_WARN_BYTES", 1024)  # where the check reads it
    result = pf.check_folder_size(ctx(folder))
    assert result.status == WARN and "serving" in result.detail


def test_a_check_that_crashes_is_a_failure_not_a_crash(folder):
    def broken(_ctx):
        raise RuntimeError("boom")

    results = pf.run_checks(ctx(folder), checks=(broken, pf.check_ascii_names))
    assert [r.status for r in results] == [FAIL, PASS] and "boom" in results[0].detail


# --------------------------------------------------------------------------- the command


def test_cli_table_and_exit_status(folder):
    (folder / "build_env.sh").write_text("if then\n")
    (folder / "数据.txt").write_text("x")
    done = subprocess.run([sys.executable, "-m", "serving.deploy.preflight", "--root", str(folder), "--model", "demo"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    out = done.stdout
    assert "check" in out and "status" in out
    for name in ("ASCII file names", "build_env.sh parses", "api.py in sync with notebook", "listens on 0.0.0.0:8080",
                 "no torch in the serving path", "no token or secret in a file", "model", "folder size"):
        assert name in out
    assert "fix: rename them" in out
    assert out.strip().splitlines()[-1].startswith("preflight: ") and "FAIL" in out.strip().splitlines()[-1]


def test_cli_passes_on_a_clean_copy(folder):
    done = subprocess.run([sys.executable, "-m", "serving.deploy.preflight", "--root", str(folder), "--model", "demo"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert " 0 FAIL" in done.stdout


# --------------------------------------------------------------------------- the rehearsal


def _leftover_rehearsals(before):
    return {p for p in Path(os.environ.get("TMPDIR", "/tmp")).glob("qwenvl-rehearsal-*")} - before


def _pids_running(pid_texts):
    alive = []
    for pid in pid_texts:
        try:
            os.kill(int(pid), 0)
            alive.append(pid)
        except (ProcessLookupError, ValueError):
            pass
    return alive


def test_rehearsal_end_to_end(folder):
    """Copy, venv (seeing this Python's packages), build_env.sh in it, api.py, two requests, stop, clean up."""
    before = set(Path(os.environ.get("TMPDIR", "/tmp")).glob("qwenvl-rehearsal-*"))
    done = subprocess.run([sys.executable, "-m", "serving.deploy.preflight", "--root", str(folder), "--skip-checks",
                           "--rehearse", "--reuse-site-packages", "--start-timeout", "180"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    for step in ("copy the folder", "create the virtual environment", "run build_env.sh",
                 "start api.py and wait for /health", "request in the tutorial's format",
                 "request in OpenAI's format, streamed", "stop the service"):
        assert "ok  " in out and step in out
    assert "[build_env] step 5/5: verify imports" in out  # build_env.sh really ran, in the venv
    assert "/venv/bin/python" in out and "requirements.txt: already satisfied" in out
    assert "--format tutorial: time:" in out and "--format openai --stream: time:" in out
    assert "rehearsal: passed" in out
    assert not _leftover_rehearsals(before)
    import re

    pids = re.findall(r"api\.py \(pid (\d+)\)", out)
    assert pids and not _pids_running(pids)


def test_rehearsal_reports_the_failing_step_and_cleans_up(folder):
    api = folder / "api.py"
    api.write_text("import sys\nprint('api.py: cannot start, config broken', file=sys.stderr)\nsys.exit(3)\n")
    before = set(Path(os.environ.get("TMPDIR", "/tmp")).glob("qwenvl-rehearsal-*"))
    result = pf.rehearse(folder, reuse_site_packages=True, start_timeout=60)
    assert not result.ok
    names = [s.name for s in result.steps]
    assert names[3:] == ["start api.py and wait for /health", "stop the service"]  # no request was sent
    failed = next(s for s in result.steps if not s.ok)
    assert failed.name == "start api.py and wait for /health" and result.steps[-1].ok
    assert "exited with 3" in failed.detail and "config broken" in failed.log_tail
    assert "FAILED at 'start api.py and wait for /health'" in pf.format_rehearsal(result)
    assert not _leftover_rehearsals(before) and not Path(result.workdir).exists()
