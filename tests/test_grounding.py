"""Grounding: every response says each image's size as sent and as the model saw it (image_sizes), so
Qwen2.5-VL's boxes map back onto the client's image; serving.notebook.grounding and test_connection.py's copy of it
find and map boxes alike; test_connection.py --boxes / --draw-boxes do it against a server."""

from __future__ import annotations

import base64
import io
import re
import sys
from dataclasses import replace

import pytest
from PIL import Image

from conftest import ROOT, LiveServer, b64, png_bytes
from fake_engine import FakeEngine
from serving.notebook import grounding
from serving.web.app import create_app
from serving.jobs import Finished, TextDelta

sys.path.insert(0, str(ROOT))
import test_connection as tc  # noqa: E402

CAT = ROOT / "examples" / "cat.jpg"
CHAT = "/v1/chat/completions"

# Qwen2.5-VL's own answer format (as its cookbooks show), and variants seen in practice
ANSWERS = {
    "fenced list": '```json\n[\n\t{"bbox_2d": [135, 56, 460, 379], "label": "cat"},\n'
                   '\t{"bbox_2d": [500, 300, 560, 350], "label": "ball of yarn"}\n]\n```',
    "bare object": 'The cat is here: {"bbox_2d": [10.5, 20, 30, 40.25], "label": "cat"}.',
    "swapped corners": '[{"bbox_2d": [300, 200, 100, 50], "label": "x"}]',
    "chinese label": '[{"bbox_2d": [1, 2, 3, 4], "label": "\\u732b"}, {"bbox_2d": [5, 6, 7, 8], "label": "猫 \\"tabby\\""}]',
    "no label": '[{"bbox_2d": [1, 2, 3, 4]}]',
    "cut short": '```json\n[\n\t{"bbox_2d": [1, 2, 3, 4], "label": "a"},\n\t{"bbox_2d": [5, 6, 7',
    "no boxes": "A ginger cat sits on a blue rug next to a red ball of yarn.",
    "malformed": '{"bbox_2d": [1, 2, "three", 4], "label": "bad"} {"bbox_2d": [1, 2, 3], "label": "short"}',
}
EXPECTED = {
    "fenced list": [((135, 56, 460, 379), "cat"), ((500, 300, 560, 350), "ball of yarn")],
    "bare object": [((10.5, 20, 30, 40.25), "cat")],
    "swapped corners": [((100, 50, 300, 200), "x")],
    "chinese label": [((1, 2, 3, 4), "猫"), ((5, 6, 7, 8), '猫 "tabby"')],
    "no label": [((1, 2, 3, 4), "")],
    "cut short": [((1, 2, 3, 4), "a")],
    "no boxes": [],
    "malformed": [],
}


@pytest.mark.parametrize("name", ANSWERS)
def test_find_boxes(name):
    found = [((b.x1, b.y1, b.x2, b.y2), b.label) for b in grounding.find_boxes(ANSWERS[name])]
    assert found == [(tuple(float(v) for v in box), label) for box, label in EXPECTED[name]]


@pytest.mark.parametrize("name", ANSWERS)
def test_the_client_copy_agrees(name):
    """test_connection.py carries its own copy (it imports nothing from serving): both read answers alike."""
    ours = [([b.x1, b.y1, b.x2, b.y2], b.label) for b in grounding.find_boxes(ANSWERS[name])]
    theirs = [(box["bbox_2d"], box["label"]) for box in tc.find_boxes(ANSWERS[name])]
    assert theirs == ours
    size = {"width": 1000, "height": 750, "model_width": 588, "model_height": 448}
    mapped = [grounding.to_original(b, size).as_list() for b in grounding.find_boxes(ANSWERS[name])]
    assert [tc.to_original(box, size)["bbox_2d"] for box in tc.find_boxes(ANSWERS[name])] == mapped


