"""Images from a request -> PIL images, in memory. Never written to disk.

An image arrives as a data URL, raw base64, or an http(s) URL. Local paths and file:// are
refused: a server must not open files a client names.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import contextlib
import re
import warnings

from PIL import Image, UnidentifiedImageError

from serving.intake import urlguard
from serving.config import Settings
from serving.errors import ImageError, RequestTimeout

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w-]+=[^;,]*)*)(?P<b64>;base64)?,(?P<data>.*)$",
                       re.DOTALL | re.IGNORECASE)  # the scheme, type and ";base64" are case-insensitive
_PATH = re.compile(r"^(~[\w.-]*|\.{1,2})?/[^\s]{0,4095}$|^[A-Za-z]:[\\/]")  # /a/b, ./a, ~/a, C:\a
_B64_WHITESPACE = re.compile(r"\s+")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")  # base64 never holds a colon
PATCH_FACTOR = 28  # patch_size 14 x spatial_merge_size 2: image sides are multiples of this
MAX_ASPECT_RATIO = 200  # the vision tower's limit (qwen-vl-utils' MAX_RATIO)
ORIGINAL_SIZE = "original_size"  # key of a decoded image's .info: (width, height) as sent, upright
# key of a decoded image's .info when decoding changed nothing (an RGB picture, upright, at full size):
# (format, the bytes as sent, size), so a gateway can pass them on instead of encoding the pixels again
# (serving.engines.upstream); Pillow copies .info to derived images, hence the size to check against
SOURCE = "source_bytes"
PASSABLE_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
# The formats people send (a camera's multi-picture JPEG opens as JPEG). Pillow opens some 40 formats; the rare ones
# (DDS, BLP, SPIDER, ...) failed on damaged data with errors of their own (500s in a fuzz of 98,062 files):
# anything else is refused by name.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
ORIENTATION_TAG = 0x0112  # EXIF Orientation; 5-8 turn the picture a quarter
_LIMITS = Settings()  # the defaults of the limits below have one owner: the settings
warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we refuse by our own limit, quietly


def load_image(source: str, *, param: str, allow_urls: bool = True, timeout: float = _LIMITS.image_fetch_timeout,
               max_bytes: int = _LIMITS.max_image_bytes, pixel_limit: int = _LIMITS.max_image_pixels, allow_hosts=(),
               target_pixels: int | None = None, budget=None, deadline: float | None = None) -> Image.Image:
    """Decode one image reference into an RGB PIL image; ImageError names `param` on failure.

    `max_bytes` caps the encoded image, `pixel_limit` its width x height (read from the header,
    before decoding); `allow_hosts` are URL hosts exempt from the public-address rule;
    `target_pixels`, the pixel budget the image will be scaled to, lets a large JPEG be decoded
    at reduced size to begin with (and other large images be shrunk right after decoding);
    `budget` (serving.intake.membudget.MemoryBudget) bounds the memory of images decoded at once, waited
    for until `deadline` (time.perf_counter()).
    """
    decode = dict(param=param, pixel_limit=pixel_limit, target_pixels=target_pixels, budget=budget, deadline=deadline)
    if not isinstance(source, str) or not source.strip():
        raise ImageError("image is empty", param=param)
    source = source.strip()
    scheme = _SCHEME.match(source)
    scheme = scheme.group(1).lower() if scheme else ""
    if scheme == "data":
        data = _from_data_url(source, param, max_bytes)
    elif scheme in ("http", "https"):
        if not allow_urls:
            raise ImageError("image URLs are turned off on this server; send the image as base64",
                             param=param, code="image_url_disabled")
        try:
            data = urlguard.fetch(source, timeout=timeout, max_bytes=max_bytes, allow_hosts=allow_hosts)
        except urlguard.FetchError as exc:
            raise ImageError(exc.message, param=param, code=exc.code) from None
    elif scheme:
        raise _unsupported(param, f"{scheme}: URLs are not accepted")
    else:
        try:
            return decode_image_bytes(_from_base64(source, param, max_bytes), **decode)
        except ImageError as exc:
            # JPEG base64 starts with "/9j/" and "/etc/passwd" is valid base64: only when the
            # text is not an image and looks like a path (not like a damaged JPEG) is it called a path.
            if exc.code == "invalid_image" and not source.startswith("/9j/") and _PATH.match(source):
                raise _unsupported(param, "local file paths are not accepted") from None
            raise
    return decode_image_bytes(data, **decode)


def _unsupported(param: str, what: str) -> ImageError:
    return ImageError(f"{what}; send the image as base64, a data URL or an http(s) URL",
                      param=param, code="unsupported_image_source")


def _check_bytes(size: int, max_bytes: int, param: str) -> None:
    if size > max_bytes:
        raise ImageError(f"image is {size} bytes, more than the limit of {max_bytes}",
                         param=param, code="image_too_large")


def decode_image_bytes(data: bytes, *, param: str, pixel_limit: int = _LIMITS.max_image_pixels,
                       target_pixels: int | None = None, budget=None, deadline: float | None = None) -> Image.Image:
    """Bytes -> an upright RGB image. Checked from the header before decoding: the pixel count, and for a
    JPEG that its bytes can hold the pixels it declares. A large image is decoded small (a JPEG at 1/2 to
    1/8 scale) or shrunk by a whole factor right after decoding, never below `target_pixels`; `budget`
    (serving.intake.membudget.MemoryBudget) is held for the memory decoding takes, waited for until `deadline`."""
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as img:
            width, height = img.size  # from the header: nothing is decoded yet
            if width * height > pixel_limit:
                raise ImageError(f"image is {width}x{height} = {width * height} pixels, more than this server's "
                                 f"limit of {pixel_limit} (MAX_IMAGE_PIXELS)", param=param, code="image_too_many_pixels")
            if img.format == "JPEG" and _jpeg_too_short(data, width, height):
                raise ImageError(f"the JPEG is {len(data)} bytes, too few for the {width}x{height} pixels it declares: "
                                 "it is truncated or damaged", param=param)
            if target_pixels and img.format == "JPEG" and width * height > 2 * target_pixels:
                # The model will see at most target_pixels: let libjpeg decode at 1/2, 1/4 or 1/8
                # scale, never below the size the image is resized to afterwards.
                scale = math.sqrt(target_pixels / (width * height))
                img.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
            orientation = img.getexif().get(ORIENTATION_TAG, 1)
            held = budget.hold(decode_cost(img, width, height), deadline) if budget else contextlib.nullcontext()
            with held:
                img.load()
                rgb = _to_rgb(_transpose(_shrink(img, target_pixels), orientation))
            # the size as sent (upright), which a draft decode above may have reduced: what boxes map back to
            rgb.info[ORIGINAL_SIZE] = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
            if rgb is img and orientation == 1 and img.size == (width, height) and img.format in PASSABLE_FORMATS:
                rgb.info[SOURCE] = (img.format, data, rgb.size)
            return rgb
    except TimeoutError:
        raise RequestTimeout("the request took longer than this server's time limit while waiting for memory to "
                             "decode its images (IMAGE_DECODE_MB)", code="request_timeout") from None
    except Image.DecompressionBombError as exc:  # Pillow's own guard, before ours could read the size
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(pixels.group(1))} pixels" if pixels else "too many pixels"
        raise ImageError(f"image is {size}, more than this server's limit of {pixel_limit} (MAX_IMAGE_PIXELS)",
                         param=param, code="image_too_many_pixels") from None
    except UnidentifiedImageError:
        raise ImageError(f"the data is not an image in a format this server reads ({', '.join(ACCEPTED_FORMATS)})",
                         param=param) from None
    except (OSError, ValueError, SyntaxError, EOFError, RuntimeError) as exc:  # RuntimeError: AVIF's decoder
        if "truncated" in str(exc):
            raise ImageError("the image data is truncated: it ends before the picture does", param=param) from None
        raise ImageError("the data is not an image in a format this server reads (PNG, JPEG, WebP, GIF, BMP, TIFF, ...)",
                         param=param) from None


# Bytes per pixel Pillow keeps an image of each mode in (every mode of 2 to 4 bands takes 4)
_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
_SHRINKABLE = {"L", "RGB", "RGBA", "LA", "I", "F", "CMYK", "YCbCr", "LAB", "HSV", "RGBa", "La"}  # Image.reduce's modes
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


def decode_cost(img: Image.Image, width: int, height: int) -> int:
    """Bytes decoding an opened image takes at its peak, about: the decoded pixels (at the draft size for
    a JPEG), the copy that changes its mode or shrinks it, and for a progressive JPEG libjpeg's buffer of
    every DCT coefficient at full size (2 bytes per sample)."""
    pixels = img.size[0] * img.size[1]  # after draft(): the size libjpeg will decode to
    copy = 1 if img.mode in ("1", "RGB") else 4  # "1" shrinks as "L"; other modes but RGB become RGB
    cost = pixels * (_PIXEL_BYTES.get(img.mode, 4) + copy)
    if img.format == "JPEG" and img.info.get("progressive"):
        cost += width * height * 2 * len(img.getbands())
    return cost


def _shrink(img: Image.Image, target_pixels: int | None) -> Image.Image:
    """A decoded image at least twice target_pixels, shrunk by the largest whole factor that keeps it at
    target_pixels or more (box filter), so what follows (mode changes, the resize) works on a small copy."""
    if not target_pixels:
        return img
    factor = min(int(math.sqrt(img.size[0] * img.size[1] / target_pixels)), min(img.size) // PATCH_FACTOR)
    if factor < 2:  # small already, or so thin that its short side must stay whole
        return img
    if img.mode == "1":
        img = img.convert("L")  # one byte a pixel either way; reduce() does not take mode 1
    elif img.mode not in _SHRINKABLE:
        img = _to_rgb(img)  # palettes (averaging indices means nothing), 16-bit greys
    return img.reduce(factor)


def _transpose(img: Image.Image, orientation: int) -> Image.Image:
    """The EXIF orientation applied (phone photos), as ImageOps.exif_transpose does, on the small image."""
    method = _TRANSPOSE.get(orientation)
    return img.transpose(method) if method is not None else img


def _jpeg_too_short(data: bytes, width: int, height: int) -> bool:
    """True when a Huffman-coded JPEG has fewer bytes than its declared size needs: every 8x8 block of
    its first component costs at least one bit (its DC code), so a 7000x7000 JPEG holds at least ~95 KB.
    (A truncated file would otherwise be decoded at full cost into a mostly grey picture.) Arithmetic-coded
    JPEGs, rare, can be smaller and are not judged."""
    if _jpeg_frame_marker(data) in (0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, None):
        return False
    blocks = math.ceil(width / 8) * math.ceil(height / 8)
    return len(data) < blocks // 16  # half the least possible, for headroom


def _jpeg_frame_marker(data: bytes):
    """The JPEG's start-of-frame marker (0xC0-0xCF, not DHT/JPG/DAC), or None when not found before the scan."""
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return marker
        elif marker == 0xDA:
            return None
        else:
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def limit_pillow(pixel_limit: int) -> None:
    """Pillow's own decompression-bomb guard (process-wide) must not be stricter than ours, which runs first."""
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < pixel_limit:
        Image.MAX_IMAGE_PIXELS = int(pixel_limit)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img  # loaded already: it needs no file, and a copy would only cost memory
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))  # transparent -> white, like qwen-vl-utils
        background.paste(rgba, mask=rgba.split()[3])
        return background
    return img.convert("RGB")


