"""Duplicate groups on vectors with known truth: passes, keep rule, removal list, pair metrics."""

from __future__ import annotations

import numpy as np
import pytest
from inmemory import find_duplicate_groups

from scanner.neighbours.dedup import duplicate_removals, pair_precision_recall
from scanner.neighbours.phash import hamming_pairs


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _planted(seed=0, n=200, d=16):
    """n random unit vectors; rows 1-2 near-copies of row 0; rows 11-14 byte copies of row 10 (but
    embedded far apart, so only the byte hash can link them); row 20 a near-copy of row 21."""
    rng = np.random.default_rng(seed)
    v = _unit(rng.standard_normal((n, d)))
    v[1:3] = _unit(v[0] + 0.02 * rng.standard_normal((2, d)))
    v[20] = _unit(v[21:22] + 0.02 * rng.standard_normal((1, d)))[0]
    keys = [f"k{i:04d}" for i in range(n)]
    hashes = [f"h{i}" for i in range(n)]
    for i in range(11, 15):
        hashes[i] = hashes[10]
    return keys, v, hashes


def test_groups_keep_one_and_link_reasons():
    keys, v, hashes = _planted()
    df = find_duplicate_groups(keys, v, hashes, threshold=0.95, k=5)
    groups = {g: sorted(m.key) for g, m in df.groupby("group_id")}
    assert sorted(groups.values()) == [["k0000", "k0001", "k0002"], ["k0010", "k0011", "k0012", "k0013", "k0014"],
                                       ["k0020", "k0021"]]
    # exactly one kept per group, and it is the lowest key when sizes are unknown
    kept = df[df.keep]
    assert kept.groupby("group_id").size().eq(1).all()
    assert sorted(kept.key) == ["k0000", "k0010", "k0020"]
    assert (df.loc[df.keep, "similarity"] == 1.0).all()
    link = dict(zip(df.key, df.link))
    assert link["k0011"] == "bytes" and link["k0001"] == "embedding"
    removal = duplicate_removals(df, shard_of={k: "00000" for k in keys})
    assert sorted(removal.key) == ["k0001", "k0002", "k0011", "k0012", "k0013", "k0014", "k0021"]
    assert set(removal.reason) == {"duplicate"} and set(removal.shard) == {"00000"}


def test_keep_rule_prefers_the_largest_image():
    keys, v, hashes = _planted()
    sizes = [32 * 32] * len(keys)
    sizes[2] = 64 * 64  # k0002 is the largest member of the first group
    df = find_duplicate_groups(keys, v, hashes, threshold=0.95, k=5, sizes=sizes)
    assert "k0002" in set(df[df.keep].key) and "k0000" not in set(df[df.keep].key)


def test_threshold_above_everything_leaves_only_byte_groups():
    keys, v, hashes = _planted()
    df = find_duplicate_groups(keys, v, hashes, threshold=1.01, k=5)
    assert sorted(df.key) == ["k0010", "k0011", "k0012", "k0013", "k0014"]


def test_external_index_gives_the_same_groups():
    from inmemory import build_index

    from scanner.config import NeighboursConfig

    keys, v, hashes = _planted()
    index, _ = build_index(v, NeighboursConfig(index="flat"))
    a = find_duplicate_groups(keys, v, hashes, threshold=0.95, k=5)
    b = find_duplicate_groups(keys, v, hashes, threshold=0.95, k=5, index=index)
    assert a[["key", "group_id", "keep"]].equals(b[["key", "group_id", "keep"]])


def test_phash_pass_links_near_exact_copies():
    keys, v, hashes = _planted()
    ph = np.arange(len(keys), dtype=np.uint64) << np.uint64(20)  # all far apart in Hamming distance
    ph[50] = ph[60] ^ np.uint64(0b101)  # 2 bits apart
    df = find_duplicate_groups(keys, v, hashes, threshold=0.95, k=5, phashes=ph, phash_max_dist=2)
    g = df.set_index("key").group_id
    assert g["k0050"] == g["k0060"] and df.set_index("key").link["k0050"] == "phash"
    df0 = find_duplicate_groups(keys, v, hashes, threshold=0.95, k=5, phashes=ph, phash_max_dist=1)
    assert "k0050" not in set(df0.key)


