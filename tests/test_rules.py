"""Project rules: no PyTorch in the serving path; no non-ASCII file names (AI Studio hangs on them)."""

import os
import subprocess
import sys

from conftest import ROOT


def test_serving_path_never_imports_torch():
    """The app, the chat widget and the built-in engine, each answering once on the demo model."""
    code = """
import io
import sys

from PIL import Image

from serving.web.app import create_app
from serving.config import Settings
from serving.web.server import build_engine
from serving.notebook.widgets import ChatWidget

settings = Settings(model="demo")
engine = build_engine(settings)
client = create_app(settings, engine).test_client()
body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
assert client.post("/v1/chat/completions", json=body).status_code == 200
png = io.BytesIO()
Image.new("RGB", (64, 64)).save(png, "PNG")
chat = ChatWidget(engine, settings, max_tokens=2)
assert chat.add_upload("x.png", png.getvalue())
chat.question.value = "hi"
assert chat.send() and chat.wait(120) and chat.error == ""
engine.close()
import api
bad = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
assert not bad, bad
print("ok")
"""
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