def _from_data_url(url: str, param: str, max_bytes: int) -> bytes:
    match = _DATA_URL.match(url)
    if not match or not match.group("b64"):
        raise ImageError("a data URL must look like data:image/png;base64,<data>", param=param)
    return _from_base64(match.group("data"), param, max_bytes)


def _from_base64(text: str, param: str, max_bytes: int) -> bytes:
    compact = _B64_WHITESPACE.sub("", text)
    _check_bytes(len(compact) * 3 // 4 - 2, max_bytes, param)  # before decoding anything
    compact += "=" * (-len(compact) % 4)  # clients often drop the padding
    try:
        if "-" in compact or "_" in compact:
            data = base64.b64decode(compact, altchars=b"-_", validate=True)
        else:
            data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError("image data is not valid base64 (nor a data: or http(s) URL)", param=param) from exc
    _check_bytes(len(data), max_bytes, param)
    return data


def fit_pixels(img: Image.Image, min_pixels: int, max_pixels: int, *, param: str | None = None) -> Image.Image:
    """Resize to the sides the vision tower will use (multiples of 28, within the pixel budget).

    Done here, once, with a good filter, so the processor has nothing left to resize.
    """
    width, height = img.size
    try:
        new_h, new_w = smart_resize(height, width, factor=PATCH_FACTOR, min_pixels=min_pixels, max_pixels=max_pixels)
    except ValueError as exc:  # e.g. an aspect ratio over 200
        sent = "x".join(map(str, img.info.get(ORIGINAL_SIZE, img.size)))  # as sent, before any draft decoding
        raise ImageError(f"the image of {sent} cannot be sized for the model: {exc}", param=param,
                         code="invalid_image_size") from exc
    if (new_w, new_h) == (width, height):
        return img
    return img.resize((new_w, new_h), Image.Resampling.BICUBIC)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple:
    """(height, width) nearest to the image's, both multiples of `factor`, with a pixel count within
    [min_pixels, max_pixels]: qwen-vl-utils' rule (PaddleFormers has the same), here so that sizing
    images needs no Paddle. ValueError, with the reason in words, for an aspect ratio over
    MAX_ASPECT_RATIO and for a shape that no size within max_pixels can keep (a very long, thin image
    under a small budget, where the rule would make the short side 0)."""
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(f"its aspect ratio is {ratio:.1f}:1; the model takes at most {MAX_ASPECT_RATIO}:1")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    if h_bar < factor or w_bar < factor:  # the short side would be 0: the rule's own answer cannot be used
        least = factor * max(factor, round(ratio) * factor)
        raise ValueError(f"at its aspect ratio of {ratio:.1f}:1, with sides that are multiples of {factor}, it "
                         f"needs at least about {least} pixels, more than the pixel budget of {max_pixels} "
                         "(max_pixels); raise max_pixels or crop the image")
    return h_bar, w_bar
