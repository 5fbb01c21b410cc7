"""Finding and reading webdataset shards (img2dataset layout: KEY.jpg + KEY.txt + KEY.json in a .tar).

Reading is streaming (`tarfile` in "r|*" mode: one pass, no seeks, works on pipes and object stores
mounted as files, reads gzip/bz2/xz-compressed tars as webdataset does) and never raises on data: a
member it cannot use (a link, a device, a name that is no KEY.EXT) becomes an error row, and a
truncated or corrupt tar yields every sample read before the damage followed by one shard-level
error row; so does a file that is not a tar, and a tar with no samples. Tar member names are only
ever parsed as strings, never used as filesystem paths.
"""

from __future__ import annotations

import glob
import os
import re
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from scanner.errors import ShardSpecError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
CAPTION_EXTS = ("txt",)
META_EXTS = ("json",)
# One member this large is refused (an image or caption, not a video); keeps a bad shard from
# exhausting worker memory.
MAX_MEMBER_BYTES = 256 * 1024 * 1024
# Captions are cut to this many characters: far beyond any text encoder's context (CLIP: 77 tokens), and
# a crawl's megabyte "alt text" would otherwise be copied into every output table.
MAX_CAPTION_CHARS = 16_384

# The corpus-wide check's text (finalize for a scan, neighbours.store for dedup): one key, two samples.

_GLOB_CHARS = re.compile(r"[*?\[]")
# webdataset's convention: the key is the member path up to the first dot of its basename.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def _brace_expand(pattern: str) -> list[str]:
    from braceexpand import braceexpand

    return list(braceexpand(pattern))


def expand_shards(spec: str | os.PathLike | list) -> list[str]:
    """Expand a directory, a glob, a brace pattern (``shards/{00000..00099}.tar``) or a list of them.

    Returns sorted, de-duplicated absolute paths of existing .tar files. Raises ShardSpecError naming
    the first entry that matches nothing, or when the whole spec is empty.
    """
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec or [])
    if not items:
        raise ShardSpecError("no shards given: pass a directory, a glob or a brace pattern such as "
                             "'shards/{00000..00099}.tar'")
    out: list[str] = []
    for item in items:
        for part in [str(item).strip()]:
            if not part:
                continue
            found: list[str] = []
            for pattern in _brace_expand(os.path.expanduser(part)):
                if os.path.isdir(pattern):
                    found += sorted(glob.glob(os.path.join(pattern, "*.tar")))
                elif _GLOB_CHARS.search(pattern):
                    found += sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
                elif os.path.isfile(pattern):
                    found.append(pattern)
                else:
                    raise ShardSpecError(f"shard path {pattern!r} does not exist (from {part!r})")
            if not found:
                raise ShardSpecError(f"{part!r} matches no .tar shard")
            out += found
    return sorted({str(Path(p).resolve()) for p in out})


def shard_name(path: str) -> str:
    """Output name of a shard: its file name without .tar (``/data/00012.tar`` -> ``00012``)."""
    name = os.path.basename(path)
    return name.removesuffix(".tar")


def _sample_row(key: str, shard: str, members: dict[str, bytes], member_errors: list[str]) -> dict:
    image_ext = next((e for e in IMAGE_EXTS if e in members), None)
    caption = None
    error = "; ".join(member_errors) or None
    if "txt" in members:
        # Invalid UTF-8 is mangled, not refused: the image is fine and the caption is still mostly readable.
        caption = members["txt"].decode("utf-8", errors="replace").strip()[:MAX_CAPTION_CHARS]
    if image_ext is None and error is None:
        found = ", ".join(sorted(members)) or "nothing"
        error = f"no image member (found: {found}; accepted: {', '.join(IMAGE_EXTS)})"
    return {
        "key": key,
        "shard": shard,
        "image": members.get(image_ext) if image_ext else None,
        "ext": image_ext,
        "caption": caption,
        "json": members.get("json"),
        "error": error,
    }


def _split_name(name: str) -> tuple[str, str | None]:
    """Member name -> (key, lower-case extension), or (name, None) when it names no sample."""
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2).lower()) if m else (name, None)


def _key_problem(key: str) -> str | None:
    """Why a key cannot be reported as it is (keys end up in parquet and one a line in removal_list.txt)."""
    if any(0xDC80 <= ord(c) <= 0xDCFF for c in key):  # tarfile's surrogateescape for bytes that are not UTF-8
        return "is not valid UTF-8"
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        return "has a control character"
    return None


def _printable_key(key: str) -> str:
    return key.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


_MEMBER_KINDS = {tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hard link", tarfile.CHRTYPE: "character device",
                 tarfile.BLKTYPE: "block device", tarfile.FIFOTYPE: "FIFO"}


def _member_kind(info: tarfile.TarInfo) -> str:
    kind = _MEMBER_KINDS.get(info.type, f"member of tar type {info.type!r}")
    return f"{kind} to {info.linkname!r}" if info.linkname else kind


def _end_recorder() -> tuple[type, dict]:
    """A TarInfo class that records why the archive's member loop ended, and the dict it writes to.

    tarfile ends the loop without an exception when, after the first member, the data runs out at a
    header (a tar cut between members or inside a header) or a header fails its checksum: every sample
    behind that point would be lost without a word. TarInfo.fromtarfile reads each header, so it sees
    which of these it was.
    """
    end: dict = {}

    class RecordingTarInfo(tarfile.TarInfo):
        @classmethod
        def fromtarfile(cls, tf):
            try:
                return super().fromtarfile(tf)
            except tarfile.HeaderError as e:
                end["error"], end["offset"] = e, tf.offset
                raise

    return RecordingTarInfo, end


