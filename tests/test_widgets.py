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
    assert chat.busy and not chat.stop_button.disabled
    assert not chat.send_button.disabled  # a question typed meanwhile is queued, not refused
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
    assert len(chat.transcript.children) == 2  # the question's row and the answer's (the streamed one replaced)


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
    assert len(chat.transcript.children) == 4  # one row per message
    assert "a.png, 64x64" in chat.transcript.children[0].children[0].value  # the image's caption: name, size


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
    assert chat.defaults_note in chat.settings_box.children
    assert any(chat.temperature in getattr(box, "children", ()) for box in chat.settings_box.children)


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


def test_a_question_sent_while_answering_is_queued_and_goes_next(chat, engine):
    chat.max_tokens.value = 200
    chat.question.value = "One"
    chat.send_button.click()
    chat.question.value = "Two"
    assert chat.send() and chat.error == ""
    assert chat.queued == ["Two"] and "Two" in chat.queue_label.value and "queued" in chat.status
    assert chat.question.value == ""
    assert wait_until(lambda: len(chat.deltas) >= 2)
    chat.stop()  # stops "One"; "Two" goes next
    assert chat.wait(60)
    assert [t.role for t in chat.history] == ["user", "assistant", "user", "assistant"]
    assert [t.parts[-1] for t in chat.history if t.role == "user"] == ["One", "Two"]
    assert chat.queued == [] and chat.queue_label.value == "" and chat.error == ""
    assert chat.last_result.finish_reason in ("stop", "length")


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
    assert params.seed is None  # -1: a random seed
    assert chat.last_result.completion_tokens <= 5

    chat.top_k.value, chat.repetition_penalty.value, chat.seed.value = 7, 1.3, 1234
    chat.question.value = "Again, seeded"
    chat.send_button.click()
    chat.wait(60)
    params = seen[-1]
    assert (params.top_k, params.repetition_penalty, params.seed) == (7, 1.3, 1234)
    seeded = chat.answer
    chat.regenerate()
    chat.wait(60)
    assert chat.answer == seeded  # the same seed samples the same answer


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
    widget = next(c for c in code if c.id == "chat-widget").outputs
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in widget)
    example = next(c for c in code if c.id == "grounding-example").outputs  # the offline grounding example
    printed = "".join(o.get("text", "") for o in example)
    assert "uploaded 640x480, the model sees 644x476" in printed and "red box: [59.6, 250.1, 250.4, 429.6]" in printed
    assert any("image/png" in o.get("data", {}) for o in example)


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
    view = chat.transcript.children[-1].children[-1]  # below the answer, in its row
    assert "qv-boxes" in view._dom_classes and "1600x1200" in view.children[1].value
    assert "shapes.png" in view.children[1].value
    assert "red square" in view.children[1].value

    chat.set_language("zh")  # the rows are drawn again: the boxes stay below the answer
    assert "qv-boxes" in chat.transcript.children[-1].children[-1]._dom_classes
    chat.clear()
    assert chat.boxes == [] and chat.boxes_image is None


def test_an_answer_without_boxes_draws_nothing(chat):
    chat.add_upload("x.png", png_bytes())
    browser_commits(chat.question, "What is it?")
    assert chat.wait(60)
    assert chat.boxes == [] and chat.boxes_image is None
    assert not any("qv-boxes" in getattr(w, "_dom_classes", ()) for row in chat.transcript.children
                   for w in getattr(row, "children", ()))


# ---------------------------------------------------------------- issue 19: what a user meets, and what other chat UIs have

def test_upload_errors_name_no_library_and_clear_on_the_next_action(chat):
    assert not chat.add_upload("notes.txt", b"plain text, not an image")
    assert "notes.txt" in chat.error
    assert "Pillow" not in chat.error and "Error)" not in chat.error  # no library or exception names
    assert not chat.add_upload("clip.mp4", b"\x00\x00\x00\x18ftypmp42" + b"broken" * 50)
    assert "clip.mp4" in chat.error and "FFmpeg" not in chat.error and "decoded" in chat.error
    assert chat.add_upload("cat.png", png_bytes((640, 480)))
    assert chat.error == "" and chat.error_label.value == ""  # the error went with the next thing that worked

    chat.question.value = ""
    assert not chat.send()
    assert chat.error == "type a question first"
    chat.question.value = "Now?"
    assert chat.send() and chat.error == ""
    assert chat.wait(60) and chat.error == ""


