"""The notebook chat UI: ipywidgets over an engine, through the chat service. Images stay in memory.

    chat = ChatWidget(engine, settings)
    chat            # the last line of a cell shows it

Everything a person does in the browser has a method here too (add_upload, send, stop, clear,
wait), so the UI is tested without a browser. An upload is an image or a video file (mp4, webm,
mov, ...): a video is sampled and sized at once (serving.intake.video) and shown as a strip of its
sampled frames. The answer is generated in a background thread
and streamed into the page delta by delta; Stop cancels the generation at once (the engine drops
it at its next step) and the streaming loop ends. Uploads are sized and questions answered by
serving.chat.ChatService, the same pipeline as the API's, with the same settings.
"""

from __future__ import annotations

import html
import io
import threading
import time
from dataclasses import dataclass
from typing import Optional

import ipywidgets as W

from PIL import Image as PILImage

from serving.notebook import grounding
from serving.intake import images
from serving.intake import video as videos
from serving.chat import ChatService, image_sizes
from serving.errors import ImageError, ServiceError
from serving.jobs import Finished
from serving.protocol import ChatTurn

THUMBNAIL = (96, 96)
STRIP_FRAMES = 8  # sampled frames shown in a video's thumbnail strip
STRIP_HEIGHT = 48
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".mpg", ".mpeg", ".ts", ".flv", ".ogv", ".3gp")
# The sliders' starting values: Qwen2.5's recommended sampling for chat
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.8
BOXES_MAX_SIDE = 640  # the picture with an answer's boxes drawn on it, in the transcript


@dataclass
class Pending:
    """An uploaded image or video waiting to be sent with the next question."""

    name: str
    image: object  # PIL image, RGB, already resized for the vision tower; or a serving.intake.video.Video, sampled and sized
    thumbnail: bytes  # PNG (a video's: a strip of its sampled frames)
    data: bytes = b""  # the file as uploaded: an answer's boxes are drawn on it


@dataclass
class Result:
    """How the last answer ended: Finished's fields, or "stopped" when Stop cut it short."""

    finish_reason: str  # "stop", "length" or "stopped"
    prompt_tokens: int
    completion_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


