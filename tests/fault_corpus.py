"""A fault corpus: every kind of bad input a web crawl produces, planted in small webdataset shards.

    corpus = build_fault_corpus(tmp_dir)      # writes tmp_dir/shards/*.tar, returns the truth as data

Every planted sample has a key that names its fault (`good_cmyk_jpeg`, `bad_truncated_jpeg`, ...)
and is in exactly one of:

- `good`: must be read, decoded and scored/embedded with no error (formats that must decode, images
  without captions, captions that are not UTF-8, invalid JSON sidecars, ...);
- `bad`: must give exactly one error row whose text contains the expected reason;
- `repeated`: a key written more than once (inside one shard, adjacent or not, and across shards):
  each occurrence is read as its own row (nothing is merged or overwritten), and the corpus-wide
  check turns every occurrence into an error row containing REPEATED_KEY_REASON;
- `lost`: samples behind the damage of a damaged shard, which no streaming reader can reach (the
  shard's own error row says so); they must not appear at all.

`shard_errors` maps a shard name (file name without .tar, as scanner.data.shards.shard_name gives
it) to the text its one shard-level error row (key null) must contain; every other shard has none.
Whole-file faults (empty tar, zero bytes, not a tar, gzip, truncations, ...) are separate `*.tar`
files, so a directory spec picks them all up.

Member names are only strings to memscan: `../` and absolute names (`escape_names`) give ordinary
keys (webdataset's: the member path up to the first dot of its basename, e.g. `../good_escape_up`),
so a removal list names them as a webdataset training loader does, and nothing is ever written
outside the output directory. Images are distinct random-ish pictures, 16 to 64 px, so no two are
duplicates of each other.
"""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from scanner.data.shards import MAX_CAPTION_CHARS

REPEATED_KEY_REASON = "is repeated"  # scanner.corpus.keys.repeated_key_errors names the key and its shards
# Written by the absolute-path member; a test checks it never appears on this machine.
ABS_DIR = "/memscan_fault_corpus_abs"


@dataclass
class FaultCorpus:
    root: Path
    shards: list[Path]  # every *.tar file written, sorted
    good: dict[str, str] = field(default_factory=dict)  # key -> shard name
    bad: dict[str, tuple[str, str]] = field(default_factory=dict)  # key -> (shard name, expected error text)
    repeated: dict[str, list[str]] = field(default_factory=dict)  # key -> shard name of each occurrence
    lost: dict[str, str] = field(default_factory=dict)  # key -> shard name: behind a shard's damage, no row
    shard_errors: dict[str, str] = field(default_factory=dict)  # shard name -> expected shard error text
    what: dict[str, str] = field(default_factory=dict)  # key or shard name -> the planted fault, in words
    captions: dict[str, str | None] = field(default_factory=dict)  # good key -> the caption it must read as
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # good key -> (width, height) as shown
    # good key -> (h, w, 3) what it must decode to, up to JPEG error: 16-bit, CMYK, alpha, first frames
    reference: dict[str, np.ndarray] = field(default_factory=dict)
    escape_names: list[str] = field(default_factory=list)  # member names with ../ or an absolute path
    directories: list[str] = field(default_factory=list)  # directory members: not samples, no row

    @property
    def dir(self) -> Path:
        return self.root / "shards"

    def expected_keys(self, shard: str) -> list[str]:
        """Sorted keys of the rows one shard must give (a repeated key once per occurrence), shard row not counted."""
        keys = [k for k, s in self.good.items() if s == shard] + [k for k, (s, _) in self.bad.items() if s == shard]
        keys += [k for k, ss in self.repeated.items() for s in ss if s == shard]
        return sorted(keys)


# --------------------------------------------------------------------------------------------------
# pictures and encodings


def _picture(seed: int, size: int | tuple[int, int]) -> np.ndarray:
    """A distinct smooth random picture (w, h) -> (h, w, 3) uint8: low-frequency colour blobs plus a gradient."""
    w, h = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(1000 + seed)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    arr = np.asarray(coarse.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float64)
    ramp = np.linspace(-40, 40, w)[None, :, None] * rng.choice([-1, 1], 3)[None, None, :]
    return np.clip(arr + ramp, 0, 255).astype(np.uint8)


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _jpeg(seed: int, size=32, **kw) -> bytes:
    return _encode(Image.fromarray(_picture(seed, size)), "JPEG", quality=90, **kw)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_raw(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG written by hand (PIL cannot write 16-bit RGB, nor a header that lies about the size)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(rows))
            + _png_chunk(b"IEND", b""))


