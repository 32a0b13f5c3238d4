"""The notebook chat UI, driven through its widgets on the demo model (no browser here)."""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import png_bytes
from serving.chat import ChatService
from serving.intake.images import PATCH_FACTOR
from serving.notebook.widgets import ChatWidget

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "03_chat_widget.ipynb"


def upload_value(*files):
    """What ipywidgets 8's FileUpload holds after the browser sent files: a tuple of dicts."""
    return tuple({"name": name, "type": "image/png", "size": len(data), "content": memoryview(data),
                  "last_modified": datetime.datetime.now(datetime.timezone.utc)} for name, data in files)


def wait_until(predicate, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


@pytest.fixture()
def chat(engine, settings):
    widget = ChatWidget(engine, settings, temperature=0.0, max_tokens=24)
    yield widget
    widget.clear()
    widget.wait(60)


def greedy(engine, settings, turns, max_tokens):
    """The answer the chat service gives to `turns` directly (what the API would answer)."""
    service = ChatService(engine, settings)
    return service.start(turns, service.sampling_params(max_tokens=max_tokens, temperature=0)).collect().text


def test_upload_send_streams_the_answer_and_keeps_the_image_in_history(chat, engine, settings):
    chat.upload.value = upload_value(("red.png", png_bytes((200, 90), (200, 30, 30))))
    assert chat.upload.value == ()  # reset, so the same file can be chosen again
    assert [p.name for p in chat.pending] == ["red.png"]
    assert len(chat.thumbnails.children) == 1

    pieces = []
    chat.status_label.observe(lambda change: pieces.append(change["new"]), names="value")
    chat.question.value = "What is in this picture?"
    chat.send_button.click()
    assert chat.busy and chat.send_button.disabled and not chat.stop_button.disabled
    assert chat.wait(60)

    assert chat.error == ""
    assert len(chat.deltas) > 1 and "".join(chat.deltas) == chat.answer and chat.answer
    assert sum("writing... " in p and "pieces" in p for p in pieces) == len(chat.deltas)  # one UI update per delta
    assert chat.pending == [] and chat.thumbnails.children == ()
    assert chat.question.value == ""

    user, assistant = chat.history
    assert user.role == "user" and assistant.role == "assistant"
    image, text = user.parts
    assert isinstance(image, Image.Image) and text == "What is in this picture?"
    assert image.width % PATCH_FACTOR == 0 and image.height % PATCH_FACTOR == 0
    assert assistant.parts == [chat.answer]
    assert chat.answer == greedy(engine, settings, [user], 24)  # the widget sent exactly this conversation

    assert chat.last_result.finish_reason in ("stop", "length")
    assert "tokens/s" in chat.status and str(chat.last_result.completion_tokens) in chat.status
    assert not chat.busy and not chat.send_button.disabled and chat.stop_button.disabled


def test_second_turn_sends_the_whole_conversation(chat, engine, settings, monkeypatch):
    seen = []
    start = engine.start
    monkeypatch.setattr(engine, "start", lambda turns, params: seen.append(list(turns)) or start(turns, params))

    assert chat.add_upload("a.png", png_bytes((64, 64), (10, 200, 10)))
    chat.question.value = "First question"
    chat.send_button.click()
    chat.wait(60)
    first_answer = chat.answer
    chat.question.value = "And a follow-up?"
    chat.send_button.click()
    chat.wait(60)

    assert chat.error == ""
    roles = [t.role for t in chat.history]
    assert roles == ["user", "assistant", "user", "assistant"]
    assert chat.history[1].parts == [first_answer]
    assert chat.history[2].parts == ["And a follow-up?"]
    sent = seen[-1]
    assert [t.role for t in sent] == ["user", "assistant", "user"]
    assert isinstance(sent[0].parts[0], Image.Image)  # the first turn's image goes along
    assert chat.answer == greedy(engine, settings, chat.history[:3], 24)
    assert len(chat.transcript.children) == 5  # thumbnails row + 4 messages


def browser_commits(box, text):
    """What the browser sends when Enter commits the question box (continuous_update is off): the value."""
    box._handle_msg({"content": {"data": {"method": "update", "state": {"value": text}}}, "buffers": []})


def test_enter_in_the_question_box_sends(chat):
    assert chat.question.continuous_update is False  # ipywidgets 8's supported Enter: a committed value
    chat.question.value = "Hello?"
    chat.question._handle_custom_msg({"event": "submit"}, [])  # the deprecated submit event sends nothing
    assert not chat.busy and chat.history == []
    browser_commits(chat.question, "Hello?")
    assert chat.wait(60)
    assert [t.role for t in chat.history] == ["user", "assistant"]
    assert chat.history[0].parts == ["Hello?"] and chat.error == ""


def test_values_set_from_python_do_not_send(chat):
    chat.question.value = "Not yet"
    assert not chat.busy and chat.history == []
    browser_commits(chat.question, "   ")  # leaving an empty box: nothing to send, no error
    assert not chat.busy and chat.error == ""


def test_send_clicked_after_the_box_committed_is_quiet(chat):
    """A click on Send first takes the focus from the box, which commits (and sends) the question."""
    browser_commits(chat.question, "Typed, then Send clicked")
    chat.send_button.click()
    assert chat.wait(60)
    assert chat.error == "" and [t.role for t in chat.history] == ["user", "assistant"]


def test_the_slider_defaults_are_stated_beside_them(chat):
    from serving.notebook.widgets import DEFAULT_TEMPERATURE, DEFAULT_TOP_P

    note = chat.defaults_note.value
    assert f"temperature {DEFAULT_TEMPERATURE:g}" in note and f"top_p {DEFAULT_TOP_P:g}" in note
    assert "greedy" in note
    sliders = next(box for box in chat.ui.children if chat.temperature in getattr(box, "children", ()))
    assert chat.defaults_note in sliders.children


def test_stop_cancels_a_long_answer(chat, settings):
    limit = settings.max_tokens_limit
    chat.max_tokens.value = limit
    chat.question.value = "Tell me a very long story"
    started = time.perf_counter()
    chat.send_button.click()
    assert wait_until(lambda: len(chat.deltas) >= 3)
    chat.stop_button.click()
    assert chat.wait(30)
    elapsed = time.perf_counter() - started

    result = chat.last_result
    assert result.finish_reason == "stopped"
    assert 0 < result.completion_tokens < limit // 4
    assert "stopped" in chat.status
    assert [t.role for t in chat.history] == ["user", "assistant"]
    assert chat.history[1].parts == [chat.answer] and chat.answer

    # the generation was cancelled in the engine: the next answer does not queue behind `limit` tokens
    chat.max_tokens.value = 4
    chat.question.value = "Short one"
    chat.send_button.click()
    assert chat.wait(30)
    assert chat.last_result.finish_reason in ("stop", "length") and chat.last_result.completion_tokens <= 4
    assert time.perf_counter() - started < elapsed + 20


def test_clear_starts_over_even_while_answering(chat, settings):
    chat.add_upload("x.png", png_bytes())
    chat.question.value = "One"
    chat.send_button.click()
    chat.wait(60)
    assert len(chat.history) == 2

    chat.clear_button.click()
    assert chat.history == [] and chat.pending == [] and chat.answer == ""
    assert "No messages" in chat.transcript.children[0].value
    assert "cleared" in chat.status

    chat.max_tokens.value = settings.max_tokens_limit
    chat.question.value = "Two"
    chat.send_button.click()
    assert wait_until(lambda: len(chat.deltas) >= 1)
    thread = chat._thread
    chat.clear_button.click()
    assert not chat.busy and not chat.send_button.disabled
    thread.join(30)
    assert not thread.is_alive()
    assert chat.history == [] and chat.answer == ""  # the abandoned answer did not come back


def test_a_file_that_is_not_an_image_is_rejected(chat):
    assert not chat.add_upload("notes.txt", b"not an image")
    assert "notes.txt" in chat.error and "not an image" in chat.error
    assert "Error" in chat.error_label.value
    assert chat.pending == []

    chat.upload.value = upload_value(("good.png", png_bytes()), ("bad.png", b"not an image"))
    assert [p.name for p in chat.pending] == ["good.png"]
    assert "bad.png" in chat.error


def test_an_empty_question_is_an_error(chat):
    chat.add_upload("x.png", png_bytes())
    chat.question.value = "   "
    chat.send_button.click()
    assert not chat.busy
    assert "question" in chat.error
    assert chat.history == [] and len(chat.pending) == 1  # the image waits for a question


def test_send_while_answering_is_refused(chat, engine):
    chat.max_tokens.value = 200
    chat.question.value = "One"
    chat.send_button.click()
    chat.question.value = "Two"
    assert not chat.send()
    assert "still being written" in chat.error
    chat.stop()
    chat.wait(30)
    assert [t.parts[-1] for t in chat.history if t.role == "user"] == ["One"]


def test_sampling_sliders_reach_the_engine(chat, engine, monkeypatch):
    seen = []
    start = engine.start
    monkeypatch.setattr(engine, "start", lambda turns, params: seen.append(params) or start(turns, params))
    chat.temperature.value, chat.top_p.value, chat.max_tokens.value = 0.8, 0.9, 5
    chat.question.value = "Sample, please"
    chat.send_button.click()
    chat.wait(60)
    params = seen[-1]
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k) == (5, 0.8, 0.9, 0)
    assert chat.last_result.completion_tokens <= 5