class ChatWidget:
    def __init__(self, engine, settings=None, *, system: Optional[str] = None,
                 temperature: float = DEFAULT_TEMPERATURE, top_p: float = DEFAULT_TOP_P,
                 max_tokens: Optional[int] = None):
        from serving.config import Settings

        self.engine = engine
        self.settings = settings or Settings()
        self.service = ChatService(engine, self.settings)
        self.system = system
        self._history: list[ChatTurn] = []
        self._pending: list[Pending] = []
        self._lock = threading.RLock()
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()  # the running answer's own flag; each answer gets a new one
        self._reply = None  # the running answer (serving.chat.Reply), cancelled by Stop and Clear
        self._generation = 0  # bumped by send and clear: a stale thread leaves the UI and history alone
        self._thread_generation = -1
        self._rows: list = []  # (turn, [widgets]) shown in the transcript, in order
        self.deltas: list[str] = []  # the text deltas of the latest answer, as they arrived
        self.answer = ""  # the latest answer so far
        self.last_result: Optional[Result] = None
        self.boxes: list = []  # the latest answer's boxes (serving.notebook.grounding.Box), in pixels of the uploaded image
        self.boxes_image = None  # that image with them drawn (PIL), as the transcript shows it
        self._uploads: dict = {}  # id(sized image in the history) -> the file as uploaded
        self._error = ""
        self._status = ""
        self._build_controls(temperature, top_p, max_tokens)
        self._render_transcript()
        self._set_status("ready: upload images (optional), type a question, press Enter or Send")

    # ------------------------------------------------------------------ layout

    def _build_controls(self, temperature, top_p, max_tokens) -> None:
        limit = self.settings.max_tokens_limit
        if max_tokens is None:
            max_tokens = self.settings.default_max_tokens

        self.upload = W.FileUpload(accept="image/*,video/*", multiple=True, description="Images/video",
                                   tooltip="add images or a video to the next question")
        self.upload.add_class("qv-upload")
        self.upload.observe(self._on_upload, names="value")
        self.thumbnails = W.HBox(layout=W.Layout(flex_flow="row wrap"))
        self.thumbnails.add_class("qv-pending")
        self.question = QuestionBox(self._on_question_commit, placeholder="Ask about the images, then press Enter",
                                    layout=W.Layout(flex="1 1 auto", width="auto"))
        self.question.add_class("qv-question")
        self.send_button = W.Button(description="Send", button_style="primary", icon="paper-plane",
                                    layout=W.Layout(width="90px"))
        self.send_button.add_class("qv-send")
        self.send_button.on_click(lambda _b: self._on_send_click())
        self.stop_button = W.Button(description="Stop", button_style="warning", icon="stop",
                                    disabled=True, layout=W.Layout(width="80px"))
        self.stop_button.add_class("qv-stop")
        self.stop_button.on_click(lambda _b: self.stop())
        self.clear_button = W.Button(description="Clear", icon="trash", layout=W.Layout(width="80px"))
        self.clear_button.add_class("qv-clear")
        self.clear_button.on_click(lambda _b: self.clear())

        slider_layout = W.Layout(width="300px")
        self.temperature = W.FloatSlider(value=min(max(float(temperature), 0.0), 2.0), min=0.0, max=2.0,
                                         step=0.05, description="temperature", readout_format=".2f",
                                         tooltip="0 = greedy", layout=slider_layout)
        self.top_p = W.FloatSlider(value=min(max(float(top_p), 0.01), 1.0), min=0.01, max=1.0, step=0.01,
                                   description="top_p", readout_format=".2f", layout=slider_layout)
        self.max_tokens = W.IntSlider(value=min(max(int(max_tokens), 1), limit), min=1, max=limit,
                                      description="max tokens", layout=slider_layout)
        for slider in (self.temperature, self.top_p, self.max_tokens):
            slider.style.description_width = "initial"
        self.defaults_note = W.HTML(
            f"<span style='color:#666;font-size:90%'>defaults: temperature {DEFAULT_TEMPERATURE:g}, top_p "
            f"{DEFAULT_TOP_P:g} (Qwen2.5's recommended sampling for chat; the checkpoint's own defaults are "
            "near-greedy); temperature 0 = greedy</span>")
        self.defaults_note.add_class("qv-defaults")

        self.transcript = W.VBox(layout=W.Layout(max_height="480px", overflow="auto",
                                                 border="1px solid #ddd", padding="6px"))
        self.transcript.add_class("qv-transcript")
        self._empty_note = W.HTML("<span style='color:#888'>No messages yet.</span>")
        self._answer_html = W.HTML()
        self.status_label = W.HTML()
        self.status_label.add_class("qv-status")
        self.error_label = W.HTML()
        self.error_label.add_class("qv-error")

        header = []
        if self.engine.info.is_demo:
            header.append(W.HTML("<i>Demo model: random weights, its answers are meaningless text.</i>"))
        self.ui = W.VBox(header + [
            self.transcript,
            self.thumbnails,
            W.HBox([self.upload, self.question, self.send_button, self.stop_button, self.clear_button]),
            W.HBox([self.temperature, self.top_p, self.max_tokens, self.defaults_note],
                   layout=W.Layout(flex_flow="row wrap", align_items="center")),
            self.status_label,
            self.error_label,
        ], layout=W.Layout(width="100%"))
        self.ui.add_class("qv-chat")

    def display(self) -> None:
        from IPython.display import display

        display(self.ui)

    def _repr_mimebundle_(self, **kwargs):
        return self.ui._repr_mimebundle_(**kwargs)

    # ------------------------------------------------------------------ state, read-only

    @property
    def history(self) -> list:
        """The conversation so far: ChatTurns whose parts are PIL images and text."""
        with self._lock:
            return list(self._history)

    @property
    def pending(self) -> list:
        """Images uploaded for the next question."""
        with self._lock:
            return list(self._pending)

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
        """Decode and resize an uploaded file; False (and an error shown) when it is not an image or a video."""
        self._set_error("")
        if videos.looks_like_video(data) or name.lower().endswith(VIDEO_EXTENSIONS):
            return self._add_video(name, data)
        limit = self.settings.max_images
        if sum(not isinstance(p.image, videos.Video) for p in self._pending) >= limit:
            self._set_error(f"{name}: at most {limit} images per question")
            return False
        try:
            image = self.service.image_from_bytes(bytes(data), param=name)
        except ImageError as exc:
            self._set_error(f"{name}: {exc.message}")
            return False
        with self._lock:
            self._pending.append(Pending(name, image, _thumbnail_png(image), bytes(data)))
        self._render_pending()
        return True

    def _add_video(self, name: str, data: bytes) -> bool:
        limit = self.settings.max_videos
        if sum(isinstance(p.image, videos.Video) for p in self._pending) >= limit:
            self._set_error(f"{name}: at most {limit} videos per question" if limit else f"{name}: videos are off")
            return False
        self._set_status(f"reading the video {name}...")
        try:
            clip = self.service.video_from_bytes(bytes(data), param=name)
        except ServiceError as exc:
            self._set_error(f"{name}: {exc.message}")
            self._set_status("ready")
            return False
        with self._lock:
            self._pending.append(Pending(name, clip, _strip_png(clip)))
        self._render_pending()
        self._set_status(f"video {name}: {clip.describe()}")
        return True

    def send(self) -> bool:
        """Start answering the typed question with the pending images; False when it cannot start."""
        self._set_error("")
        if self.busy:
            self._set_error("an answer is still being written: wait for it or press Stop")
            return False
        text = self.question.value.strip()
        if not text:
            self._set_error("type a question first")
            return False
        with self._lock:
            turn = ChatTurn("user", [p.image for p in self._pending] + [text])
            pending = self._pending
            self._pending = []
            self._uploads.update((id(p.image), p.data) for p in pending if p.data)
            self._history.append(turn)
            turns = list(self._history)
            self._generation += 1
            generation = self._generation
            self.deltas, self.answer, self.last_result = [], "", None
            self.boxes, self.boxes_image = [], None
            self._stop = stop = threading.Event()
        self.question.value = ""
        self._render_pending()
        self._render_transcript(answering=True)
        self._set_busy(True)
        self._set_status("reading the question...")
        params = dict(max_tokens=int(self.max_tokens.value), temperature=float(self.temperature.value),
                      top_p=float(self.top_p.value))
        if params["temperature"] > 0:
            params["top_k"] = 0  # the sliders decide: a model default of top_k=1 would make sampling greedy
        self._thread = threading.Thread(target=self._answer, args=(generation, stop, turns, pending, text, params),
                                        name="chat-widget-answer", daemon=True)
        self._thread_generation = generation
        self._thread.start()
        return True

    def stop(self) -> None:
        """Cancel the answer being written; what was written so far stays in the conversation."""
        if self.busy:
            self._stop.set()
            reply = self._reply
            if reply is not None:
                reply.cancel()  # at once, even while the model is still reading a long prompt
            self._set_status("stopping...")

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the latest answer is done; True when it is."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return thread is None or not thread.is_alive()

    def clear(self) -> None:
        """Start over: stop any answer, forget the conversation and the pending images."""
        self._stop.set()
        if self._reply is not None:
            self._reply.cancel()
        with self._lock:
            self._generation += 1
            self._history = []
            self._pending = []
            self._uploads = {}
            self.deltas, self.answer, self.last_result = [], "", None
            self.boxes, self.boxes_image = [], None
        self.question.value = ""
        self._set_busy(False)
        self._set_error("")
        self._render_pending()
        self._render_transcript()
        self._answer_html.close()  # an abandoned answer's row
        self._set_status("cleared: a new conversation")

    # ------------------------------------------------------------------ the answer, in a thread

    def _answer(self, generation: int, stop: threading.Event, turns: list, pending: list, text: str,
                params: dict) -> None:
        started = time.perf_counter()
        result, failure = None, None
        reply = None
        try:
            system = [ChatTurn("system", [self.system])] if self.system else []
            reply = self.service.start(system + turns, self.service.sampling_params(**params))
            self._reply = reply
            if stop.is_set():
                reply.cancel()
            self._set_status("writing...", generation)
            for event in reply:
                if isinstance(event, Finished):
                    result = Result(event.finish_reason, event.prompt_tokens, event.completion_tokens,
                                    event.seconds)
                    break
                if stop.is_set():
                    break
                with self._lock:
                    if generation != self._generation:
                        break
                    self.deltas.append(event)
                    self.answer += event
                self._show_answer(generation)
            if result is None:  # stopped before the engine's Finished: count the text written
                result = Result("stopped", reply.prompt_tokens, self.engine.count_tokens(self.answer),
                                time.perf_counter() - started)
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
            if failure is not None:
                # the question did not get an answer: take it back so it can be asked again
                if self._history and self._history[-1] is turns[-1]:
                    self._history.pop()
                self._pending = pending + self._pending
            else:
                answer = ChatTurn("assistant", [self.answer])
                self._history.append(answer)
                self.last_result = result
                self._answer_html.value = _bubble(self.answer, "assistant")  # without the cursor
                boxes = self._boxes_view(turns, self.answer)
                if boxes is not None:
                    self.transcript.children = self.transcript.children + (boxes,)
                self._rows.append((answer, [self._answer_html] + ([boxes] if boxes is not None else [])))
            if failure is not None:
                if not self.question.value:
                    self.question.value = text
                self._set_error(failure)
                self._set_status("no answer")
                self._render_pending()
                self._render_transcript()
                self._answer_html.close()
            else:
                self._set_status(_describe(result))
            self._set_busy(False)

    # ------------------------------------------------------------------ widget updates

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

    def _boxes_view(self, turns: list, answer: str):
        """When `answer` holds Qwen2.5-VL boxes (bbox_2d): the image they are about (the last image of the
        conversation's latest turn with images) as uploaded, with the boxes mapped back onto it and drawn,
        and their coordinates in its pixels. None when there are no boxes or no image."""
        found = grounding.find_boxes(answer)
        image = next((part for turn in reversed(turns) if turn.role == "user"
                      for part in reversed(turn.parts) if isinstance(part, PILImage.Image)), None)
        if not found or image is None:
            self.boxes, self.boxes_image = [], None
            return None
        size = image_sizes([ChatTurn("user", [image])])[0]
        boxes = [grounding.to_original(box, size) for box in found]
        data = self._uploads.get(id(image))
        picture = (images.decode_image_bytes(data, param="upload", pixel_limit=self.settings.max_image_pixels,
                                             target_pixels=BOXES_MAX_SIDE ** 2)
                   if data else image.resize((size.width, size.height)))
        scale = picture.width / size.width  # a large upload may be decoded at reduced size
        shown = [grounding.Box(b.x1 * scale, b.y1 * scale, b.x2 * scale, b.y2 * scale, b.label) for b in boxes]
        self.boxes, self.boxes_image = boxes, grounding.draw_boxes(picture, shown, max_side=BOXES_MAX_SIDE)
        buf = io.BytesIO()
        self.boxes_image.save(buf, "PNG")
        caption = "; ".join(f"{html.escape(b.label or 'box')} {b.as_list()}" for b in boxes)
        view = W.VBox([W.Image(value=buf.getvalue(), format="png",
                               layout=W.Layout(max_width=f"{BOXES_MAX_SIDE}px")),
                       W.HTML(f"<span style='color:#555'>{len(boxes)} box(es) in pixels of the uploaded "
                              f"{size.width}x{size.height} image: {caption}</span>")])
        view.add_class("qv-boxes")
        return view

    def _set_status(self, text: str, generation: Optional[int] = None) -> None:
        if generation is not None and generation != self._generation:
            return
        self._status = text
        self.status_label.value = f"<span style='color:#555'>{html.escape(text)}</span>"

    def _set_error(self, text: str) -> None:
        self._error = text
        self.error_label.value = f"<span style='color:#c62828'><b>Error:</b> {html.escape(text)}</span>" if text else ""

    def _set_busy(self, busy: bool, generation: Optional[int] = None) -> None:
        if generation is not None and generation != self._generation:
            return
        self.send_button.disabled = busy
        self.stop_button.disabled = not busy

    def _show_answer(self, generation: int) -> None:
        with self._lock:
            if generation != self._generation:
                return
            self._answer_html.value = _bubble(self.answer + " \u258c", "assistant")
            count = len(self.deltas)
        self._set_status(f"writing... {count} pieces", generation)

    def _render_pending(self) -> None:
        with self._lock:
            pending = list(self._pending)
        old = self.thumbnails.children
        self.thumbnails.children = [_thumbnail_box(p.thumbnail, p.name, wide=isinstance(p.image, videos.Video))
                                    for p in pending]
        _close(old)

    def _render_transcript(self, answering: bool = False) -> None:
        """Show the history; rows of turns already shown are reused, rows of dropped turns closed."""
        with self._lock:
            history = list(self._history)
            shown = {id(turn): widgets for turn, widgets in self._rows}
            rows = []
            for turn in history:
                widgets = shown.pop(id(turn), None) or _turn_widgets(turn)
                rows.append((turn, widgets))
            for widgets in shown.values():
                _close(widgets)
            self._rows = rows
            children = [w for _turn, widgets in rows for w in widgets]
            if answering:
                self._answer_html = W.HTML(_bubble("\u258c", "assistant"))
                self._answer_html.add_class("qv-answer")
                children.append(self._answer_html)
            if not children:
                children = [self._empty_note]
            self.transcript.children = children


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


