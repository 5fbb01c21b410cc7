"""memscan evaluate: AUROC in each column's registered direction (scanner/columns.py), never chosen on the data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from scanner.columns import direction, score_column
from scanner.evaluate import column_metrics, evaluate, format_metrics


def _scan(tmp_path, shift_norm: float, shift_cfg: float):
    """40 repeated + 160 unique images; score_norm (registered: low flags) and cfg_norm (high flags) shifted."""
    rng = np.random.default_rng(0)
    n_pos, n_neg = 40, 160
    planted = ["repeated"] * n_pos + ["unique"] * n_neg
    keys = [f"k{i:03d}" for i in range(n_pos + n_neg)]
    pos = np.r_[np.ones(n_pos), np.zeros(n_neg)].astype(bool)
    scores = pd.DataFrame({"key": keys, "shard": "00000", "error": None,
                           "score_norm": rng.normal(size=len(keys)) + shift_norm * pos,
                           "cfg_norm": rng.normal(size=len(keys)) + shift_cfg * pos,
                           "unregistered_col": rng.normal(size=len(keys)) - 2.0 * pos, "mem_class": "none"})
    (tmp_path / "scores").mkdir(parents=True)
    scores.to_parquet(tmp_path / "scores" / "00000.parquet")
    truth = pd.DataFrame({"key": keys, "planted": planted, "group_id": None})
    truth.to_parquet(tmp_path / "truth.parquet")
    return scores, truth


def test_registered_direction_is_used_and_a_wrong_tail_is_a_warning(tmp_path):
    # score_norm is *higher* for the positives here, the opposite of its registered direction (low)
    _scan(tmp_path, shift_norm=+2.0, shift_cfg=+2.0)
    m = evaluate(tmp_path, tmp_path / "truth.parquet")
    sn = m["scores"]["repeated_vs_unique"]["score_norm"]
    cfg = m["scores"]["repeated_vs_unique"]["cfg_norm"]
    assert sn["direction"] == "low" and sn["direction_source"] == "registry" and sn["auroc"] < 0.2
    assert cfg["direction"] == "high" and cfg["auroc"] > 0.8  # right tail: a working detector stays one
    assert len(m["warnings"]) == 1 and "score_norm vs repeated" in m["warnings"][0]
    assert "warning: score_norm" in format_metrics(m)
    # an unregistered column keeps the data-chosen tail, and says so
    un = m["scores"]["repeated_vs_unique"]["unregistered_col"]
    assert un["direction"] == "low" and un["direction_source"] == "data" and un["auroc"] > 0.8
    assert (tmp_path / "metrics.json").exists()


def test_a_column_in_its_right_direction_has_no_warning(tmp_path):
    scores, truth = _scan(tmp_path, shift_norm=-2.0, shift_cfg=+2.0)
    warnings: list = []
    m = column_metrics(scores, truth, "repeated", warnings=warnings)
    assert m["score_norm"]["auroc"] > 0.8 and not warnings


@pytest.mark.parametrize(("col", "want"), [("p_laplace_1", "low"), ("p_laplace_2", "low"), ("p_laplace_3", "high"),
                                           ("p_laplace_1_5", "low"), ("lid_gap", "high"), ("lid_lpca", "low"),
                                           ("score_norm_cal", "low"), ("cfg_norm", "high"), ("nonsense", None)])
def test_registry_directions(col, want):
    assert direction(col) == want
    assert (score_column(col) is None) == (want is None)
