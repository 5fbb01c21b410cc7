"""Image decoding that turns bad bytes into a DecodeError, never a crash.

Handles what web-scraped corpora contain: EXIF rotation, grayscale / palette / CMYK / alpha /
16-bit images, and decompression bombs (refused from the header, before any pixel is decoded).
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps

from scanner.config import MAX_IMAGE_PIXELS


class DecodeError(ValueError):
    """Bytes that are not a usable image."""


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit: scale to 8 bits rather than letting PIL clip everything above 255 to white.
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") else max(float(a.max()), 1.0)
        im = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # Composite transparency onto white: deterministic, and how the image is usually shown.
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return im.convert("RGB")


def decode_image(data: bytes | None, size: int, channels: int = 3, max_pixels: int = MAX_IMAGE_PIXELS
                 ) -> tuple[np.ndarray, int, int]:
    """Decode, EXIF-rotate, resize the shorter side to `size` and centre-crop.

    Returns (pixels (size, size, channels) uint8, original width, original height).
    Raises DecodeError for empty, unreadable, or oversized (> max_pixels) images.
    """
    im, w, h = open_image(data, max_pixels)
    return fit_image(im, size, channels), w, h


def open_image(data: bytes | None, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[Image.Image, int, int]:
    """Decode once: the EXIF-rotated RGB image and its width and height. Raises DecodeError.

    fit_image then makes each size a stage needs (the model's, the embedder's) from the one decode.
    """
    if not data:
        raise DecodeError("empty image member (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's own bomb warnings: we check the size ourselves
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w <= 0 or h <= 0:
                raise DecodeError(f"image has no pixels ({w}x{h})")
            if w * h > max_pixels:
                raise DecodeError(f"image is {w}x{h} = {w * h} pixels, above data.max_image_pixels={max_pixels} "
                                  "(possible decompression bomb)")
            im.load()
            im = ImageOps.exif_transpose(im)
            w, h = im.size
            im = _to_rgb(im)
    except DecodeError:
        raise
    except Image.DecompressionBombError as e:  # PIL refuses (in Image.open) what is far above its own limit
        raise DecodeError(f"image is above PIL's limit of {2 * Image.MAX_IMAGE_PIXELS} pixels (possible "
                          f"decompression bomb): {e}") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data; all mean "not an image we can use"
        # PIL names the in-memory file by its address ("<_io.BytesIO object at 0x7f...>"): drop it, so the
        # same bad image gives the same error text on every run and every node
        why = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(e))
        raise DecodeError(f"cannot decode image: {type(e).__name__}: {why}") from None
    return im, int(w), int(h)


def fit_image(im: Image.Image, size: int, channels: int = 3) -> np.ndarray:
    """An RGB image from open_image -> (size, size, channels) uint8: shorter side to `size`, centre crop."""
    try:
        im = ImageOps.fit(im, (size, size), Image.Resampling.BICUBIC)
    except Exception as e:  # noqa: BLE001 - a lazily failing image (truncated data) fails here, not in open_image
        raise DecodeError(f"cannot decode image: {type(e).__name__}: {e}") from None
    if channels == 1:
        return np.asarray(im.convert("L"), dtype=np.uint8)[..., None]
    return np.asarray(im, dtype=np.uint8)
