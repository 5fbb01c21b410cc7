"""The sink (driver side): rows collected per shard, written as one part file per shard, atomically.

    parts/NAME.parquet        one row per sample: text columns, width, height, sha256, phash, error,
                              error_stage, embed_error, every score column
    vectors/NAME.npy          (rows, D) float16: the images in model space (scoring only)
    embeddings/NAME.npy       (rows, d) float32: the copy-detection embeddings (neighbours only)
    thumbs/NAME.npy           (rows, S*S*3) uint8: the embedder's input at neighbours.align_size (when > 0)
    previews/NAME.parquet     key, preview: the small image report.html shows (data.preview_size > 0)
    heldout/NAME.parquet      a held-out shard's rows (classify.calibration_shards): key, error, the detector

The part file is written last: its presence means the shard is done, so a killed scan resumes by
skipping shards that have one. Rows a retried Ray task sends twice are dropped by their row number.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np

from scanner.stages.base import INFO_PREFIX, SECONDS_PREFIX, Stage
from scanner.storage import PART_FOLDERS, part_name

log = logging.getLogger("memscan")

ARRAYS = {"vector": "vectors", "embedding": "embeddings", "thumb": "thumbs"}  # batch column -> folder of per-shard .npy
NOT_STORED = ("image_model", "image_embed", "marker", "n_rows", "row", "split", "preview", *ARRAYS)
# A shard that could not be opened at all (a network or permission error, not a missing object): no part file is
# written, so the rerun that follows the scan's exit 3 tries it again, where a missing shard's error row is final.
TRANSIENT = "the shard cannot be opened"
def done_shards(out, split: str = "corpus") -> set[str]:
    """Names of the shards of `split` whose part file exists in `out` (a scanner.storage.Out): one listing of the
    folder, not a request per shard (10^5 shards in a bucket)."""
    return {n.removesuffix(".parquet") for n in out.names(PART_FOLDERS[split], ".parquet")}


@dataclass(frozen=True)
class SinkSpec:
    out: str  # the scan's --out: a local directory or an object-storage URL (scanner.storage.Out)


class SinkStage(Stage):
    """Buffers rows per shard; writes the shard's files when all its rows have arrived. cfg: a SinkSpec."""

    name, runs = "sink", "driver"
    reads = ("key", "shard", "split", "marker", "n_rows", "row")

    def setup(self) -> None:
        from scanner.storage import Out

        self.out = Out(self.cfg.out)
        self.rows: dict[tuple, list] = {}
        self.arrays: dict[tuple, dict[str, list]] = {}
        self.expected: dict[tuple, int] = {}
        self.seen: dict[tuple, set[int]] = {}  # row numbers received per unfinished shard
        self.done: list[tuple] = []  # (split, shard) written
        self.failed: dict[tuple, str] = {}  # (split, shard) -> why its output could not be written
        self.images = 0  # corpus samples collected (rows with a key: a damaged shard's own error row is not one)
        self.stage_seconds: dict[str, float] = {}  # stage name -> seconds its actors spent on this run's batches
        self.stage_info: dict[str, dict] = {}  # stage name -> devices, nodes and warnings of its batches

    def add(self, batch: dict) -> list[tuple]:
        """Take one batch; write every shard it completes. Returns the (split, shard) written now."""
        self._check_reads(batch)
        return self.process(batch)

    def _record(self, batch: dict) -> None:
        for c in [c for c in batch if c.startswith(SECONDS_PREFIX)]:
            name = c.removeprefix(SECONDS_PREFIX)
            self.stage_seconds[name] = self.stage_seconds.get(name, 0.0) + float(np.sum(batch.pop(c)))
        for c in [c for c in batch if c.startswith(INFO_PREFIX)]:
            rec = self.stage_info.setdefault(c.removeprefix(INFO_PREFIX),
                                             {"devices": Counter(), "nodes": Counter(), "warnings": set()})
            for text in batch.pop(c):
                if text:
                    info = json.loads(text)
                    rec["devices"][info["device"]] += 1
                    rec["nodes"][info["node"]] += 1
                    if info.get("warning"):
                        rec["warnings"].add(info["warning"])

    def stages_summary(self) -> dict:
        """stage -> {devices: {device: batches}, nodes: {node id: batches}, warnings: [...]} for summary.json."""
        return {k: {"devices": dict(v["devices"]), "nodes": dict(v["nodes"]), "warnings": sorted(v["warnings"])}
                for k, v in self.stage_info.items()}

    def process(self, batch: dict) -> list[tuple]:
        import pandas as pd

        self._record(batch)
        finished = []
        cols = [c for c in batch if c not in NOT_STORED]
        splits = batch["split"].astype(str)
        for key in sorted({(s, sh) for s, sh in zip(splits, batch["shard"])}):
            split, shard = key
            if key in self.done or key in self.failed:
                continue  # a retried task re-sent a finished shard
            m = (batch["shard"] == shard) & (splits == split)
            markers = m & batch["marker"]
            rows = m & ~batch["marker"]
            if rows.any():
                seen = self.seen.setdefault(key, set())
                new = np.array([int(r) not in seen for r in batch["row"]]) & rows
                seen.update(int(r) for r in batch["row"][new])
                if new.any():
                    self.rows.setdefault(key, []).append(pd.DataFrame({c: batch[c][new] for c in cols}))
                    if split == "corpus":
                        arrays = self.arrays.setdefault(key, {})
                        for c in (*ARRAYS, "preview"):
                            if c in batch:
                                arrays.setdefault(c, []).append(batch[c][new])
                if split == "corpus":
                    self.images += sum(k is not None for k in batch["key"][new])  # not a damaged shard's row
            if markers.any():
                self.expected[key] = int(batch["n_rows"][markers][0])
            if key in self.expected and len(self.seen.get(key, ())) == self.expected[key]:
                try:
                    self._write(key)
                except OSError as e:  # disk full, permissions, a vanished mount: this shard only, rerun resumes it
                    self.failed[key] = f"{type(e).__name__}: {e}"
                    self.rows.pop(key, None)
                    self.arrays.pop(key, None)
                    log.error("could not write the outputs of shard %s (%s); the other shards go on, and a rerun "
                              "does this one again", shard, self.failed[key])
                    continue
                self.seen.pop(key, None)
                finished.append(key)
        return finished

    def _write(self, key: tuple) -> None:
        import pandas as pd
        import pyarrow as pa

        from scanner.schema import TEXT_COLUMNS

        split, shard = key
        df = pd.concat(self.rows.pop(key, []), ignore_index=True) if key in self.rows else pd.DataFrame()
        if len(df) == 1 and df["key"].isna().all() and str(df["error"].iloc[0]).startswith(TRANSIENT):
            self.arrays.pop(key, None)
            raise OSError(df["error"].iloc[0])
        arrays = self.arrays.pop(key, {})
        previews = arrays.pop("preview", None)
        for c, parts in arrays.items():
            self.out.write_npy(f"{ARRAYS[c]}/{shard}.npy", np.concatenate(parts))
        if previews is not None:
            keys = df["key"].to_numpy() if "key" in df else np.zeros(0, object)
            p = np.concatenate(previews)
            have = np.array([x is not None for x in p], bool)
            self.out.write_parquet(f"previews/{shard}.parquet",
                                   pd.DataFrame({"key": keys[have], "preview": list(p[have])}))
        # The part file is written last: its presence is the shard's completion marker. Text columns are typed
        # string even where a shard's values are all None (pandas would write Arrow null, and reading every part
        # at once, pd.read_parquet(OUT/parts), would fail to merge null with string).
        table = pa.Table.from_pandas(df, preserve_index=False)
        for i, f in enumerate(table.schema):
            if f.name in TEXT_COLUMNS and f.type != pa.string():
                table = table.set_column(i, pa.field(f.name, pa.string()), table.column(i).cast(pa.string()))
        self.out.write_parquet(part_name(shard, split), table)
        self.done.append(key)
