"""memscan evaluate: AUROC in each column's registered direction (scanner/columns.py), never chosen on the data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from scanner.columns import direction, score_column
from scanner.demo.evaluate import column_metrics, evaluate, format_metrics


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


def test_roc_curves_match_sklearn_with_ties_and_weights():
    from sklearn.metrics import roc_auc_score

    from scanner.demo.evaluate import _roc_curves, tpr_at_fpr

    rng = np.random.default_rng(1)
    y = rng.random(3000) < 0.2
    s = np.round(rng.normal(size=3000) + 1.5 * y, 1)  # many ties
    auc, t1, t01 = _roc_curves(y, s, np.ones((1, 3000)))
    assert auc[0] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert t1[0] == pytest.approx(tpr_at_fpr(y, s)) and t01[0] == pytest.approx(tpr_at_fpr(y, s, 0.001))
    w = rng.integers(0, 3, 3000).astype(float)
    keep = w > 0
    assert _roc_curves(y, s, w[None])[0][0] == pytest.approx(
        roc_auc_score(y[keep], s[keep], sample_weight=w[keep]), abs=1e-12)


def test_bootstrap_counts_a_group_once_not_each_copy():
    """20 groups of 24 identical copies: over groups the interval is that of 20 positives, over copies it would
    pretend 480; the interval over groups must be the wider one, and both must contain the AUROC."""
    from scanner.demo.evaluate import bootstrap_metrics

    rng = np.random.default_rng(2)
    base = rng.normal(size=20) + 1.0
    s = np.r_[np.repeat(base, 24), rng.normal(size=2000)]
    y = np.r_[np.ones(480, bool), np.zeros(2000, bool)]
    groups = np.r_[np.repeat([f"g{i}" for i in range(20)], 24), [f"u{i}" for i in range(2000)]]
    copies = np.r_[[f"c{i}" for i in range(480)], groups[480:]]
    by_group = bootstrap_metrics(y, s, groups, n_boot=300, seed=0)
    by_copy = bootstrap_metrics(y, s, copies, n_boot=300, seed=0)
    assert by_group["ci_units"] == {"positive": 20, "negative": 2000}
    w_group = np.diff(by_group["auroc_ci"])[0]
    w_copy = np.diff(by_copy["auroc_ci"])[0]
    assert w_group > 3 * w_copy, (w_group, w_copy)
    from sklearn.metrics import roc_auc_score

    auc = roc_auc_score(y, s)
    assert by_group["auroc_ci"][0] <= auc <= by_group["auroc_ci"][1]
    assert bootstrap_metrics(y, s, groups, n_boot=300, seed=0) == by_group  # seeded


def test_metrics_carry_intervals_and_the_low_fpr_rate(tmp_path):
    _scan(tmp_path, shift_norm=-2.0, shift_cfg=+2.0)
    m = evaluate(tmp_path, tmp_path / "truth.parquet", n_boot=100)
    sn = m["scores"]["repeated_vs_unique"]["score_norm"]
    assert sn["auroc_ci"][0] <= sn["auroc"] <= sn["auroc_ci"][1] and sn["n_boot"] == 100
    assert 0.0 <= sn["tpr_at_0_1pct_fpr"] <= sn["tpr_at_1pct_fpr"]
    assert "95% CI" in format_metrics(m) and "@0.1%" in format_metrics(m)


def test_dose_response_reads_flags_per_copy_count(tmp_path):
    from scanner.demo.evaluate import dose_response

    rows, truth = [], []
    for k, flag_share in ((2, 0.0), (8, 0.5), (32, 1.0)):
        for g in range(2):
            gid = f"{k}-{g}"
            for c in range(k):
                key = f"d{k}-{g}-{c}"
                flagged = (g + 0.5) / 2 <= flag_share  # group 0 flagged at 0.5, both at 1.0
                rows.append({"key": key, "error": None, "verdict": "suspected" if flagged else "clear",
                             "mem_class": "dd" if flagged else "none", "score_norm_cal": 0.5 if flagged else 1.0})
                truth.append({"key": key, "planted": "dose", "copies": k, "group_id": gid})
    for i in range(10):
        rows.append({"key": f"u{i}", "error": None, "verdict": "suspected" if i == 0 else "clear",
                     "mem_class": "none", "score_norm_cal": 1.0})
        truth.append({"key": f"u{i}", "planted": "unique", "copies": 1, "group_id": None})
    d = dose_response(pd.DataFrame(rows), pd.DataFrame(truth))
    assert [r["copies"] for r in d] == [1, 2, 8, 32]
    assert [r["flagged"] for r in d] == [0.1, 0.0, 0.5, 1.0] and [r["units"] for r in d] == [10, 2, 2, 2]
    assert d[2]["flagged_units_min_max"] == [0.0, 1.0] and d[3]["dd"] == 1.0
    assert dose_response(pd.DataFrame(rows), pd.DataFrame(truth).assign(planted="unique")) == []


def test_duplicate_recall_per_planted_kind_and_edit():
    from scanner.demo.evaluate import duplicates_by_edit

    planted = pd.DataFrame({"key": list("abcdefg"), "group_id": [0, 0, 0, 1, 1, 2, 2],
                            "planted": ["near_dup"] * 3 + ["exact_dup"] * 2 + ["near_dup"] * 2,
                            "edit": ["copy", "shift", "jpeg", "copy", "copy", "copy", "shift"]})
    # found: a-c (one predicted group), d-e; missed: b (alone), g (grouped with a stranger, not with f)
    dups = pd.DataFrame({"key": ["a", "c", "d", "e", "g", "x"], "group_id": [10, 10, 11, 11, 12, 12]})
    r = {(x["planted"], x["edit"]): (x["recall"], x["members"]) for x in duplicates_by_edit(dups, planted)}
    assert r == {("near_dup", "copy"): (0.5, 2), ("near_dup", "shift"): (0.0, 2), ("near_dup", "jpeg"): (1.0, 1),
                 ("exact_dup", "copy"): (1.0, 2)}
    found = {(x["planted"], x["edit"]): (x["groups_found"], x["groups"]) for x in duplicates_by_edit(dups, planted)}
    assert found == {("near_dup", "copy"): (1, 2), ("near_dup", "shift"): (0, 2), ("near_dup", "jpeg"): (1, 1),
                     ("exact_dup", "copy"): (1, 1)}
    assert duplicates_by_edit(dups, planted.drop(columns="edit")) == []


def test_dose_groups_are_planted_duplicates(tmp_path):
    """A dose corpus' groups are true duplicate groups: finding them must not cost precision."""
    keys = ["a", "b", "c", "d", "u"]
    scores = pd.DataFrame({"key": keys, "shard": "00000", "error": None, "score_norm": [1.0, 1.0, 1.0, 1.0, 2.0],
                           "mem_class": "none", "verdict": "clear"})
    (tmp_path / "scores").mkdir()
    scores.to_parquet(tmp_path / "scores" / "00000.parquet")
    pd.DataFrame({"key": ["a", "b", "c", "d"], "group_id": [0, 0, 1, 1], "similarity": 1.0,
                  "keep": [True, False, True, False]}).to_parquet(tmp_path / "duplicates.parquet")
    truth = pd.DataFrame({"key": keys, "planted": ["repeated", "repeated", "dose", "dose", "unique"],
                          "group_id": pd.array([0, 0, 1, 1, None], dtype="Int64"), "copies": [2, 2, 2, 2, 1]})
    truth.to_parquet(tmp_path / "truth.parquet")
    d = evaluate(tmp_path, tmp_path / "truth.parquet", n_boot=0)["duplicates"]
    assert d["pair_precision"] == 1.0 and d["pair_recall"] == 1.0
    assert "non_identical" not in d  # no part files: no byte hashes
    # a and b are byte copies (left out of the non-identical pairs), c and d two encodings of one picture
    (tmp_path / "parts").mkdir()
    pd.DataFrame({"key": keys, "sha256": ["h0", "h0", "h1", "h2", "h3"]}).to_parquet(tmp_path / "parts" / "00000.parquet")
    ni = evaluate(tmp_path, tmp_path / "truth.parquet", n_boot=0)["duplicates"]["non_identical"]
    assert (ni["true_pairs"], ni["predicted_pairs"], ni["correct_pairs"]) == (1, 1, 1)