def test_the_last_line_of_a_cell_shows_it(chat):
    bundle = chat._repr_mimebundle_()
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == chat.ui.model_id


def test_notebook_is_clean_and_runs_headless():
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    assert all(c.get("id") for c in nb.cells)
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and 'MODEL = "demo"' in params[0].source

    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert errors == []
    last = code[-1].outputs
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in last)


def test_an_engine_error_is_shown_and_the_question_can_be_asked_again(chat, engine, monkeypatch):
    from serving.errors import InvalidRequest

    def refuse(turns, params):
        raise InvalidRequest("the prompt is too long for this model", param="messages")

    monkeypatch.setattr(engine, "start", refuse)
    chat.add_upload("x.png", png_bytes())
    chat.question.value = "Will this fail?"
    chat.send_button.click()
    assert chat.wait(30)
    assert "too long" in chat.error and "Error" in chat.error_label.value
    assert chat.history == [] and chat.status == "no answer"
    assert chat.question.value == "Will this fail?" and len(chat.pending) == 1  # ready to try again
    assert not chat.send_button.disabled and chat.stop_button.disabled

    monkeypatch.undo()
    chat.send_button.click()
    assert chat.wait(60)
    assert chat.error == "" and [t.role for t in chat.history] == ["user", "assistant"]
    assert isinstance(chat.history[0].parts[0], Image.Image)