def test_to_original_scales_and_clamps():
    size = {"width": 4000, "height": 3000, "model_width": 1148, "model_height": 840}  # MAX_PIXELS' default
    box = grounding.to_original(grounding.Box(574, 420, 1148, 900, "x"), size)
    assert (box.x1, box.y1, box.x2) == pytest.approx((2000, 1500, 4000))
    assert box.y2 == 3000  # past the edge: kept inside the image


def test_draw_boxes_marks_the_box():
    picture = Image.new("RGB", (200, 100), (255, 255, 255))
    drawn = grounding.draw_boxes(picture, [grounding.Box(20, 30, 120, 90, "cat")])
    assert drawn is not picture and picture.getpixel((20, 60)) == (255, 255, 255)
    assert drawn.getpixel((20, 60)) == grounding.COLOURS[0]
    assert grounding.draw_boxes(picture, [], max_side=50).size == (50, 25)


# ---------------------------------------------------------------- image_sizes, on the demo model


def jpeg(size, color=(40, 120, 200), exif_orientation=None) -> bytes:
    buf = io.BytesIO()
    image = Image.new("RGB", size, color)
    if exif_orientation is None:
        image.save(buf, "JPEG", quality=80)
    else:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        image.save(buf, "JPEG", quality=80, exif=exif.tobytes())
    return buf.getvalue()


def sizes_of(client, *datas, **extra):
    parts = [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + b64(d)}} for d in datas]
    r = client.post(CHAT, json={"messages": [{"role": "user", "content": parts + [{"type": "text", "text": "?"}]}],
                                "max_tokens": 1, **extra})
    assert r.status_code == 200, r.json
    return r.json["image_sizes"]


def test_image_sizes_report_both_sizes(client, settings):
    small, large = png_bytes((300, 200)), jpeg((4000, 3000))
    sizes = sizes_of(client, small, large)
    assert sizes[0] == {"width": 300, "height": 200, "model_width": 308, "model_height": 196}
    big = sizes[1]
    # a 12-megapixel JPEG is decoded at reduced size (draft): its size as sent is still reported
    assert (big["width"], big["height"]) == (4000, 3000)
    assert big["model_width"] % 28 == 0 and big["model_height"] % 28 == 0
    assert big["model_width"] * big["model_height"] <= settings.max_pixels
    assert abs(big["model_width"] / big["model_height"] - 4 / 3) < 0.05


def test_image_sizes_follow_the_exif_orientation(client):
    """A phone photo stored 400x300 with "rotate 90" is a 300x400 picture: boxes map onto the upright one."""
    (size,) = sizes_of(client, jpeg((400, 300), exif_orientation=6))
    assert (size["width"], size["height"]) == (300, 400)
    assert size["model_height"] > size["model_width"]


def test_image_sizes_follow_a_per_image_pixel_budget(client):
    parts = [{"type": "image", "image": b64(jpeg((1000, 1000))), "max_pixels": 200 * 200},
             {"type": "text", "text": "?"}]
    r = client.post(CHAT, json={"messages": [{"role": "user", "content": parts}], "max_tokens": 1})
    (size,) = r.json["image_sizes"]
    assert (size["width"], size["height"]) == (1000, 1000) and size["model_width"] * size["model_height"] <= 40000