def test_a_dedup_folder_gets_the_duplicate_metrics_alone(tmp_path):
    """A folder without scores/: its parts say which images were read, and only they count as planted."""
    keys = ["a", "b", "c", "d", "e", "u"]
    (tmp_path / "parts").mkdir()
    pd.DataFrame({"key": keys, "error": [None, None, None, None, "decode: truncated", None],
                  "sha256": ["h0", "h0", "h1", "h2", None, "h3"]}).to_parquet(tmp_path / "parts" / "00000.parquet")
    # found: a-b (bytes) and c-d; e was planted with c but never read, so missing it is no miss; u is a stranger
    pd.DataFrame({"key": ["a", "b", "c", "d", "u"], "group_id": [0, 0, 1, 1, 1], "similarity": 1.0,
                  "keep": [True, False, True, False, False]}).to_parquet(tmp_path / "duplicates.parquet")
    truth = pd.DataFrame({"key": keys, "planted": ["exact_dup", "exact_dup", "near_dup", "near_dup", "near_dup",
                                                   "unique"],
                          "group_id": pd.array([0, 0, 1, 1, 1, None], dtype="Int64"),
                          "edit": ["copy", "copy", "copy", "shift", "jpeg", None]})
    truth.to_parquet(tmp_path / "truth.parquet")
    m = evaluate(tmp_path, tmp_path / "truth.parquet", n_boot=0)
    d = m["duplicates"]
    assert m["scores"] == {} and "mem_class_by_planted" not in m
    assert (d["true_pairs"], d["predicted_pairs"], d["correct_pairs"]) == (2, 4, 2)  # c-u and d-u are wrong
    assert (d["removed"], d["removed_right"], d["redundant"]) == (3, 2, 2)
    assert {(r["planted"], r["edit"]): r["recall"] for r in d["recall_by_edit"]} == {
        ("exact_dup", "copy"): 1.0, ("near_dup", "copy"): 1.0, ("near_dup", "shift"): 1.0}
    assert d["non_identical"]["true_pairs"] == 1 and (tmp_path / "metrics.json").exists()
    assert "duplicate recall, near_dup / shift: 1.000" in format_metrics(m)