# ---------------------------------------------------------------- grounding: boxes drawn on the uploaded image

# What Qwen2.5-VL answers to "Outline the position of each shape and output all the coordinates in JSON format.":
# absolute pixel coordinates in the image as the model saw it. The demo model's random weights cannot ground,
# so the engine is given this answer (as other tests here give it an error); the image goes through the real
# upload path and the widget does the rest.
GROUNDED = ('```json\n[\n\t{"bbox_2d": [28, 56, 140, 168], "label": "red square"},\n'
            '\t{"bbox_2d": [196, 28, 280, 112], "label": "blue circle"}\n]\n```')


def _shapes_png(size=(1600, 1200)) -> bytes:
    import io

    from PIL import ImageDraw

    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.rectangle([160, 320, 800, 960], fill=(220, 30, 30))
    draw.ellipse([1120, 160, 1600, 640], fill=(30, 60, 220))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_an_answer_with_boxes_draws_them_on_the_uploaded_image(chat, engine, settings, monkeypatch):
    from fake_engine import FakeGeneration
    from serving.jobs import Finished, TextDelta

    seen = []

    def grounded(turns, params):
        seen.append(turns)
        return FakeGeneration([TextDelta(GROUNDED[:40]), TextDelta(GROUNDED[40:]),
                               Finished("stop", prompt_tokens=300, completion_tokens=60, seconds=0.1)],
                              prompt_tokens=300)

    monkeypatch.setattr(engine, "start", grounded)
    assert chat.add_upload("shapes.png", _shapes_png())
    browser_commits(chat.question, "Outline the position of each shape and output all the coordinates in JSON.")
    assert chat.wait(60) and chat.error == ""

    sized = seen[-1][0].parts[0]  # the image as the model saw it: scaled down to the pixel budget
    assert sized.size != (1600, 1200) and sized.width % 28 == 0
    sx, sy = 1600 / sized.width, 1200 / sized.height
    assert [b.label for b in chat.boxes] == ["red square", "blue circle"]
    first = chat.boxes[0]  # in pixels of the uploaded 1600x1200 image
    assert (first.x1, first.y1, first.x2, first.y2) == pytest.approx((28 * sx, 56 * sy, 140 * sx, 168 * sy))
    drawn = chat.boxes_image
    assert drawn.size == (640, 480)  # the uploaded picture, shrunk for the page
    from serving.notebook.grounding import COLOURS

    # the red square's box is drawn where the mapped box says, in the first box colour
    scale = 640 / 1600
    row = round((first.y1 + first.y2) / 2 * scale)
    left = [drawn.getpixel((x, row)) for x in range(int(first.x1 * scale) - 1, int(first.x1 * scale) + 3)]
    assert any(sum(abs(a - b) for a, b in zip(pixel, COLOURS[0])) < 40 for pixel in left), left  # after shrinking
    view = chat.transcript.children[-1]
    assert "qv-boxes" in view._dom_classes and "1600x1200" in view.children[1].value
    assert "red square" in view.children[1].value

    chat.clear()
    assert chat.boxes == [] and chat.boxes_image is None


def test_an_answer_without_boxes_draws_nothing(chat):
    chat.add_upload("x.png", png_bytes())
    browser_commits(chat.question, "What is it?")
    assert chat.wait(60)
    assert chat.boxes == [] and chat.boxes_image is None
    assert not any("qv-boxes" in getattr(w, "_dom_classes", ()) for w in chat.transcript.children)
