"""What img2dataset writes beside the images: per-sample KEY.json, per-shard NAME_stats.json.

    sample_meta(raw_json_bytes)  -> {"url", "download_sha256", "original_width", "original_height"}
    download_stats(shard_paths)  -> the downloads each shard's url list asked for, and how many failed

KEY.json (img2dataset's downloader) holds the url, the original size before resizing and, with its default
`compute_hash="sha256"`, the sha256 of the downloaded bytes (before resizing: not the sha256 of the stored image,
which the read stage computes itself). NAME_stats.json counts the shard's urls: successes (samples in the tar),
failed_to_download and failed_to_resize (never written to the tar, so a scan that reads only the tar cannot see
them): count = successes + failed_to_download + failed_to_resize.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterable

log = logging.getLogger("memscan")

# read-stage row columns from KEY.json: text (None when absent) and ints (-1 when absent)
META_TEXT = ("url", "download_sha256")
META_INTS = ("original_width", "original_height")
META_COLUMNS = META_TEXT + META_INTS
NO_META = {"url": None, "download_sha256": None, "original_width": -1, "original_height": -1}
MAX_URL_CHARS = 8192  # a url longer than any browser accepts is not a url; it is kept cut, as a caption is
STATS_FIELDS = ("count", "successes", "failed_to_download", "failed_to_resize")


def _side(v) -> int:
    """An image side from JSON: a non-negative int (an integral float accepted), else -1."""
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**31 else -1


def sample_meta(raw: bytes | None, key: str | None = None) -> dict:
    """img2dataset's KEY.json bytes -> {url (str | None), download_sha256 (str | None: 64 hex digits),
    original_width, original_height (int pixels, -1 when absent)}.

    Never raises: a sample without a KEY.json, a KEY.json that is not a JSON object (not UTF-8, not JSON, a list),
    or a field of the wrong type gives that field's null; the image itself is fine, so this is logged at debug level
    and nowhere louder.
    """
    out = dict(NO_META)
    if raw is None:
        return out
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        log.debug("sample %r: its .json is not JSON (%s): no url or download metadata", key, e)
        return out
    if not isinstance(meta, dict):
        log.debug("sample %r: its .json is a %s, not an object: no url or download metadata", key, type(meta).__name__)
        return out
    url = meta.get("url")
    out["url"] = url[:MAX_URL_CHARS] if isinstance(url, str) else None
    sha = meta.get("sha256")
    if isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdefABCDEF" for c in sha):
        out["download_sha256"] = sha.lower()
    out["original_width"] = _side(meta.get("original_width"))
    out["original_height"] = _side(meta.get("original_height"))
    return out


def stats_path(shard: str) -> str | None:
    """Where img2dataset wrote a shard's stats: NAME_stats.json beside NAME.tar, as a local path or URL
    (``s3://b/p/00012.tar`` -> ``s3://b/p/00012_stats.json``; a chain's target, a pipe: command's .tar).
    None when the shard's object does not end in .tar."""
    from urllib.parse import urlsplit, urlunsplit

    from scanner.data.shards import shard_object

    obj = shard_object(shard)
    if obj is None:
        return None
    if obj.startswith(("http://", "https://")):  # a query string (a signature) belongs to the tar alone
        u = urlsplit(obj)
        if not u.path.endswith(".tar"):
            return None
        return urlunsplit((u.scheme, u.netloc, u.path[:-len(".tar")] + "_stats.json", "", ""))
    return obj[:-len(".tar")] + "_stats.json" if obj.endswith(".tar") else None


def download_stats(shard_paths: Iterable[str]) -> dict:
    """img2dataset's NAME_stats.json of each shard, summed, read through fsspec (local, s3://, gs://, http(s)://).

    Returns {"shards": shards given, "shards_with_stats": shards whose stats file was read, "count": urls those
    shards' url lists held, "successes": samples img2dataset wrote, "failed_to_download", "failed_to_resize",
    "failed": the two failures summed, "unreadable_stats": stats files that exist but are not img2dataset's JSON}.
    The counts cover the shards_with_stats alone, where successes + failed = count: a scan that saw `seen` rows of
    those shards lost count - seen - failed more (e.g. a truncated tar).

    Each filesystem's stats files are fetched in one batched call (s3fs and gcsfs fetch them concurrently); a
    missing stats file is no error (shards not written by img2dataset have none).
    """
    import fsspec

    shards = list(shard_paths)
    by_protocol: dict[str, list[str]] = defaultdict(list)
    for s in shards:
        p = stats_path(str(s))
        if p is not None:
            by_protocol[p.split("://", 1)[0] if "://" in p else ""].append(p)
    totals = dict.fromkeys(STATS_FIELDS, 0)
    found = unreadable = 0
    for protocol, paths in by_protocol.items():
        fs, _ = fsspec.core.url_to_fs(paths[0])
        try:
            got = fs.cat([fs._strip_protocol(p) for p in paths], on_error="return")
        except Exception as e:  # noqa: BLE001 - the stats are a report's extra: a store that refuses them is logged
            log.warning("img2dataset stats of %d %s shards not read: %s: %s", len(paths), protocol or "local",
                        type(e).__name__, e)
            continue
        for path, data in got.items():
            if isinstance(data, BaseException):
                if not isinstance(data, FileNotFoundError):
                    log.debug("img2dataset stats %s not read: %s: %s", path, type(data).__name__, data)
                    unreadable += 1
                continue
            try:
                stats = json.loads(data)
                values = {k: stats[k] for k in STATS_FIELDS}
                if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values.values()):
                    raise ValueError(f"counts must be ints >= 0, got {values}")
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
                log.debug("img2dataset stats %s is not img2dataset's: %s: %s", path, type(e).__name__, e)
                unreadable += 1
                continue
            found += 1
            for k in STATS_FIELDS:
                totals[k] += values[k]
    return {"shards": len(shards), "shards_with_stats": found, **totals,
            "failed": totals["failed_to_download"] + totals["failed_to_resize"], "unreadable_stats": unreadable}