def test_every_image_of_the_conversation_in_order(client):
    first, second = png_bytes((100, 60)), png_bytes((60, 100))
    messages = [{"role": "user", "content": [{"type": "image", "image": b64(first)}, {"type": "text", "text": "a"}]},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": [{"type": "image", "image": b64(second)}, {"type": "text", "text": "b"}]}]
    r = client.post(CHAT, json={"messages": messages, "max_tokens": 1})
    assert [(s["width"], s["height"]) for s in r.json["image_sizes"]] == [(100, 60), (60, 100)]


# ---------------------------------------------------------------- test_connection.py --boxes


def run_client(capsys, *args):
    code = tc.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_client_reports_no_boxes_from_the_demo_model(live_server, capsys):
    code, out, err = run_client(capsys, "--api-url", live_server.base_url + CHAT, "--image", str(CAT),
                                "--max-tokens", "4", "--boxes")
    assert code == 0, err
    assert "boxes: none in the answer" in out


CAT_ANSWER = '```json\n[\n\t{"bbox_2d": [235, 128, 468, 418], "label": "cat"}\n]\n```'


@pytest.fixture(scope="module")
def grounding_server(settings):
    """A server whose engine answers what Qwen2.5-VL answers to a grounding question about examples/cat.jpg
    shown at 1280x960 (the demo model's random weights cannot ground): boxes in the model's pixels."""
    engine = FakeEngine(script=(TextDelta(CAT_ANSWER[:30]), TextDelta(CAT_ANSWER[30:]),
                                Finished("stop", prompt_tokens=400, completion_tokens=40, seconds=0.1)))
    custom = replace(settings, max_pixels=1280 * 960 // 4)  # the model sees the picture at half its sides
    server = LiveServer(create_app(custom, engine), custom).start()
    yield server
    server.stop()


def _cat_twice(tmp_path):
    """examples/cat.jpg at twice its size, 1280x960: its model-pixel boxes map back doubled-ish."""
    path = tmp_path / "cat_big.png"
    with Image.open(CAT) as cat:
        cat.resize((1280, 960)).save(path)
    return path


@pytest.mark.parametrize("stream", [False, True])
def test_client_maps_and_draws_boxes(grounding_server, capsys, tmp_path, stream):
    image = _cat_twice(tmp_path)
    drawn = tmp_path / "boxes.png"
    args = ["--api-url", grounding_server.base_url + CHAT, "--image", str(image), "--draw-boxes", str(drawn)]
    code, out, err = run_client(capsys, *args, *(["--stream"] if stream else []))
    assert code == 0, err
    header = re.search(r"boxes in pixels of the 1280x960 image sent \(the model saw it at (\d+)x(\d+)\)", out)
    assert header, out
    mw, mh = int(header.group(1)), int(header.group(2))
    assert mw % 28 == 0 and mh % 28 == 0 and mw * mh <= 1280 * 960 // 4  # the server's MAX_PIXELS here
    x1, y1, x2, y2 = (float(v) for v in re.search(r"cat: \[([^\]]+)\]", out).group(1).split(","))
    assert (x1, y1, x2, y2) == pytest.approx((235 * 1280 / mw, 128 * 960 / mh, 468 * 1280 / mw, 418 * 960 / mh),
                                             abs=0.06)
    with Image.open(drawn) as picture:
        assert picture.size == (1280, 960)
        assert picture.getpixel((round(x1) + 1, round((y1 + y2) / 2))) == (230, 25, 75)


def test_client_needs_a_local_image_to_draw(grounding_server, capsys):
    url = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    code, _out, err = run_client(capsys, "--api-url", grounding_server.base_url + CHAT, "--image", url,
                                 "--format", "openai", "--draw-boxes", "x.png")
    assert code == 1 and "--draw-boxes needs --image to be a local file" in err


def test_readme_mapping_snippet_works_with_the_openai_client(grounding_server, capsys):
    """The Python lines that map boxes back (docs/serving.md, Grounding), run as written on what the official client
    returns."""
    import openai

    guide = (ROOT / "docs" / "serving.md").read_text(encoding="utf-8")
    snippet = re.search(r"Scale by their ratio.*?```python\n(.*?)```", guide, re.DOTALL).group(1)
    client = openai.OpenAI(base_url=grounding_server.base_url + "/v1", api_key="unused", max_retries=0)
    picture = base64.b64encode(CAT.read_bytes()).decode()
    reply = client.chat.completions.create(model="any", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{picture}"}},
        {"type": "text", "text": "Outline the position of the cat and output its coordinates in JSON format."}]}])
    client.close()
    exec(snippet, {"reply": reply})  # noqa: S102 - the documentation's own code
    size = reply.model_extra["image_sizes"][0]
    assert (size["width"], size["height"]) == (640, 480)
    sx, sy = 640 / size["model_width"], 480 / size["model_height"]
    assert capsys.readouterr().out.strip() == f"cat {[235 * sx, 128 * sy, 468 * sx, 418 * sy]}"
