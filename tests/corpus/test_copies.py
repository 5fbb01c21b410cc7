"""Duplicate links of the corpus steps (scanner/corpus/keys.py, copies.py) against in-memory truth, in this process
and as Ray tasks, and groups that do not chain."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from corpus_parts import context, run, write_parts
from inmemory import find_duplicate_groups

from scanner.config import load_config
from scanner.corpus.copies import BYTES, PHASH, chunk_masks
from scanner.neighbours.phash import hamming_pairs


def _ctx(tmp_path, frames, executor="local", **sets):
    """Part files of `frames`, every row searched (each shard has an embeddings array), a 1 MiB budget: many
    partitions even for these small tables."""
    for f in frames:
        for c in ("error", "error_stage", "embed_error"):
            f[c] = None
    cfg = load_config(None, ["corpus.memory_gb=0.25", *[f"{k}={v}" for k, v in sets.items()]],
                      sections=("neighbours", "corpus"))
    arrays = {"embeddings": [np.ones((len(f), 2), np.float32) for f in frames]}
    return context(tmp_path, write_parts(tmp_path, frames, arrays), cfg, executor)


def _links(ctx, kind):
    b = ctx.executor.read(ctx.out, "corpus/copies")
    rows = list(ctx.executor.batches(b))
    e = np.concatenate([np.column_stack([r["a"], r["b"]])[r["kind"] == kind] for r in rows]) if rows else \
        np.zeros((0, 2), np.int64)
    return e


@pytest.mark.parametrize("executor", ["local", pytest.param("ray", marks=pytest.mark.slow)])
def test_repeated_keys_name_every_copy_and_its_shards(tmp_path, executor, request):
    if executor == "ray":
        request.getfixturevalue("ray_session")
    frames = [pd.DataFrame({"key": ["a", "b", "c", None]}), pd.DataFrame({"key": ["d", "b", "e", "a"]}),
              pd.DataFrame({"key": ["b", "f"]})]
    ctx = _ctx(tmp_path, frames, executor)
    run(ctx, "keys")
    from scanner.corpus.rows import repeated

    gids, errors = repeated(ctx.store)
    assert gids.tolist() == [0, 1, 5, 7, 8]  # a (twice), b (three times); the null key of a damaged shard is not
    assert "key 'b' is repeated: 3 samples carry it, in shards 00000, 00001, 00002" in errors[1]


def test_byte_copies_link_each_copy_to_the_first_row(tmp_path):
    rng = np.random.default_rng(0)
    sha = [f"{h:064x}" for h in rng.integers(0, 2**62, 300)]
    for i in (10, 150, 299):
        sha[i] = sha[3]
    sha[200] = sha[100]
    sha[7] = None
    ctx = _ctx(tmp_path, [pd.DataFrame({"key": [f"k{i}" for i in range(s, s + 100)], "sha256": sha[s:s + 100]})
                          for s in (0, 100, 200)])
    run(ctx, "keys", "copies")
    e = _links(ctx, BYTES)
    assert sorted(map(tuple, e.tolist())) == [(10, 3), (150, 3), (200, 100), (299, 3)]


@pytest.mark.parametrize(("r", "small_bucket", "executor"), [(0, 64, "local"), (1, 64, "local"), (2, 64, "local"),
                                                             (3, 64, "local"), (2, 1, "local"),
                                                             pytest.param(2, 64, "ray", marks=pytest.mark.slow)])
def test_phash_multi_index_hashing_finds_every_pair_brute_force_finds(tmp_path, monkeypatch, r, small_bucket,
                                                                      executor, request):
    from scanner.corpus import copies

    if executor == "ray":
        request.getfixturevalue("ray_session")
    monkeypatch.setattr(copies, "SMALL_BUCKET", small_bucket)  # 1: every bucket takes the blocked path
    rng = np.random.default_rng(r)
    h = rng.integers(0, 2**63, 2000, dtype=np.uint64)
    for j in range(60):  # planted pairs at every distance up to r + 1
        a, b = rng.choice(2000, 2, replace=False)
        flip = rng.choice(64, rng.integers(0, r + 2), replace=False)
        h[b] = h[a] ^ np.uint64(sum(1 << int(f) for f in flip))
    ctx = _ctx(tmp_path, [pd.DataFrame({"key": [f"k{i}" for i in range(s, s + 500)],
                                        "phash": h[s:s + 500].view(np.int64)}) for s in range(0, 2000, 500)],
               executor, **{"neighbours.phash_max_dist": r})
    run(ctx, "keys", "copies")
    e = _links(ctx, PHASH)
    # the same components as the all-pairs search (equal hashes may be chained, not all linked pairwise)
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    def comps(pairs):
        g = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(2000, 2000))
        return connected_components(g, directed=False)[1]

    want = hamming_pairs(h, r)
    assert len(want) >= 20  # planted pairs within r bits (the rest sit one bit beyond)
    np.testing.assert_array_equal(_canon(comps(e)), _canon(comps(want)))
    dist = np.bitwise_count(h[e[:, 0]] ^ h[e[:, 1]])
    assert (dist <= r).all()


def _canon(labels):
    _, first = np.unique(labels, return_index=True)
    remap = {labels[f]: j for j, f in enumerate(sorted(first))}
    return np.array([remap[v] for v in labels])


def test_chunks_cover_the_64_bits():
    for r in range(8):
        c = chunk_masks(r)
        assert len(c) == r + 1
        assert sum(int(m).bit_count() for _, m in c) == 64


def test_a_chain_of_near_duplicates_is_cut_into_balls_around_kept_images():
    """30 images along an arc, each at cosine 0.98 from the next: connected components would make one group
    whose ends are at cosine ~0.6. Every member must be within the threshold of its group's kept image."""
    theta = np.arccos(0.98) * np.arange(30)
    v = np.zeros((30, 8), np.float32)
    v[:, 0], v[:, 1] = np.cos(theta), np.sin(theta)
    keys = [f"k{i:02d}" for i in range(30)]
    df = find_duplicate_groups(keys, v, None, threshold=0.95, k=10)
    assert df.group_id.nunique() >= 4
    kept = df[df.keep].set_index("group_id").key
    for g, m in df.groupby("group_id"):
        centre = v[keys.index(kept[g])]
        assert (v[[keys.index(k) for k in m.key]] @ centre >= 0.95 - 1e-6).all()
        assert np.allclose(m.similarity[~m.keep], v[[keys.index(k) for k in m.key[~m.keep]]] @ centre, atol=1e-5)
    assert set(df.key) == set(keys)  # every image still has a group: each is within 0.95 of a neighbour