def test_a_folder_with_nothing_to_evaluate_names_both_commands(tmp_path):
    pd.DataFrame({"key": ["a"], "planted": ["unique"], "group_id": [None]}).to_parquet(tmp_path / "truth.parquet")
    with pytest.raises(FileNotFoundError, match="memscan scan.*memscan dedup"):
        evaluate(tmp_path, tmp_path / "truth.parquet")


def test_verbatim_and_varied_caption_groups_are_compared_to_unique_images(tmp_path):
    # cfg_norm flags the verbatim-caption group (shared caption) and not the varied one: reported separately
    keys = [f"k{i:02d}" for i in range(30)]
    planted = ["repeated"] * 10 + ["unique"] * 20
    kind = ["verbatim"] * 5 + ["varied"] * 5 + [None] * 20
    cfg = np.r_[np.full(5, 5.0), np.linspace(0, 1, 5), np.linspace(0, 1, 20)]
    captions = ["same caption"] * 5 + [f"copy {i}" for i in range(5)] + [f"img {i}" for i in range(20)]
    scores = pd.DataFrame({"key": keys, "shard": "00000", "caption": captions, "error": None, "cfg_norm": cfg,
                           "mem_class": "none"})
    (tmp_path / "scores").mkdir()
    scores.to_parquet(tmp_path / "scores" / "00000.parquet")
    truth = pd.DataFrame({"key": keys, "planted": planted, "group_id": [0] * 5 + [1] * 5 + [None] * 20,
                          "caption_kind": kind})
    truth.to_parquet(tmp_path / "truth.parquet")
    reps = pd.DataFrame({"gen_id": [0, 1, 2, 3, 4], "caption": ["same caption", "img 3", "img 4", "copy 1", "copy 2"],
                         "seed": [0, 1, 2, 3, 4], "matched_key": ["k02", "k23", "k00", "k06", "k08"],
                         "similarity": [0.99, 0.99, 0.5, 0.2, 0.97], "replicated": [True, True, False, False, True]})
    reps.to_parquet(tmp_path / "replications.parquet")
    m = evaluate(tmp_path, tmp_path / "truth.parquet", n_boot=0)
    assert m["scores"]["verbatim_vs_unique"]["cfg_norm"]["auroc"] == 1.0
    assert m["scores"]["verbatim_vs_unique"]["cfg_norm"]["n_pos"] == 5
    assert m["scores"]["varied_vs_unique"]["cfg_norm"]["auroc"] < 0.7
    assert m["scores"]["repeated_vs_unique"]["cfg_norm"]["n_pos"] == 10
    by = {r["caption_kind"]: r for r in m["replications_by_caption"]}
    assert by["verbatim"] == {"caption_kind": "verbatim", "generations": 1, "replicated": 1.0,
                              "replicated_own_image": 1.0}
    # "img 3" replicated k23, another image than the one trained with that caption (k13)
    assert by["unique"]["generations"] == 2 and by["unique"]["replicated"] == 0.5
    assert by["unique"]["replicated_own_image"] == 0.0
    # "copy 2" (k07's caption) replicated k08, another copy of the same varied group: its own image
    assert by["varied"] == {"caption_kind": "varied", "generations": 2, "replicated": 0.5, "replicated_own_image": 0.5}
    assert "generations from verbatim captions: 1" in format_metrics(m)
    truth.drop(columns="caption_kind").to_parquet(tmp_path / "truth.parquet")
    assert "verbatim_vs_unique" not in evaluate(tmp_path, tmp_path / "truth.parquet", n_boot=0)["scores"]


