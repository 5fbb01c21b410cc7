"""Where memscan writes and reads its outputs: a local directory or an object-storage prefix, through fsspec.

    out = Out("s3://bucket/scans/x")        # or "/scans/x", "gs://...", "file:///scans/x"
    out.write_parquet("scores/00000.parquet", df, schema)
    out.exists("parts/00000.parquet"); out.names("parts", ".parquet"); out.read_json("summary.json")
    out.uri("summary.json")                 # "s3://bucket/scans/x/summary.json": what the log prints

Every write is whole or absent: a local file goes to NAME.tmp and is renamed into place (a killed job never
leaves a half file that looks complete; the scan's resume relies on it), an object is uploaded in one put or
one multipart upload that only appears when it completes. Credentials and endpoints come from the storage
library's own environment and profiles (AWS_ENDPOINT_URL, AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS, ...),
never from memscan's config. A URL whose scheme memscan cannot write (http, pipe:, an unknown protocol) is
refused with a ConfigError naming the scheme: it never becomes a local folder called `s3:`.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import re
from pathlib import Path

from scanner.errors import ConfigError

# schemes an --out may use: fsspec protocols that write whole objects (or local files)
WRITABLE = {"file": None, "local": None, "s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs",
            "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs", "memory": None}


# Where a shard's part file goes, by split: its presence marks the shard done (scanner.stages.sink writes it)
PART_FOLDERS = {"corpus": "parts", "heldout": "heldout"}
HELDOUT_LIST = "heldout/_shards.json"  # the held-out shards' names of this scan (the cut reads those, no others)


def part_name(name: str, split: str = "corpus") -> str:
    """The part file (relative to --out) whose presence marks shard `name` of `split` done."""
    return f"{PART_FOLDERS[split]}/{name}.parquet"


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")


def scheme(url: str | os.PathLike) -> str:
    """'s3' for s3://..., 'file' for a plain path; the outer protocol of a chained URL (simplecache::s3://...);
    'pipe' for webdataset's pipe:CMD (any NAME: prefix counts, so `s3:bucket` is never taken for a folder)."""
    text = str(url)
    if "::" in text:
        return text.split("::", 1)[0].lower()
    m = _SCHEME.match(text)
    return m.group(1).lower() if m else "file"


def is_url(url: str | os.PathLike) -> bool:
    return scheme(url) not in ("file", "local")


