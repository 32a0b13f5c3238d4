"""Images from a request -> PIL images, in memory. Never written to disk.

An image arrives as a data URL, raw base64, or an http(s) URL. Local paths and file:// are
refused: a server must not open files a client names.
"""

from __future__ import annotations

import base64
import binascii
import io
import re

import requests
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w-]+=[^;,]*)*)(?P<b64>;base64)?,(?P<data>.*)$",
                       re.DOTALL)
_B64_WHITESPACE = re.compile(r"\s+")
PATCH_FACTOR = 28  # patch_size 14 x spatial_merge_size 2: image sides are multiples of this


def load_image(source: str, *, param: str, allow_urls: bool = True, timeout: float = 10.0,
               max_bytes: int = 20 * 1024 * 1024) -> Image.Image:
    """Decode one image reference into an RGB PIL image; ImageError names `param` on failure."""
    if not isinstance(source, str) or not source.strip():
        raise ImageError("image is empty", param=param)
    source = source.strip()
    lowered = source[:16].lower()
    if lowered.startswith("data:"):
        data = _from_data_url(source, param)
    elif lowered.startswith(("http://", "https://")):
        if not allow_urls:
            raise ImageError("image URLs are turned off on this server; send the image as base64",
                             param=param, code="image_url_disabled")
        data = _fetch(source, param, timeout, max_bytes)
    elif lowered.startswith("file:"):
        raise _local_path_refused(param)
    else:
        try:
            data = _from_base64(source, param)
            if len(data) <= max_bytes:
                return decode_image_bytes(data, param=param)
        except ImageError:
            # JPEG base64 starts with "/9j/" and "/etc/passwd" is valid base64: only when the
            # text is neither an image nor base64 is a path-like string called a path.
            if source.startswith(("/", "./", "../", "~")) or re.match(r"^[A-Za-z]:\\", source):
                raise _local_path_refused(param) from None
            raise
    if len(data) > max_bytes:
        raise ImageError(f"image is {len(data)} bytes, more than the limit of {max_bytes}",
                         param=param, code="image_too_large")
    return decode_image_bytes(data, param=param)


def _local_path_refused(param: str) -> ImageError:
    return ImageError("local file paths are not accepted; send the image as base64 or an http(s) URL",
                      param=param, code="unsupported_image_source")


def decode_image_bytes(data: bytes, *, param: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            img = ImageOps.exif_transpose(img)  # phone photos: honour the orientation tag
            return _to_rgb(img)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"the data is not an image Pillow can read ({type(exc).__name__})", param=param) from exc


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img.copy()
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))  # transparent -> white, like qwen-vl-utils
        background.paste(rgba, mask=rgba.split()[3])
        return background
    return img.convert("RGB")


def _from_data_url(url: str, param: str) -> bytes:
    match = _DATA_URL.match(url)
    if not match or not match.group("b64"):
        raise ImageError("a data URL must look like data:image/png;base64,<data>", param=param)
    return _from_base64(match.group("data"), param)


def _from_base64(text: str, param: str) -> bytes:
    compact = _B64_WHITESPACE.sub("", text)
    compact += "=" * (-len(compact) % 4)  # clients often drop the padding
    try:
        if "-" in compact or "_" in compact:
            return base64.b64decode(compact, altchars=b"-_", validate=True)
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError("image data is not valid base64 (nor a data: or http(s) URL)", param=param) from exc


def _fetch(url: str, param: str, timeout: float, max_bytes: int) -> bytes:
    try:
        with requests.get(url, stream=True, timeout=(timeout, timeout)) as response:
            if response.status_code >= 400:
                raise ImageError(f"fetching the image URL gave HTTP {response.status_code}",
                                 param=param, code="image_fetch_failed")
            chunks, size = [], 0
            for chunk in response.iter_content(64 * 1024):
                size += len(chunk)
                if size > max_bytes:
                    raise ImageError(f"the image at the URL is larger than {max_bytes} bytes",
                                     param=param, code="image_too_large")
                chunks.append(chunk)
            return b"".join(chunks)
    except requests.RequestException as exc:
        raise ImageError(f"could not fetch the image URL: {type(exc).__name__}", param=param,
                         code="image_fetch_failed") from exc


def fit_pixels(img: Image.Image, min_pixels: int, max_pixels: int, *, param: str | None = None) -> Image.Image:
    """Resize to the sides the vision tower will use (multiples of 28, within the pixel budget).

    Done here, once, with a good filter, so the processor has nothing left to resize.
    """
    from paddleformers.transformers.qwen2_vl.vision_process import smart_resize

    width, height = img.size
    try:
        new_h, new_w = smart_resize(height, width, factor=PATCH_FACTOR, min_pixels=min_pixels, max_pixels=max_pixels)
    except ValueError as exc:  # e.g. an aspect ratio over 200
        raise ImageError(f"image of {width}x{height} cannot be used: {exc}", param=param,
                         code="invalid_image_size") from exc
    if (new_w, new_h) == (width, height):
        return img
    return img.resize((new_w, new_h), Image.Resampling.BICUBIC)
