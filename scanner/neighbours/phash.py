"""Perceptual hashes (imagehash's DCT pHash, 64 bits) and near-exact matching by Hamming distance.

pHash keeps the signs of the lowest 8x8 DCT frequencies of a 32x32 greyscale thumbnail: re-encoding,
resizing and mild brightness changes leave it (nearly) unchanged, crops and shifts do not. It is a
cheap first pass for exact and near-exact copies at scale; the embedder handles the rest.
"""

from __future__ import annotations

import numpy as np


def phash64(images: np.ndarray) -> np.ndarray:
    """images: (N, H, W, C) uint8 -> (N,) uint64 pHash (imagehash.phash, hash_size 8)."""
    import imagehash
    from PIL import Image

    out = np.empty(len(images), dtype=np.uint64)
    for i, img in enumerate(images):
        arr = img[..., 0] if img.shape[-1] == 1 else img
        bits = imagehash.phash(Image.fromarray(arr)).hash.flatten()
        out[i] = np.packbits(bits).view(">u8")[0]
    return out


_POP8 = np.array([i.bit_count() for i in range(256)], dtype=np.uint8)


def _popcount(x: np.ndarray) -> np.ndarray:
    """Bits set in each uint64 (numpy >= 2 has it built in)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    return _POP8[np.ascontiguousarray(x).view(np.uint8)].reshape(*x.shape, 8).sum(-1)


def hamming_pairs(hashes: np.ndarray, max_dist: int, block: int = 1024) -> np.ndarray:
    """All index pairs (i < j) whose 64-bit hashes differ in at most max_dist bits.

    hashes: (N,) uint64. max_dist 0 groups equal hashes in O(N log N); larger distances compare in
    blocks (O(N^2 / block) vectorised; fine to a few 10^5 hashes, beyond that use max_dist 0 and
    leave the rest to the embedding index). Returns (P, 2) int64.
    """
    h = np.asarray(hashes, dtype=np.uint64)
    if max_dist == 0:
        order = np.argsort(h, kind="stable")
        same = np.flatnonzero(h[order][1:] == h[order][:-1])
        # chain equal neighbours in sorted order: connected components make the groups complete
        return np.stack([order[same], order[same + 1]], axis=1).astype(np.int64)
    pairs = []
    for a in range(0, len(h), block):
        dist = _popcount(h[a:a + block, None] ^ h[None, a:])  # (block, N - a) popcounts
        i, j = np.nonzero(dist <= max_dist)
        keep = i < j  # row a + i, column a + j: each pair once
        pairs.append(np.stack([a + i[keep], a + j[keep]], axis=1))
    return np.concatenate(pairs).astype(np.int64) if pairs else np.zeros((0, 2), dtype=np.int64)
