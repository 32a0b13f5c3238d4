"""Images from a request -> PIL images, in memory. Never written to disk.

An image arrives as a data URL, raw base64, or an http(s) URL. Local paths and file:// are
refused: a server must not open files a client names.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from . import urlguard
from .config import Settings
from .errors import ImageError

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w-]+=[^;,]*)*)(?P<b64>;base64)?,(?P<data>.*)$",
                       re.DOTALL)
_B64_WHITESPACE = re.compile(r"\s+")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")  # base64 never holds a colon
PATCH_FACTOR = 28  # patch_size 14 x spatial_merge_size 2: image sides are multiples of this
MAX_ASPECT_RATIO = 200  # the vision tower's limit (qwen-vl-utils' MAX_RATIO)
_LIMITS = Settings()  # the defaults of the limits below have one owner: the settings
warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we refuse by our own limit, quietly


def load_image(source: str, *, param: str, allow_urls: bool = True, timeout: float = _LIMITS.image_fetch_timeout,
               max_bytes: int = _LIMITS.max_image_bytes, pixel_limit: int = _LIMITS.max_image_pixels, allow_hosts=(),
               target_pixels: int | None = None) -> Image.Image:
    """Decode one image reference into an RGB PIL image; ImageError names `param` on failure.

    `max_bytes` caps the encoded image, `pixel_limit` its width x height (read from the header,
    before decoding); `allow_hosts` are URL hosts exempt from the public-address rule;
    `target_pixels`, the pixel budget the image will be scaled to, lets a large JPEG be decoded
    at reduced size to begin with.
    """
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
            return decode_image_bytes(_from_base64(source, param, max_bytes), param=param, pixel_limit=pixel_limit,
                                      target_pixels=target_pixels)
        except ImageError as exc:
            # JPEG base64 starts with "/9j/" and "/etc/passwd" is valid base64: only when the
            # text is not an image is a path-like string called a path.
            if exc.code == "invalid_image" and source.startswith(("/", "./", "../", "~")):
                raise _unsupported(param, "local file paths are not accepted") from None
            raise
    return decode_image_bytes(data, param=param, pixel_limit=pixel_limit, target_pixels=target_pixels)


def _unsupported(param: str, what: str) -> ImageError:
    return ImageError(f"{what}; send the image as base64, a data URL or an http(s) URL",
                      param=param, code="unsupported_image_source")


def _check_bytes(size: int, max_bytes: int, param: str) -> None:
    if size > max_bytes:
        raise ImageError(f"image is {size} bytes, more than the limit of {max_bytes}",
                         param=param, code="image_too_large")


def decode_image_bytes(data: bytes, *, param: str, pixel_limit: int = _LIMITS.max_image_pixels,
                       target_pixels: int | None = None) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size  # from the header: nothing is decoded yet
            if width * height > pixel_limit:
                raise ImageError(f"image is {width}x{height} = {width * height} pixels, more than the limit of "
                                 f"{pixel_limit}", param=param, code="image_too_many_pixels")
            if target_pixels and img.format == "JPEG" and width * height > 2 * target_pixels:
                # The model will see at most target_pixels: let libjpeg decode at 1/2, 1/4 or 1/8
                # scale, never below the size the image is resized to afterwards.
                scale = math.sqrt(target_pixels / (width * height))
                img.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
            img.load()
            img = ImageOps.exif_transpose(img)  # phone photos: honour the orientation tag
            return _to_rgb(img)
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image has too many pixels ({exc})", param=param, code="image_too_many_pixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError(f"the data is not an image Pillow can read ({type(exc).__name__})", param=param) from None


def limit_pillow(pixel_limit: int) -> None:
    """Pillow's own decompression-bomb guard (process-wide) must not be stricter than ours, which runs first."""
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < pixel_limit:
        Image.MAX_IMAGE_PIXELS = int(pixel_limit)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img  # exif_transpose already returned a copy detached from the file
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
        raise ImageError(f"image of {width}x{height} cannot be used: {exc}", param=param,
                         code="invalid_image_size") from exc
    if (new_w, new_h) == (width, height):
        return img
    return img.resize((new_w, new_h), Image.Resampling.BICUBIC)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple:
    """(height, width) nearest to the image's, both multiples of `factor`, with a pixel count within
    [min_pixels, max_pixels]: qwen-vl-utils' rule (PaddleFormers has the same), here so that sizing
    images needs no Paddle. ValueError for an aspect ratio over MAX_ASPECT_RATIO."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, "
                         f"got {max(height, width) / min(height, width)}")
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
    return h_bar, w_bar
