"""Corpus-wide steps of finalize that need no Ray: LID_* neighbour search and the MMH classes."""

import numpy as np
import pandas as pd

from scanner.config import load_config
from scanner.finalize import classify, lid_lpca_model_space, removal_list


def _line_and_blob(rng, n=40, dim=12, shift=10.0):
    line = np.outer(rng.uniform(-1, 1, n), rng.normal(size=dim))  # LID 1
    blob = np.zeros((n, dim))
    blob[:, :8] = rng.normal(size=(n, 8))  # LID 8
    return np.vstack([line, blob + shift]).astype(np.float32)


def test_lid_lpca_model_space_recovers_dimensions():
    x = _line_and_blob(np.random.default_rng(0))
    lid = lid_lpca_model_space(x, np.ones(len(x), bool), k=15, alpha=0.05)
    assert np.median(lid[:40]) == 1 and np.median(lid[40:]) >= 6


def test_search_space_chooses_the_neighbours_pca_runs_on_model_vectors():
    """With `search` (e.g. CLIP vectors) the neighbour sets come from it, the PCA from model space."""
    x = _line_and_blob(np.random.default_rng(1), n=40, shift=0.0)
    # both shapes share a centre; in the search space each line point sits on a blob point, so its
    # neighbour set mixes in blob points and their 8 model-space dimensions
    search = np.vstack([x[40:] + 1e-3, x[40:]])
    ok = np.ones(len(x), bool)
    own = lid_lpca_model_space(x, ok, k=15, alpha=0.05)
    swapped = lid_lpca_model_space(x, ok, k=15, alpha=0.05, search=search)
    assert np.median(own[:40]) == 1 and np.median(swapped[:40]) >= 4
    ok[3] = False  # rows that are not ok get NaN and are never anyone's neighbour
    assert np.isnan(lid_lpca_model_space(x, ok, k=15, alpha=0.05, search=search)[3])


def test_classify_dd_od_and_removal_reasons():
    cfg = load_config(None, ["model.kind=none", "classify.detector=score_norm", "classify.detector_quantile=0.5",
                             "classify.lpca_low=3"])
    df = pd.DataFrame({"key": list("abcdef"), "shard": "00000", "error": [None] * 5 + ["bad"],
                       "score_norm": [1.0, 2.0, 9.0, 8.0, 1.5, np.nan], "lid_lpca": [1.0, 10.0, 1.0, 10.0, 2.0, np.nan],
                       "lid_flipd": [0.5, 2.0, 1.0, 9.0, 1.0, np.nan]})
    df["lid_gap"] = df["lid_lpca"] - df["lid_flipd"]
    info = classify(df, cfg)
    assert info["threshold"] == 2.0  # median of the five good scores, low tail flags
    assert df["mem_class"].tolist()[:5] == ["dd", "od", "none", "none", "dd"] and pd.isna(df["mem_class"][5])
    dups = pd.DataFrame({"key": ["a", "c"], "group_id": [0, 0], "similarity": [1.0, 0.99], "keep": [True, False]})
    rem = removal_list(df, dups, replicated={"d"})
    # c: duplicate; a is in a group (dedup fixes it) so no dd_mem row; e: dd_mem; b: od_mem; d: replicated
    assert dict(zip(rem["key"], rem["reason"])) == {"c": "duplicate", "e": "dd_mem", "b": "od_mem", "d": "replicated"}


def test_neighbour_rows_skip_unreadable_and_every_copy_of_a_repeated_key():
    """Duplicate search needs unique keys: a repeated key is skipped even where one copy only failed scoring
    (finalize marks a repeat as an error only on rows that had none)."""
    import numpy as np
    import pandas as pd

    from scanner.finalize import neighbour_rows

    df = pd.DataFrame({
        "key": ["a", "b", "b", "c", "d", "e"], "shard": ["0", "0", "1", "1", "1", "1"], "caption": [None] * 6,
        "sha256": list("abcdef"), "width": [8] * 6, "height": [8] * 6, "phash": np.arange(6, dtype=np.int64),
        "error": [None, "key 'b' is repeated", "scoring failed: x", "cannot decode image", None, None],
        "error_stage": [None, "read", "score", "decode", "score", None],
        "embed_error": [None, None, None, None, None, "embedding failed: y"]})
    data, ok = neighbour_rows(df, np.eye(6, 4, dtype=np.float32))
    # a: fine; b: repeated (both copies out); c: not decoded; d: only its scoring failed (the picture is there);
    # e: not embedded
    assert data["keys"] == ["a", "d"] and ok.tolist() == [True, False, False, False, True, False]
    assert data["vectors"].shape == (2, 4) and data["pixels"] == [64, 64]
