"""The notebook chat UI: ipywidgets over an engine, through the chat service. Images stay in memory.

    chat = ChatWidget(engine, settings)
    chat            # the last line of a cell shows it

Everything a person does in the browser has a method here too (add_upload, remove_pending, send, stop,
regenerate, edit, clear, export_conversation, import_conversation, set_language, wait), so the UI is tested
without a browser. An upload is an image or a video file (mp4, webm, mov, ...): a video is sampled and sized
at once (serving.intake.video) and shown as a strip of its sampled frames. The answer is generated in a
background thread and streamed into the page delta by delta, rendered as Markdown (code highlighted, LaTeX by
MathJax); the status line tells "reading the prompt" (until the first token) from "writing", and at the end
shows the time to the first token apart from the writing speed. Stop cancels the generation at once (the
engine drops it at its next step). A question sent while an answer is being written waits in a queue and
goes next. Uploads are sized and questions answered by serving.chat.ChatService, the same pipeline as the
API's, with the same settings. The transcript keeps the newest message in view by itself (its scroll box is
anchored at the bottom with CSS: no script).
"""

from __future__ import annotations

import datetime
import html
import io
import threading
import time
from dataclasses import dataclass
from typing import Optional

import ipywidgets as W
from PIL import Image as PILImage

from serving.chat import ChatService, image_sizes
from serving.errors import ImageError, ServiceError
from serving.intake import images
from serving.intake import video as videos
from serving.jobs import Finished
from serving.notebook import conversation, grounding, render
from serving.notebook.labels import LANGUAGES, text as label
from serving.protocol import ChatTurn

THUMBNAIL = (96, 96)
LARGE_SIDE = 640  # an image opened by a click in the transcript
STRIP_FRAMES = 8  # sampled frames shown in a video's thumbnail strip
STRIP_HEIGHT = 48
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".mpg", ".mpeg", ".ts", ".flv", ".ogv", ".3gp")
# The sliders' starting values: Qwen2.5's recommended sampling for chat
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.8
# The demo model writes about 4 tokens/s on a loaded 2-core machine: 512 tokens of its random text would take
# minutes. Its answers mean nothing, so a short default shows the streaming without the wait.
DEMO_MAX_TOKENS = 48
BOXES_MAX_SIDE = 640  # the picture with an answer's boxes drawn on it, in the transcript
# How many of the latest user turns with images send their images again with each question (0: all). Every
# image costs hundreds of prompt tokens on every later turn; older ones are named in the text instead.
KEEP_IMAGES = 1


@dataclass
class Pending:
    """An uploaded image or video: waiting to be sent with the next question, then part of the history."""

    name: str
    image: object  # PIL image, RGB, already resized for the vision tower; or a serving.intake.video.Video
    thumbnail: bytes  # PNG (a video's: a strip of its sampled frames)
    data: bytes = b""  # the file as uploaded: an answer's boxes are drawn on it, an export keeps it
    mime: str = "image/png"

    @property
    def is_video(self) -> bool:
        return isinstance(self.image, videos.Video)

    @property
    def caption(self) -> str:
        """The file's name and size as the person knows them (not the model-side size)."""
        if self.is_video:
            clip = self.image
            return f"{self.name}, {clip.duration:.1f} s, {len(clip.frames)} frames"
        width, height = self.image.info.get(images.ORIGINAL_SIZE, self.image.size)
        return f"{self.name}, {width}x{height}"


@dataclass
class Result:
    """How the last answer ended: Finished's fields, or "stopped" when Stop cut it short, with its timing."""

    finish_reason: str  # "stop", "length" or "stopped"
    prompt_tokens: int
    completion_tokens: int
    seconds: float  # from sending to the end
    first_token_seconds: Optional[float] = None  # time to the first text; None: none came

    @property
    def tokens_per_second(self) -> float:
        """The writing speed: tokens after the first over the time after it (the prompt's reading excluded)."""
        if self.first_token_seconds is None or self.completion_tokens < 2:
            return 0.0
        writing = self.seconds - self.first_token_seconds
        return (self.completion_tokens - 1) / writing if writing > 0 else 0.0


