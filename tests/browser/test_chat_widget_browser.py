"""The chat widget in a real JupyterLab, driven by Debian's chromium through Playwright.

Starts JupyterLab on 127.0.0.1 (free port, token, no browser) over a temporary copy of the
notebooks, runs notebooks/03_chat_widget.ipynb and uses the widget as a person would: an error that
clears itself, two uploads and the removal of one, several streamed turns (the newest message stays in
view), Regenerate, Edit and resend, Stop, an imported conversation whose answer is Markdown (code,
table, math) with its Copy button, and the Chinese labels. Screenshots of each step go to
$ARTIFACTS_DIR (default: artifacts/ in the repo root). Skipped only when chromium is missing outside CI;
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
        deadline = time.time() + 300  # generous: JupyterLab starts slowly on a loaded machine
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.base}/api/status", params={"token": self.token}, timeout=2).ok:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"JupyterLab did not come up in 300 s:\n{self.log_tail()}")

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
    other = _png(lab.tmp / "second.png")
    saved = _markdown_conversation(lab.tmp / "saved-chat.json")
    question = "What shapes are in this picture?"
    shots = []

    def shot(name):
        chat.scroll_into_view_if_needed()
        chat.screenshot(path=str(ARTIFACTS / f"chat_widget_{name}.png"))
        shots.append(name)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1100})
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=lab.base)
        page = context.new_page()
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
            _watch(page)
            box = page.locator(".qv-question input")
            status = page.locator(".qv-status")
            error = page.locator(".qv-error")

            # an error, then gone by itself once the next thing works
            page.locator("button.qv-send").click()
            error.filter(has_text="type a question first").wait_for(timeout=30_000)
            # two files attached through the paperclip, one removed again
            with page.expect_file_chooser(timeout=30_000) as chooser:
                page.locator("button.qv-upload:not(.qv-import)").click()
            chooser.value.set_files([str(image), str(other)])
            page.locator(".qv-pending-file").nth(1).wait_for(state="visible", timeout=30_000)
            assert error.inner_text().strip() == ""
            captions = page.locator(".qv-pending .qv-caption").all_inner_texts()
            assert captions == ["shapes.png, 320x200", "second.png, 320x200"], captions
            # ipywidgets writes its own "(n)" count into the button's text, "(0)" here: it must not show
            count_width = page.evaluate("""() => {
                const button = document.querySelector('button.qv-upload:not(.qv-import)');
                const range = document.createRange();
                const text = [...button.childNodes].find(n => n.nodeType === Node.TEXT_NODE);
                range.selectNodeContents(text);
                return range.getBoundingClientRect().width;
            }""")
            assert count_width == 0
            page.locator(".qv-pending-file").nth(1).locator("button.qv-remove").click()
            page.wait_for_function("document.querySelectorAll('.qv-pending-file').length === 1", timeout=30_000)
            shot("1_pending")

            # the first turn streams; then more turns until the transcript scrolls
            box.fill(question)
            box.press("Enter")
            _finished(page, 1)
            answers = page.evaluate("window.__answers")
            assert len([a for a in answers if _answer_text(a)]) > 2, answers  # it streamed
            assert any("reading the prompt" in s for s in page.evaluate("window.__statuses"))
            assert "first token after" in status.inner_text() and "tokens/s" in status.inner_text()
            # a click on the question's picture enlarges it, a second click closes it
            figure = page.locator(".qv-row .qv-figure").first
            figure.locator("summary").click()
            figure.locator("img.qv-large").wait_for(state="visible", timeout=10_000)
            enlarged = figure.locator("img.qv-large").bounding_box()["width"]
            shot("2_first_answer")
            figure.locator("summary").click()
            figure.locator("img.qv-large").wait_for(state="hidden", timeout=10_000)
            for turn in range(2, 7):
                box.fill(f"Follow-up number {turn}?")
                box.press("Enter")
                _finished(page, turn)
            geometry = _scroll_geometry(page)
            assert geometry["overflows"], geometry  # enough turns to need scrolling
            assert geometry["last_visible"], geometry  # and the newest message is in view
            shot("3_scrolled_to_newest")

            # Regenerate the last answer: the same number of messages, a new answer
            rows = page.locator(".qv-row").count()
            page.locator(".qv-regenerate").last.click()
            _finished(page, 7)
            assert page.locator(".qv-row").count() == rows
            # Edit the last question and send it again
            page.locator(".qv-edit").last.click()
            page.wait_for_function(f"document.querySelectorAll('.qv-row').length === {rows - 2}", timeout=30_000)
            assert box.input_value() == "Follow-up number 6?"
            box.fill("Follow-up number 6, edited?")
            box.press("Enter")
            _finished(page, 8)
            assert "Follow-up number 6, edited?" in page.locator(".qv-transcript").inner_text()
            assert _scroll_geometry(page)["last_visible"]
            shot("4_regenerated_and_edited")

            # Stop: no empty answer is left behind
            box.fill("Stop this one")
            seen = page.evaluate("window.__statuses.length")  # the statuses of earlier turns do not count
            box.press("Enter")
            page.wait_for_function(f"window.__statuses.slice({seen}).some(s => s.includes('reading the prompt') || "
                                   "s.includes('writing'))", timeout=30_000)
            page.locator("button.qv-stop").click()
            status.filter(has_text="stopped").wait_for(timeout=60_000)
            bubbles = page.locator(".qv-assistant .qv-md").all_inner_texts()
            assert all(text.strip() for text in bubbles), bubbles
            assert error.inner_text().strip() == ""
            shot("5_stopped")

            # an image dropped on the widget and one pasted into the question box join the pending files
            page.evaluate(_DROP_AND_PASTE)
            page.wait_for_function("document.querySelectorAll('.qv-pending-file').length === 2", timeout=30_000)
            dropped = page.locator(".qv-pending .qv-caption").all_inner_texts()
            shot("5b_dropped_and_pasted")

            # Import a conversation whose answer is Markdown: rendered, with its Copy button
            page.locator(".qv-settings").get_by_text("Settings", exact=True).click()  # open the panel
            with page.expect_file_chooser(timeout=30_000) as chooser:
                page.locator("button.qv-import").click()
            chooser.value.set_files(str(saved))
            status.filter(has_text="imported").wait_for(timeout=60_000)
            answer = page.locator(".qv-assistant").last
            assert answer.locator("strong", has_text="bold").count() == 1
            assert answer.locator("table td", has_text="42").count() == 1
            assert answer.locator("pre", has_text="print").count() == 1
            page.wait_for_timeout(1000)  # MathJax typesets after the HTML is set
            math = answer.locator("mjx-container").count()
            answer.locator("button.qv-copy").click()
            answer.locator("button.qv-copy", has_text="Copied").wait_for(timeout=10_000)
            copied = page.evaluate("navigator.clipboard.readText()")
            shot("6_markdown")

            # the Chinese labels
            page.locator(".qv-language button", has_text="中文").click()
            page.locator("button.qv-send", has_text="发送").wait_for(timeout=30_000)
            labels = {name: page.locator(f"button.{name}").inner_text().strip()
                      for name in ("qv-send", "qv-stop", "qv-clear")}
            transcript_zh = page.locator(".qv-transcript").inner_text()
            shot("7_chinese")
            page.screenshot(path=str(ARTIFACTS / "chat_widget.png"))
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "chat_widget_failure.png"))
            print(lab.log_tail())
            raise
        finally:
            browser.close()

    assert math >= 1  # the LaTeX was typeset
    assert copied == _MARKDOWN_ANSWER
    assert labels == {"qv-send": "发送", "qv-stop": "停止", "qv-clear": "清空"}, labels
    assert "模型" in transcript_zh and "重新生成" in transcript_zh
    assert enlarged >= 300  # the 320x200 upload at its own size, not the 96-pixel thumbnail
    assert dropped == ["dropped.png, 64x48", "pasted.png, 64x48"], dropped
    assert len(shots) == 8
    assert lab.root.joinpath(NOTEBOOK).exists()
    assert _digest(ROOT / "notebooks" / NOTEBOOK) == source_digest  # nothing written back into the repo


_MARKDOWN_ANSWER = ("Here is **bold** text.\n\n| item | value |\n|---|---|\n| answer | 42 |\n\n"
                    "```python\nprint('hello')\n```\n\nAnd math: $e^{i\\pi} + 1 = 0$")


_DROP_AND_PASTE = """async () => {
    const canvas = document.createElement('canvas');
    canvas.width = 64; canvas.height = 48;
    const ctx = canvas.getContext('2d');
    ctx.fillStyle = '#c33'; ctx.fillRect(0, 0, 64, 48);
    const blob = await new Promise(done => canvas.toBlob(done, 'image/png'));
    const drop = new DataTransfer();
    drop.items.add(new File([blob], 'dropped.png', {type: 'image/png'}));
    document.querySelector('.qv-scroll').dispatchEvent(
        new DragEvent('drop', {dataTransfer: drop, bubbles: true, cancelable: true}));
    await new Promise(done => setTimeout(done, 1500));  // one file after the other, as a person would
    const paste = new DataTransfer();
    paste.items.add(new File([blob], 'pasted.png', {type: 'image/png'}));
    document.querySelector('.qv-question input').dispatchEvent(
        new ClipboardEvent('paste', {clipboardData: paste, bubbles: true, cancelable: true}));
}"""


def _markdown_conversation(path: Path) -> Path:
    import json

    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Show me some Markdown"},
                                             {"role": "assistant", "content": _MARKDOWN_ANSWER}]}))
    return path


def _watch(page) -> None:
    """Record every distinct text of the streamed answer and of the status line, as they change."""
    page.evaluate("""() => {
        window.__answers = [];
        window.__statuses = [];
        const chat = document.querySelector('.qv-chat');
        new MutationObserver(() => {
            const all = chat.querySelectorAll('.qv-answer');
            if (all.length) {
                const text = all[all.length - 1].innerText;
                if (window.__answers[window.__answers.length - 1] !== text) window.__answers.push(text);
            }
            const status = chat.querySelector('.qv-status');
            const now = status ? status.innerText : '';
            if (window.__statuses[window.__statuses.length - 1] !== now) window.__statuses.push(now);
        }).observe(chat, {subtree: true, childList: true, characterData: true});
    }""")


def _finished(page, count: int, timeout: float = 180_000) -> None:
    """Wait until `count` answers have finished since _watch (their status lines report tokens/s)."""
    page.wait_for_function(f"window.__statuses.filter(s => s.includes('tokens/s')).length >= {count}",
                           timeout=timeout)
    page.wait_for_timeout(200)  # let the last value render


def _scroll_geometry(page) -> dict:
    return page.evaluate("""() => {
        const scroll = document.querySelector('.qv-scroll');
        const rows = scroll.querySelectorAll('.qv-row');
        const last = rows[rows.length - 1].getBoundingClientRect();
        const view = scroll.getBoundingClientRect();
        return {overflows: scroll.scrollHeight > scroll.clientHeight + 10,
                last_visible: last.bottom <= view.bottom + 2 && last.bottom > view.top,
                rows: rows.length, scrollHeight: scroll.scrollHeight, clientHeight: scroll.clientHeight,
                last_bottom: last.bottom, view_bottom: view.bottom};
    }""")


def _answer_text(text: str) -> str:
    return text.replace("\u258c", "").replace("Model", "").replace("Copy", "").strip()