def _trailing_data(tf: tarfile.TarFile) -> bool:
    """Whether anything but zero padding follows the end-of-archive block (e.g. `cat a.tar b.tar`)."""
    read = getattr(tf.fileobj, "read", None)
    if read is None:
        return False
    while chunk := read(1 << 16):
        if chunk.strip(b"\0"):
            return True
    return False


def _unread_tail(tf: tarfile.TarFile, end: dict) -> str | None:
    """Why a member loop that ended without an exception did not reach the real end of the shard, or None."""
    err, at = end.get("error"), end.get("offset")
    if isinstance(err, tarfile.EOFHeaderError):  # a zero block: the end-of-archive marker
        if _trailing_data(tf):
            return (f"the shard goes on after its end-of-archive marker at byte {at} (tars concatenated, or a "
                    "zeroed block): what follows is not read, as webdataset does not read it either")
        return None
    if isinstance(err, tarfile.EmptyHeaderError):
        return f"the data ends at byte {at}, between two members, without the tar end-of-archive marker"
    if isinstance(err, tarfile.TruncatedHeaderError):
        return f"the data ends at byte {at}, cut inside a member header"
    if isinstance(err, tarfile.InvalidHeaderError):
        return f"corrupt member header at byte {at} ({err}): the rest of the shard is not read"
    return None


def iter_tar_samples(path: str, max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[dict]:
    """Stream one shard as sample dicts.

    Each dict: key, shard (the shard's path), image (bytes | None), ext, caption (str | None),
    json (bytes | None), error (str | None). A final dict with key None and an error is yielded
    when the shard is not a tar, truncated, corrupt, or holds no samples; samples read before the
    damage are all yielded.

    Keys are webdataset's: the member path up to the first dot of its basename (``a/b.c.jpg`` -> ``a/b``).
    A key met again after other members, or with an extension its sample already has, starts a new
    sample with the same key (nothing is merged or overwritten; the corpus-wide check reports repeats).
    Links, devices and FIFOs are error rows naming the member and its type: they are never followed.
    """
    shard = str(path)
    current: str | None = None
    members: dict[str, bytes] = {}
    member_errors: list[str] = []
    yielded = 0
    opened = False
    tarinfo, end = _end_recorder()

    def row() -> dict:
        problem = _key_problem(current)
        if problem is None:
            return _sample_row(current, shard, members, member_errors)
        return {"key": _printable_key(current), "shard": shard, "image": None, "ext": None, "caption": None,
                "json": None, "error": f"member name {current!r} {problem}: its key cannot be reported"}

    def shard_row(error: str) -> dict:
        return {"key": None, "shard": shard, "image": None, "ext": None, "caption": None, "json": None,
                "error": error}

    try:
        with tarfile.open(shard, mode="r|*", tarinfo=tarinfo) as tf:
            opened = True
            for info in tf:
                if info.isdir():
                    continue  # a container, not part of a sample (`tar c dir/` writes one); no data is lost
                key, ext = _split_name(info.name)
                if ext is None or key != current or ext in members:
                    if current is not None:
                        yield row()
                        yielded += 1
                    current, members, member_errors = key, {}, []
                kind = None if info.isfile() else _member_kind(info)
                if ext is None:  # README, ._KEY.jpg (macOS AppleDouble): webdataset skips these too
                    member_errors.append(f"member {info.name!r}{f' ({kind})' if kind else ''} does not name a "
                                         "sample (KEY.EXTENSION): not read")
                    yield row()
                    yielded += 1
                    current = None
                    continue
                if kind is not None:
                    member_errors.append(f"member {info.name!r} is a {kind}, not a regular file: not read (memscan "
                                         "reads regular files only and never follows a link)")
                    continue
                if info.size > max_member_bytes:
                    member_errors.append(f"member {info.name!r} is {info.size} bytes (> {max_member_bytes})")
                    continue
                f = tf.extractfile(info)
                data = f.read() if f is not None else b""
                if len(data) != info.size:
                    raise tarfile.ReadError(f"member {info.name!r} truncated ({len(data)} of {info.size} bytes)")
                members[ext] = data
            tail = _unread_tail(tf, end)
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error) as e:
        if not opened and isinstance(e, tarfile.TarError):  # the first header already failed
            empty = os.path.isfile(shard) and os.path.getsize(shard) == 0
            yield shard_row("not a tar archive: the file is empty (0 bytes)" if empty else
                            f"not a tar archive: {type(e).__name__}: {e}")
            return
        # The sample being read when the archive broke is kept only if its image was complete.
        if current is not None and any(x in members for x in IMAGE_EXTS):
            yield row()
        elif current is not None:
            yield {"key": _printable_key(current), "shard": shard, "image": None, "ext": None, "caption": None,
                   "json": None, "error": f"sample cut off by a damaged shard: {type(e).__name__}: {e}"}
        yield shard_row(f"truncated or corrupt shard: {type(e).__name__}: {e}")
        return
    if current is not None:
        yield row()
        yielded += 1
    if tail is not None:
        yield shard_row(f"truncated or corrupt shard: {tail}")
    elif yielded == 0:
        yield shard_row("the shard holds no samples (an empty tar, or only directories)")