class ChatWidget:
    def __init__(self, engine, settings=None, *, system: Optional[str] = None,
                 temperature: float = DEFAULT_TEMPERATURE, top_p: float = DEFAULT_TOP_P,
                 max_tokens: Optional[int] = None, lang: str = "en"):
        from serving.config import Settings

        self.engine = engine
        self.settings = settings or Settings()
        self.service = ChatService(engine, self.settings)
        self.lang = lang if lang in dict((v, k) for k, v in LANGUAGES) else "en"
        self._history: list[ChatTurn] = []
        self._pending: list[Pending] = []
        self._files: dict = {}  # id(sized image or video in the history) -> its Pending (name, file as uploaded)
        self._queue: list = []  # (text, [Pending]) asked while an answer was being written, in order
        self._extras: dict = {}  # id(answer turn) -> {"stopped": bool, "boxes": (PNG, caption) or None}
        self._lock = threading.RLock()
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()  # the running answer's own flag; each answer gets a new one
        self._reply = None  # the running answer (serving.chat.Reply), cancelled by Stop and Clear
        self._generation = 0  # bumped by each answer and by clear: a stale thread leaves the UI and history alone
        self._thread_generation = -1
        self._rows: list = []  # (turn, VBox) shown in the transcript, in order
        self.deltas: list[str] = []  # the text deltas of the latest answer, as they arrived
        self.answer = ""  # the latest answer so far
        self.last_result: Optional[Result] = None
        self.boxes: list = []  # the latest answer's boxes (serving.notebook.grounding.Box), in pixels of the upload
        self.boxes_image = None  # that image with them drawn (PIL), as the transcript shows it
        self._error = ""
        self._status = ""
        self._status_key: tuple = ("ready", {})
        self._build_controls(system, temperature, top_p, max_tokens)
        self._render_transcript()
        self._render_pending()
        self._set_status("ready")

    # ------------------------------------------------------------------ layout

    def _build_controls(self, system, temperature, top_p, max_tokens) -> None:
        limit = self.settings.max_tokens_limit
        if max_tokens is None:
            max_tokens = DEMO_MAX_TOKENS if self.engine.info.is_demo else self.settings.default_max_tokens
        defaults = getattr(self.engine, "defaults", None) or {}

        self.style = W.HTML(render.style_html())
        self.language = W.ToggleButtons(options=LANGUAGES, value=self.lang, style={"button_width": "70px"})
        self.language.add_class("qv-language")
        self.language.observe(lambda change: self.set_language(change["new"]), names="value")
        self.demo_note = W.HTML()

        self.upload = W.FileUpload(accept="image/*,video/*", multiple=True, icon="paperclip", description="")
        self.upload.add_class("qv-upload")  # icon only: its own "(n)" count would read (0) (see render.STYLE)
        self.upload.observe(self._on_upload, names="value")
        self.drop_sink = W.Text(continuous_update=False, layout=W.Layout(display="none"))
        self.drop_sink.add_class("qv-drop-sink")  # files dropped or pasted in the browser arrive here (render.style_html)
        self.drop_sink.observe(self._on_drop, names="value")
        self.pending_label = W.HTML()
        self.pending_label.add_class("qv-pending-label")
        self.thumbnails = W.HBox(layout=W.Layout(flex_flow="row wrap"))
        self.thumbnails.add_class("qv-pending")
        self.question = QuestionBox(self._on_question_commit, layout=W.Layout(flex="1 1 auto", width="auto"))
        self.question.add_class("qv-question")
        self.send_button = W.Button(button_style="primary", icon="paper-plane", layout=W.Layout(width="90px"))
        self.send_button.add_class("qv-send")
        self.send_button.on_click(lambda _b: self._on_send_click())
        self.stop_button = W.Button(button_style="warning", icon="stop", disabled=True, layout=W.Layout(width="80px"))
        self.stop_button.add_class("qv-stop")
        self.stop_button.on_click(lambda _b: self.stop())
        self.clear_button = W.Button(icon="trash", layout=W.Layout(width="80px"))
        self.clear_button.add_class("qv-clear")
        self.clear_button.on_click(lambda _b: self.clear())
        self.queue_label = W.HTML()
        self.queue_label.add_class("qv-queue")

        slider = W.Layout(width="330px")
        self.temperature = W.FloatSlider(value=min(max(float(temperature), 0.0), 2.0), min=0.0, max=2.0, step=0.05,
                                         readout_format=".2f", layout=slider)
        self.top_p = W.FloatSlider(value=min(max(float(top_p), 0.01), 1.0), min=0.01, max=1.0, step=0.01,
                                   readout_format=".2f", layout=slider)
        self.max_tokens = W.IntSlider(value=min(max(int(max_tokens), 1), limit), min=1, max=limit, layout=slider)
        self.top_k = W.IntText(value=0, layout=W.Layout(width="200px"))
        self.repetition_penalty = W.FloatSlider(value=float(defaults.get("repetition_penalty") or 1.0), min=1.0,
                                                max=2.0, step=0.01, readout_format=".2f", layout=slider)
        self.seed = W.IntText(value=-1, layout=W.Layout(width="220px"))
        self.keep_images = W.Dropdown(options=[("1", 1), ("2", 2), ("all", 0)], value=KEEP_IMAGES, layout=W.Layout(width="330px"))
        self.json_mode = W.Checkbox(value=False, indent=False)
        self.json_mode.layout.display = "" if "response_format" in getattr(self.engine.info, "features", ()) else "none"
        self.system_prompt = W.Textarea(value=system or "", rows=2, layout=W.Layout(width="100%"))
        self.system_prompt.add_class("qv-system")
        for control in (self.temperature, self.top_p, self.max_tokens, self.top_k, self.repetition_penalty,
                        self.seed, self.keep_images, self.system_prompt):
            control.style.description_width = "initial"
        self.defaults_note = W.HTML()
        self.defaults_note.add_class("qv-defaults")
        self.export_button = W.Button(icon="download", layout=W.Layout(width="110px"))
        self.export_button.add_class("qv-export")
        self.export_button.on_click(lambda _b: self._on_export())
        self.import_upload = W.FileUpload(accept=".json,application/json", multiple=False, icon="folder-open",
                                          description="")
        self.import_upload.add_class("qv-upload")
        self.import_upload.add_class("qv-import")
        self.import_upload.observe(self._on_import, names="value")
        self.import_label = W.Label()
        self.export_link = W.HTML()
        self.export_link.add_class("qv-export-link")
        self.settings_box = W.VBox([
            self.system_prompt,
            W.HBox([self.temperature, self.top_p, self.max_tokens], layout=W.Layout(flex_flow="row wrap")),
            W.HBox([self.top_k, self.repetition_penalty, self.seed], layout=W.Layout(flex_flow="row wrap")),
            W.HBox([self.keep_images, self.json_mode], layout=W.Layout(flex_flow="row wrap")),
            self.defaults_note,
            W.HBox([self.export_button, self.import_label, self.import_upload, self.export_link], layout=W.Layout(align_items="center")),
        ])
        self.settings_panel = W.Accordion(children=[self.settings_box])
        self.settings_panel.add_class("qv-settings")

        # the transcript: a column-reverse scroll box starts (and stays) at its bottom, the newest message
        self.transcript = W.VBox()
        self.transcript.add_class("qv-transcript")
        self.scroller = W.Box([self.transcript], layout=W.Layout(
            display="flex", flex_flow="column-reverse", max_height="520px", overflow="auto"))
        self.scroller.add_class("qv-scroll")
        self._empty_note = W.HTML()
        self._answer_html = W.HTMLMath()
        self.status_label = W.HTML()
        self.status_label.add_class("qv-status")
        self.error_label = W.HTML()
        self.error_label.add_class("qv-error")

        self.ui = W.VBox([
            self.style,
            self.drop_sink,
            W.HBox([self.demo_note, self.language], layout=W.Layout(justify_content="space-between",
                                                                     align_items="center")),
            self.scroller,
            W.HBox([self.pending_label, self.thumbnails], layout=W.Layout(align_items="flex-start")),
            W.HBox([self.upload, self.question, self.send_button, self.stop_button, self.clear_button]),
            self.queue_label,
            self.status_label,
            self.error_label,
            self.settings_panel,
        ], layout=W.Layout(width="100%"))
        self.ui.add_class("qv-chat")
        self._apply_labels()

    def _apply_labels(self) -> None:
        """Every fixed word of the UI in the current language."""
        t = lambda key, **kw: label(self.lang, key, **kw)  # noqa: E731
        self.demo_note.value = f"<i>{html.escape(t('demo_note'))}</i>" if self.engine.info.is_demo else ""
        self.upload.tooltip = t("attach")
        self.question.placeholder = t("placeholder")
        self.send_button.description = t("send")
        self.stop_button.description = t("stop")
        self.clear_button.description = t("clear")
        self.temperature.description = t("temperature")
        self.top_p.description = t("top_p")
        self.max_tokens.description = t("max_tokens")
        self.top_k.description = t("top_k")
        self.repetition_penalty.description = t("repetition_penalty")
        self.seed.description = t("seed")
        self.keep_images.description = t("keep_images")
        keep = self.keep_images.value
        self.keep_images.options = [(t("keep_latest"), 1), (t("keep_two"), 2), (t("keep_all"), 0)]
        self.keep_images.value = keep
        self.json_mode.description = t("json_mode")
        self.system_prompt.description = t("system_prompt")
        self.system_prompt.placeholder = t("system_placeholder")
        self.defaults_note.value = (f"<span style='color:#666;font-size:90%'>"
                                    f"{html.escape(t('defaults', temperature=DEFAULT_TEMPERATURE, top_p=DEFAULT_TOP_P))}"
                                    "</span>")
        self.export_button.description = t("export")
        self.import_upload.tooltip = t("import")
        self.import_label.value = t("import") + ":"
        self.settings_panel.set_title(0, t("settings"))
        self._empty_note.value = f"<span style='color:#888'>{html.escape(t('no_messages'))}</span>"

    def display(self) -> None:
        from IPython.display import display

        display(self.ui)

    def _repr_mimebundle_(self, **kwargs):
        return self.ui._repr_mimebundle_(**kwargs)

    # ------------------------------------------------------------------ state, read-only

    @property
    def history(self) -> list:
        """The conversation so far: ChatTurns whose parts are PIL images (videos) and text."""
        with self._lock:
            return list(self._history)

    @property
    def pending(self) -> list:
        """Images and videos uploaded for the next question."""
        with self._lock:
            return list(self._pending)

    @property
    def queued(self) -> list:
        """Questions asked while an answer was being written, waiting their turn."""
        with self._lock:
            return [text for text, _files in self._queue]

    @property
    def status(self) -> str:
        return self._status

    @property
    def error(self) -> str:
        return self._error

    @property
    def busy(self) -> bool:
        """An answer is being written (one that Clear abandoned does not count)."""
        thread = self._thread
        return thread is not None and thread.is_alive() and self._thread_generation == self._generation

    # ------------------------------------------------------------------ actions

    def add_upload(self, name: str, data: bytes) -> bool:
        """Decode and size an uploaded file; False (and an error shown) when it is not an image or a video."""
        self._set_error("")
        item = self._read_file(name, bytes(data))
        if item is None:
            return False
        with self._lock:
            self._pending.append(item)
        self._render_pending()
        if item.is_video:
            self._set_status("video_ready", name=name, description=item.image.describe())
        return True

    def remove_pending(self, index: int) -> None:
        """Take one uploaded file back before it is sent."""
        with self._lock:
            if 0 <= index < len(self._pending):
                del self._pending[index]
        self._set_error("")
        self._render_pending()

    def send(self) -> bool:
        """Ask the typed question with the pending files. While an answer is being written the question is
        queued and goes next. False when there is nothing to ask."""
        text = self.question.value.strip()
        if not text:
            self._set_error(label(self.lang, "type_first"))
            return False
        self._set_error("")
        with self._lock:
            files, self._pending = self._pending, []
            queue = self.busy
            if queue:
                self._queue.append((text, files))
        self.question.value = ""
        self._render_pending()
        if queue:
            self._render_queue()
            self._set_status("queued_status")
            return True
        self._ask(text, files)
        return True

    def stop(self) -> None:
        """Cancel the answer being written; what was written so far stays in the conversation (an answer
        stopped before its first token is taken back, with its question returned to the box)."""
        if self.busy:
            self._stop.set()
            reply = self._reply
            if reply is not None:
                reply.cancel()  # at once, even while the model is still reading a long prompt
            self._set_status("stopping")

    def regenerate(self, index: Optional[int] = None) -> bool:
        """Write the answer at `index` of the history again (default: the last answer); the turns after it
        are dropped. False while an answer is being written or when there is no such answer."""
        with self._lock:
            if self.busy:
                return False
            if index is None:
                index = max((i for i, t in enumerate(self._history) if t.role == "assistant"), default=-1)
            if not (0 <= index < len(self._history)) or self._history[index].role != "assistant":
                return False
            self._truncate(index)
        self._set_error("")
        self._render_transcript()
        self._start_answer(status="regenerating")
        return True

    def edit(self, index: int) -> bool:
        """Take the question at `index` of the history back into the box (its files back to the pending ones)
        to change and send again; it and the turns after it leave the history."""
        with self._lock:
            if self.busy or not (0 <= index < len(self._history)) or self._history[index].role != "user":
                return False
            turn = self._history[index]
            files = [self._files[id(p)] for p in turn.parts if not isinstance(p, str) and id(p) in self._files]
            self._truncate(index)
            self._pending = files + self._pending
        self.question.value = "".join(p for p in turn.parts if isinstance(p, str))
        self._set_error("")
        self._render_pending()
        self._render_transcript()
        self._set_status("editing")
        return True

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the latest answer (and every queued question's) is done; True when they are."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            thread = self._thread
            if thread is None:
                return True
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                return False
            if self._thread is thread:  # no queued question started after it
                return True

    def clear(self) -> None:
        """Start over: stop any answer, forget the conversation, the queue and the pending files."""
        self._stop.set()
        if self._reply is not None:
            self._reply.cancel()
        with self._lock:
            self._generation += 1
            self._history, self._pending, self._queue, self._files, self._extras = [], [], [], {}, {}
            self.deltas, self.answer, self.last_result = [], "", None
            self.boxes, self.boxes_image = [], None
        self.question.value = ""
        self.export_link.value = ""
        self._set_busy(False)
        self._set_error("")
        self._render_pending()
        self._render_queue()
        self._render_transcript()
        self._answer_html.close()  # an abandoned answer's row
        self._set_status("cleared")

    def set_language(self, lang: str) -> None:
        """Relabel the whole UI: "en" (English) or "zh" (Chinese)."""
        if lang not in dict((v, k) for k, v in LANGUAGES):
            raise ValueError(f"language {lang!r}: choose 'en' or 'zh'")
        self.lang = lang
        if self.language.value != lang:
            self.language.value = lang  # calls back here once more, with nothing left to change
        self._apply_labels()
        with self._lock:
            _close(row for _turn, row in self._rows)
            self._rows = []
        self._render_transcript(answering=self.busy)
        self._render_pending()
        self._render_queue()
        key, values = self._status_key
        self._set_status(key, **values)

    def export_conversation(self) -> dict:
        """The conversation as an OpenAI messages list (images and videos as data URLs) with the files' names
        and the sampling settings: what Export offers to download (see serving.notebook.conversation)."""
        with self._lock:
            history = list(self._history)
            files = {key: (p.name, p.data, p.mime) for key, p in self._files.items()}
        sampling = {"temperature": self.temperature.value, "top_p": self.top_p.value, "top_k": self.top_k.value,
                    "repetition_penalty": self.repetition_penalty.value, "seed": self.seed.value,
                    "max_tokens": self.max_tokens.value}
        return conversation.to_json(history, files, system=self.system_prompt.value.strip(), sampling=sampling,
                                    model=self.engine.info.name)

    def import_conversation(self, data, name: str = "conversation.json") -> bool:
        """Replace the conversation with one Export wrote (JSON text, bytes or the dict); False and an error
        shown when it cannot be read. Its files go through the same intake as uploads."""
        if self.busy:
            return False
        try:
            saved = conversation.read(data)
        except conversation.ConversationError as exc:
            self._set_error(label(self.lang, "bad_import", name=name, reason=str(exc)))
            return False
        turns, files = [], {}
        for role, parts in saved.turns:
            turn = ChatTurn(role, [])
            for part in parts:
                if part.text is not None:
                    turn.parts.append(part.text)
                    continue
                item = self._read_file(part.name, part.data, video=part.video)
                if item is None:
                    return False  # the error names the file
                turn.parts.append(item.image)
                files[id(item.image)] = item
            turns.append(turn)
        self.clear()
        with self._lock:
            self._history, self._files = turns, files
        self.system_prompt.value = saved.system
        for key, control in (("temperature", self.temperature), ("top_p", self.top_p), ("top_k", self.top_k),
                             ("repetition_penalty", self.repetition_penalty), ("seed", self.seed),
                             ("max_tokens", self.max_tokens)):
            value = saved.sampling.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                try:
                    control.value = type(control.value)(value)
                except Exception:  # a value outside this server's range: keep the control's own
                    pass
        self._render_transcript()
        self._set_status("imported", turns=len(turns), name=name)
        return True

    # ------------------------------------------------------------------ the answer, in a thread

    def _ask(self, text: str, files: list) -> None:
        with self._lock:
            turn = ChatTurn("user", [p.image for p in files] + [text])
            self._files.update((id(p.image), p) for p in files)
            self._history.append(turn)
        self._render_transcript()
        self._start_answer(question=text, files=files)

    def _start_answer(self, *, question: Optional[str] = None, files: Optional[list] = None,
                      status: Optional[str] = None) -> None:
        """Answer the history as it stands (it ends with a question)."""
        with self._lock:
            turns = list(self._history)
            self._generation += 1
            generation = self._generation
            self.deltas, self.answer, self.last_result = [], "", None
            self.boxes, self.boxes_image = [], None
            self._stop = stop = threading.Event()
            self._reply = None
        if question is None:  # regenerate: the question is the history's last turn
            question = "".join(p for p in turns[-1].parts if isinstance(p, str))
            files = [self._files[id(p)] for p in turns[-1].parts if not isinstance(p, str) and id(p) in self._files]
        self._render_transcript(answering=True)
        self._set_busy(True)
        self._set_status(status or "reading_prompt", prompt_tokens="...")
        params = self._sampling()
        self._thread = threading.Thread(target=self._answer, args=(generation, stop, turns, files, question, params),
                                        name="chat-widget-answer", daemon=True)
        self._thread_generation = generation
        self._thread.start()

    def _sampling(self) -> dict:
        params = dict(max_tokens=int(self.max_tokens.value), temperature=float(self.temperature.value),
                      top_p=float(self.top_p.value), repetition_penalty=float(self.repetition_penalty.value))
        if params["temperature"] > 0:
            params["top_k"] = max(0, int(self.top_k.value))  # 0: off (a model default of 1 would make it greedy)
        if int(self.seed.value) >= 0:
            params["seed"] = int(self.seed.value)
        return params

    def _turns_to_send(self, turns: list) -> list:
        """The system prompt, then the history with the images of all but the latest KEEP turns with images
        named in the text instead of sent again."""
        keep = int(self.keep_images.value)
        with_files = [i for i, t in enumerate(turns) if t.role == "user" and any(not isinstance(p, str) for p in t.parts)]
        dropped = set(with_files[:-keep] if keep else [])
        sent = []
        for i, turn in enumerate(turns):
            if i not in dropped:
                sent.append(turn)
                continue
            names = []
            for part in turn.parts:
                if not isinstance(part, str):
                    item = self._files.get(id(part))
                    kind = "video" if isinstance(part, videos.Video) else "image"
                    names.append(f"{kind} {item.name}" if item else kind)
            note = f"[{', '.join(names)}: shown earlier in the conversation, not sent again]\n"
            sent.append(ChatTurn("user", [note + "".join(p for p in turn.parts if isinstance(p, str))]))
        system = self.system_prompt.value.strip()
        return ([ChatTurn("system", [system])] if system else []) + sent

    def _answer(self, generation: int, stop: threading.Event, turns: list, files: list, text: str,
                params: dict) -> None:
        started = time.perf_counter()
        first = None
        result, failure = None, None
        reply = None
        try:
            sampling = self.service.sampling_params(**params)
            if self.json_mode.value and self.json_mode.layout.display != "none":
                compile_output = getattr(self.engine, "compile_output", None)
                if compile_output is not None:  # the built-in engine holds the answer to JSON itself
                    from serving.structured import OutputSpec

                    sampling.output = compile_output(OutputSpec(schema={"type": "object"}))
                else:  # an upstream server is asked to
                    sampling.extra = {"response_format": {"type": "json_object"}}
            reply = self.service.start(self._turns_to_send(turns), sampling)
            self._reply = reply
            if stop.is_set():
                reply.cancel()
            self._set_status("reading_prompt", generation, prompt_tokens=reply.prompt_tokens)
            for event in reply:
                if isinstance(event, Finished):
                    result = Result(event.finish_reason, event.prompt_tokens, event.completion_tokens,
                                    time.perf_counter() - started, first)
                    break
                if stop.is_set():
                    break
                with self._lock:
                    if generation != self._generation:
                        break
                    if first is None:
                        first = time.perf_counter() - started
                    self.deltas.append(event)
                    self.answer += event
                self._show_answer(generation, first)
            if result is None:  # stopped before the engine's Finished: count the text written
                result = Result("stopped", reply.prompt_tokens, self.engine.count_tokens(self.answer) if self.answer
                                else 0, time.perf_counter() - started, first)
        except ServiceError as exc:
            failure = exc.message
        except Exception as exc:  # keep the UI alive whatever happens
            failure = f"{type(exc).__name__}: {exc}"
        finally:
            if reply is not None:
                reply.cancel()  # frees the engine if the generation is still running
        with self._lock:
            if generation != self._generation:
                return  # cleared meanwhile
            take_back = failure is not None or (result.finish_reason == "stopped" and not self.answer)
            if take_back:
                # the question got no answer: take it back so it can be asked (or changed) again
                if self._history and self._history[-1] is turns[-1]:
                    self._truncate(len(self._history) - 1)
                self._pending = [f for f in files if all(f is not p for p in self._pending)] + self._pending
                if not self.question.value:
                    self.question.value = text
                if failure is None:
                    self.last_result = result
            else:
                answer = ChatTurn("assistant", [self.answer])
                self._history.append(answer)
                self.last_result = result
                self._extras[id(answer)] = {"stopped": result.finish_reason == "stopped",
                                            "boxes": self._boxes_view(turns, self.answer)}
                self._rows.append((answer, self._turn_row(answer)))
            self._render_pending()
            self._render_transcript()
            self._answer_html.close()  # the streamed row; the answer's own row (with its actions) replaced it
            if failure is not None:
                self._set_error(label(self.lang, "failed", reason=failure))
                self._set_status("no_answer")
            elif take_back:
                self._set_status("stopped_empty")
            else:
                self._set_status_result(result)
            self._set_busy(False)
            following = self._queue.pop(0) if self._queue and failure is None else None
        if following is not None:
            self._render_queue()
            self._ask(*following)

    # ------------------------------------------------------------------ widget events

    def _on_upload(self, change) -> None:
        files = change["new"]
        if not files:
            return  # our own reset below
        errors = []
        for item in files:
            if not self.add_upload(item["name"], item["content"]):
                errors.append(self._error)
        self.upload.value = ()  # so the same file can be chosen again
        self._set_error("; ".join(errors))

    def _on_drop(self, change) -> None:
        """A file dropped on the widget or pasted into it: {"name", "data" (base64)} from the browser."""
        import base64
        import json

        raw = change["new"]
        if not raw:
            return  # our own reset below
        self.drop_sink.value = ""  # the file's bytes need not stay in the widget's state
        try:
            item = json.loads(raw)
            name, data = str(item.get("name") or "pasted.png"), base64.b64decode(item["data"], validate=True)
        except (ValueError, KeyError, TypeError, AttributeError):
            self._set_error(label(self.lang, "not_image", name="?"))
            return
        self.add_upload(name, data)

    def _on_import(self, change) -> None:
        files = change["new"]
        if not files:
            return
        item = files[0]
        self.import_upload.value = ()
        self.import_conversation(bytes(item["content"]), name=item["name"])

    def _on_export(self) -> None:
        import base64

        data = self._export_bytes()
        name = datetime.datetime.now().strftime("chat-%Y%m%d-%H%M%S.json")
        url = "data:application/json;base64," + base64.b64encode(data).decode()
        size = f"{len(data) / 1024:.0f} KB" if len(data) >= 1024 else f"{len(data)} B"
        self.export_link.value = (f"<a class='qv-download' download='{name}' href='{url}'>"
                                  f"{html.escape(label(self.lang, 'download', name=name, size=size))}</a>")
        self._set_status("exported", turns=len(self._history))

    def _export_bytes(self) -> bytes:
        import json

        return json.dumps(self.export_conversation(), ensure_ascii=False, indent=1).encode("utf-8")

    def _on_question_commit(self) -> None:
        """The browser committed the question box (Enter, or leaving it after typing): send it."""
        if self.question.value.strip():
            self.send()

    def _on_send_click(self) -> None:
        # Clicking Send moves the focus out of the question box first, which commits (and so sends) what was
        # typed: the click then finds the box empty and an answer on its way, and has nothing left to do.
        if self.busy and not self.question.value.strip():
            return
        self.send()

    # ------------------------------------------------------------------ reading uploads

    def _read_file(self, name: str, data: bytes, video: Optional[bool] = None) -> Optional[Pending]:
        """An uploaded (or imported) file -> Pending, sized for the model; None and an error shown if unusable."""
        t = lambda key, **kw: label(self.lang, key, **kw)  # noqa: E731
        is_video = video if video is not None else (videos.looks_like_video(data) or name.lower().endswith(VIDEO_EXTENSIONS))
        with self._lock:
            counts = [p.is_video for p in self._pending]
        if is_video:
            limit = self.settings.max_videos
            if sum(counts) >= limit:
                self._set_error(t("too_many_videos", name=name, limit=limit) if limit else t("videos_off", name=name))
                return None
            self._set_status("reading_video", name=name)
            try:
                clip = self.service.video_from_bytes(data, param=name)
            except ServiceError as exc:
                self._set_error(t("not_video", name=name) if exc.code == "invalid_video" else f"{name}: {exc.message}")
                self._set_status("ready")
                return None
            return Pending(name, clip, _strip_png(clip), data, clip.mime or "video/mp4")
        limit = self.settings.max_images
        if len(counts) - sum(counts) >= limit:
            self._set_error(t("too_many_images", name=name, limit=limit))
            return None
        try:
            image = self.service.image_from_bytes(data, param=name)
        except ImageError as exc:
            generic = exc.code == "invalid_image" and "truncated" not in exc.message
            self._set_error(t("not_image", name=name) if generic else f"{name}: {exc.message}")
            return None
        return Pending(name, image, _thumbnail_png(image), data, conversation.image_mime(data))

    # ------------------------------------------------------------------ grounding

    def _boxes_view(self, turns: list, answer: str):
        """When `answer` holds Qwen2.5-VL boxes (bbox_2d): the image they are about (the last image of the
        conversation's latest turn with images) as uploaded, with the boxes mapped back onto it and drawn,
        and their coordinates in its pixels, as (PNG, caption HTML) for _turn_row. None when there are no boxes
        or no image."""
        found = grounding.find_boxes(answer)
        image = next((part for turn in reversed(turns) if turn.role == "user"
                      for part in reversed(turn.parts) if isinstance(part, PILImage.Image)), None)
        if not found or image is None:
            self.boxes, self.boxes_image = [], None
            return None
        size = image_sizes([ChatTurn("user", [image])])[0]
        boxes = [grounding.to_original(box, size) for box in found]
        item = self._files.get(id(image))
        picture = (images.decode_image_bytes(item.data, param="upload", pixel_limit=self.settings.max_image_pixels,
                                             target_pixels=BOXES_MAX_SIDE ** 2)
                   if item is not None and item.data else image.resize((size.width, size.height)))
        scale = picture.width / size.width  # a large upload may be decoded at reduced size
        shown = [grounding.Box(b.x1 * scale, b.y1 * scale, b.x2 * scale, b.y2 * scale, b.label) for b in boxes]
        self.boxes, self.boxes_image = boxes, grounding.draw_boxes(picture, shown, max_side=BOXES_MAX_SIDE)
        buf = io.BytesIO()
        self.boxes_image.save(buf, "PNG")
        caption = "; ".join(f"{html.escape(b.label or 'box')} {b.as_list()}" for b in boxes)
        name = html.escape(item.name) if item is not None else "image"
        return buf.getvalue(), (f"<span style='color:#555'>{len(boxes)} box(es) in pixels of the uploaded "
                                f"{name} ({size.width}x{size.height}): {caption}</span>")

    # ------------------------------------------------------------------ widget updates

    def _set_status(self, key: str, generation: Optional[int] = None, **values) -> None:
        if generation is not None and generation != self._generation:
            return
        self._status_key = (key, values)
        self._status = label(self.lang, key, **values)
        self.status_label.value = f"<span style='color:#555'>{html.escape(self._status)}</span>"

    def _set_status_result(self, result: Result) -> None:
        ttft = f"{result.first_token_seconds:.2f} s" if result.first_token_seconds is not None else "-"
        reason = {"stop": "finished", "length": "length"}.get(result.finish_reason, "stopped")
        self._set_status("result", reason=label(self.lang, reason), tokens=result.completion_tokens,
                         ttft=ttft, prompt_tokens=result.prompt_tokens, speed=f"{result.tokens_per_second:.1f}")

    def _set_error(self, text: str) -> None:
        self._error = text
        self.error_label.value = (f"<span style='color:#c62828'><b>{html.escape(label(self.lang, 'error'))}:</b> "
                                  f"{html.escape(text)}</span>" if text else "")

    def _set_busy(self, busy: bool) -> None:
        self.stop_button.disabled = not busy
        self.import_upload.disabled = busy
        with self._lock:
            rows = [row for _turn, row in self._rows]
        for row in rows:
            for child in row.children:
                if "qv-actions" in child._dom_classes:
                    for button in child.children:
                        button.disabled = busy

    def _show_answer(self, generation: int, first: float) -> None:
        with self._lock:
            if generation != self._generation:
                return
            self._answer_html.value = render.bubble_html(self.answer, "assistant", self.lang, markdown=True,
                                                         cursor=True)
            count = len(self.deltas)
        self._set_status("writing", generation, pieces=count, ttft=first)

    def _render_pending(self) -> None:
        with self._lock:
            pending = list(self._pending)
        old = self.thumbnails.children
        self.thumbnails.children = [self._pending_box(i, p) for i, p in enumerate(pending)]
        self.pending_label.value = (f"<span style='color:#555'>{html.escape(label(self.lang, 'pending', count=len(pending)))}"
                                    "</span>" if pending else "")
        _close(old)

    def _pending_box(self, index: int, item: Pending) -> W.Widget:
        remove = W.Button(description=label(self.lang, "remove"), icon="times", layout=W.Layout(width="auto"))
        remove.add_class("qv-remove")
        remove.on_click(lambda _b, item=item: self.remove_pending(self._pending.index(item))
                        if item in self._pending else None)
        caption = W.HTML(f"<div class='qv-caption'>{html.escape(item.caption)}</div>")
        picture = W.Image(value=item.thumbnail, format="png", layout=W.Layout(width="auto", height="auto",
                                                                             object_fit="contain"))
        box = W.VBox([picture, caption, remove], layout=W.Layout(margin="2px 6px 2px 0", align_items="flex-start"))
        box.add_class("qv-pending-file")
        return box

    def _render_queue(self) -> None:
        with self._lock:
            queued = [text for text, _files in self._queue]
        shown = "; ".join(f"\u201c{q if len(q) <= 60 else q[:57] + '...'}\u201d" for q in queued)
        self.queue_label.value = (f"<span style='color:#6a1b9a'>{html.escape(label(self.lang, 'queued', questions=shown))}"
                                  "</span>" if queued else "")

    def _render_transcript(self, answering: bool = False) -> None:
        """Show the history; rows of turns already shown are reused, rows of dropped turns closed."""
        with self._lock:
            history = list(self._history)
            shown = {id(turn): row for turn, row in self._rows}
            rows = []
            for turn in history:
                row = shown.pop(id(turn), None) or self._turn_row(turn)
                rows.append((turn, row))
            _close(shown.values())
            self._rows = rows
            children = [row for _turn, row in rows]
            if answering:
                self._answer_html = W.HTMLMath(render.bubble_html("", "assistant", self.lang, markdown=True,
                                                                  cursor=True), layout=W.Layout(width="100%"))
                self._answer_html.add_class("qv-answer")
                children.append(self._answer_html)
            if not children:
                children = [self._empty_note]
            self.transcript.children = children

    def _turn_row(self, turn: ChatTurn) -> W.VBox:
        """One message: its files (click to enlarge), its text, its actions (edit a question, write an answer
        again), and below an answer with boxes, the picture they were drawn on."""
        text = "".join(p for p in turn.parts if isinstance(p, str))
        extras = self._extras.get(id(turn), {})
        note = label(self.lang, "stopped") if extras.get("stopped") else ""
        widgets = []
        files = [p for p in turn.parts if not isinstance(p, str)]
        if files:
            widgets.append(W.HTML("".join(self._figure(part) for part in files)))
        if turn.role == "assistant":
            bubble = W.HTMLMath(render.bubble_html(text, "assistant", self.lang, markdown=True, note=note),
                                layout=W.Layout(width="100%"))
        else:
            bubble = W.HTML(render.bubble_html(text, turn.role, self.lang), layout=W.Layout(width="100%"))
        bubble.add_class(f"qv-{turn.role}")
        widgets.append(bubble)
        action = {"user": ("edit", "pencil", self.edit), "assistant": ("regenerate", "refresh", self.regenerate)}.get(turn.role)
        if action is not None:
            key, icon, method = action
            button = W.Button(description=label(self.lang, key), icon=icon, disabled=self.busy,
                              layout=W.Layout(width="auto"))
            button.add_class(f"qv-{key}")
            button.on_click(lambda _b, turn=turn, method=method: method(self._index_of(turn)))
            actions = W.HBox([button])
            actions.add_class("qv-actions")
            widgets.append(actions)
        if extras.get("boxes"):
            png, caption = extras["boxes"]
            view = W.VBox([W.Image(value=png, format="png", layout=W.Layout(max_width=f"{BOXES_MAX_SIDE}px")),
                           W.HTML(caption)])
            view.add_class("qv-boxes")
            widgets.append(view)
        row = W.VBox(widgets)
        row.add_class("qv-row")
        return row

    def _figure(self, part) -> str:
        item = self._files.get(id(part))
        if isinstance(part, videos.Video):
            strip = PILImage.open(io.BytesIO(item.thumbnail if item else _strip_png(part)))
            caption = item.caption if item else f"video: {part.describe()}"
            return render.figure_html(render.png_data_url(strip, 400), caption, render.png_data_url(strip, 1600))
        caption = item.caption if item else "{}x{}".format(*part.info.get(images.ORIGINAL_SIZE, part.size))
        return render.figure_html(render.png_data_url(part, THUMBNAIL[0]), caption,
                                  render.png_data_url(part, LARGE_SIDE))

    def _index_of(self, turn) -> int:
        with self._lock:
            return next((i for i, t in enumerate(self._history) if t is turn), -1)

    def _truncate(self, index: int) -> None:
        """Drop the history from `index` on, and the files only those turns held."""
        self._history = self._history[:index]
        kept = {id(p) for t in self._history for p in t.parts if not isinstance(p, str)}
        self._files = {key: item for key, item in self._files.items() if key in kept}
        turns = {id(t) for t in self._history}
        self._extras = {key: extra for key, extra in self._extras.items() if key in turns}


class QuestionBox(W.Text):
    """The question box. continuous_update is off, so the browser sends the typed text when it is committed:
    on Enter (or when the box loses the focus after a change), ipywidgets 8's supported way to act on Enter
    (its `submit` event and on_submit are deprecated). `on_commit()` runs for each value the browser sends;
    values set from Python (clearing the box) do not call it."""

    def __init__(self, on_commit, **kwargs):
        super().__init__(continuous_update=False, **kwargs)
        self._on_commit = on_commit

    def set_state(self, sync_data):
        super().set_state(sync_data)  # ipywidgets calls set_state only with state from the browser
        if "value" in sync_data:
            self._on_commit()


def _close(widgets) -> None:
    """Close widgets and everything inside them, so the kernel forgets them."""
    for widget in list(widgets):
        _close(getattr(widget, "children", ()))
        widget.close()


def _thumbnail_png(image) -> bytes:
    small = image.copy()
    small.thumbnail(THUMBNAIL)
    buf = io.BytesIO()
    small.save(buf, "PNG")
    return buf.getvalue()


def _strip_png(clip) -> bytes:
    """A video's thumbnail strip: up to STRIP_FRAMES of its sampled frames side by side, PNG."""
    frames = clip.thumbnails(STRIP_FRAMES)
    width = max(1, round(STRIP_HEIGHT * clip.width / clip.height))
    strip = PILImage.new("RGB", (width * len(frames) + 2 * (len(frames) - 1), STRIP_HEIGHT), (255, 255, 255))
    for i, frame in enumerate(frames):
        strip.paste(frame.resize((width, STRIP_HEIGHT), PILImage.Resampling.BILINEAR), (i * (width + 2), 0))
    buf = io.BytesIO()
    strip.save(buf, "PNG")
    return buf.getvalue()
