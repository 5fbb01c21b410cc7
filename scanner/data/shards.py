"""Finding and reading webdataset shards (img2dataset layout: KEY.jpg + KEY.txt + KEY.json in a .tar).

Reading is streaming (`tarfile` in "r|" mode: one pass, no seeks, works on pipes and object stores
mounted as files) and never raises on data: a member it cannot use becomes an error row, and a
truncated or corrupt tar yields every sample read before the damage followed by one shard-level
error row. Tar member names are only ever parsed as strings, never used as filesystem paths.
"""

from __future__ import annotations

import glob
import os
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

from scanner.errors import ShardSpecError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
CAPTION_EXTS = ("txt",)
META_EXTS = ("json",)
# One member this large is refused (an image or caption, not a video); keeps a bad shard from
# exhausting worker memory.
MAX_MEMBER_BYTES = 256 * 1024 * 1024

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
        try:
            caption = members["txt"].decode("utf-8").strip()
        except UnicodeDecodeError:
            caption = members["txt"].decode("utf-8", errors="replace").strip()
            error = error or None  # a mangled caption is still a caption: keep the sample
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


def iter_tar_samples(path: str, max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[dict]:
    """Stream one shard as sample dicts.

    Each dict: key, shard (the shard's path), image (bytes | None), ext, caption (str | None),
    json (bytes | None), error (str | None). A final dict with key None and an error is yielded
    when the tar is truncated or unreadable; samples read before that point are all yielded.
    """
    shard = str(path)
    current: str | None = None
    members: dict[str, bytes] = {}
    member_errors: list[str] = []
    try:
        with tarfile.open(shard, mode="r|*") as tf:
            for info in tf:
                if not info.isfile():
                    continue  # directories, links, devices: never followed
                m = _KEY_EXT.match(info.name)
                if m is None:
                    continue  # no extension: not part of any sample
                key, ext = os.path.basename(m.group(1)), m.group(2).lower()
                if key != current:
                    if current is not None:
                        yield _sample_row(current, shard, members, member_errors)
                    current, members, member_errors = key, {}, []
                if info.size > max_member_bytes:
                    member_errors.append(f"member {ext} is {info.size} bytes (> {max_member_bytes})")
                    continue
                f = tf.extractfile(info)
                data = f.read() if f is not None else b""
                if len(data) != info.size:
                    raise tarfile.ReadError(f"member {info.name!r} truncated ({len(data)} of {info.size} bytes)")
                members[ext] = data
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        # The sample being read when the archive broke is kept only if its image was complete.
        if current is not None and any(x in members for x in IMAGE_EXTS):
            yield _sample_row(current, shard, members, member_errors)
        elif current is not None:
            yield {"key": current, "shard": shard, "image": None, "ext": None, "caption": None, "json": None,
                   "error": f"sample cut off by a damaged shard: {type(e).__name__}: {e}"}
        yield {"key": None, "shard": shard, "image": None, "ext": None, "caption": None, "json": None,
               "error": f"truncated or corrupt shard: {type(e).__name__}: {e}"}
        return
    if current is not None:
        yield _sample_row(current, shard, members, member_errors)