def test_removal_precision_counts_what_the_list_removes_not_pairs():
    """A stranger joined to a group of copies is one wrong removal (pair precision counts it once per copy); a
    stranger kept in place of the copies makes every removal of that group wrong."""
    from scanner.demo.evaluate import removal_precision_recall
    from scanner.neighbours.dedup import pair_precision_recall

    planted = pd.DataFrame({"key": [f"c{i}" for i in range(6)] + ["p", "q"], "group_id": [0] * 6 + [1, 1]})
    # group 10: the six copies and stranger u, a copy kept; group 11: p and q, found; r, s alone in truth
    dups = pd.DataFrame({"key": [f"c{i}" for i in range(6)] + ["u", "p", "q"],
                         "group_id": [10] * 7 + [11, 11], "keep": [True] + [False] * 6 + [True, False]})
    r = removal_precision_recall(dups, planted)
    assert r == {"removal_precision": 6 / 7, "removal_recall": 1.0, "removed": 7, "removed_right": 6, "redundant": 6}
    pairs = pair_precision_recall(dict(zip(dups.key, dups.group_id)), dict(zip(planted.key, planted.group_id)))
    assert pairs["pair_precision"] == pytest.approx(16 / 22)  # the stranger costs 6 of 22 pairs
    # the stranger kept: the six copies removed against it are all wrong, q still right
    kept_u = dups.assign(keep=[False] * 6 + [True, True, False])
    r = removal_precision_recall(kept_u, planted)
    assert r["removed_right"] == 1 and r["removed"] == 7 and r["removal_recall"] == pytest.approx(1 / 6)
    assert removal_precision_recall(dups.iloc[:0], planted)["removal_precision"] == 1.0