def _png16_rgb(seed: int, size=32) -> bytes:
    arr = _picture(seed, size).astype(np.uint16) * 257  # full 16-bit range
    rows = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(size))
    return _png_raw(size, size, 16, 2, rows)


def _bomb_png(side: int) -> bytes:
    """A grayscale PNG whose header declares side x side pixels but carries one row: tiny on disk."""
    return _png_raw(side, side, 8, 0, b"\x00" + b"\x00" * side)


def _animated(seed: int, fmt: str, size=32) -> tuple[bytes, np.ndarray]:
    """Three visibly different frames; returns (bytes, the first frame)."""
    first = _picture(seed, size)
    frames = [Image.fromarray(first), Image.fromarray(255 - first), Image.fromarray(first[::-1, ::-1])]
    kw = {"lossless": True} if fmt == "WEBP" else {}
    return _encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **kw), first


# --------------------------------------------------------------------------------------------------
# tar writing


def _regular(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_700_000_000  # fixed: the same corpus byte for byte on every run
    return info, data


def _special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mtime = kind, linkname, 1_700_000_000
    if kind == tarfile.DIRTYPE:
        info.mode = 0o755
    return info, None


def _tar_bytes(members: list, fmt=tarfile.GNU_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _offsets(data: bytes) -> dict[str, tuple[int, int]]:
    """Member name -> (header offset, data offset) in an uncompressed tar."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        return {m.name: (m.offset, m.offset_data) for m in tf.getmembers()}


class _Builder:
    def __init__(self, root: Path):
        self.c = FaultCorpus(root=root, shards=[])
        self.c.dir.mkdir(parents=True, exist_ok=True)
        self.seed = 0

    def next_seed(self) -> int:
        self.seed += 1
        return self.seed

    def good(self, shard: str, key: str, what: str, caption: str | None = "default", size=(32, 32)):
        self.c.good[key] = shard
        self.c.sizes[key] = size
        self.c.what[key] = what
        self.c.captions[key] = f"a picture planted as {key}" if caption == "default" else caption

    def bad(self, shard: str, key: str, what: str, reason: str):
        self.c.bad[key] = (shard, reason)
        self.c.what[key] = what

    def sample(self, key: str, image: bytes | None, ext="jpg", caption: bytes | None = b"default",
               meta: bytes | None = b'{"url": "http://example.com/x.jpg"}') -> list:
        out = []
        if image is not None:
            out.append(_regular(f"{key}.{ext}", image))
        if caption is not None:
            out.append(_regular(f"{key}.txt", f"a picture planted as {key}".encode(errors="surrogateescape") if caption == b"default"
                                else caption))
        if meta is not None:
            out.append(_regular(f"{key}.json", meta))
        return out

    def write(self, name: str, data: bytes, what: str, shard_error: str | None = None) -> str:
        path = self.c.dir / f"{name}.tar"
        path.write_bytes(data)
        self.c.shards.append(path)
        self.c.what[name] = what
        if shard_error is not None:
            self.c.shard_errors[name] = shard_error
        return name


# --------------------------------------------------------------------------------------------------
# the shards


def _images_shard(b: _Builder) -> None:
    """Formats that must decode, and image bytes that cannot."""
    s = "images"
    members: list = []

    def good(key, what, image, ext="jpg", size=(32, 32), looks_like=None):
        b.good(s, key, what, size=size)
        if looks_like is not None:
            b.c.reference[key] = looks_like
        members.extend(b.sample(key, image, ext))

    def bad(key, what, reason, image, ext="jpg"):
        b.bad(s, key, what, reason)
        members.extend(b.sample(key, image, ext))

    def pic(size=32):
        return _picture(b.next_seed(), size)

    n = b.next_seed
    good("good_jpeg", "plain RGB JPEG", _jpeg(n(), 32))
    good("good_png", "plain RGB PNG", _encode(Image.fromarray(pic(40)), "PNG"), "png", (40, 40))
    good("good_webp", "plain RGB WebP", _encode(Image.fromarray(pic(24)), "WEBP"), "webp", (24, 24))
    good("good_bmp", "BMP", _encode(Image.fromarray(pic(20)), "BMP"), "bmp", (20, 20))
    good("good_tiff", "TIFF", _encode(Image.fromarray(pic(20)), "TIFF"), "tif", (20, 20))
    good("good_small_16px", "16x16 JPEG, the smallest size", _jpeg(n(), 16), size=(16, 16))
    good("good_large_64px", "64x48 JPEG, not square", _jpeg(n(), (64, 48)), size=(64, 48))
    p = pic()
    good("good_cmyk_jpeg", "CMYK JPEG", _encode(Image.fromarray(p).convert("CMYK"), "JPEG", quality=95),
         looks_like=p)
    good("good_gray_jpeg", "grayscale JPEG", _encode(Image.fromarray(pic()).convert("L"), "JPEG"))
    good("good_progressive_jpeg", "progressive JPEG", _jpeg(n(), 32, progressive=True))
    gray = pic()[..., 0]
    good("good_png16_gray", "16-bit grayscale PNG (full range: clipping to 8 bits would give white)",
         _encode(Image.fromarray(gray.astype(np.uint16) * 257), "PNG"), "png", looks_like=np.dstack([gray] * 3))
    seed = n()
    good("good_png16_rgb", "16-bit RGB PNG (48 bits a pixel)", _png16_rgb(seed), "png",
         looks_like=_picture(seed, 32))
    good("good_palette_trns_png", "palette PNG with a transparent colour",
         _encode(Image.fromarray(pic()).quantize(16), "PNG", transparency=0), "png")
    p, alpha = pic(), np.linspace(0, 255, 32 * 32).reshape(32, 32).astype(np.uint8)
    on_white = p * (alpha[..., None] / 255.0) + 255.0 * (1 - alpha[..., None] / 255.0)
    good("good_rgba_png", "RGBA PNG with graded alpha: composited on white",
         _encode(Image.fromarray(np.dstack([p, alpha]), "RGBA"), "PNG"), "png", looks_like=on_white)
    la = np.dstack([pic()[..., 1], np.full((32, 32), 128, np.uint8)])
    good("good_la_png", "grayscale + alpha PNG", _encode(Image.fromarray(la, "LA"), "PNG"), "png")
    good("good_1bit_png", "1-bit black and white PNG", _encode(Image.fromarray(pic()).convert("1"), "PNG"), "png")
    gif, first = _animated(n(), "GIF")
    good("good_animated_gif", "animated GIF, 3 frames: the first is used", gif, "gif", looks_like=first)
    webp, first = _animated(n(), "WEBP")
    good("good_animated_webp", "animated WebP, 3 frames: the first is used", webp, "webp", looks_like=first)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees: 48 wide on disk, 24 wide as shown
    good("good_exif_rotated_jpeg", "48x24 JPEG with an EXIF tag rotating it to 24x48",
         _encode(Image.fromarray(pic((48, 24))), "JPEG", exif=exif.tobytes()), size=(24, 48))
    good("good_png_named_jpg", "a PNG in a .jpg member (the content decides)",
         _encode(Image.fromarray(pic()), "PNG"), "jpg")
    good("good_upper_ext", "upper-case extension .JPG", _jpeg(n(), 32), "JPG")

    truncated = _jpeg(n(), 64)
    bad("bad_truncated_jpeg", "JPEG cut in half", "cannot decode image", truncated[: len(truncated) // 2])
    bad("bad_empty_image", "zero-byte image member", "empty image member", b"")
    bad("bad_garbage_image", "random bytes in a .jpg member", "cannot decode image",
        np.random.default_rng(7).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    bad("bad_html_as_jpg", "an HTML error page saved as .jpg", "cannot decode image",
        b"<!DOCTYPE html><html><body><h1>403 Forbidden</h1></body></html>")
    bad("bad_bomb_png_20000", "PNG declaring 20000x20000 pixels (a few hundred bytes)",
        "possible decompression bomb", _bomb_png(20000), "png")
    bad("bad_bomb_png_10000", "PNG declaring 10000x10000 pixels: above memscan's limit, below PIL's",
        "possible decompression bomb", _bomb_png(10000), "png")
    bad("bad_zero_size_png", "PNG header declaring 0x0 pixels", "cannot decode image",
        _png_raw(0, 0, 8, 0, b""), "png")
    members += _repeat_across(b, s)
    b.write(s, _tar_bytes(members), "every image format, good and bad")


def _repeat_across(b: _Builder, shard: str) -> list:
    key = "repeat_across_shards"
    b.c.repeated.setdefault(key, []).append(shard)
    b.c.what[key] = "the same key in two shards, with different images"
    return b.sample(key, _jpeg(b.next_seed(), 32))


def _members_shard(b: _Builder) -> None:
    """Captions, sidecars, member names and member types."""
    s = "members"
    n = b.next_seed
    m: list = []
    b.good(s, "good_no_caption", "image without a caption", caption=None)
    m += b.sample("good_no_caption", _jpeg(n()), caption=None)
    b.good(s, "good_no_json", "image and caption without a JSON sidecar")
    m += b.sample("good_no_json", _jpeg(n()), meta=None)
    b.good(s, "good_invalid_json", "JSON sidecar that is not JSON (the image is read; its url and download metadata are null)")
    m += b.sample("good_invalid_json", _jpeg(n()), meta=b'{"url": "http://exa')
    b.good(s, "good_binary_json", "JSON sidecar of binary garbage")
    m += b.sample("good_binary_json", _jpeg(n()), meta=b"\xff\xfe\x00\x01garbage")
    b.good(s, "good_invalid_utf8_caption", "caption in Latin-1, not UTF-8: kept with U+FFFD",
           caption="caf\ufffd cr\ufffdme br\ufffdl\ufffde")
    m += b.sample("good_invalid_utf8_caption", _jpeg(n()), caption="café crème brûlée".encode("latin-1"))
    b.good(s, "good_empty_caption", "zero-byte caption", caption="")
    m += b.sample("good_empty_caption", _jpeg(n()), caption=b"")
    long_caption = ("a very long alt text " * 20_000).encode()  # 420 KB
    b.good(s, "good_oversized_caption", "420 KB caption: cut to MAX_CAPTION_CHARS, the image is still scanned",
           caption=long_caption.decode().strip()[:MAX_CAPTION_CHARS])
    m += b.sample("good_oversized_caption", _jpeg(n()), caption=long_caption)
    long_key = "good_long_name_" + "x" * 150  # > 100 characters: needs a GNU long-name header
    b.good(s, long_key, "member name longer than 100 characters")
    m += b.sample(long_key, _jpeg(n()))
    b.good(s, "../good_escape_up", "member names starting with ../ (a string, never a path)")
    m += b.sample("../good_escape_up", _jpeg(n()))
    b.good(s, f"{ABS_DIR}/good_absolute", "absolute member names (a string, never a path)")
    m += b.sample(f"{ABS_DIR}/good_absolute", _jpeg(n()))
    b.c.escape_names += ["../good_escape_up.jpg", f"{ABS_DIR}/good_absolute.jpg"]
    b.good(s, "subdir/good_in_subdir", "sample inside a directory member")
    m += [_special("subdir", tarfile.DIRTYPE)] + b.sample("subdir/good_in_subdir", _jpeg(n()))
    b.c.directories.append("subdir")
    m += [_special("empty_dir", tarfile.DIRTYPE)]
    b.c.directories.append("empty_dir")

    b.bad(s, "bad_caption_only", "caption without an image", "no image member")
    m += b.sample("bad_caption_only", None)
    b.bad(s, "bad_json_only", "JSON sidecar without an image or caption", "no image member")
    m += b.sample("bad_json_only", None, caption=None)
    b.bad(s, "bad_no_image_ext", "a sample whose only data is an .mp4 member", "no image member")
    m += [_regular("bad_no_image_ext.mp4", b"\x00\x00\x00\x18ftypmp42")]

    b.bad(s, "bad_symlink", "the image member is a symlink to another sample's image", "is a symlink")
    m += [_special("bad_symlink.jpg", tarfile.SYMTYPE, "good_no_json.jpg")] + b.sample("bad_symlink", None)
    b.bad(s, "bad_symlink_etc", "a symlink to /etc/passwd, alone", "is a symlink")
    m += [_special("bad_symlink_etc.jpg", tarfile.SYMTYPE, "/etc/passwd")]
    b.bad(s, "bad_hardlink", "the image member is a hard link to another sample's image", "is a hard link")
    m += [_special("bad_hardlink.jpg", tarfile.LNKTYPE, "good_no_json.jpg")] + b.sample("bad_hardlink", None)
    b.bad(s, "bad_char_device", "a character device member", "is a character device")
    m += [_special("bad_char_device.jpg", tarfile.CHRTYPE)]
    b.bad(s, "bad_block_device", "a block device member", "is a block device")
    m += [_special("bad_block_device.jpg", tarfile.BLKTYPE)]
    b.bad(s, "bad_fifo", "a FIFO member", "is a FIFO")
    m += [_special("bad_fifo.jpg", tarfile.FIFOTYPE)]
    b.bad(s, "README", "a member without an extension", "does not name a sample")
    m += [_regular("README", b"not a sample")]
    b.bad(s, "._good_jpeg.jpg", "a macOS AppleDouble member (name starts with a dot)", "does not name a sample")
    m += [_regular("._good_jpeg.jpg", b"\x00\x05\x16\x07AppleDouble")]
    b.bad(s, "bad_control\nchar", "a key with a newline (cannot be one line of removal_list.txt)",
          "control character")
    m += b.sample("bad_control\nchar", _jpeg(n()))
    b.bad(s, "bad_not_utf8_\ufffd", "a member name that is not UTF-8", "not valid UTF-8")
    m += b.sample("bad_not_utf8_\udcff", _jpeg(n()))  # surrogateescape: the raw byte 0xff in the tar header

    key = "repeat_in_shard"
    b.c.repeated[key] = [s, s]
    b.c.what[key] = "the same key twice in one shard, other samples between, different images"
    m = b.sample(key, _jpeg(n())) + m + b.sample(key, _jpeg(n()))
    key = "repeat_adjacent"
    b.c.repeated[key] = [s, s]
    b.c.what[key] = "the same key twice in a row (KEY.jpg KEY.txt KEY.jpg KEY.txt): two samples, not one"
    m += b.sample(key, _jpeg(n())) + b.sample(key, _jpeg(n()))
    b.write(s, _tar_bytes(m), "captions, sidecars, member names and member types")


def _good_samples(b: _Builder, shard: str, keys: list[str]) -> list:
    m = []
    for k in keys:
        b.good(shard, k, "a good sample in a shard with a shard-level fault")
        m += b.sample(k, _jpeg(b.next_seed()))
    return m


def _lose(b: _Builder, shard: str, keys: list[str]) -> list:
    m = []
    for k in keys:
        b.c.lost[k] = shard
        b.c.what[k] = "a sample behind the damage of its shard: unreachable"
        m += b.sample(k, _jpeg(b.next_seed()))
    return m


def _damaged_shards(b: _Builder) -> None:
    """Whole-file faults, one file each."""
    s = "repeat"
    b.write(s, _tar_bytes(_good_samples(b, s, ["good_repeat_neighbour"]) + _repeat_across(b, s)),
            "a good shard that repeats a key of the images shard")

    s = "gzip"
    b.write(s, gzip.compress(_tar_bytes(_good_samples(b, s, ["good_gzip_a", "good_gzip_b"])), mtime=0),
            "a gzip-compressed tar named .tar: read like webdataset reads it, every sample good")

    s = "pax"
    b.write(s, _tar_bytes(_good_samples(b, s, ["good_pax_a", "good_pax_b"]), fmt=tarfile.PAX_FORMAT),
            "a POSIX (pax) tar instead of GNU")

    # Truncated inside a member's data: the samples before are kept, the one being read is an error.
    s = "truncated_data"
    m = _good_samples(b, s, ["good_before_cut_a", "good_before_cut_b"])
    b.bad(s, "bad_cut_in_image", "its image is cut off by the end of the file", "cut off by a damaged shard")
    m += b.sample("bad_cut_in_image", _jpeg(b.next_seed(), 64))
    m += _lose(b, s, ["lost_after_cut"])
    data = _tar_bytes(m)
    _, at = _offsets(data)["bad_cut_in_image.jpg"]
    b.write(s, data[: at + 300], "a tar cut inside an image member", "truncated or corrupt shard")

    # Cut exactly between two members: tarfile alone would end quietly there.
    s = "truncated_boundary"
    m = _good_samples(b, s, ["good_before_boundary"]) + _lose(b, s, ["lost_after_boundary"])
    data = _tar_bytes(m)
    hdr, _ = _offsets(data)["lost_after_boundary.jpg"]
    b.write(s, data[:hdr], "a tar cut between two members (no end-of-archive marker)", "end-of-archive marker")

    s = "truncated_header"
    m = _good_samples(b, s, ["good_before_header_cut"]) + _lose(b, s, ["lost_in_header_cut"])
    data = _tar_bytes(m)
    hdr, _ = _offsets(data)["lost_in_header_cut.jpg"]
    b.write(s, data[: hdr + 200], "a tar cut inside a member header", "cut inside a member header")

    s = "corrupt_header"
    m = _good_samples(b, s, ["good_before_bad_header"]) + _lose(b, s, ["lost_after_bad_header"])
    data = bytearray(_tar_bytes(m))
    hdr, _ = _offsets(bytes(data))["lost_after_bad_header.jpg"]
    data[hdr: hdr + 16] = b"\xde\xad\xbe\xef" * 4  # the name field: the header checksum no longer matches
    b.write(s, bytes(data), "a member header overwritten with garbage (bad checksum)", "corrupt member header")

    s = "concatenated"
    first = _tar_bytes(_good_samples(b, s, ["good_first_archive"]))
    second = _tar_bytes(_lose(b, s, ["lost_second_archive"]))
    b.write(s, first + second, "two tars concatenated (cat a.tar b.tar): webdataset stops at the first end",
            "after its end-of-archive marker")

    b.write("empty", _tar_bytes([]), "a valid tar with no members", "no samples")
    b.write("only_dirs", _tar_bytes([_special("a", tarfile.DIRTYPE), _special("a/b", tarfile.DIRTYPE)]),
            "a tar holding only directories", "no samples")
    b.write("zero_bytes", b"", "a zero-byte file", "not a tar archive: the file is empty")
    b.write("not_a_tar", b"<html><body>502 Bad Gateway</body></html>\n" * 30,
            "an HTML error page saved as .tar", "not a tar archive")
    b.write("jpeg_as_tar", _jpeg(b.next_seed(), 64), "a JPEG saved as .tar", "not a tar archive")

    # A gzip tar cut inside an image: the cut is placed where the decompressed prefix ends mid-member.
    s = "truncated_gzip"
    m = _good_samples(b, s, ["good_gzip_before_cut"])
    b.bad(s, "bad_gzip_cut_in_image", "its image is cut off by the end of the compressed file",
          "cut off by a damaged shard")
    noise = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)  # incompressible
    m += b.sample("bad_gzip_cut_in_image", _encode(Image.fromarray(noise), "PNG"), "png")
    m += _lose(b, s, ["lost_gzip_after_cut"])
    data = _tar_bytes(m)
    _, at = _offsets(data)["bad_gzip_cut_in_image.png"]
    whole = gzip.compress(data, mtime=0)
    cut = next(c for c in range(512, len(whole), 256)
               if len(zlib.decompressobj(31).decompress(whole[:c])) > at + 4096)
    b.write(s, whole[:cut], "a gzip-compressed tar cut inside an image member", "truncated or corrupt shard")


def build_fault_corpus(root: str | Path) -> FaultCorpus:
    """Write the fault shards under root/shards and return their ground truth (see the module docstring)."""
    b = _Builder(Path(root))
    _images_shard(b)
    _members_shard(b)
    _damaged_shards(b)
    b.c.shards.sort()
    return b.c