def _turn_widgets(turn: ChatTurn) -> list:
    images = [p for p in turn.parts if not isinstance(p, str)]
    text = "".join(p for p in turn.parts if isinstance(p, str))
    widgets = []
    if images:
        widgets.append(W.HBox([_video_box(img) if isinstance(img, videos.Video)
                               else _thumbnail_box(_thumbnail_png(img), f"{img.width}x{img.height}") for img in images],
                              layout=W.Layout(flex_flow="row wrap")))
    row = W.HTML(_bubble(text, turn.role))
    row.add_class(f"qv-{turn.role}")
    widgets.append(row)
    return widgets


def _close(widgets) -> None:
    """Close widgets and everything inside them, so the kernel forgets them."""
    for widget in widgets:
        _close(getattr(widget, "children", ()))
        widget.close()


def _describe(result: Result) -> str:
    reason = {"stop": "finished", "length": "hit max tokens", "stopped": "stopped"}[result.finish_reason]
    return (f"{reason}: {result.completion_tokens} tokens in {result.seconds:.2f} s, "
            f"{result.tokens_per_second:.1f} tokens/s (prompt {result.prompt_tokens} tokens)")


def _bubble(text: str, role: str) -> str:
    who = {"user": "You", "assistant": "Model", "system": "System"}.get(role, role)
    colour = {"user": "#e3f2fd", "assistant": "#f5f5f5"}.get(role, "#fff8e1")
    return (f"<div style='background:{colour};border-radius:6px;padding:4px 8px;margin:2px 0;"
            f"white-space:pre-wrap;word-break:break-word'><b>{who}:</b> {html.escape(text)}</div>")


