"""The per-shard part files of a scan as one table with global row ids, read shard by shard.

Global row id (gid) = the shard's offset (rows of the shards before it, in the given shard order) + the
row's position in its part file. Arrays (vectors/, embeddings/) are row-aligned with the part file; a
shard whose array is missing or misaligned simply has none (its rows are not searched).

The --out may be in object storage (scanner.storage.Out): tables are read through its filesystem; an array is
memory-mapped from disk, so one in object storage is copied once to the local `cache` folder on first use.

A scan `--against` finished scans (scanner.corpus.prior) reads their part files where they are: each shard has a
source (the --out holding its part file and arrays) and a role, `old` (a shard of a finished scan: its shards come
first, in that scan's order, so their gids are that scan's), `new` (this run's) or `reference` (a reference set's,
last). Every step writes its own output into this run's --out (`out`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

NEW, OLD, REFERENCE = 0, 1, 2
ROLES = {"new": NEW, "old": OLD, "reference": REFERENCE}


class PartStore:
    def __init__(self, out, shards: list[str], cache: Path | None = None, sources: list[str | None] | None = None,
                 roles: list[str] | None = None, files: list[str] | None = None):
        """out: the scan's --out (a scanner.storage.Out, or a local path); cache: a local folder for arrays copied
        from object storage (None: every source is local). sources: per shard, the --out (URI) holding its part
        file (None: `out`); roles: per shard, new / old / reference (None: all new); files: per shard, its part
        file's name at its source when that is not its name here (a reference set's shards are renamed, refN-NAME,
        so that they never clash with the corpus's)."""
        from scanner.storage import Out

        self.out = out if isinstance(out, Out) else Out(out)
        self.cache = Path(cache) if cache is not None else None
        # a shard's name: what the pipeline passes (scanner.data.shards.shard_name), or a local path's base name
        self.names = [os.path.basename(str(s)).removesuffix(".tar") for s in shards]
        if len(set(self.names)) != len(self.names):
            dup = sorted({n for n in self.names if self.names.count(n) > 1})
            raise ValueError(f"shard names must be unique across the scans read together; repeated: {dup[:5]}")
        uris = [self.out.uri() if s is None else str(s) for s in (sources or [None] * len(self.names))]
        self._outs = {u: (self.out if u == self.out.uri() else Out(u)) for u in dict.fromkeys(uris)}
        self.source = uris
        self.roles = np.array([ROLES[r] for r in (roles or ["new"] * len(self.names))], np.int8)
        if self.cache is None and not all(o.local for o in self._outs.values()):
            raise ValueError(f"{self.out} reads part files in object storage: PartStore needs a local cache folder "
                             "for their arrays")
        self.files = list(files) if files is not None else list(self.names)
        # the shards whose rows ask the neighbour searches (links, LID_*): all, except an --against scan's whose
        # own links are reused (their pairs were found when it ran) and a reference set's (found by the corpus)
        self.asks = np.ones(len(self.names), bool)
        self.sizes = np.array([self.src(i).parquet_file(self.part_rel(self.files[i])).metadata.num_rows
                               for i in range(len(self.names))], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.n = int(self.offsets[-1])
        self._columns: set[str] | None = None
        self._local: dict[tuple[str, int], Path | None] = {}

    def src(self, i: int):
        """The Out holding shard i's part file and arrays."""
        return self._outs[self.source[i]]

    def role_of(self, gids: np.ndarray) -> np.ndarray:
        """NEW / OLD / REFERENCE of each row."""
        return self.roles[self.shard_of(np.asarray(gids, np.int64))]

    def shards_of(self, *roles: int) -> list[int]:
        return [i for i in range(len(self)) if self.roles[i] in roles]

    @property
    def incremental(self) -> bool:
        return bool((self.roles != NEW).any())

    def __getstate__(self) -> dict:
        """Shipped to Ray tasks: the array cache is each machine's own (a folder in its temp directory)."""
        state = dict(self.__dict__)
        state["_local"] = {}
        if not all(o.local for o in self._outs.values()):
            import hashlib
            import tempfile

            state["cache"] = Path(tempfile.gettempdir()) / (
                "memscan-cache-" + hashlib.sha256(self.out.uri().encode()).hexdigest()[:12])
        return state

    @staticmethod
    def part_rel(name: str) -> str:
        return f"parts/{name}.parquet"

    def __len__(self) -> int:
        return len(self.names)

    @property
    def columns(self) -> set[str]:
        """Columns present in any part (parts of a dedup run have no score columns)."""
        if self._columns is None:
            self._columns = set()
            for i, n in enumerate(self.files):
                self._columns.update(self.src(i).parquet_file(self.part_rel(n)).schema_arrow.names)
        return self._columns

    def read(self, i: int, columns: list[str] | None = None):
        """Shard i's part rows as a DataFrame; `columns` it lacks come back as nulls."""
        import pandas as pd

        rel = self.part_rel(self.files[i])
        src = self.src(i)
        have = src.parquet_file(rel).schema_arrow.names
        want = have if columns is None else [c for c in columns if c in have]
        df = src.read_parquet(rel, columns=want) if want else pd.DataFrame(index=range(int(self.sizes[i])))
        for c in columns or ():
            if c not in df:
                df[c] = None
        return df

    def array_path(self, folder: str, i: int) -> Path | None:
        """The local path of shard i's array in `folder` (copied from object storage on first use), None if none."""
        key = (folder, i)
        if key not in self._local:
            rel = f"{folder}/{self.files[i]}.npy"
            src = self.src(i)
            if src.local:
                p = src.local_path(rel)
                self._local[key] = p if p.is_file() else None
            elif src.exists(rel):
                from scanner.storage import local_copy

                self._local[key] = Path(local_copy(src.uri(rel), self.cache))
            else:
                self._local[key] = None
        return self._local[key]

    def has_array(self, folder: str, i: int) -> bool:
        """The shard's array exists and is row-aligned with its part file."""
        p = self.array_path(folder, i)
        if p is None:
            return False
        a = np.load(p, mmap_mode="r")
        ok = a.ndim == 2 and len(a) == self.sizes[i]
        del a
        return ok

    def array(self, folder: str, i: int) -> np.ndarray:
        return np.load(self.array_path(folder, i))

    def dim(self, folder: str) -> int | None:
        for i in range(len(self)):
            if self.has_array(folder, i):
                a = np.load(self.array_path(folder, i), mmap_mode="r")
                d = int(a.shape[1])
                del a
                return d
        return None

    def shard_of(self, gids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.offsets, gids, side="right") - 1

    def gather(self, folder: str, gids: np.ndarray, dtype=np.float32) -> np.ndarray:
        """Rows `gids` (any order, repeats allowed) of an array folder, shard by shard through a memory map
        that is closed again at once (so mapped pages never pile up in this process)."""
        gids = np.asarray(gids, dtype=np.int64)
        out = None
        order = np.argsort(gids, kind="stable")
        sg = gids[order]
        shard = self.shard_of(sg)
        bounds = np.flatnonzero(np.diff(shard)) + 1
        for part in np.split(np.arange(len(sg)), bounds):
            if not len(part):
                continue
            i = int(shard[part[0]])
            a = np.load(self.array_path(folder, i), mmap_mode="r")
            rows = np.asarray(a[sg[part] - self.offsets[i]], dtype=dtype)
            del a
            if out is None:
                out = np.empty((len(gids), rows.shape[1]), dtype=dtype)
            out[order[part]] = rows
        return out if out is not None else np.zeros((0, 0), dtype=dtype)

    def gather_columns(self, gids: np.ndarray, columns: list[str]):
        """Part columns of rows `gids` (sorted unique), one shard at a time. Returns a DataFrame in gid order."""
        import pandas as pd

        gids = np.asarray(gids, dtype=np.int64)
        shard = self.shard_of(gids)
        frames = []
        for i in np.unique(shard):
            rows = gids[shard == i] - self.offsets[i]
            frames.append(self.read(int(i), columns).iloc[rows].reset_index(drop=True))
        if not frames:
            return pd.DataFrame(columns=columns)
        return pd.concat(frames, ignore_index=True)

    def gather_keys(self, gids: np.ndarray):
        """(keys as one pyarrow string array, pixel counts) of rows `gids` (sorted unique), a shard at a time:
        compact Arrow strings, no Python string per row."""
        import pyarrow as pa
        import pyarrow.compute as pc

        gids = np.asarray(gids, dtype=np.int64)
        shard = self.shard_of(gids)
        keys, pixels = [], []
        for i in np.unique(shard):
            rows = pa.array(gids[shard == i] - self.offsets[i])
            t = self.src(int(i)).parquet_file(self.part_rel(self.files[int(i)])).read(columns=["key", "width", "height"]
                                                                                 ).take(rows)
            keys.append(t.column("key").combine_chunks().cast(pa.string()))
            px = pc.multiply(pc.fill_null(t.column("width"), 0), pc.fill_null(t.column("height"), 0))
            pixels.append(np.asarray(px.to_numpy(zero_copy_only=False), dtype=np.int64))
        if not keys:
            return pa.array([], pa.string()), np.zeros(0, np.int64)
        return pa.concat_arrays(keys), np.concatenate(pixels)
