"""The read stage: each shard opened once, each image decoded once, for every stage after it.

A Ray task per shard (never an actor: it holds no model). Per sample it emits the caption, the
original width and height, the sha256 of the raw image bytes, and from one decode the image at the
model's side (`image_model`, for scoring) and at the embedder's (`image_embed`, for embedding and
its perceptual hash). A bad member or a damaged shard is an error row, never an exception.

The last batch of a shard ends with a marker row whose `n_rows` says how many rows were sent; `row`
numbers each sample within its shard, so the sink drops a row a retried task sends twice.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from scanner.config import MAX_IMAGE_PIXELS
from scanner.data.shards import shard_name
from scanner.stages.base import SECONDS_PREFIX

ROWS_PER_BATCH = 256


@dataclass(frozen=True)
class ReadSpec:
    """What the later stages need from a decode: side and channels per consumer (0: none)."""

    model_side: int = 0  # the scoring model's input side (0: no scoring stage)
    model_channels: int = 3
    embed_side: int = 0  # the embedder's input side (0: no embedding stage)
    max_pixels: int = MAX_IMAGE_PIXELS


def read_shard(path: str, spec: ReadSpec, rows_per_batch: int = ROWS_PER_BATCH) -> Iterator[dict]:
    """Yield numpy batches for one shard; the last batch ends with one marker row (`n_rows` = rows sent).

    Columns: key, shard (its name), caption, width, height, error, error_stage, sha256 (str or None),
    image_model (B, R, R, C) uint8 when spec.model_side, image_embed (B, S, S, 3) uint8 when
    spec.embed_side (zeros where error), marker (bool), n_rows (int64, -1 but on the marker), row (int64,
    the sample's position in the shard, -1 on the marker).
    """
    from scanner.data.decode import DecodeError, fit_image, open_image
    from scanner.data.shards import iter_tar_samples

    name = shard_name(path)
    blanks = {}
    if spec.model_side:
        blanks["image_model"] = np.zeros((spec.model_side, spec.model_side, spec.model_channels), np.uint8)
    if spec.embed_side:
        blanks["image_embed"] = np.zeros((spec.embed_side, spec.embed_side, 3), np.uint8)
    rows: list[dict] = []
    sent = 0
    t0 = time.perf_counter()

    def pack(rs: list[dict]) -> dict:
        batch = {c: np.array([r[c] for r in rs], dtype=object) for c in ("key", "caption", "error", "error_stage",
                                                                            "sha256")}
        batch["shard"] = np.array([name] * len(rs), dtype=object)
        for c in ("width", "height", "n_rows", "row"):
            batch[c] = np.array([r[c] for r in rs], dtype=np.int64)
        batch["marker"] = np.array([r["marker"] for r in rs], dtype=bool)
        for c, blank in blanks.items():
            batch[c] = np.stack([r.get(c, blank) for r in rs])
        nonlocal t0  # seconds spent reading this batch, on its first row (the sink sums them per stage)
        batch[SECONDS_PREFIX + "read"] = np.zeros(len(rs))
        batch[SECONDS_PREFIX + "read"][0], t0 = time.perf_counter() - t0, time.perf_counter()
        return batch

    for s in iter_tar_samples(path):
        row = {"key": s["key"], "caption": s["caption"], "width": -1, "height": -1, "error": s["error"],
               "error_stage": "read" if s["error"] else None, "sha256": None, "marker": False, "n_rows": -1,
               "row": sent + len(rows)}
        if s["error"] is None:
            row["sha256"] = hashlib.sha256(s["image"]).hexdigest()
            try:
                im, row["width"], row["height"] = open_image(s["image"], spec.max_pixels)
                if spec.model_side:
                    row["image_model"] = fit_image(im, spec.model_side, spec.model_channels)
                if spec.embed_side:
                    row["image_embed"] = fit_image(im, spec.embed_side, 3)
            except DecodeError as e:
                row["error"], row["error_stage"] = str(e), "decode"
                row.pop("image_model", None)
                row.pop("image_embed", None)
        rows.append(row)
        if len(rows) >= rows_per_batch:
            sent += len(rows)
            yield pack(rows)
            rows = []
    sent += len(rows)
    rows.append({"key": None, "caption": None, "width": -1, "height": -1, "error": None, "error_stage": None,
                 "sha256": None, "marker": True, "n_rows": sent, "row": -1})
    yield pack(rows)


def read_batch(batch: dict, spec: dict):
    """Ray Data flat-map over a batch of shard paths (one per task): typed Arrow tables (schema.typed_block)."""
    from scanner.schema import typed_block

    for path in batch["path"]:
        for b in read_shard(str(path), ReadSpec(**spec)):
            yield typed_block(b)
