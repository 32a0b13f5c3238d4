"""Project rules: no PyTorch in the serving path; no non-ASCII file names (AI Studio hangs on them)."""

import os
import subprocess
import sys

from conftest import ROOT


def test_serving_path_never_imports_torch():
    code = (
        "import sys\n"
        "from serving.config import Settings\n"
        "from serving.app import create_app\n"
        "from serving.server import build_engine\n"
        "from serving.protocol import ChatTurn\n"
        "from PIL import Image\n"
        "engine = build_engine(Settings(model='demo'))\n"
        "create_app(Settings(model='demo'), engine)\n"
        "p = engine.build_prompt([ChatTurn('user', [Image.new('RGB', (64, 64)), 'hi'])])\n"
        "engine.generate(p, engine.sampling_params(max_tokens=2))\n"
        "engine.close()\n"
        "import api\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


def test_no_non_ascii_file_names():
    offenders = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in (".git", "__pycache__", ".pytest_cache")]
        for name in dirs + files:
            if not name.isascii():
                offenders.append(os.path.relpath(os.path.join(folder, name), ROOT))
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True).stdout
    offenders += [p for p in tracked.decode("utf-8", "replace").split("\0") if p and not p.isascii()]
    assert offenders == []
