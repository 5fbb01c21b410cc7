"""Load a whole (small) corpus into memory: for training the demo model and the embedder.

The scan itself never does this; it streams shards through Ray Data (scanner.pipeline).
"""

from __future__ import annotations

import hashlib

import numpy as np

from scanner.config import MAX_IMAGE_PIXELS
from scanner.data.decode import DecodeError, decode_image
from scanner.data.shards import expand_shards, iter_tar_samples


def load_images(shards, size: int, channels: int = 3, max_pixels: int = MAX_IMAGE_PIXELS, stats: dict | None = None
                ) -> tuple[list[str], np.ndarray, list[str | None], list[str]]:
    """Decode every readable sample of `shards` (a spec expand_shards takes).

    Returns (keys, images (N, size, size, channels) uint8, captions, raw_hashes), where raw_hashes
    is the sha1 of the undecoded image bytes (equal bytes = exact duplicate). Undecodable samples
    and truncated tails are skipped; `stats`, when given, gets {"skipped": how many}.
    """
    return load_shard_images(expand_shards(shards), size, channels, max_pixels, stats)


def load_shard_images(paths: list[str], size: int, channels: int = 3, max_pixels: int = MAX_IMAGE_PIXELS,
                      stats: dict | None = None) -> tuple[list[str], np.ndarray, list[str | None], list[str]]:
    """load_images over shards already expanded (paths and URLs as expand_shards gives them; a missing one, kept
    from a brace range, has no readable sample and is skipped, not refused again)."""
    keys, images, captions, hashes = [], [], [], []
    skipped = 0
    for path in paths:
        for row in iter_tar_samples(path):
            if row["key"] is None or row["error"] or row["image"] is None:
                skipped += 1
                continue
            try:
                arr, _, _ = decode_image(row["image"], size, channels, max_pixels)
            except DecodeError:
                skipped += 1
                continue
            keys.append(row["key"])
            images.append(arr)
            captions.append(row["caption"])
            hashes.append(hashlib.sha1(row["image"]).hexdigest())
    if stats is not None:
        stats["skipped"] = skipped
    stacked = np.stack(images) if images else np.zeros((0, size, size, channels), np.uint8)
    return keys, stacked, captions, hashes
