"""Pixel check of near-duplicate candidates: the RMSE of two thumbnails at their best small translation.

A copy moved by a few pixels (re-framed, padded, cropped by a margin) keeps its content but loses the
embedder's cosine: the small copy-detection tower is not shift invariant at 1-2 px of 32, and a colour
wheel crop or two handwritten 1s sit as close in its space as such a copy (demo seed 1: a shifted copy at
cosine 0.77, distinct images up to 0.99). Pixels separate them once aligned: a shifted copy, moved back,
differs only by its re-encode (RMSE <= 0.0131 of the [0, 1] range against its original on seed 0), distinct
images that look alike by more (>= 0.0327 on seed 0, among pairs at cosine >= 0.6); the shipped limit, 0.02,
sits in the middle of that gap (benchmarks/results/align.md). So neighbours whose cosine is below
`neighbours.dup_threshold` (>= `align_min_cosine`) are linked when their thumbnails (the embedder's input,
stored per row as uint8) agree within `align_max_rmse` at some shift of at most `align_max_shift` pixels,
measured over the overlap, and closer than either thumbnail is to its own mean colour (`contrast`): a flat
image sits within a few hundredths of every dark, low-contrast image of its mean (fresh demo seeds 6 and 8:
an all-black LFW face against retina crops, RMSE 0.016-0.019), and agreeing with it says nothing. It is a
verification of candidates, as copy-detection pipelines verify their
descriptor matches; it never searches on its own, so its cost is a few thousand pixels per candidate pair.
"""

from __future__ import annotations

import numpy as np


def thumbnails(images: np.ndarray, size: int) -> np.ndarray:
    """images: (N, H, W, C) uint8 -> (N, size * size * C) uint8 rows (resized with a box filter when H, W != size)."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C) uint8, got shape {images.shape}")
    n, h, w, c = images.shape
    if (h, w) != (size, size):
        from PIL import Image

        out = np.empty((n, size, size, c), np.uint8)
        for i, img in enumerate(images):
            pil = Image.fromarray(img[..., 0] if c == 1 else img)
            out[i] = np.asarray(pil.resize((size, size), Image.Resampling.BOX)).reshape(size, size, c)
        images = out
    return np.ascontiguousarray(images, dtype=np.uint8).reshape(n, -1)


def aligned_rmse(a: np.ndarray, b: np.ndarray, size: int, max_shift: int, block: int = 4096) -> np.ndarray:
    """Row-wise min over integer shifts (dy, dx), |dy|, |dx| <= max_shift, of the RMSE (in [0, 1]) of thumbnails a
    and b over the part where they overlap after b is moved by (dy, dx).

    a, b: (P, size * size * C) uint8 rows from `thumbnails`. Returns (P,) float32. Symmetric in a and b.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 2 or a.shape[1] % (size * size):
        raise ValueError(f"a and b must both be (P, {size}*{size}*C) thumbnail rows, got {a.shape} and {b.shape}")
    if not 0 <= max_shift < size:
        raise ValueError(f"max_shift must be in [0, {size}), got {max_shift}")
    c = a.shape[1] // (size * size)
    out = np.empty(len(a), np.float32)
    for s in range(0, len(a), block):
        x = a[s:s + block].reshape(-1, size, size, c).astype(np.float32) / 255
        y = b[s:s + block].reshape(-1, size, size, c).astype(np.float32) / 255
        best = np.full(len(x), np.inf, np.float32)
        for dy in range(-max_shift, max_shift + 1):
            for dx in range(-max_shift, max_shift + 1):
                xa = x[:, max(0, dy):size + min(0, dy), max(0, dx):size + min(0, dx)]
                yb = y[:, max(0, -dy):size + min(0, -dy), max(0, -dx):size + min(0, -dx)]
                best = np.minimum(best, np.sqrt(((xa - yb) ** 2).mean(axis=(1, 2, 3))))
        out[s:s + block] = best
    return out


def contrast(thumbs: np.ndarray, size: int) -> np.ndarray:
    """(P,) float32: each thumbnail's RMSE (in [0, 1]) from its own per-channel mean colour; 0 for a flat image."""
    t = np.asarray(thumbs)
    n, c = size * size, t.shape[1] // (size * size)
    x = t.reshape(len(t), n, c).astype(np.int64)  # exact: a flat image gets 0, not rounding noise
    var = (n * (x * x).sum(axis=1) - x.sum(axis=1) ** 2).mean(axis=1) / n ** 2
    return (np.sqrt(var) / 255).astype(np.float32)


def agrees(rmse: np.ndarray, min_contrast: np.ndarray, max_rmse: float) -> np.ndarray:
    """The match rule on measured pairs: aligned RMSE <= max_rmse and below the flatter thumbnail's `contrast` (two
    images that agree no better than a flat one would are not evidence of a copy)."""
    return (rmse <= max_rmse) & (rmse < min_contrast)


def aligned_match(a: np.ndarray, b: np.ndarray, size: int, max_shift: int, max_rmse: float) -> np.ndarray:
    """(P,) bool: thumbnails a and b are one picture moved (`agrees` on their `aligned_rmse` and `contrast`)."""
    return agrees(aligned_rmse(a, b, size, max_shift), np.minimum(contrast(a, size), contrast(b, size)), max_rmse)