class Out:
    """An output location: a local directory or an object-storage prefix. Paths given to its methods are
    relative to it, with "/" separators (`parts/00000.parquet`)."""

    def __init__(self, url: str | os.PathLike, purpose: str = "--out"):
        import fsspec

        text = str(url)
        s = scheme(text)
        if s not in WRITABLE:
            raise ConfigError(f"{purpose} {text!r}: memscan cannot write to {s}:// (accepted: a local directory or "
                              f"{', '.join(sorted(k + '://' for k in WRITABLE if k not in ('file', 'local')))})")
        if s not in ("file", "local") and "://" not in text:
            raise ConfigError(f"{purpose} {text!r}: write a URL as {s}://bucket/prefix")
        try:
            self.fs, root = fsspec.core.url_to_fs(text)
        except ImportError as e:
            raise ConfigError(f"{purpose} {text!r} needs the {WRITABLE[s] or s} package for {s}:// ({e}); "
                              f"pip install {WRITABLE[s] or s}") from None
        self.local = s in ("file", "local")
        self.root = str(Path(root).resolve()) if self.local else root.rstrip("/")
        self.protocol = "file" if self.local else s

    def __repr__(self) -> str:
        return f"Out({self.uri()!r})"

    def __str__(self) -> str:
        return self.uri()

    def path(self, rel: str = "") -> str:
        """The path the filesystem object takes (no protocol)."""
        return posixpath.join(self.root, rel) if rel else self.root

    def uri(self, rel: str = "") -> str:
        """The full location a user can paste: a local path, or protocol://bucket/prefix/rel."""
        p = self.path(rel)
        return p if self.local else f"{self.protocol}://{p}"

    def local_path(self, rel: str = "") -> Path:
        """The local Path of `rel`; only for a local Out (a remote one raises: its files have no path here)."""
        if not self.local:
            raise ValueError(f"{self.uri(rel)} is in object storage, not on this machine's disk")
        return Path(self.path(rel))

    def sub(self, rel: str) -> Out:
        """The Out of a folder inside this one."""
        return Out(self.uri(rel))

    # ---- reading
    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def isdir(self, rel: str = "") -> bool:
        return self.fs.isdir(self.path(rel))

    def names(self, folder: str, suffix: str = "") -> list[str]:
        """Names of the files directly in `folder` that end with `suffix` (one listing: no request per file)."""
        try:
            entries = self.fs.ls(self.path(folder), detail=False)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries
                      if e.endswith(suffix) and not e.endswith(".tmp"))

    def open(self, rel: str, mode: str = "rb"):
        return self.fs.open(self.path(rel), mode)

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def read_json(self, rel: str):
        return json.loads(self.read_text(rel))

    def read_parquet(self, rel: str, columns: list[str] | None = None):
        """A parquet file (or a folder of them) as a DataFrame."""
        import pandas as pd

        return pd.read_parquet(self.path(rel), columns=columns, filesystem=self.fs)

    def parquet_file(self, rel: str):
        """pyarrow's ParquetFile (schema, row count, row groups) without reading the data."""
        import pyarrow.parquet as pq

        return pq.ParquetFile(self.path(rel), filesystem=self._arrow_fs())

    def _arrow_fs(self):
        import pyarrow.fs as pafs

        if self.local:
            return pafs.LocalFileSystem()
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))

    # ---- writing: whole or absent
    def write_bytes(self, rel: str, data: bytes) -> None:
        if self.local:
            p = self.local_path(rel)
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(p.name + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, p)
        else:
            self.fs.pipe_file(self.path(rel), data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def write_json(self, rel: str, obj) -> None:
        """Indented JSON with a final newline; values JSON cannot hold (paths, numpy scalars) as str."""
        self.write_text(rel, json.dumps(obj, indent=2, default=str) + "\n")

    def write_parquet(self, rel: str, df, schema=None) -> None:
        """A DataFrame (or pyarrow Table) as parquet. schema: a pyarrow schema from scanner.schema for a
        user-facing table (its columns, order and types; None: the types pandas infers, for internal files)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if schema is not None:
            from scanner.schema import to_arrow

            table = to_arrow(df, schema)
        else:
            table = df if isinstance(df, pa.Table) else pa.Table.from_pandas(df, preserve_index=False)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self.write_bytes(rel, buf.getvalue())

    def write_npy(self, rel: str, array) -> None:
        import numpy as np

        buf = io.BytesIO()
        np.save(buf, array)
        self.write_bytes(rel, buf.getvalue())

    def writer(self, rel: str):
        """A binary file to stream a large output into (ParquetWriter, text lines): a local NAME.tmp renamed at
        commit(), or an object upload that completes at commit(); abort() leaves nothing."""
        return _Upload(self, rel)

    def makedirs(self, rel: str = "") -> None:
        if self.local:
            self.local_path(rel).mkdir(parents=True, exist_ok=True)

    def remove(self, rel: str, recursive: bool = False) -> None:
        try:
            self.fs.rm(self.path(rel), recursive=recursive)
        except FileNotFoundError:
            pass


class _Upload:
    """See Out.writer."""

    def __init__(self, out: Out, rel: str):
        self.out, self.rel = out, rel
        if out.local:
            p = out.local_path(rel)
            p.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = p.with_name(p.name + ".tmp")
            self.f = open(self.tmp, "wb")  # noqa: SIM115 - closed by commit / abort
        else:
            self.f = out.fs.open(out.path(rel), "wb")

    def commit(self) -> None:
        self.f.close()
        if self.out.local:
            os.replace(self.tmp, self.out.local_path(self.rel))

    def abort(self) -> None:
        if self.out.local:
            self.f.close()
            self.tmp.unlink(missing_ok=True)
        else:  # an unfinished multipart upload is discarded, no object appears
            discard = getattr(self.f, "discard", None)
            if discard is not None:
                discard()
            else:
                self.f.close()
                self.out.remove(self.rel)


def local_copy(url: str, cache: str | os.PathLike) -> str:
    """A local path for `url`: the path itself when local, else a copy under `cache` made on first use and kept
    (fsspec's filecache; a folder is copied whole). For what must be a file on disk: memory maps, checkpoints."""
    if not is_url(url):
        return str(url)
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    if fs.isdir(path):
        target = Path(cache) / fs.protocol[0] if isinstance(fs.protocol, tuple) else Path(cache) / str(fs.protocol)
        target = target / path.strip("/")
        if not target.is_dir():
            tmp = target.with_name(target.name + ".tmp")
            fs.get(path.rstrip("/") + "/", str(tmp), recursive=True)
            os.replace(tmp, target)
        return str(target)
    return fsspec.open_local(f"filecache::{url}", filecache={"cache_storage": str(cache)})


# A local file written whole (the helpers the demo, the trainers and tests use on their own local folders)
def atomic_write_parquet(df, path: str | os.PathLike, schema=None) -> None:
    p = Path(path)
    Out(p.parent).write_parquet(p.name, df, schema)


def atomic_write_npy(array, path: str | os.PathLike) -> None:
    p = Path(path)
    Out(p.parent).write_npy(p.name, array)


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    p = Path(path)
    Out(p.parent).write_text(p.name, text)


def write_json(obj, path: str | os.PathLike) -> None:
    p = Path(path)
    Out(p.parent).write_json(p.name, obj)
