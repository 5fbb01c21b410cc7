"""k nearest neighbours out of core (scanner/corpus/search.py) against brute force on vectors with known truth."""

from __future__ import annotations

import types

import numpy as np
import pandas as pd
import pytest
from corpus_parts import split, write_parts

from scanner.corpus.search import exact_neighbours, make_plan, search
from scanner.corpus.spill import Spill
from scanner.corpus.store import PartStore


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _store(tmp_path, x, sizes, keep=None):
    frames = [pd.DataFrame({"key": [f"k{j:06d}" for j in range(s0, s0 + s)]})
              for s0, s in zip(np.r_[0, np.cumsum(sizes)[:-1]], sizes)]
    shards = write_parts(tmp_path, frames, {"embeddings": split(x, sizes)})
    return PartStore(tmp_path, shards)


def _clustered(n=3000, d=24, centres=40, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d))
    return _unit(c[rng.integers(0, centres, n)] + 0.35 * rng.standard_normal((n, d)))


def _brute(x, k):
    sims = x @ x.T
    return np.sort(sims, axis=1)[:, ::-1][:, :k]


def _collect():
    got = {}

    def consume(qg, nbr, s, _rows):
        for g, i, v in zip(qg, nbr, s):
            assert int(g) not in got, "a row was a query twice"
            got[int(g)] = (i, v)
    return got, consume


KNOBS = types.SimpleNamespace(index="auto", flat_max=100, list_size=200, spill=2)


def test_spill_round_trips_records_by_partition(tmp_path):
    rec = np.dtype([("gid", "<i8"), ("x", "<f2", (3,))])
    sp = Spill(tmp_path / "s", 5, rec, buffer_bytes=64)  # tiny buffer: many flushes
    want = {p: [] for p in range(5)}
    rng = np.random.default_rng(0)
    for _ in range(20):
        r = np.zeros(7, rec)
        r["gid"] = rng.integers(0, 10**9, 7)
        parts = rng.integers(0, 5, 7)
        sp.add(parts, r)
        for p, g in zip(parts, r["gid"]):
            want[int(p)].append(int(g))
    sp.flush()
    assert all(sp.read(p)["gid"].tolist() == want[p] for p in range(5))
    assert sp.counts.sum() == 140
    sp.close()
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("block", [64, 10_000])
def test_exact_plan_is_brute_force_in_any_block_size(tmp_path, block):
    x = _clustered(n=500)
    store = _store(tmp_path, x, [120, 80, 300])
    plan = make_plan(500, x.shape[1], 6, "ip", types.SimpleNamespace(**{**vars(KNOBS), "flat_max": 10**6}), 1 << 30)
    assert plan.kind == "exact"
    plan.block = block
    got, consume = _collect()
    info = search(store, "embeddings", lambda i: np.ones(store.sizes[i], bool), plan, consume, tmp_path / "w")
    assert info["recall_at_k"] == 1.0 and sorted(got) == list(range(500))
    sims = np.stack([got[g][1] for g in range(500)])
    np.testing.assert_allclose(sims, _brute(x, 6), atol=1e-5)
    assert all(got[g][0][0] == g or got[g][1][0] >= 1 - 1e-5 for g in range(500))  # itself first (or a tie)


def test_ivf_plan_answers_every_row_once_and_measures_its_recall(tmp_path):
    x = _clustered(n=3000)
    store = _store(tmp_path, x, [1000, 1000, 1000])
    plan = make_plan(3000, x.shape[1], 11, "ip", KNOBS, 1 << 30)
    assert plan.kind == "ivf" and plan.nlist == 15 and plan.spill == 2
    got, consume = _collect()
    info = search(store, "embeddings", lambda i: np.ones(store.sizes[i], bool), plan, consume, tmp_path / "w",
                  recall_sample=300)
    assert sorted(got) == list(range(3000))
    truth = _brute(x, 11)
    mine = np.stack([got[g][1] for g in range(3000)])
    recall = float((mine >= truth[:, -1:] - 1e-4).mean())
    assert recall >= 0.9, recall
    assert abs(info["recall_at_k"] - recall) < 0.05  # the held-out estimate agrees with the full truth
    assert info["largest_list"] < 3000 and not (tmp_path / "w" / "ivf-embeddings").exists()


