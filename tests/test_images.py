"""Image references -> PIL images, in memory."""

import base64
import http.server
import threading

import pytest
from PIL import Image

from serving.errors import ImageError
from serving.web.http_errors import problem
from serving.intake.images import fit_pixels, load_image

from conftest import b64, png_bytes


def test_data_url_raw_base64_and_urlsafe():
    data = png_bytes((40, 30))
    for source in (f"data:image/png;base64,{b64(data)}", b64(data), b64(data).rstrip("="),
                   base64.urlsafe_b64encode(data).decode(), "\n".join([b64(data)[:50], b64(data)[50:]])):
        img = load_image(source, param="p")
        assert img.size == (40, 30) and img.mode == "RGB"


def test_jpeg_and_transparent_png():
    assert load_image(b64(png_bytes((20, 20), fmt="JPEG")), param="p").size == (20, 20)
    import io

    buf = io.BytesIO()
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(buf, "PNG")
    img = load_image(b64(buf.getvalue()), param="p")
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("source,code", [
    ("not base64!!", "invalid_image"),
    (b64(b"these bytes are not an image"), "invalid_image"),
    ("data:image/png,rawdata", "invalid_image"),
    ("/etc/passwd", "unsupported_image_source"),
    ("file:///etc/passwd", "unsupported_image_source"),
    ("", "invalid_image"),
])
def test_bad_sources_are_client_errors(source, code):
    with pytest.raises(ImageError) as info:
        load_image(source, param="messages[0].content[1]")
    assert info.value.code == code and problem(info.value).status == 400
    assert info.value.param == "messages[0].content[1]"


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/img.png":
            body = png_bytes((33, 22))
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
        else:
            body = b"nope"
            self.send_response(404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def image_host():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_url(image_host):
    local = ("127.0.0.1",)  # loopback is refused unless allowed by name
    assert load_image(image_host + "/img.png", param="p", allow_hosts=local).size == (33, 22)
    with pytest.raises(ImageError) as info:
        load_image(image_host + "/img.png", param="p")
    assert info.value.code == "image_url_refused"
    with pytest.raises(ImageError) as info:
        load_image(image_host + "/missing.png", param="p", allow_hosts=local)
    assert info.value.code == "image_fetch_failed"
    with pytest.raises(ImageError) as info:
        load_image(image_host + "/img.png", param="p", allow_urls=False)
    assert info.value.code == "image_url_disabled"


def test_fit_pixels_respects_budget():
    img = Image.new("RGB", (4000, 3000))
    fitted = fit_pixels(img, 3136, 1003520)
    w, h = fitted.size
    assert w % 28 == 0 and h % 28 == 0 and w * h <= 1003520
    small = fit_pixels(Image.new("RGB", (10, 10)), 3136, 1003520)
    assert small.size[0] * small.size[1] >= 3136


def test_nothing_written_to_disk(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    load_image(b64(png_bytes()), param="p")
    assert list(tmp_path.iterdir()) == []


def test_smart_resize_is_paddleformers_rule():
    """Our copy (images need no Paddle to be sized) gives the sides PaddleFormers' gives, limits included."""
    from paddleformers.transformers.qwen2_vl.vision_process import smart_resize as theirs

    from serving.intake.images import smart_resize

    sizes = [(1, 1), (10, 10), (27, 29), (28, 28), (64, 96), (333, 500), (480, 640), (1080, 1920), (3000, 4000),
             (4032, 3024), (7, 1400), (12000, 60)]
    budgets = [(3136, 1003520), (3136, 200_000), (200_704, 1003520), (50_000, 50_000)]
    for height, width in sizes:
        for low, high in budgets:
            expected = theirs(height, width, factor=28, min_pixels=low, max_pixels=high)
            if min(expected) == 0:  # their rule's answer for a long thin image under a small budget: unusable
                with pytest.raises(ValueError, match="raise max_pixels or crop"):
                    smart_resize(height, width, 28, low, high)
                continue
            assert smart_resize(height, width, 28, low, high) == expected, (height, width, low, high)
    for call in (smart_resize, lambda *a: theirs(*a[:2], factor=a[2], min_pixels=a[3], max_pixels=a[4])):
        with pytest.raises(ValueError):
            call(2, 600, 28, 3136, 1003520)


def _saved(fmt: str, mode="RGB") -> bytes:
    import io

    buf = io.BytesIO()
    Image.new(mode, (64, 64), (10, 200, 30) if mode == "RGB" else 120).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt, mode", [("DDS", "RGB"), ("SPIDER", "L"), ("TGA", "RGB"), ("PCX", "RGB")])
def test_only_the_formats_people_send_are_opened(fmt, mode):
    """Pillow opens some 40 formats; damaged files of the rare ones raised errors of their own (DDS:
    NotImplementedError, SPIDER: AttributeError, BLP: BLPFormatError): 500s. Now only JPEG, PNG, WebP, GIF, BMP,
    TIFF and AVIF are opened, and any other is a 400 that lists them."""
    with pytest.raises(ImageError) as caught:
        load_image(b64(_saved(fmt, mode)), param="p")
    assert caught.value.code == "invalid_image" and "JPEG, PNG, WEBP" in caught.value.message
    for accepted in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF"):
        assert load_image(b64(_saved(accepted)), param="p").size == (64, 64), accepted


def test_a_damaged_avif_is_a_400():
    data = bytearray(_saved("AVIF"))
    data[81] ^= 0xFF  # libavif: "Failed to decode image: Missing or empty image item", a RuntimeError
    with pytest.raises(ImageError) as caught:
        load_image(b64(bytes(data)), param="p")
    assert caught.value.code == "invalid_image" and "RuntimeError" not in caught.value.message  # plain words
