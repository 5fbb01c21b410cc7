"""Exact and approximate faiss indexes agree on small data; recall is measured, not assumed."""

from __future__ import annotations

import numpy as np
import pytest
from inmemory import build_index, exact_knn, knn, measure_recall

from scanner.config import NeighboursConfig


def _vectors(n=3000, d=32, seed=0):
    """Clustered unit vectors with planted near-duplicates (like image embeddings, unlike an isotropic cloud)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((30, d)).astype(np.float32)
    x = centres[rng.integers(0, 30, n)] + 0.5 * rng.standard_normal((n, d)).astype(np.float32)
    x[n // 2: n // 2 + 100] = x[:100] + 0.01 * rng.standard_normal((100, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_flat_is_exact():
    x = _vectors()
    index, info = build_index(x, NeighboursConfig(index="auto", flat_max=10_000))
    assert info["kind"] == "flat" and info["recall_at_k"] == 1.0
    sims, ids = knn(index, x[:50], 5)
    ref_sims, _ = exact_knn(x, x[:50], 5)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)
    assert (ids[:, 0] == np.arange(50)).all()  # each vector is its own nearest neighbour


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_agrees_with_exact(kind):
    x = _vectors()
    cfg = NeighboursConfig(index=kind, k=10, recall_sample=300)
    index, info = build_index(x, cfg)
    assert info["kind"] == kind and info["recall_at_k"] >= 0.99, info
    # held-out queries: recall of the tuned index against exact search
    assert measure_recall(index, x, k=10, sample=300, seed=7) >= 0.98
    # the planted near-duplicates are found by both
    _, ids = knn(index, x[:100], 2)
    half = len(x) // 2
    assert (ids[:, 1] == np.arange(half, half + 100)).mean() >= 0.99


def test_auto_switches_to_approximate_above_flat_max():
    import faiss

    x = _vectors(n=2000)
    _, info = build_index(x, NeighboursConfig(index="auto", flat_max=1000, k=10, recall_sample=200))
    assert info["kind"] == ("ivf" if faiss.get_num_gpus() > 0 else "hnsw")
    assert 0.99 <= info["recall_at_k"] <= 1.0


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"\(N, d\)"):
        build_index(np.zeros(5, np.float32), NeighboursConfig())
    cfg = NeighboursConfig()
    cfg.index = "lsh"  # bypasses config validation on purpose
    with pytest.raises(ValueError, match="'lsh'"):
        build_index(_vectors(n=300), cfg)


def test_probe_reaches_cpu_ivf_and_hnsw_indexes():
    import faiss
    from inmemory import _set_probe

    x = _vectors(n=1000)
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(32), 32, 8, faiss.METRIC_INNER_PRODUCT)
    ivf.train(x)
    _set_probe(ivf, "ivf", 5)
    assert ivf.nprobe == 5
    hnsw = faiss.IndexHNSWFlat(32, 8, faiss.METRIC_INNER_PRODUCT)
    _set_probe(hnsw, "hnsw", 40)
    assert hnsw.hnsw.efSearch == 40


def test_probe_on_a_gpu_index_goes_through_the_gpu_parameter_space(monkeypatch):
    """faiss.ParameterSpace raises on an index moved to a GPU (issue #33): a GPU IVF index gets its nprobe from
    GpuParameterSpace. Without a GPU the dispatch is checked on stand-ins for both faiss classes."""
    import faiss
    from inmemory import _set_probe

    calls = []

    class FakeGpuIVF:
        nprobe = 1

    class FakeGpuSpace:
        def set_index_parameter(self, index, name, value):
            calls.append((name, value))
            setattr(index, name, value)

    class CpuSpaceRefuses:
        def set_index_parameter(self, *a):
            raise RuntimeError("ParameterSpace on a GPU index")

    monkeypatch.setattr(faiss, "GpuIndexIVF", FakeGpuIVF, raising=False)
    monkeypatch.setattr(faiss, "GpuParameterSpace", FakeGpuSpace, raising=False)
    monkeypatch.setattr(faiss, "ParameterSpace", CpuSpaceRefuses)
    index = FakeGpuIVF()
    _set_probe(index, "ivf", 7)
    assert calls == [("nprobe", 7)] and index.nprobe == 7


@pytest.mark.gpu
def test_ivf_on_the_gpu_reaches_its_recall():
    import faiss

    if faiss.get_num_gpus() == 0:
        pytest.skip("faiss sees no GPU")
    x = _vectors()
    _, info = build_index(x, NeighboursConfig(index="ivf", k=10, recall_sample=300))
    assert info["device"] == "gpu" and info["recall_at_k"] >= 0.99 and info["nprobe"] >= 1, info