def test_selection_leaves_rows_out_as_queries_and_as_neighbours(tmp_path):
    x = _clustered(n=400)
    store = _store(tmp_path, x, [200, 200])
    drop = np.zeros(400, bool)
    drop[::3] = True

    def select(i):
        return ~drop[store.offsets[i]:store.offsets[i + 1]]

    s, ids = exact_neighbours(store, "embeddings", select, (None, x[:10]), 5, "ip", 128)
    assert not np.isin(ids, np.flatnonzero(drop)).any()
    keep = np.flatnonzero(~drop)
    np.testing.assert_allclose(s, np.sort(x[:10] @ x[keep].T, axis=1)[:, ::-1][:, :5], atol=1e-5)


def test_l2_metric_for_model_space(tmp_path):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((300, 8)) * 5).astype(np.float32)
    store = _store(tmp_path, x, [300])
    s, ids = exact_neighbours(store, "embeddings", lambda i: np.ones(300, bool), (None, x[:4]), 3, "l2", 50)
    d = ((x[:4, None] - x[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(ids, np.argsort(d, axis=1)[:, :3])
    assert (s[:, 0] == 0).all()


def test_ivf_lists_as_ray_tasks_give_the_same_neighbours(tmp_path, ray_session):
    x = _clustered(n=2000, seed=3)
    store = _store(tmp_path, x, [700, 1300])
    plan = make_plan(2000, x.shape[1], 6, "ip", KNOBS, 1 << 30)
    runs = []
    for parallel in (False, True):
        got, consume = _collect()
        info = search(store, "embeddings", lambda i: np.ones(store.sizes[i], bool), plan, consume,
                      tmp_path / f"w{parallel}", parallel=parallel)
        assert info["lists_as_ray_tasks"] is parallel
        runs.append(got)
    assert sorted(runs[0]) == sorted(runs[1]) == list(range(2000))
    for g in range(2000):
        np.testing.assert_array_equal(runs[0][g][0], runs[1][g][0])


@pytest.mark.parametrize("kind", ["exact", "ivf"])
def test_query_only_rows_find_neighbours_and_are_never_found(tmp_path, kind):
    """queries= adds rows that ask without being indexed (the pHash copies of duplicate search): each asks once,
    its neighbours are indexed rows only, and the indexed rows' answers do not change."""
    x = _clustered(n=3000)
    store = _store(tmp_path, x, [1000, 1000, 1000])
    outside = np.zeros(3000, bool)
    outside[::7] = True

    def part(mask):
        return lambda i: mask[store.offsets[i]:store.offsets[i + 1]]

    knobs = types.SimpleNamespace(**{**vars(KNOBS), "flat_max": 10**6 if kind == "exact" else 100})
    plan = make_plan(int((~outside).sum()), x.shape[1], 11, "ip", knobs, 1 << 30)
    assert plan.kind == kind
    got, consume = _collect()
    search(store, "embeddings", part(~outside), plan, consume, tmp_path / "w", recall_sample=200,
           queries=part(np.ones(3000, bool)))
    assert sorted(got) == list(range(3000))  # every row asked once, indexed or not
    nbrs = np.stack([got[g][0] for g in range(3000)])
    assert not np.isin(nbrs, np.flatnonzero(outside)).any()
    inside = np.flatnonzero(~outside)
    truth = np.sort(x @ x[inside].T, axis=1)[:, ::-1][:, :11]
    mine = np.stack([got[g][1] for g in range(3000)])
    hit = (mine >= truth[:, -1:] - 1e-4).mean()
    assert hit == 1.0 if kind == "exact" else hit >= 0.9, hit
