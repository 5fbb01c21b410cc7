import io

import numpy as np
import pytest
from PIL import Image

from scanner.data.decode import DecodeError, decode_image


def _bytes(im: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("data, match", [
    (b"", "empty image member"),
    (b"not an image at all", "cannot decode image"),
    (_bytes(Image.new("RGB", (40, 40), (9, 9, 9)), "JPEG")[:60], "cannot decode image"),
])
def test_bad_bytes_raise_decode_error(data, match):
    with pytest.raises(DecodeError, match=match) as err:
        decode_image(data, 16)
    assert "0x" not in str(err.value)  # no object address: the same bad image gives the same error row every run


def test_decompression_bomb_refused_from_header():
    data = _bytes(Image.new("L", (5000, 5000)))
    with pytest.raises(DecodeError, match="possible decompression bomb"):
        decode_image(data, 16, max_pixels=1_000_000)


@pytest.mark.parametrize("im", [
    Image.new("L", (20, 30), 128),
    Image.new("CMYK", (20, 30), (0, 0, 0, 0)),
    Image.new("RGBA", (20, 30), (255, 0, 0, 0)),  # fully transparent: composited on white
    Image.new("P", (20, 30), 3),
])
def test_modes_become_rgb(im):
    arr, w, h = decode_image(_bytes(im, "JPEG" if im.mode == "CMYK" else "PNG"), 16)
    assert arr.shape == (16, 16, 3) and arr.dtype == np.uint8 and (w, h) == (20, 30)
    if im.mode == "RGBA":
        assert arr.min() == 255


def test_16bit_png_scaled_not_clipped():
    im = Image.fromarray(np.full((10, 10), 32768, np.uint16))
    arr, _, _ = decode_image(_bytes(im), 8, channels=1)
    assert arr.shape == (8, 8, 1) and 120 <= int(arr.mean()) <= 135


def test_exif_rotation_applied():
    im = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    _, w, h = decode_image(_bytes(im, "JPEG", exif=exif.tobytes()), 8)
    assert (w, h) == (20, 40)
