"""k nearest neighbours out of core (scanner/corpus/search.py) against brute force on vectors with known truth: the
exact plan, and the inverted file built and searched as tasks (in this process and as Ray tasks)."""

from __future__ import annotations

import types

import numpy as np
import pandas as pd
import pytest
from corpus_parts import split, write_parts

from scanner.corpus.executor import LocalExecutor, RayExecutor
from scanner.corpus.search import exact_neighbours, make_plan, search
from scanner.corpus.store import PartStore
from scanner.storage import Out


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


def consume(qg, nbr, s, _rows):
    """Every answer as records (what a step's consumer returns)."""
    return {"q": np.asarray(qg, np.int64), "nbr": np.asarray(nbr, np.int64), "sims": np.asarray(s, np.float32)}


def _run(tmp_path, store, plan, ex=None, **kw):
    """search() with the records collected: ({query gid: (neighbour gids, sims)}, info); a query answered twice
    fails."""
    ex = ex or LocalExecutor()
    t, info = search(store, "embeddings", kw.pop("select", lambda i: np.ones(store.sizes[i], bool)), plan, consume,
                     ex, side=(Out(tmp_path), "side"), **kw)
    got = {}
    for b in ex.batches(t):
        for g, i, v in zip(b["q"], b["nbr"], b["sims"]):
            assert int(g) not in got, "a row was a query twice"
            got[int(g)] = (np.asarray(i), np.asarray(v))
    return got, info


KNOBS = types.SimpleNamespace(index="auto", flat_max=100, list_size=200, spill=2)


@pytest.mark.parametrize("block", [64, 10_000])
def test_exact_plan_is_brute_force_in_any_block_size(tmp_path, block):
    x = _clustered(n=500)
    store = _store(tmp_path, x, [120, 80, 300])
    plan = make_plan(500, x.shape[1], 6, "ip", types.SimpleNamespace(**{**vars(KNOBS), "flat_max": 10**6}), 1 << 30)
    assert plan.kind == "exact"
    plan.block = block
    got, info = _run(tmp_path, store, plan)
    assert info["recall_at_k"] == 1.0 and sorted(got) == list(range(500))
    sims = np.stack([got[g][1] for g in range(500)])
    np.testing.assert_allclose(sims, _brute(x, 6), atol=1e-5)
    assert all(got[g][0][0] == g or got[g][1][0] >= 1 - 1e-5 for g in range(500))  # itself first (or a tie)


@pytest.mark.parametrize("quantizer", ["exact", "hnsw"])
def test_ivf_plan_answers_every_row_once_and_measures_its_recall(tmp_path, quantizer, monkeypatch):
    """Either coarse quantizer (exact at this size; the HNSW graph that larger corpora get, forced here)."""
    import scanner.corpus.search as search_module

    if quantizer == "hnsw":
        monkeypatch.setattr(search_module, "EXACT_MAX_LISTS", 0)
    x = _clustered(n=3000)
    store = _store(tmp_path, x, [1000, 1000, 1000])
    plan = make_plan(3000, x.shape[1], 11, "ip", KNOBS, 1 << 30)
    assert plan.kind == "ivf" and plan.nlist == 15 and plan.spill == 2
    got, info = _run(tmp_path, store, plan, recall_sample=300)
    assert sorted(got) == list(range(3000))
    truth = _brute(x, 11)
    mine = np.stack([got[g][1] for g in range(3000)])
    recall = float((mine >= truth[:, -1:] - 1e-4).mean())
    assert recall >= 0.9, recall
    assert abs(info["recall_at_k"] - recall) < 0.05  # the held-out estimate agrees with the full truth
    assert info["quantizer"].startswith({"exact": "exact", "hnsw": "HNSW"}[quantizer]), info["quantizer"]
    assert not (tmp_path / "side").exists()  # the side answers are cleaned up


def test_the_coarse_quantizer_is_exact_up_to_its_limit_and_a_graph_above():
    """At most exact_max centroids: a flat index, the true nearest lists of every row; above, an HNSW graph, which
    on 200 well-separated centroids (its search breadth 64) finds the same first list for nearly every row."""
    from scanner.corpus.search import coarse_quantizer, quantizer_name

    rng = np.random.default_rng(3)
    c = rng.standard_normal((200, 16)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = (c[rng.integers(0, 200, 2000)] + 0.05 * rng.standard_normal((2000, 16))).astype(np.float32)
    truth = np.argsort(-(x @ c.T), axis=1)[:, :2]
    flat = coarse_quantizer(c, "ip", 2, exact_max=200)
    assert quantizer_name(flat) == "exact over the centroids"
    np.testing.assert_array_equal(flat.search(x, 2)[1], truth)
    graph = coarse_quantizer(c, "ip", 2, exact_max=199)
    assert quantizer_name(graph).startswith("HNSW")
    assert (graph.search(x, 2)[1][:, 0] == truth[:, 0]).mean() >= 0.99


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
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import a test module
    x = _clustered(n=2000, seed=3)
    store = _store(tmp_path, x, [700, 1300])
    plan = make_plan(2000, x.shape[1], 6, "ip", KNOBS, 1 << 30)
    runs = []
    for ex in (LocalExecutor(), RayExecutor(1 << 30)):
        got, info = _run(tmp_path, store, plan, ex)
        assert info["lists_as_tasks"] == ex.kind
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
    got, _ = _run(tmp_path, store, plan, select=part(~outside), recall_sample=200, queries=part(np.ones(3000, bool)))
    assert sorted(got) == list(range(3000))  # every row asked once, indexed or not
    nbrs = np.stack([got[g][0] for g in range(3000)])
    assert not np.isin(nbrs, np.flatnonzero(outside)).any()
    inside = np.flatnonzero(~outside)
    truth = np.sort(x @ x[inside].T, axis=1)[:, ::-1][:, :11]
    mine = np.stack([got[g][1] for g in range(3000)])
    hit = (mine >= truth[:, -1:] - 1e-4).mean()
    assert hit == 1.0 if kind == "exact" else hit >= 0.9, hit
