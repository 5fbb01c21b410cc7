"""The per-shard part files of a scan as one table with global row ids, read shard by shard.

Global row id (gid) = the shard's offset (rows of the shards before it, in the given shard order) + the
row's position in its part file. Arrays (vectors/, embeddings/) are row-aligned with the part file; a
shard whose array is missing or misaligned simply has none (its rows are not searched).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scanner.data.shards import shard_name


class PartStore:
    def __init__(self, out: Path, shards: list[str]):
        import pyarrow.parquet as pq

        self.out = Path(out)
        self.names = [shard_name(str(s)) for s in shards]
        self.sizes = np.array([pq.ParquetFile(self.part_path(n)).metadata.num_rows for n in self.names], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.n = int(self.offsets[-1])
        self._columns: set[str] | None = None

    def part_path(self, name: str) -> Path:
        return self.out / "parts" / f"{name}.parquet"

    def __len__(self) -> int:
        return len(self.names)

    @property
    def columns(self) -> set[str]:
        """Columns present in any part (parts of a dedup run have no score columns)."""
        if self._columns is None:
            import pyarrow.parquet as pq

            self._columns = set()
            for n in self.names:
                self._columns.update(pq.ParquetFile(self.part_path(n)).schema_arrow.names)
        return self._columns

    def read(self, i: int, columns: list[str] | None = None):
        """Shard i's part rows as a DataFrame; `columns` it lacks come back as nulls."""
        import pandas as pd
        import pyarrow.parquet as pq

        path = self.part_path(self.names[i])
        have = pq.ParquetFile(path).schema_arrow.names
        want = have if columns is None else [c for c in columns if c in have]
        df = pd.read_parquet(path, columns=want) if want else pd.DataFrame(index=range(int(self.sizes[i])))
        for c in columns or ():
            if c not in df:
                df[c] = None
        return df

    def array_path(self, folder: str, i: int) -> Path:
        return self.out / folder / f"{self.names[i]}.npy"

    def has_array(self, folder: str, i: int) -> bool:
        """The shard's array exists and is row-aligned with its part file."""
        p = self.array_path(folder, i)
        if not p.is_file():
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
        import pyarrow.parquet as pq

        gids = np.asarray(gids, dtype=np.int64)
        shard = self.shard_of(gids)
        keys, pixels = [], []
        for i in np.unique(shard):
            rows = pa.array(gids[shard == i] - self.offsets[i])
            t = pq.read_table(self.part_path(self.names[int(i)]), columns=["key", "width", "height"]).take(rows)
            keys.append(t.column("key").combine_chunks().cast(pa.string()))
            px = pc.multiply(pc.fill_null(t.column("width"), 0), pc.fill_null(t.column("height"), 0))
            pixels.append(np.asarray(px.to_numpy(zero_copy_only=False), dtype=np.int64))
        if not keys:
            return pa.array([], pa.string()), np.zeros(0, np.int64)
        return pa.concat_arrays(keys), np.concatenate(pixels)