def test_pending_files_are_captioned_with_name_and_size_and_one_can_be_removed(chat, engine, monkeypatch):
    seen = []
    start = engine.start
    monkeypatch.setattr(engine, "start", lambda turns, params: seen.append(list(turns)) or start(turns, params))
    chat.upload.value = upload_value(("cat.png", png_bytes((640, 480))), ("dog.png", png_bytes((300, 200))),
                                     ("bird.png", png_bytes((100, 100))))
    assert [p.caption for p in chat.pending] == ["cat.png, 640x480", "dog.png, 300x200", "bird.png, 100x100"]
    assert "3 file(s)" in chat.pending_label.value
    captions = [box.children[1].value for box in chat.thumbnails.children]
    assert "cat.png, 640x480" in captions[0]  # the file's own size, not the model-side one (644x476)
    dog = chat.thumbnails.children[1]
    dog.children[2].click()  # its Remove button
    assert [p.name for p in chat.pending] == ["cat.png", "bird.png"] and len(chat.thumbnails.children) == 2
    assert "2 file(s)" in chat.pending_label.value
    assert "(0)" not in chat.upload.description  # the attach button shows no stale count of its own

    chat.question.value = "Two pictures"
    chat.send()
    assert chat.wait(60)
    assert sum(isinstance(p, Image.Image) for p in seen[-1][0].parts) == 2
    assert chat.pending_label.value == ""


def test_reading_the_prompt_is_a_state_of_its_own_and_speed_excludes_it(chat):
    statuses = []
    chat.status_label.observe(lambda change: statuses.append(change["new"]), names="value")
    chat.add_upload("x.png", png_bytes((448, 448)))
    chat.question.value = "Describe it"
    chat.send()
    assert chat.wait(60)
    first_writing = next(i for i, s in enumerate(statuses) if "writing..." in s)
    assert any("reading the prompt" in s and "tokens" in s for s in statuses[:first_writing])
    assert not any("pieces" in s for s in statuses[:first_writing])  # no "writing... 1 pieces" while reading
    result = chat.last_result
    assert 0 < result.first_token_seconds < result.seconds
    assert result.tokens_per_second == pytest.approx((result.completion_tokens - 1)
                                                     / (result.seconds - result.first_token_seconds))
    assert f"first token after {result.first_token_seconds:.2f} s" in chat.status
    assert f"prompt {result.prompt_tokens} tokens" in chat.status


def test_stop_before_the_first_token_leaves_no_empty_answer(chat):
    chat.add_upload("x.png", png_bytes())
    chat.question.value = "Stop me at once"
    chat.send()
    chat.stop()
    assert chat.wait(30)
    assert chat.history == []  # no empty "Model:" bubble; the question is back, ready to send again
    assert chat.question.value == "Stop me at once" and len(chat.pending) == 1
    assert "back in the box" in chat.status and chat.error == ""
    assert "No messages" in chat.transcript.children[0].value
    assert not chat.busy and chat.stop_button.disabled


def test_a_stopped_answer_says_so_in_its_bubble(chat, settings):
    chat.max_tokens.value = settings.max_tokens_limit
    chat.question.value = "A long one"
    chat.send()
    assert wait_until(lambda: len(chat.deltas) >= 2)
    chat.stop()
    assert chat.wait(30)
    bubble = chat.transcript.children[-1].children[0].value
    assert "stopped" in bubble and chat.answer.strip()[:5] in bubble.replace("&#x27;", "'")


def test_the_demo_model_starts_with_a_short_max_tokens(engine, settings):
    from serving.notebook.widgets import DEMO_MAX_TOKENS

    widget = ChatWidget(engine, settings)
    assert engine.info.is_demo and widget.max_tokens.value == DEMO_MAX_TOKENS < 64
    assert "Demo model" in widget.demo_note.value


def test_only_the_latest_turn_with_images_sends_them_again(chat, engine, monkeypatch):
    seen = []
    start = engine.start
    monkeypatch.setattr(engine, "start", lambda turns, params: seen.append(list(turns)) or start(turns, params))
    chat.max_tokens.value = 2
    for name in ("one.png", "two.png"):
        chat.add_upload(name, png_bytes((224, 224)))
        chat.question.value = f"About {name}"
        chat.send()
        assert chat.wait(60)
    chat.question.value = "And a follow-up without an image"
    chat.send()
    assert chat.wait(60)

    sent = seen[-1]
    images_sent = [p for t in sent for p in t.parts if isinstance(p, Image.Image)]
    assert len(images_sent) == 1 and sent[2].parts[0] is images_sent[0]  # two.png's turn keeps its image
    assert sent[0].parts == ["[image one.png: shown earlier in the conversation, not sent again]\nAbout one.png"]
    assert sum(isinstance(p, Image.Image) for t in chat.history for p in t.parts) == 2  # the history keeps both
    first_prompt = chat.last_result.prompt_tokens

    chat.keep_images.value = 0  # all
    chat.regenerate()
    assert chat.wait(60)
    assert sum(isinstance(p, Image.Image) for t in seen[-1] for p in t.parts) == 2
    assert chat.last_result.prompt_tokens > first_prompt


