"""Large JPEGs are decoded at reduced size when the model will downscale them anyway."""

import io

from PIL import Image

from serving.intake.images import decode_image_bytes, fit_pixels


def big_jpeg(size=(4000, 3000)) -> bytes:
    img = Image.linear_gradient("L").resize(size).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_draft_decodes_smaller_but_never_below_the_final_size():
    data = big_jpeg()
    full = decode_image_bytes(data, param="p")
    drafted = decode_image_bytes(data, param="p", target_pixels=1003520)
    assert full.size == (4000, 3000)
    assert drafted.size[0] < 4000 and drafted.size[0] * drafted.size[1] >= 1003520
    final_full = fit_pixels(full, 3136, 1003520)
    final_drafted = fit_pixels(drafted, 3136, 1003520)
    assert final_full.size == final_drafted.size  # the model sees the same sides either way


def test_small_jpeg_and_png_are_decoded_as_they_are():
    small = big_jpeg((640, 480))
    assert decode_image_bytes(small, param="p", target_pixels=1003520).size == (640, 480)
    buf = io.BytesIO()
    Image.new("RGB", (1200, 900)).save(buf, "PNG")
    assert decode_image_bytes(buf.getvalue(), param="p", target_pixels=1003520).size == (1200, 900)


def test_large_png_is_shrunk_by_a_whole_factor_never_below_the_final_size():
    """Not JPEG, so no draft: decoded whole, then reduced at once, before any copy in another mode."""
    for mode, size in (("RGB", (3000, 2000)), ("1", (7000, 7000)), ("P", (4100, 3000)), ("RGBA", (3000, 3000))):
        buf = io.BytesIO()
        Image.new(mode, size).save(buf, "PNG")
        shrunk = decode_image_bytes(buf.getvalue(), param="p", target_pixels=1003520)
        assert shrunk.mode == "RGB" and shrunk.size[0] < size[0] and shrunk.size[0] * shrunk.size[1] >= 1003520, mode
        full = decode_image_bytes(buf.getvalue(), param="p")
        assert full.size == size
        assert fit_pixels(shrunk, 3136, 1003520).size == fit_pixels(full, 3136, 1003520).size, mode
