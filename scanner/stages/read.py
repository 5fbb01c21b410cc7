"""The read stage: each shard opened once, each image decoded once, for every stage after it.

A Ray task per shard (never an actor: it holds no model). Per sample it emits the caption, the original
width and height, the sha256 of the raw image bytes, and from one decode the image at the model's side
(`image_model`, for scoring), at the embedder's (`image_embed`, for embedding and its perceptual hash) and a
small preview for report.html (`preview`: PNG or JPEG bytes, so the report never opens a shard). A bad member
or a damaged shard is an error row, never an exception.

img2dataset's KEY.json gives each row `url`, `original_width`, `original_height` (the size before img2dataset resized
it) and `download_sha256` (of the downloaded bytes): null / -1 when a sample has none (scanner/data/img2dataset.py).

Rows carry the split of their shard: `corpus`, or `heldout` for classify.calibration_shards (images the model
never trained on, scored for the detector's cut alone: no embedding, no preview).

The last batch of a shard ends with a marker row whose `n_rows` says how many rows were sent; `row` numbers
each sample within its shard, so the sink drops a row a retried task sends twice.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from scanner.config import MAX_IMAGE_PIXELS
from scanner.data.img2dataset import META_COLUMNS, NO_META, sample_meta
from scanner.data.shards import shard_name
from scanner.stages.base import Stage

ROWS_PER_BATCH = 256
TEXT = ("key", "caption", "error", "error_stage", "sha256", "split", "url", "download_sha256")
INTS = ("width", "height", "n_rows", "row", "original_width", "original_height")


@dataclass(frozen=True)
class ReadSpec:
    """What the later stages need from a decode: side and channels per consumer (0: none)."""

    model_side: int = 0  # the scoring model's input side (0: no scoring stage)
    model_channels: int = 3
    embed_side: int = 0  # the embedder's input side (0: no embedding stage)
    max_pixels: int = MAX_IMAGE_PIXELS
    preview_size: int = 0  # side of the preview kept for report.html (0: none)
    rows_per_batch: int = ROWS_PER_BATCH


def preview_bytes(im, size: int) -> bytes:
    """A square centre crop of an RGB PIL image at min(size, its shorter side): PNG up to 32 px (lossless and
    as small as a JPEG there), JPEG (quality 90) above."""
    from PIL import Image, ImageOps

    side = max(1, min(size, *im.size))
    small = ImageOps.fit(im, (side, side), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    if side <= 32:
        small.save(buf, format="PNG", optimize=True)
    else:
        small.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def read_shard(path: str, spec: ReadSpec, split: str = "corpus") -> Iterator[dict]:
    """Yield numpy batches for one shard; the last batch ends with one marker row (`n_rows` = rows sent).

    Columns: key, shard (its name), split, caption, width, height, error, error_stage, sha256 (str or None),
    url, download_sha256 (str or None), original_width, original_height (int64 pixels, -1 when unknown),
    image_model (B, R, R, C) uint8 when spec.model_side, image_embed (B, S, S, 3) uint8 when spec.embed_side
    (zeros where error, and on held-out rows), preview (bytes or None) when spec.preview_size, marker (bool),
    n_rows (int64, -1 but on the marker), row (int64, the sample's position in the shard, -1 on the marker).
    """
    from scanner.data.decode import DecodeError, fit_image, open_image
    from scanner.data.shards import iter_tar_samples

    name = shard_name(path)
    corpus = split == "corpus"
    blanks = {}
    if spec.model_side:
        blanks["image_model"] = np.zeros((spec.model_side, spec.model_side, spec.model_channels), np.uint8)
    if spec.embed_side:
        blanks["image_embed"] = np.zeros((spec.embed_side, spec.embed_side, 3), np.uint8)
    rows: list[dict] = []
    sent = 0

    def pack(rs: list[dict]) -> dict:
        batch = {c: np.array([r[c] for r in rs], dtype=object) for c in TEXT}
        batch["shard"] = np.array([name] * len(rs), dtype=object)
        for c in INTS:
            batch[c] = np.array([r[c] for r in rs], dtype=np.int64)
        batch["marker"] = np.array([r["marker"] for r in rs], dtype=bool)
        for c, blank in blanks.items():
            batch[c] = np.stack([r.get(c, blank) for r in rs])
        if spec.preview_size:
            batch["preview"] = np.array([r.get("preview") for r in rs], dtype=object)
        return batch

    for s in iter_tar_samples(path):
        row = {"key": s["key"], "caption": s["caption"], "width": -1, "height": -1, "error": s["error"],
               "error_stage": "read" if s["error"] else None, "sha256": None, "marker": False, "n_rows": -1,
               "row": sent + len(rows), "split": split, **sample_meta(s["json"], s["key"])}
        if s["error"] is None:
            row["sha256"] = hashlib.sha256(s["image"]).hexdigest()
            try:
                im, row["width"], row["height"] = open_image(s["image"], spec.max_pixels)
                if spec.model_side:
                    row["image_model"] = fit_image(im, spec.model_side, spec.model_channels)
                if spec.embed_side and corpus:
                    row["image_embed"] = fit_image(im, spec.embed_side, 3)
                if spec.preview_size and corpus:
                    row["preview"] = preview_bytes(im, spec.preview_size)
            except DecodeError as e:
                row["error"], row["error_stage"] = str(e), "decode"
                for c in ("image_model", "image_embed", "preview"):
                    row.pop(c, None)
        rows.append(row)
        if len(rows) >= spec.rows_per_batch:
            sent += len(rows)
            yield pack(rows)
            rows = []
    sent += len(rows)
    rows.append({"key": None, "caption": None, "width": -1, "height": -1, "error": None, "error_stage": None,
                 "sha256": None, "marker": True, "n_rows": sent, "row": -1, "split": split, **NO_META})
    yield pack(rows)


class ReadStage(Stage):
    """A Ray task per shard: its batches, then the marker row. cfg: a ReadSpec."""

    name, runs = "read", "task"
    reads = ("path", "split")
    writes = ("key", "shard", "split", "caption", "width", "height", "error", "error_stage", "sha256", "marker",
              "n_rows", "row", *META_COLUMNS)

    @classmethod
    def declared_writes(cls, cfg: ReadSpec) -> tuple[str, ...]:
        return cls.writes + tuple(c for c, on in (("image_model", cfg.model_side), ("image_embed", cfg.embed_side),
                                                  ("preview", cfg.preview_size)) if on)

    def process(self, batch: dict) -> Iterator[dict]:
        for path, split in zip(batch["path"], batch["split"]):
            yield from read_shard(str(path), self.cfg, str(split))
