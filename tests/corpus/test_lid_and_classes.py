"""The corpus steps behind LID_* and the classes (scanner/corpus/lid.py, classify.py), in this process: LID_*
neighbour search, the cut and the MMH classes."""

import numpy as np
import pandas as pd

from scanner.config import load_config
from scanner.corpus.classify import classify, removal_list


def _line_and_blob(rng, n=40, dim=12, shift=10.0):
    line = np.outer(rng.uniform(-1, 1, n), rng.normal(size=dim))  # LID 1
    blob = np.zeros((n, dim))
    blob[:, :8] = rng.normal(size=(n, 8))  # LID 8
    return np.vstack([line, blob + shift]).astype(np.float32)


def _lids(tmp_path, x, search=None, ok=None, space="model", sizes=None, scale="local"):
    """lid_lpca through part files, as finalize runs it: LID_* per row (NaN where not computed); scale corpus takes
    the median largest eigenvalue of these rows as the level."""
    from corpus_parts import context, run, split, write_parts

    from scanner.corpus.classify import lpca_count

    n = len(x)
    ok = np.ones(n, bool) if ok is None else ok
    sizes = sizes or [n // 2, n - n // 2]
    frames = [pd.DataFrame({"key": [f"k{i:04d}" for i in range(s0, s0 + s)],
                            "error": [None if ok[i] else "bad" for i in range(s0, s0 + s)]})
              for s0, s in zip(np.r_[0, np.cumsum(sizes)[:-1]], sizes)]
    arrays = {"vectors": split(x.astype(np.float16), sizes)}
    if search is not None:
        arrays["embeddings"] = split(search.astype(np.float32), sizes)
    cfg = load_config(None, [f"geometry.lpca_space={space}", "geometry.lpca_k=15", "geometry.lpca_alpha=0.05",
                             f"geometry.lpca_scale={scale}"], sections=("geometry", "neighbours", "corpus"))
    ctx = context(tmp_path, write_parts(tmp_path, frames, arrays), cfg)
    run(ctx, "keys", "lid")
    gid, spec = _spectra(ctx)
    top = spec[:, 0]
    out = np.full(n, np.nan, np.float32)
    out[gid] = lpca_count(spec, {"lpca_reference": float(np.median(top[top > 0]))}, cfg)
    return out


def _spectra(ctx) -> tuple[np.ndarray, np.ndarray]:
    """(gid, spec) of every row step `lid` wrote (corpus/lid/NAME.parquet per shard)."""
    from scanner.corpus.rows import read_shard_file

    frames = [read_shard_file(ctx.store, "lid", i) for i in range(len(ctx.store))]
    df = pd.concat([f for f in frames if f is not None], ignore_index=True)
    return df["gid"].to_numpy(), np.stack(df["spec"].to_numpy())


def test_lid_lpca_recovers_dimensions(tmp_path):
    x = _line_and_blob(np.random.default_rng(0))
    lid = _lids(tmp_path, x)
    assert np.median(lid[:40]) == 1 and np.median(lid[40:]) >= 6


def test_lid_lpca_through_an_inverted_file(tmp_path):
    """Above flat_max the neighbours come from the inverted file (lists built and searched as tasks); separated
    shapes keep their LID."""
    from corpus_parts import context, run, split, write_parts

    from scanner.config import load_config as lc
    from scanner.corpus.classify import lpca_count

    x = _line_and_blob(np.random.default_rng(2), n=300, shift=30.0)
    cfg = lc(None, ["neighbours.flat_max=100", "corpus.list_size=100", "geometry.lpca_k=15",
                    "geometry.lpca_scale=local"], sections=("geometry", "neighbours", "corpus"))
    frames = [pd.DataFrame({"key": [f"k{i:04d}" for i in range(s0, s0 + 200)], "error": None}) for s0 in (0, 200, 400)]
    ctx = context(tmp_path, write_parts(tmp_path, frames, {"vectors": split(x.astype(np.float16), [200] * 3)}), cfg)
    info = run(ctx, "keys", "lid")["lid"]
    assert info["kind"] == "ivf" and info["nlist"] >= 6 and info["recall_at_k"] >= 0.9, info
    gid, spec = _spectra(ctx)
    lid = np.full(600, np.nan)
    lid[gid] = lpca_count(spec, {}, cfg)
    assert not np.isnan(lid).any()
    assert np.median(lid[:300]) == 1 and np.median(lid[300:]) >= 6


def test_search_space_chooses_the_neighbours_pca_runs_on_model_vectors(tmp_path):
    """With lpca_space clip the neighbour sets come from the embeddings, the PCA from model space."""
    x = _line_and_blob(np.random.default_rng(1), n=40, shift=0.0)
    # both shapes share a centre; in the search space each line point sits on a blob point, so its
    # neighbour set mixes in blob points and their 8 model-space dimensions
    search = np.vstack([x[40:] + 1e-3, x[40:]])
    own = _lids(tmp_path / "a", x, search=search)
    swapped = _lids(tmp_path / "b", x, search=search, space="clip")
    assert np.median(own[:40]) == 1 and np.median(swapped[:40]) >= 4
    ok = np.ones(len(x), bool)
    ok[3] = False  # rows that are not ok get NaN and are never anyone's neighbour
    assert np.isnan(_lids(tmp_path / "c", x, search=search, ok=ok, space="clip")[3])


def test_classify_dd_od_and_removal_reasons():
    cfg = load_config(None, ["model.kind=none", "classify.detector=score_norm", "classify.detector_quantile=0.5",
                             "classify.lpca_low=3"])
    df = pd.DataFrame({"key": list("abcdef"), "shard": "00000", "error": [None] * 5 + ["bad"],
                       "score_norm": [1.0, 2.0, 9.0, 8.0, 1.5, np.nan], "lid_lpca": [1.0, 10.0, 1.0, 10.0, 4.0, np.nan],
                       "lid_flipd": [0.5, 1.0, 3.0, 9.0, 2.0, np.nan]})
    info = classify(df, cfg)
    assert info["threshold"] == 2.0  # median of the five good scores, low tail flags: a, b, e
    assert info["lid_medians"] == {"lid_flipd": 2.0, "lid_lpca": 4.0}
    # five rows (< 30): every LID_* value's typical lid_flipd pools them all, the median 2
    assert info["lid_flipd_typical"] == [2.0] * 11
    # lid_gap_rel = (2 - lid_flipd) / 2: a 0.75, b 0.5, c -0.5, d -3.5, e 0
    np.testing.assert_allclose(df["lid_gap_rel"][:5], [0.75, 0.5, -0.5, -3.5, 0.0])
    # a: flagged, LID_* 1 < 3 -> dd; b: flagged, LID_* normal, the model's LID far below -> od;
    # e: flagged, but LID_* is normal and the model's LID is not below it (gap 0, margin 0) -> none
    assert df["mem_class"].tolist()[:5] == ["dd", "od", "none", "none", "none"] and pd.isna(df["mem_class"][5])
    assert df["flagged"].tolist() == [True, True, False, False, True, False]
    dups = pd.DataFrame({"key": ["a", "c"], "group_id": [0, 0], "similarity": [1.0, 0.99], "keep": [True, False]})
    rem = removal_list(df, dups, replicated={"d"})
    # c: duplicate; a is in a group (dedup fixes it) so no dd_mem row; b: od_mem; d: replicated; e: kept (no class)
    assert dict(zip(rem["key"], rem["reason"])) == {"c": "duplicate", "b": "od_mem", "d": "replicated"}
    df2 = df.drop(columns="mem_class")
    classify(df2, load_config(None, ["model.kind=none", "classify.detector=score_norm",
                                     "classify.detector_quantile=0.5", "classify.lpca_low=3",
                                     "classify.gap_margin=-0.1"]))
    assert df2["mem_class"].tolist()[:5] == ["dd", "od", "none", "none", "od"]  # a lower margin takes e in
    # copies: a flagged row in a group of byte copies is dd whatever its LID_* (e: 4, above lpca_low); unflagged d
    # stays; only groups with a byte-identical pair count (an embedding link may join two distinct look-alikes)
    from scanner.corpus.classify import copy_groups

    groups = pd.DataFrame({"key": list("vwxyz"), "group_id": [0, 0, 1, 1, 2], "link": ["bytes", "phash", "embedding",
                                                                                        "embedding", "phash"]})
    assert copy_groups(groups) == {0}
    df3 = df.drop(columns="mem_class")
    classify(df3, cfg, copies=np.array([False, False, False, True, True, False]))
    assert df3["mem_class"].tolist()[:5] == ["dd", "od", "none", "none", "dd"]


def test_searched_rows_skip_unreadable_and_every_copy_of_a_repeated_key(tmp_path):
    """Duplicate search needs unique keys: a repeated key is skipped even where one copy only failed scoring."""
    from corpus_parts import context, run, write_parts

    from scanner.corpus.rows import masks, repeated

    frames = [pd.DataFrame({"key": ["a", "b"], "error": [None, None], "error_stage": [None, None],
                            "embed_error": [None, None]}),
              pd.DataFrame({"key": ["b", "c", "d", "e"], "error": ["scoring failed: x", "cannot decode image", None, None],
                            "error_stage": ["score", "decode", "score", None],
                            "embed_error": [None, None, None, "embedding failed: y"]})]
    ctx = context(tmp_path, write_parts(tmp_path, frames, {"embeddings": [np.eye(2, 4), np.eye(4)]}),
                  load_config(None, [], sections=("corpus",)))
    run(ctx, "keys")
    rep = repeated(ctx.store)[0]
    m = [masks(ctx.store, i) for i in range(2)]
    # a: fine; b: repeated (both copies out); c: not decoded; d: only its scoring failed (the picture is there);
    # e: not embedded
    searched = np.concatenate([x["searched"] for x in m])
    assert rep.tolist() == [1, 2] and searched.tolist() == [True, False, False, False, True, False]
    counts = {k: int(sum(x[k].sum() for x in m)) for k in ("has_key", "ok", "searched")}
    assert counts == {"has_key": 6, "ok": 3, "searched": 2}  # ok: a, d, e (no error in the part)


def test_a_lid_theta_that_is_not_a_dimension_gives_no_od_and_says_so(tmp_path, caplog):
    """flipd_at: clean on a trained UNet gives lid_flipd far below 0: relative gaps would be meaningless."""
    from corpus_parts import context, run, write_parts

    frames = [pd.DataFrame({"key": ["a", "b", "c"], "error": [None] * 3, "error_stage": [None] * 3,
                            "embed_error": [None] * 3, "score_norm": [1.0, 2.0, 3.0],
                            "lid_flipd": [-500.0, -600.0, -700.0]})]
    cfg = load_config(None, ["model.kind=pixel", "model.path=/m", "classify.detector=score_norm",
                             "classify.detector_quantile=0.5"])
    ctx = context(tmp_path, write_parts(tmp_path, frames, {}), cfg)
    with caplog.at_level("WARNING", logger="memscan"):
        run(ctx, "keys", "cut")
    t = ctx.out.read_json("corpus/cut/thresholds.json")
    assert t["lid_medians"]["lid_flipd"] == -600.0 and "not a dimension" in caplog.text
    df = frames[0].assign(lid_lpca=[10.0, 10.0, 10.0], shard="00000")
    classify(df, cfg, t)
    assert df["lid_gap_rel"].isna().all() and "od" not in set(df["mem_class"])


def test_corpus_level_lid_and_typical_gap_class_planted_copies_overfit_and_simple_images(tmp_path):
    """lid_lpca -> detector_threshold -> classify as finalize runs them, on planted truth in R^12: 20 near-copies
    of one point (edits of 1e-3), a 1-dimensional line (simple images) and an 8-dimensional blob. The model's LID
    (lid_flipd) is 10 on the copies, 5 on the line, ~50 on the blob except 6 blob points at 20 (overfitted).
    Flagged: the copies, the 6 overfitted points and 6 line points. Expected: copies dd (LID_* 0 at the corpus
    level, not to Fukunaga-Olsen), overfitted od (far below the blob's typical 50), line points none (5 is what
    the model gives every line point: simple, not overfitted; the ratio rule before, LID_* / its median - lid_flipd /
    its median, gave them 1/6 - 5/50 > 0: od)."""
    from corpus_parts import context, run, split, write_parts

    from scanner.corpus.classify import lpca_count

    rng = np.random.default_rng(5)
    copies = rng.normal(size=12) * 3 + 1e-3 * rng.normal(size=(20, 12))
    line = np.outer(np.linspace(-6, 6, 100), rng.normal(size=12) / 3.5) + 20.0
    blob = np.zeros((200, 12))
    blob[:, :8] = rng.normal(size=(200, 8))
    blob -= 20.0
    x = np.vstack([copies, line, blob]).astype(np.float32)
    kind = np.array(["copy"] * 20 + ["line"] * 100 + ["blob"] * 200)
    flipd = np.where(kind == "copy", 10.0, np.where(kind == "line", 5.0, 50.0 + rng.normal(size=len(x))))
    overfit = np.flatnonzero(kind == "blob")[::33][:6]
    flipd[overfit] = 20.0
    flagged = np.zeros(len(x), bool)
    flagged[kind == "copy"] = True
    flagged[overfit] = True
    flagged[np.flatnonzero(kind == "line")[::17][:6]] = True
    score = np.where(flagged, 0.1, 1.0)
    order = rng.permutation(len(x))  # rows in no particular order across two shards
    x, kind, flipd, score, flagged = x[order], kind[order], flipd[order], score[order], flagged[order]
    sizes = [160, 160]
    frames = [pd.DataFrame({"key": [f"k{i:04d}" for i in range(s0, s0 + 160)], "error": None, "error_stage": None,
                            "embed_error": None, "score_norm": score[s0:s0 + 160], "lid_flipd": flipd[s0:s0 + 160]})
              for s0 in (0, 160)]
    shards = write_parts(tmp_path, frames, {"vectors": split(x.astype(np.float16), sizes)})
    sets = ["model.kind=pixel", "model.path=/m", "geometry.lpca_k=15", "classify.detector=score_norm",
            "classify.detector_threshold=0.5", "classify.lpca_low=1"]
    lid, ts = {}, {}
    for scale in ("corpus", "local"):
        cfg = load_config(None, [*sets, f"geometry.lpca_scale={scale}"])
        ctx = context(tmp_path, shards, cfg)
        run(ctx, "keys", "lid", "cut")
        ts[scale] = t = ctx.out.read_json("corpus/cut/thresholds.json")
        gid, spec = _spectra(ctx)
        lid[scale] = np.full(len(x), np.nan)
        lid[scale][gid] = lpca_count(spec, t, cfg)
    assert not np.isnan(lid["corpus"]).any()
    assert (lid["corpus"][kind == "copy"] == 0).all() and (lid["local"][kind == "copy"] >= 6).all()
    assert ts["local"]["lpca_reference"] is None  # the local rule needs no corpus level
    cfg = load_config(None, [*sets, "geometry.lpca_scale=corpus"])
    t = ts["corpus"]
    assert t["lpca_scale"] == "corpus" and t["lpca_reference"] > 0 and t["lid_medians"]["lid_flipd"] > 40
    typical = t["lid_flipd_typical"]
    # LID_* 0..12 (D = 12 < 16 neighbours); 1 is the line's 5; 0 holds the 20 copies only, under 30 rows: pooled
    # with the line
    assert len(typical) == 13 and typical[1] == 5.0 and typical[0] == 5.0
    assert set(np.unique(lid["corpus"][kind == "line"])) <= {1.0} and lid["corpus"][kind == "blob"].min() >= 4
    df = pd.DataFrame({"key": [f"k{i:04d}" for i in range(len(x))], "shard": "00000", "error": None,
                       "score_norm": score, "lid_flipd": flipd, "lid_lpca": lid["corpus"]})
    classify(df, cfg, t)
    cls = df["mem_class"].to_numpy()
    assert (cls[kind == "copy"] == "dd").all()
    assert (cls[np.isin(np.arange(len(x)), np.flatnonzero(np.isin(order, overfit)))] == "od").all()
    assert (cls[flagged & (kind == "line")] == "none").all() and flagged[kind == "line"].sum() == 6
    assert (cls[~flagged] == "none").all()
