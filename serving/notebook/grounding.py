"""Qwen2.5-VL's grounding answers: boxes found in an answer, mapped back to the image as sent, drawn on it.

Asked to locate something ("Outline the position of each cat and output all the coordinates in JSON
format."), Qwen2.5-VL answers with JSON such as

    ```json
    [{"bbox_2d": [135, 56, 460, 379], "label": "cat"}]
    ```

whose numbers are absolute pixel coordinates (x1, y1, x2, y2) in the image **as the model saw it**: resized
to sides that are multiples of 28 within the pixel budget. The server reports both sizes of every image
(protocol.ImageSize: each response's `image_sizes`), so x * width / model_width and y * height /
model_height put a box on the picture that was sent. test_connection.py has a standalone copy of
find_boxes and to_original (it imports nothing from this package); tests keep the two in agreement.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

_NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
_OBJECT = re.compile(r"\{[^{}]*\"bbox_2d\"[^{}]*\}")  # one complete {...} holding a bbox_2d
_BBOX = re.compile(r"\"bbox_2d\"\s*:\s*\[" + ",".join([_NUMBER] * 4) + r"\]")
_LABEL = re.compile(r"\"label\"\s*:\s*(\"(?:[^\"\\]|\\.)*\")")
# Fonts tried for labels, first found wins: CJK ones first (Qwen answers Chinese questions with Chinese labels)
FONTS = ("NotoSansCJK-Regular.ttc", "NotoSansSC-Regular.otf", "wqy-microhei.ttc", "wqy-zenhei.ttc", "simhei.ttf",
         "msyh.ttc", "DejaVuSans.ttf")
COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60))


@dataclass(frozen=True)
class Box:
    x1: float
    y1: float
    x2: float
    y2: float
    label: str = ""

    def as_list(self) -> list:
        return [round(v, 1) for v in (self.x1, self.y1, self.x2, self.y2)]


def find_boxes(text: str) -> list:
    """Every `bbox_2d` in an answer, in order: JSON in a ```json fence or bare, a list of objects or single
    ones. An answer cut short (max_tokens) keeps the boxes that were complete; anything else is skipped."""
    boxes = []
    for match in _OBJECT.finditer(text or ""):
        obj = match.group(0)
        bbox = _BBOX.search(obj)
        if bbox is None:
            continue
        x1, y1, x2, y2 = (float(v) for v in bbox.groups())
        label = _LABEL.search(obj)
        try:
            name = json.loads(label.group(1)) if label else ""
        except ValueError:
            name = ""
        boxes.append(Box(min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2), str(name)))
    return boxes


def to_original(box: Box, size) -> Box:
    """`box` (pixels of the image the model saw) in pixels of the image as sent, kept inside it. `size` is a
    protocol.ImageSize or the dict of a response's image_sizes entry."""
    get = size.get if isinstance(size, dict) else lambda name: getattr(size, name)
    sx, sy = get("width") / get("model_width"), get("height") / get("model_height")

    def clamp(value, high):
        return max(0.0, min(float(high), value))

    return Box(clamp(box.x1 * sx, get("width")), clamp(box.y1 * sy, get("height")),
               clamp(box.x2 * sx, get("width")), clamp(box.y2 * sy, get("height")), box.label)


def draw_boxes(image, boxes: list, *, max_side: int | None = None):
    """A copy of `image` (PIL) with `boxes` (in its own pixels) drawn and labelled, shrunk to `max_side`."""
    from PIL import ImageDraw

    out = image.convert("RGB")  # a copy
    draw = ImageDraw.Draw(out)
    line = max(2, round(max(out.size) / 250))
    font = _font(max(12, round(max(out.size) / 40)))
    for i, box in enumerate(boxes):
        colour = COLOURS[i % len(COLOURS)]
        draw.rectangle([box.x1, box.y1, box.x2, box.y2], outline=colour, width=line)
        if box.label:
            left, top, right, bottom = draw.textbbox((0, 0), box.label, font=font)
            x, y = box.x1, max(0.0, box.y1 - (bottom - top) - 2 * line)
            draw.rectangle([x, y, x + (right - left) + 2 * line, y + (bottom - top) + 2 * line], fill=colour)
            draw.text((x + line - left, y + line - top), box.label, fill=(255, 255, 255), font=font)
    if max_side and max(out.size) > max_side:
        out.thumbnail((max_side, max_side))
    return out


def _font(size: int):
    from PIL import ImageFont

    for name in FONTS:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size)