def test_hamming_pairs_exact_and_blocked_agree():
    rng = np.random.default_rng(0)
    h = rng.integers(0, 2**63, 300, dtype=np.uint64)
    h[100] = h[5]
    h[200] = h[7] ^ np.uint64(1 << 40)
    assert {tuple(p) for p in hamming_pairs(h, 0)} == {(5, 100)}
    assert {tuple(p) for p in hamming_pairs(h, 1, block=64)} == {(5, 100), (7, 200)}


def test_pair_precision_recall_counts_pairs():
    truth = {"a": 1, "b": 1, "c": 1, "d": 2, "e": 2, "f": None}
    perfect = pair_precision_recall(truth, truth)
    assert perfect["pair_precision"] == perfect["pair_recall"] == 1.0 and perfect["true_pairs"] == 4
    merged = pair_precision_recall({"a": 0, "b": 0, "c": 0, "d": 0, "e": 0}, truth)  # 10 pairs, 4 right
    assert merged["pair_precision"] == pytest.approx(0.4) and merged["pair_recall"] == 1.0
    split = pair_precision_recall({"a": 0, "b": 0, "d": 1, "e": 1}, truth)  # finds ab and de of 4
    assert split["pair_precision"] == 1.0 and split["pair_recall"] == pytest.approx(0.5)


def test_pair_precision_recall_over_non_identical_pairs_leaves_byte_copies_out():
    # a, b and c are one picture, a and b byte-identical; d is a stranger the prediction joined to them
    truth = {"a": 1, "b": 1, "c": 1}
    sha = {"a": "h1", "b": "h1", "c": "h2", "d": "h3"}
    every = pair_precision_recall({"a": 0, "b": 0, "c": 0, "d": 0}, truth)
    assert (every["predicted_pairs"], every["correct_pairs"]) == (6, 3) and every["pair_precision"] == 0.5
    distinct = pair_precision_recall({"a": 0, "b": 0, "c": 0, "d": 0}, truth, content=sha)
    # ab is left out: 5 predicted pairs, of which ac and bc are right; the true ones are ac and bc
    assert (distinct["predicted_pairs"], distinct["correct_pairs"], distinct["true_pairs"]) == (5, 2, 2)
    assert distinct["pair_precision"] == pytest.approx(0.4) and distinct["pair_recall"] == 1.0
    # finding only the byte copy finds none of the pairs that need more than a byte hash
    bytes_only = pair_precision_recall({"a": 0, "b": 0}, truth, content=sha)
    assert bytes_only["pair_recall"] == 0.0 and bytes_only["predicted_pairs"] == 0
    # without a hash a key counts as distinct bytes: the plain count
    assert pair_precision_recall(truth, truth, content={}) == pair_precision_recall(truth, truth)


def test_duplicate_keys_are_refused():
    with pytest.raises(ValueError, match="'x'"):
        find_duplicate_groups(["x", "x"], _unit(np.ones((2, 4))), None, threshold=0.9)


def test_an_original_linked_to_each_edit_keeps_the_whole_family():
    """A near-duplicate family as the demo plants it: the original (k0003) linked to three edits that are not linked
    to each other. Taken in key order the first edit (k0000) would be a centre holding only the original, and the
    other two edits would be left alone; the most-linked unit goes first, so one group holds all four."""
    rng = np.random.default_rng(3)
    d = 16
    base = _unit(rng.standard_normal((1, d)))[0]
    orth = np.linalg.qr(np.c_[base, rng.standard_normal((d, 3))])[0][:, 1:].T  # 3 unit directions _|_ base
    edits = _unit(0.955 * base + 0.2966 * orth)  # cosine 0.955 to the original, 0.912 to each other
    others = _unit(rng.standard_normal((6, d)))
    v = np.vstack([edits[0], edits[1], edits[2], base, others]).astype(np.float32)
    keys = [f"k{i:04d}" for i in range(len(v))]
    df = find_duplicate_groups(keys, v, None, threshold=0.93, k=5)
    assert sorted(df.key) == ["k0000", "k0001", "k0002", "k0003"] and df.group_id.nunique() == 1
    assert df.set_index("key").keep["k0003"]  # the original is kept, every edit within 0.93 of it
    assert (df.similarity >= 0.93).all()
    # the size still comes first: a larger edit is kept, and its siblings it is not linked to stay out
    sizes = [64 * 64] + [32 * 32] * (len(v) - 1)
    big = find_duplicate_groups(keys, v, None, threshold=0.93, k=5, sizes=sizes)
    assert sorted(big.key) == ["k0000", "k0003"] and big.set_index("key").keep["k0000"]
