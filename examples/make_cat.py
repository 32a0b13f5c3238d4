"""Draw examples/cat.jpg: the sample picture README's commands use (a ginger cat on a rug by a window).

    python examples/make_cat.py            # rewrites examples/cat.jpg (640x480 JPEG, about 20 KB)

Drawn here with Pillow, so it carries no one's copyright; the same code always gives the same picture.
CAT_BOX is where the cat is (x1, y1, x2, y2 in its pixels): what a grounding answer should find.
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

SIZE = (640, 480)
SCALE = 2  # drawn at twice the size, then reduced: smooth edges
CAT_BOX = (235, 128, 468, 418)  # the cat, whiskers and tail included
TARGET = Path(__file__).with_name("cat.jpg")


def _gradient(size, top, bottom) -> Image.Image:
    w, h = size
    column = Image.new("RGB", (1, h))
    for y in range(h):
        t = y / max(1, h - 1)
        column.putpixel((0, y), tuple(round(a + (b - a) * t) for a, b in zip(top, bottom)))
    return column.resize((w, h))


def draw() -> Image.Image:
    w, h = SIZE[0] * SCALE, SIZE[1] * SCALE

    def s(*values):
        return [v * SCALE for v in values]

    img = _gradient((w, h), (236, 224, 204), (214, 196, 170))  # warm wall
    d = ImageDraw.Draw(img)
    # window with sky and a cloud
    d.rectangle(s(40, 40, 200, 230), fill=(120, 90, 60))
    img.paste(_gradient((140 * SCALE, 170 * SCALE), (120, 180, 235), (200, 228, 250)), (50 * SCALE, 50 * SCALE))
    for cx, cy, r in ((100, 100, 18), (122, 94, 22), (146, 102, 16)):
        d.ellipse(s(cx - r, cy - r * 0.7, cx + r, cy + r * 0.7), fill=(250, 250, 252))
    d.rectangle(s(117, 50, 123, 220), fill=(120, 90, 60))
    d.rectangle(s(50, 132, 190, 138), fill=(120, 90, 60))
    # wooden floor with planks
    floor = _gradient((w, h - 330 * SCALE), (170, 118, 72), (128, 84, 48))
    img.paste(floor, (0, 330 * SCALE))
    for x in range(-40, 700, 90):
        d.line(s(x, 330, x - 60, 480), fill=(110, 72, 40), width=2 * SCALE)
    # a round rug under the cat
    d.ellipse(s(170, 370, 560, 460), fill=(70, 110, 150))
    d.ellipse(s(190, 378, 540, 452), outline=(230, 220, 190), width=3 * SCALE)
    # a ball of yarn
    d.ellipse(s(520, 370, 590, 440), fill=(196, 48, 64))
    for k in range(6):
        a = k * math.pi / 6
        d.arc(s(522, 372, 588, 438), math.degrees(a), math.degrees(a) + 150, fill=(150, 30, 45), width=2 * SCALE)
    d.line(s(530, 430, 500, 452, 470, 446), fill=(196, 48, 64), width=2 * SCALE)

    fur, dark, light = (222, 138, 62), (176, 96, 38), (246, 206, 160)
    # tail, curling round the front
    d.arc(s(300, 300, 468, 418), 300, 170, fill=dark, width=22 * SCALE)
    d.arc(s(304, 304, 464, 414), 300, 170, fill=fur, width=16 * SCALE)
    # body and chest
    d.ellipse(s(240, 230, 420, 405), fill=fur)
    d.ellipse(s(282, 262, 372, 400), fill=light)
    for k in range(4):  # stripes on the flank
        y = 260 + k * 26
        d.arc(s(360, y, 430, y + 60), 200, 290, fill=dark, width=6 * SCALE)
    # front paws
    d.ellipse(s(282, 382, 322, 410), fill=light)
    d.ellipse(s(330, 382, 370, 410), fill=light)
    # head and ears
    d.polygon(s(254, 180, 262, 128, 300, 160), fill=fur)
    d.polygon(s(262, 176, 266, 142, 292, 164), fill=(236, 160, 160))
    d.polygon(s(354, 160, 392, 128, 400, 180), fill=fur)
    d.polygon(s(362, 164, 388, 142, 392, 176), fill=(236, 160, 160))
    d.ellipse(s(244, 150, 410, 290), fill=fur)
    for k in range(3):  # forehead stripes
        x = 310 + k * 16
        d.line(s(x, 156, x + 2 * (k - 1), 186), fill=dark, width=5 * SCALE)
    d.ellipse(s(286, 226, 368, 284), fill=light)  # muzzle
    # eyes
    for ex in (292, 362):
        d.ellipse(s(ex - 18, 196, ex + 18, 226), fill=(120, 170, 60))
        d.ellipse(s(ex - 5, 198, ex + 5, 224), fill=(20, 20, 20))
        d.ellipse(s(ex + 4, 202, ex + 9, 208), fill=(255, 255, 255))
    # nose, mouth, whiskers
    d.polygon(s(318, 236, 336, 236, 327, 247), fill=(214, 110, 120))
    d.line(s(327, 247, 327, 256), fill=(90, 50, 40), width=2 * SCALE)
    d.arc(s(312, 248, 328, 264), 20, 160, fill=(90, 50, 40), width=2 * SCALE)
    d.arc(s(326, 248, 342, 264), 20, 160, fill=(90, 50, 40), width=2 * SCALE)
    for side in (-1, 1):
        for k in range(3):
            x0 = 327 + side * 22
            d.line(s(x0, 246 + k * 6, x0 + side * 70, 236 + k * 12), fill=(250, 245, 235), width=1 * SCALE)

    img = img.filter(ImageFilter.GaussianBlur(0.8 * SCALE)).resize(SIZE, Image.Resampling.LANCZOS)
    grain = Image.effect_noise(SIZE, 6).convert("RGB")  # a little film grain, so it does not look flat
    img = Image.blend(img, Image.merge("RGB", [grain.getchannel(0)] * 3), 0.04)
    return img


def main() -> None:
    draw().save(TARGET, "JPEG", quality=85, optimize=True, progressive=True)
    print(f"wrote {TARGET} ({TARGET.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
