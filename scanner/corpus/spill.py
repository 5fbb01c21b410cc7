"""A disk shuffle: fixed-size records partitioned into one file per partition, read back a partition at a time.

`add(part, records)` buffers; when the buffer passes `buffer_bytes` every partition's records are appended to
its file (raw numpy records, no header). `read(p)` loads one partition. Memory: the buffer plus one partition.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np


class Spill:
    def __init__(self, folder: Path, n_parts: int, dtype: np.dtype, buffer_bytes: int = 64 << 20):
        self.folder = Path(folder)
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)
        self.n_parts = int(n_parts)
        self.dtype = np.dtype(dtype)
        self.buffer_bytes = int(buffer_bytes)
        self._parts: list[np.ndarray] = []
        self._recs: list[np.ndarray] = []
        self._size = 0
        self.counts = np.zeros(self.n_parts, np.int64)

    def add(self, parts: np.ndarray, records: np.ndarray) -> None:
        parts = np.asarray(parts, dtype=np.int64)
        if len(parts) != len(records):
            raise ValueError(f"{len(parts)} partition ids for {len(records)} records")
        if not len(parts):
            return
        self._parts.append(parts)
        self._recs.append(np.asarray(records, dtype=self.dtype))
        self._size += records.nbytes
        np.add.at(self.counts, parts, 1)
        if self._size >= self.buffer_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._parts:
            return
        parts = np.concatenate(self._parts)
        recs = np.concatenate(self._recs)
        self._parts, self._recs, self._size = [], [], 0
        order = np.argsort(parts, kind="stable")
        parts, recs = parts[order], recs[order]
        starts = np.flatnonzero(np.r_[True, parts[1:] != parts[:-1]])
        ends = np.r_[starts[1:], len(parts)]
        for s, e in zip(starts, ends):
            with open(self.path(int(parts[s])), "ab") as f:
                recs[s:e].tofile(f)

    def path(self, p: int) -> Path:
        return self.folder / f"{p}.bin"

    def read(self, p: int) -> np.ndarray:
        """Every record of partition p (call flush() after the last add)."""
        f = self.path(p)
        return np.fromfile(f, dtype=self.dtype) if f.exists() else np.zeros(0, dtype=self.dtype)

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def partitions(self, min_rows: int = 2):
        """Flush, yield every partition of at least min_rows records, then remove the files."""
        self.flush()
        try:
            for p in range(self.n_parts):
                if self.counts[p] >= min_rows:
                    yield self.read(p)
        finally:
            self.close()
