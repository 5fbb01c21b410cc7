"""Per-shard embedding files, so re-indexing (new threshold, new index kind) never re-embeds.

    out/embeddings/<embedder fingerprint>/<shard>.parquet   one row per sample of the shard:
        key, shard (its name, as shard_name gives it and the scan's tables use it), path (the shard
        file read), caption, sha256 (of the raw image bytes), width, height (original pixels),
        phash (int64 bits of the 64-bit pHash), embedding (list<float32>, unit norm; null on error),
        error (null when fine)

A sample whose image is missing or undecodable is an error row (embedding null), never an
exception; a damaged shard adds a row with a null key. A shard whose file exists is skipped (the
file is written to .tmp and renamed, so an existing file is complete); the folder is per embedder
(Embedder.fingerprint hashes its weights), so a new checkpoint re-embeds instead of reusing vectors.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from scanner.files import atomic_write_parquet

EMBED_DIR = "embeddings"
COLUMNS = ["key", "shard", "path", "caption", "sha256", "width", "height", "phash", "embedding", "error"]


def embedding_path(out_dir: str | Path, shard: str, fingerprint: str) -> Path:
    from scanner.data.shards import shard_name

    return Path(out_dir) / EMBED_DIR / fingerprint / f"{shard_name(shard)}.parquet"


def shard_images(path: str | Path) -> int:
    """Samples in one embedding file: its rows with a key (a damaged shard's own error row has none)."""
    import pyarrow.parquet as pq

    key = pq.read_table(str(path), columns=["key"]).column("key")
    return len(key) - key.null_count


def embed_shard(shard: str, embedder, out_dir: str | Path, max_pixels: int = 64_000_000,
                overwrite: bool = False) -> Path:
    """Embed every sample of one tar shard with `embedder` (embed.Embedder); write and return its parquet."""
    from scanner.data.decode import decode_image
    from scanner.data.shards import iter_tar_samples, shard_name
    from scanner.neighbours.phash import phash64

    path = embedding_path(out_dir, shard, embedder.fingerprint)
    if path.exists() and not overwrite:
        return path
    size = embedder.image_size
    rows, images = [], []
    for s in iter_tar_samples(shard):
        row = {"key": s["key"], "shard": shard_name(shard), "path": str(shard), "caption": s.get("caption"),
               "sha256": None, "width": None, "height": None, "error": s["error"]}
        if s["image"] is not None and row["error"] is None:
            row["sha256"] = hashlib.sha256(s["image"]).hexdigest()
            try:
                pixels, row["width"], row["height"] = decode_image(s["image"], size, 3, max_pixels)
                images.append(pixels)
                row["_img"] = len(images) - 1
            except Exception as e:  # noqa: BLE001 - DecodeError, or whatever a hostile file makes PIL raise
                row["error"] = f"decode: {type(e).__name__}: {e}"
        rows.append(row)
    batch = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    vecs, hashes = embedder.embed(batch), phash64(batch)
    for row in rows:
        i = row.pop("_img", None)
        row["embedding"] = vecs[i] if i is not None else None
        row["phash"] = int(hashes[i].astype(np.int64)) if i is not None else None
    df = pd.DataFrame(rows, columns=COLUMNS)
    df = df.astype({"phash": "Int64", "width": "Int64", "height": "Int64"})
    atomic_write_parquet(df, path)
    return path


def load_embeddings(paths: list[str | Path]) -> dict:
    """Concatenate per-shard files -> dict: keys, shards, captions, sha256, pixels (width x height),
    phash (N,) uint64, vectors (N, d) float32 for the good rows, and errors (DataFrame: key, shard, stage ('read' for a
    repeated key, else 'embed'), error).
    Every row of a key that more than one row carries is an error row (scanner.data.keys)."""
    from scanner.data.keys import repeated_key_errors
    from scanner.data.shards import shard_name

    frames = [pd.read_parquet(p) for p in paths]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)
    df["shard"] = df["shard"].map(lambda s: shard_name(s) if isinstance(s, str) else s)  # files that held the path
    repeated = pd.Series(repeated_key_errors(df["key"].tolist(), df["shard"].tolist()), index=df.index, dtype=object)
    df["stage"] = np.where(df["error"].isna() & repeated.notna(), "read", "embed")
    df["error"] = df["error"].where(df["error"].notna(), repeated)  # every copy of a repeated key is an error row
    good = df[df["error"].isna() & df["embedding"].notna()]
    vectors = np.stack(good["embedding"].to_numpy()).astype(np.float32) if len(good) else np.zeros((0, 0), np.float32)
    return {
        "keys": good["key"].tolist(), "shards": good["shard"].tolist(), "captions": good["caption"].tolist(),
        "sha256": good["sha256"].tolist(), "pixels": (good["width"] * good["height"]).astype("int64").tolist(),
        "phash": good["phash"].astype("int64").to_numpy().view(np.uint64),
        "vectors": vectors, "errors": df.loc[df["error"].notna(), ["key", "shard", "stage", "error"]].reset_index(drop=True),
    }
