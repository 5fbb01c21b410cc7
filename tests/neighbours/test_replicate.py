"""Replications: seeded generation through the diffusers pipeline loaded from a local dir, then matching."""

from __future__ import annotations

import numpy as np
import pytest
from inmemory import build_index

from scanner.config import NeighboursConfig
from scanner.neighbours.replicate import find_replications, generate_samples


@pytest.fixture(scope="module")
def pixel_model_dir(tmp_path_factory):
    """A tiny untrained UNet2DModel + DDPMScheduler in the pixel layout (model_dir/unet, model_dir/scheduler)."""
    import diffusers
    import torch

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("pixel_model")
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    unet.save_pretrained(d / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=100).save_pretrained(d / "scheduler")
    return d


def test_generation_is_seeded_and_rgb_uint8(pixel_model_dir):
    a, meta = generate_samples(pixel_model_dir, n=3, seed=5, steps=2, batch_size=2)
    assert a.shape == (3, 8, 8, 3) and a.dtype == np.uint8
    assert [m["seed"] for m in meta] == [5, 6, 7] and [m["gen_id"] for m in meta] == [0, 1, 2]
    assert all(m["caption"] is None for m in meta)
    b, _ = generate_samples(pixel_model_dir, n=3, seed=5, steps=2, batch_size=3)  # batching changes nothing
    np.testing.assert_array_equal(a, b)
    c, _ = generate_samples(pixel_model_dir, n=1, seed=6, steps=2)  # each generation regenerates alone
    np.testing.assert_array_equal(a[1], c[0])


def test_not_a_model_dir_is_named(tmp_path):
    with pytest.raises(ValueError, match="not a diffusers model directory"):
        generate_samples(tmp_path, n=1, steps=1)


def test_find_replications_matches_training_neighbour():
    rng = np.random.default_rng(0)
    train = rng.standard_normal((100, 16)).astype(np.float32)
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    keys = [f"t{i:03d}" for i in range(100)]
    index, _ = build_index(train, NeighboursConfig(index="flat"))
    gen = np.stack([train[42] + 0.01 * rng.standard_normal(16), rng.standard_normal(16)]).astype(np.float32)
    gen /= np.linalg.norm(gen, axis=1, keepdims=True)
    meta = [{"gen_id": 0, "caption": "a cat", "seed": 10}, {"gen_id": 1, "caption": "a dog", "seed": 11}]
    reps = find_replications(gen, meta, index, keys, threshold=0.9)
    assert list(reps.columns[:5]) == ["gen_id", "caption", "seed", "matched_key", "similarity"]
    assert reps.gen_id.tolist() == [0] and reps.matched_key.tolist() == ["t042"] and reps.similarity[0] > 0.99
    everything = find_replications(gen, meta, index, keys, threshold=0.9, keep_all=True)
    assert everything.replicated.tolist() == [True, False]


def test_text_conditional_generation_takes_missing_captions_as_the_empty_prompt(tiny_sd_dir):
    # A sample without a .txt reads back from parquet as None or NaN; the tokenizer refused NaN and the whole
    # replication check failed on the latent demo (40 such samples) until both became the empty prompt.
    imgs, meta = generate_samples(tiny_sd_dir, n=3, seed=0, steps=2, captions=["a cat", float("nan"), None])
    assert imgs.shape[0] == 3 and [m["caption"] for m in meta] == ["a cat", "", ""]
    alone, _ = generate_samples(tiny_sd_dir, n=1, seed=1, steps=2, captions=[""])
    np.testing.assert_array_equal(imgs[1], alone[0])  # NaN generated exactly as the empty prompt
