"""The sink (driver side): rows collected per shard, written as one part file per shard, atomically.

    parts/NAME.parquet        one row per sample: text columns, width, height, sha256, phash, error,
                              error_stage, embed_error, every score column
    vectors/NAME.npy          (rows, D) float16: the images in model space (scoring only)
    embeddings/NAME.npy       (rows, d) float32: the copy-detection embeddings (neighbours only)
    thumbs/NAME.npy           (rows, S*S*3) uint8: the embedder's input at neighbours.align_size (when > 0)

The part file is written last: its presence means the shard is done, so a killed scan resumes by
skipping shards that have one. Rows a retried Ray task sends twice are dropped by their row number.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from scanner.files import atomic_write_npy, atomic_write_parquet
from scanner.stages.base import SECONDS_PREFIX

log = logging.getLogger("memscan")

ARRAYS = {"vector": "vectors", "embedding": "embeddings", "thumb": "thumbs"}  # batch column -> folder of per-shard .npy
NOT_STORED = ("image_model", "image_embed", "marker", "n_rows", "row", *ARRAYS)


class ShardCollector:
    """Buffers rows per shard; writes the shard's files when all its rows have arrived."""

    def __init__(self, out: Path):
        self.out = out
        self.rows: dict[str, list] = {}
        self.arrays: dict[str, dict[str, list]] = {}
        self.expected: dict[str, int] = {}
        self.seen: dict[str, set[int]] = {}  # row numbers received per unfinished shard
        self.done: list[str] = []
        self.failed: dict[str, str] = {}  # shard -> why its output could not be written
        self.images = 0  # samples collected (rows with a key: a damaged shard's own error row is not one)
        self.stage_seconds: dict[str, float] = {}  # stage name -> seconds its actors spent on this run's batches

    def add(self, batch: dict) -> list[str]:
        """Take one batch; write every shard it completes. Returns the shards written now."""
        import pandas as pd

        finished = []
        for c in [c for c in batch if c.startswith(SECONDS_PREFIX)]:
            name = c.removeprefix(SECONDS_PREFIX)
            self.stage_seconds[name] = self.stage_seconds.get(name, 0.0) + float(np.sum(batch.pop(c)))
        cols = [c for c in batch if c not in NOT_STORED]
        for shard in np.unique(batch["shard"]):
            if shard in self.done or shard in self.failed:
                continue  # a retried task re-sent a finished shard
            m = batch["shard"] == shard
            markers = m & batch["marker"]
            rows = m & ~batch["marker"]
            if rows.any():
                seen = self.seen.setdefault(shard, set())
                new = np.array([int(r) not in seen for r in batch["row"]]) & rows
                seen.update(int(r) for r in batch["row"][new])
                if new.any():
                    self.rows.setdefault(shard, []).append(pd.DataFrame({c: batch[c][new] for c in cols}))
                    for c in ARRAYS:
                        if c in batch:
                            self.arrays.setdefault(shard, {}).setdefault(c, []).append(batch[c][new])
                self.images += sum(k is not None for k in batch["key"][new])  # not a damaged shard's row
            if markers.any():
                self.expected[shard] = int(batch["n_rows"][markers][0])
            if shard in self.expected and len(self.seen.get(shard, ())) == self.expected[shard]:
                try:
                    self._write(shard)
                except OSError as e:  # disk full, permissions, a vanished mount: this shard only, rerun resumes it
                    self.failed[shard] = f"{type(e).__name__}: {e}"
                    self.rows.pop(shard, None)
                    self.arrays.pop(shard, None)
                    log.error("could not write the outputs of shard %s (%s); the other shards go on, and a rerun "
                              "does this one again", shard, self.failed[shard])
                    continue
                self.seen.pop(shard, None)
                finished.append(shard)
        return finished

    def _write(self, shard: str) -> None:
        import pandas as pd

        df = pd.concat(self.rows.pop(shard, []), ignore_index=True) if shard in self.rows else pd.DataFrame()
        for c, parts in self.arrays.pop(shard, {}).items():
            atomic_write_npy(np.concatenate(parts), self.out / ARRAYS[c] / f"{shard}.npy")
        # The part file is written last: its presence is the shard's completion marker.
        atomic_write_parquet(df, self.out / "parts" / f"{shard}.parquet")
        self.done.append(shard)
