"""The chat widget in a real JupyterLab, driven by Debian's chromium through Playwright.

Starts JupyterLab on 127.0.0.1 (free port, token, no browser) over a temporary copy of the
notebooks, runs notebooks/03_chat_widget.ipynb, uploads an image through the FileUpload control,
asks a question, waits for the streamed answer and saves screenshots to $ARTIFACTS_DIR
(default: artifacts/ in the repo root). Skipped only when chromium is missing outside CI;
with CI set it must run. Needs: apt-get install -y chromium; pip install -r requirements-dev.txt
(never `playwright install`: the browser comes from Debian).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = "03_chat_widget.ipynb"
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("ARTIFACTS_DIR") or ROOT / "artifacts")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from serving.web.server import free_port  # noqa: E402
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

if not os.path.exists(CHROMIUM) and not IN_CI:
    pytest.skip("chromium is not installed (apt-get install -y chromium); CI runs this test",
                allow_module_level=True)
if IN_CI:
    from playwright.sync_api import sync_playwright  # in CI a missing package is a failure, not a skip
else:
    sync_playwright = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install -r requirements-dev.txt)"
    ).sync_playwright




class Lab:
    """A JupyterLab server over a temporary root that holds a copy of the repo's notebooks."""

    def __init__(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="qv-lab-"))
        self.root = self.tmp / "root"
        shutil.copytree(ROOT / "notebooks", self.root, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = self.tmp / "jupyterlab.log"
        self.proc = None
        settings = self.tmp / "lab-settings" / "@jupyterlab" / "apputils-extension"
        settings.mkdir(parents=True)
        # no news or update checks: no network here, and no toast over the notebook
        (settings / "notification.jupyterlab-settings").write_text(
            '{"fetchNews": "false", "checkForUpdates": false}')

    def start(self) -> "Lab":
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        for name, folder in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"),
                             ("JUPYTER_RUNTIME_DIR", "runtime"), ("IPYTHONDIR", "ipython")):
            env[name] = str(self.tmp / folder)
        command = [
            sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root",
            "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root}",
            f"--LabApp.user_settings_dir={self.tmp / 'lab-settings'}",
            f"--LabApp.workspaces_dir={self.tmp / 'lab-workspaces'}",
            "--LabApp.extension_manager=readonly",
        ]
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(command, cwd=self.root, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 90
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.base}/api/status", params={"token": self.token}, timeout=2).ok:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"JupyterLab did not come up in 90 s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                try:  # shut the kernels down through the server, then the server itself
                    auth = {"Authorization": f"token {self.token}"}
                    for kernel in requests.get(f"{self.base}/api/kernels", headers=auth, timeout=5).json():
                        requests.delete(f"{self.base}/api/kernels/{kernel['id']}", headers=auth, timeout=30)
                except (requests.RequestException, ValueError):
                    pass
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)  # the group this test started
                    self.proc.wait(10)
        finally:
            if getattr(self, "log", None):
                self.log.close()
            shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture()
def lab():
    server = Lab()
    try:
        yield server.start()
    finally:
        server.stop()


def _png(path: Path) -> Path:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (320, 200), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    draw.rectangle((20, 20, 150, 180), fill=(220, 40, 40))
    draw.ellipse((170, 30, 300, 170), fill=(40, 90, 220))
    img.save(path, "PNG")
    return path


def _accept_dialogs_until(page, locator, seconds: float) -> None:
    """Wait for `locator` to be visible, accepting any dialog on the way (JupyterLab may ask which
    kernel to start while the session is still connecting: the notebook's own kernel is the default)."""
    deadline = time.time() + seconds
    accept = page.locator(".jp-Dialog .jp-mod-accept")
    while time.time() < deadline:
        if locator.is_visible():
            return
        if accept.count() and accept.first.is_visible():
            accept.first.click()
        page.wait_for_timeout(250)
    locator.wait_for(state="visible", timeout=1_000)  # raises with Playwright's description


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_chat_widget_in_jupyterlab(lab):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    source_digest = _digest(ROOT / "notebooks" / NOTEBOOK)
    image = _png(lab.tmp / "shapes.png")
    question = "What shapes are in this picture?"

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        try:
            page.goto(f"{lab.base}/lab/tree/{NOTEBOOK}?token={lab.token}", timeout=90_000)
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
            _accept_dialogs_until(page, page.locator(".jp-StatusBar-TextItem", has_text="| Idle").first, 90)
            # Run > Run All Cells
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
            chat = page.locator(".qv-chat")
            _accept_dialogs_until(page, chat, 180)
            chat.scroll_into_view_if_needed()

            # count the distinct texts the answer shows while it streams
            page.evaluate("""() => {
                window.__answers = [];
                const chat = document.querySelector('.qv-chat');
                new MutationObserver(() => {
                    const all = chat.querySelectorAll('.qv-answer');
                    if (!all.length) return;
                    const text = all[all.length - 1].innerText;
                    if (window.__answers[window.__answers.length - 1] !== text) window.__answers.push(text);
                }).observe(chat, {subtree: true, childList: true, characterData: true});
            }""")

            # ipywidgets' FileUpload keeps its <input type=file> out of the DOM and clicks it when its
            # button is clicked: answer the file chooser that opens, as a person would
            with page.expect_file_chooser(timeout=30_000) as chooser:
                page.locator("button.qv-upload").click()
            chooser.value.set_files(str(image))
            page.locator(".qv-pending img").first.wait_for(state="visible", timeout=30_000)
            page.locator(".qv-question input").fill(question)
            page.locator(".qv-send button, button.qv-send").first.click()

            page.locator(".qv-status", has_text="tokens/s").wait_for(timeout=120_000)
            page.wait_for_timeout(300)  # let the last value render
            answers = page.evaluate("window.__answers")
            transcript = page.locator(".qv-transcript").inner_text()
            error = page.locator(".qv-error").inner_text()
            status = page.locator(".qv-status").inner_text()
            chat.scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / "chat_widget.png"))
            chat.screenshot(path=str(ARTIFACTS / "chat_widget_element.png"))
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "chat_widget_failure.png"))
            print(lab.log_tail())
            raise
        finally:
            browser.close()

    assert error.strip() == ""
    assert question in transcript
    assert len([a for a in answers if a.strip("\u258c ").replace("Model:", "").strip()]) > 2, answers
    assert page_has_answer(transcript)
    assert "tokens/s" in status
    assert lab.root.joinpath(NOTEBOOK).exists()
    assert _digest(ROOT / "notebooks" / NOTEBOOK) == source_digest  # nothing written back into the repo


def page_has_answer(transcript: str) -> bool:
    after = transcript.split("Model:", 1)
    return len(after) == 2 and after[1].strip() != ""