def test_regenerate_writes_the_last_answer_again(chat, engine, monkeypatch):
    seen = []
    start = engine.start
    monkeypatch.setattr(engine, "start", lambda turns, params: seen.append(list(turns)) or start(turns, params))
    chat.question.value = "Hello"
    chat.send()
    assert chat.wait(60)
    first = chat.answer
    regenerate = chat.transcript.children[1].children[-1].children[0]
    assert "qv-regenerate" in regenerate._dom_classes
    regenerate.click()
    assert chat.busy and chat.transcript.children[0].children[-1].children[0].disabled  # no edit meanwhile
    assert chat.wait(60)
    assert [t.role for t in chat.history] == ["user", "assistant"]
    assert chat.answer == first  # greedy: the same answer again
    assert [[p for p in t.parts] for t in seen[-1]] == [["Hello"]]  # the question alone was sent again
    assert not chat.regenerate(5)  # no answer there


def test_edit_takes_a_question_back_and_resends_it(chat, engine, settings):
    chat.add_upload("cat.png", png_bytes((320, 240)))
    chat.question.value = "First question"
    chat.send()
    assert chat.wait(60)
    chat.question.value = "Second question"
    chat.send()
    assert chat.wait(60)
    edit = chat.transcript.children[0].children[-1].children[0]
    assert "qv-edit" in edit._dom_classes
    edit.click()
    assert chat.history == [] and chat.question.value == "First question"
    assert [p.name for p in chat.pending] == ["cat.png"]  # its image is pending again
    assert "editing" in chat.status

    chat.question.value = "First question, changed"
    chat.send()
    assert chat.wait(60)
    user, answer = chat.history
    assert user.parts[-1] == "First question, changed" and isinstance(user.parts[0], Image.Image)
    assert chat.answer == greedy(engine, settings, [user], 24)


def test_answers_render_markdown_code_and_math(chat, engine, monkeypatch):
    from fake_engine import FakeGeneration
    from serving.jobs import Finished, TextDelta

    text = "**Bold** and `x_1`\n\n```python\nprint(1 < 2)\n```\n\nEuler: $e^{i\\pi} + 1 = 0$\n\n<script>x()</script>"
    monkeypatch.setattr(engine, "start", lambda turns, params: FakeGeneration(
        [TextDelta(text[:20]), TextDelta(text[20:]), Finished("stop", 5, 30, 0.1)], prompt_tokens=5))
    chat.question.value = "Show me Markdown"
    chat.send()
    assert chat.wait(30)
    bubble = chat.transcript.children[-1].children[0]
    assert type(bubble).__name__ == "HTMLMath"  # MathJax typesets the math in the browser
    value = bubble.value
    assert "<strong>Bold</strong>" in value and "<code>x_1</code>" in value
    assert "print" in value and "&lt;" in value and "<pre" in value  # highlighted code, escaped
    assert "$e^{i\\pi} + 1 = 0$" in value  # the LaTeX reaches MathJax unchanged
    assert "<script>" not in value and "&lt;script&gt;" in value  # raw HTML from the model is shown, not run
    assert "qv-copy" in value and "navigator.clipboard" in value  # the copy button
    raw = value.split("class='qv-raw'", 1)[1]
    assert "&lt;script&gt;x()&lt;/script&gt;" in raw  # the copy button copies the raw text


def test_the_system_prompt_goes_first(chat, engine, monkeypatch):
    seen = []
    start = engine.start
    monkeypatch.setattr(engine, "start", lambda turns, params: seen.append(list(turns)) or start(turns, params))
    chat.system_prompt.value = "Answer in French."
    chat.question.value = "Hello"
    chat.send()
    assert chat.wait(60)
    assert [(t.role, t.parts) for t in seen[-1]] == [("system", ["Answer in French."]), ("user", ["Hello"])]
    assert [t.role for t in chat.history] == ["user", "assistant"]  # the history holds the conversation only