def _thumbnail_png(image) -> bytes:
    small = image.copy()
    small.thumbnail(THUMBNAIL)
    buf = io.BytesIO()
    small.save(buf, "PNG")
    return buf.getvalue()


def _strip_png(clip) -> bytes:
    """A video's thumbnail strip: up to STRIP_FRAMES of its sampled frames side by side, PNG."""
    from PIL import Image

    frames = clip.thumbnails(STRIP_FRAMES)
    width = max(1, round(STRIP_HEIGHT * clip.width / clip.height))
    strip = Image.new("RGB", (width * len(frames) + 2 * (len(frames) - 1), STRIP_HEIGHT), (255, 255, 255))
    for i, frame in enumerate(frames):
        strip.paste(frame.resize((width, STRIP_HEIGHT), Image.Resampling.BILINEAR), (i * (width + 2), 0))
    buf = io.BytesIO()
    strip.save(buf, "PNG")
    return buf.getvalue()


def _video_box(clip) -> W.Widget:
    return _thumbnail_box(_strip_png(clip), f"video: {clip.describe()}", wide=True)


def _thumbnail_box(png: bytes, caption: str, wide: bool = False) -> W.Widget:
    """A thumbnail with its caption; `wide`: a video's strip, shown at its own width."""
    limit = W.Layout() if wide else W.Layout(max_width=f"{THUMBNAIL[0]}px")
    return W.VBox([W.Image(value=png, format="png", layout=limit),
                   W.Label(caption, layout=W.Layout() if wide else W.Layout(max_width=f"{THUMBNAIL[0]}px"))],
                  layout=W.Layout(margin="2px 6px 2px 0"))
