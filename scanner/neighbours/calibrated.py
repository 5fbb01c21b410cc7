"""Calibrated precision of a duplicate link: a table from (link kind, score) to the pair precision measured there.

benchmarks/bench_copydet.py measures it on held-out demo copy corpora (seeds no setting was tuned on) with the
shipped embedder and the shipped neighbours settings, and writes scanner/neighbours/shipped/calibration.json:

    {"embedder_digest": "...", "settings": {neighbours key: value, ...},
     "kinds": {"embedding": {"edges": [lo, ..., hi], "precision": [...], "links": [...]}, "verified": {...}, ...}}

A scan reads it only when its embedder is the shipped one (by digest) and its settings are the calibrated ones;
otherwise the precision column is null (bytes links excepted: identical bytes are a copy, precision 1). A user picks
a threshold by the precision they want: every row of duplicates.parquet carries its link's score and this precision.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TABLE = Path(__file__).resolve().parent / "shipped" / "calibration.json"
# the neighbours keys that change which links a scan makes: a table measured with other values does not apply
SETTINGS = ("flip_invariant", "image_size", "dup_threshold", "phash_max_dist", "align_size", "align_min_cosine",
            "verifier", "verify_min_score", "verify_min_detail", "k")


def settings_of(n_cfg) -> dict:
    return {k: getattr(n_cfg, k) for k in SETTINGS}


def load_table(checkpoint: str | None, n_cfg, path: Path | None = None) -> tuple[dict | None, str]:
    """(the table, "") when it applies to this embedder and these settings, else (None, why not). path: the table
    (None: the shipped one, TABLE)."""
    from scanner.neighbours.checkpoint import checkpoint_digest

    path = TABLE if path is None else path
    if not Path(path).is_file():
        return None, f"no calibration table at {path}"
    table = json.loads(Path(path).read_text())
    if not checkpoint or checkpoint_digest(checkpoint) != table.get("embedder_digest"):
        return None, "the embedder is not the one the table was measured with"
    diff = sorted(k for k, v in settings_of(n_cfg).items() if table.get("settings", {}).get(k) != v)
    if diff:
        return None, f"neighbours settings differ from the calibrated ones: {', '.join(diff)}"
    return table, ""


def precision_of(table: dict | None, kinds: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(n,) float32 calibrated precision of links of these kinds (None: no link) and scores; 1 for bytes; NaN where
    the table has no entry (or there is no table)."""
    kinds = np.asarray(kinds, dtype=object)
    scores = np.asarray(scores, np.float32)
    out = np.full(len(kinds), np.nan, np.float32)
    out[kinds == "bytes"] = 1.0
    for kind, t in ((table or {}).get("kinds") or {}).items():
        m = (kinds == kind) & np.isfinite(scores)
        if not m.any():
            continue
        edges, prec = np.asarray(t["edges"], np.float64), np.asarray(t["precision"], np.float64)
        b = np.clip(np.searchsorted(edges, scores[m], side="right") - 1, 0, len(prec) - 1)
        out[m] = np.where(scores[m] >= edges[0], prec[b], np.nan)
    return out


def build_table(kinds: np.ndarray, scores: np.ndarray, right: np.ndarray, edges: dict[str, list[float]]) -> dict:
    """The table's "kinds" from measured links: kinds (L,), scores (L,), right (L,) bool (both ends in one planted
    group); edges: per kind the bin edges (ascending). Precision per bin = right links / links (NaN for none)."""
    out = {}
    kinds, scores, right = np.asarray(kinds, dtype=object), np.asarray(scores, float), np.asarray(right, bool)
    for kind, e in edges.items():
        m = kinds == kind
        b = np.searchsorted(np.asarray(e), scores[m], side="right") - 1
        links = [int(((b == i)).sum()) for i in range(len(e) - 1)]
        good = [int((right[m][b == i]).sum()) for i in range(len(e) - 1)]
        out[kind] = {"edges": list(map(float, e)), "links": links, "right": good,
                     "precision": [g / n if n else float("nan") for g, n in zip(good, links)]}
    return out