def test_export_and_import_keep_the_conversation(chat, engine, settings):
    import json

    chat.system_prompt.value = "Be brief."
    chat.add_upload("cat.png", png_bytes((640, 480), (200, 100, 50)))
    chat.question.value = "What colour?"
    chat.send()
    assert chat.wait(60)
    chat.temperature.value, chat.seed.value = 0.3, 7
    chat.export_button.click()
    assert "download=" in chat.export_link.value and ".json" in chat.export_link.value
    data = chat.export_conversation()
    assert [m["role"] for m in data["messages"]] == ["system", "user", "assistant"]
    image_part = data["messages"][1]["content"][0]
    assert image_part["type"] == "image_url" and image_part["image_url"]["url"].startswith("data:image/png;base64,")
    assert data["files"] == [{"message": 1, "part": 0, "name": "cat.png"}]
    # the messages are an API request's as they are
    service = ChatService(engine, settings)
    service.parse_request({"model": "demo", "messages": data["messages"]})

    other = ChatWidget(engine, settings, lang="zh")
    assert other.import_conversation(json.dumps(data), name="saved.json")
    assert other.error == "" and "saved.json" in other.status
    assert [t.role for t in other.history] == ["user", "assistant"]
    assert other.history[1].parts == chat.history[1].parts
    assert other.history[0].parts[0].size == chat.history[0].parts[0].size
    assert other.system_prompt.value == "Be brief."
    assert (other.temperature.value, other.seed.value) == (0.3, 7)
    assert "cat.png, 640x480" in other.transcript.children[0].children[0].value
    other.question.value = "And now?"
    other.send()
    assert other.wait(60) and len(other.history) == 4  # the imported conversation goes on

    assert not other.import_conversation("{not json", name="broken.json")
    assert "broken.json" in other.error and len(other.history) == 4


def test_labels_switch_to_chinese_and_back(chat):
    chat.question.value = "你好"
    chat.send()
    assert chat.wait(60)
    chat.language.value = "zh"  # the toggle in the page
    assert chat.lang == "zh"
    assert chat.send_button.description == "发送" and chat.stop_button.description == "停止"
    assert chat.clear_button.description == "清空" and chat.settings_panel.get_title(0) == "设置"
    assert "你" in chat.transcript.children[0].children[0].value and "模型" in chat.transcript.children[1].children[0].value
    assert "首个 token" in chat.status
    assert chat.transcript.children[1].children[-1].children[0].description == "重新生成"
    chat.set_language("en")
    assert chat.send_button.description == "Send" and "first token" in chat.status
    with pytest.raises(ValueError):
        chat.set_language("fr")


def test_a_file_dropped_or_pasted_in_the_browser_joins_the_pending_ones(chat):
    import base64
    import json

    # what the widget's drop / paste handler sends: the file as JSON through its hidden Text widget
    data = base64.b64encode(png_bytes((120, 80))).decode()
    browser_commits(chat.drop_sink, json.dumps({"name": "dropped.png", "data": data, "at": "1"}))
    assert [p.caption for p in chat.pending] == ["dropped.png, 120x80"]
    assert chat.drop_sink.value == ""  # the bytes do not stay in the widget's state
    browser_commits(chat.drop_sink, json.dumps({"name": "notes.txt", "data": base64.b64encode(b"text").decode()}))
    assert "notes.txt" in chat.error and len(chat.pending) == 1
    from serving.notebook.render import style_html

    assert "qv-drop-sink" in style_html() and "onerror=" in style_html()  # the browser side, installed once


def test_json_mode_is_offered_only_by_an_engine_that_honours_response_format(engine, settings, monkeypatch):
    import dataclasses
    import json

    monkeypatch.setattr(engine, "info", dataclasses.replace(engine.info, features=frozenset()))
    plain = ChatWidget(engine, settings)
    assert plain.json_mode.layout.display == "none"  # an engine that writes free text only
    monkeypatch.undo()

    seen = []
    start = engine.start
    monkeypatch.setattr(engine, "start", lambda turns, params: seen.append(params) or start(turns, params))
    widget = ChatWidget(engine, settings, max_tokens=48)
    assert widget.json_mode.layout.display != "none"  # the built-in engine enforces JSON itself
    widget.json_mode.value = True
    widget.question.value = "Reply in JSON"
    widget.send()
    assert widget.wait(60)
    assert seen[-1].output is not None and not seen[-1].extra  # held to JSON by the engine's grammar
    if widget.last_result.finish_reason == "stop":  # random weights: only a finished answer must parse
        assert isinstance(json.loads(widget.answer), dict)
