"""The embedder's training sample: bounded by embedder_max_images, read from as few shards as hold it, seeded."""

from __future__ import annotations

import numpy as np

from scanner.data.load import load_images
from scanner.demo.corpus import build_demo_corpus
from scanner.neighbours.train_embedder import training_sample, unique_by_bytes


def test_sample_is_bounded_seeded_and_whole_when_the_corpus_fits(tmp_path):
    corpus = build_demo_corpus(tmp_path / "c", n_unique=80, n_repeated=1, repeat_copies=5, n_oversampled=1,
                               n_exact_dup_groups=2, n_near_dup_groups=1, n_corrupt=1, n_no_caption=1,
                               samples_per_shard=15, truncate_last_shard=False, seed=0)
    shards = str(tmp_path / "c" / "shards")
    n_shards = len(corpus.shards)
    assert n_shards >= 6
    # the whole corpus fits: the same images, in the same order, as decoding every shard
    _, everything, _, hashes = load_images(shards, 16)
    images, _, read, total = training_sample(shards, 16, max_images=10_000, seed=0)
    assert read == total == n_shards
    np.testing.assert_array_equal(images, unique_by_bytes(everything, hashes))
    # a bound of 20 distinct images: 20 images, from only the shards needed to hold them (15 samples each)
    small, _, read, _ = training_sample(shards, 16, max_images=20, seed=0)
    assert len(small) == 20 and 2 <= read <= 3
    again, _, _, _ = training_sample(shards, 16, max_images=20, seed=0)
    np.testing.assert_array_equal(small, again)  # same seed, same sample
    other, _, _, _ = training_sample(shards, 16, max_images=20, seed=1)
    assert not np.array_equal(small, other)  # another seed reads other shards
