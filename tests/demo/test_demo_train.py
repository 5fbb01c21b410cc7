"""The demo trainer on a tiny corpus and a tiny UNet: saves, reloads, learns, oversamples, is seeded."""

import json
import tarfile

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from scanner.demo.corpus import build_demo_corpus
from scanner.demo.train import draw_batch, eps_norm_auroc, sample_check, sample_weights, train_demo

TINY_MODEL = {"resolution": 8, "block_out_channels": (8, 16), "norm_num_groups": 8, "layers_per_block": 1,
              "batch_size": 32, "lr": 3e-3, "warmup_steps": 0, "progress": False,
              "num_threads": 1}  # a model this small gains nothing from threads; on a busy 2-core box they spin


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_demo_corpus(tmp_path_factory.mktemp("corpus"), n_unique=60, n_repeated=2, repeat_copies=20,
                             n_oversampled=3, n_exact_dup_groups=2, n_near_dup_groups=2, n_corrupt=2,
                             n_no_caption=2, samples_per_shard=50, seed=3)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    return train_demo(corpus.out_dir, tmp_path_factory.mktemp("model"), steps=40, seed=0, **TINY_MODEL)


def test_saves_and_reloads_with_from_pretrained(trained, corpus):
    unet = UNet2DModel.from_pretrained(trained / "unet", low_cpu_mem_usage=False)
    scheduler = DDPMScheduler.from_pretrained(trained / "scheduler")
    assert (trained / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert unet.config.sample_size == 8 and unet.config.in_channels == 3
    assert scheduler.config.num_train_timesteps == 1000 and scheduler.config.beta_schedule == "linear"
    x = torch.zeros(2, 3, 8, 8)
    assert unet(x, torch.tensor([10, 500])).sample.shape == x.shape
    info = json.loads((trained / "train_info.json").read_text())
    assert info["steps"] == 40 and info["resolution"] == 8
    # what decides whether another machine trains these same weights (results/repro.md)
    assert info["machine"]["torch_threads"] == TINY_MODEL["num_threads"]  # the training's threads, not the default
    assert info["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    import pandas as pd

    truth = pd.read_parquet(corpus.truth)
    assert sorted(info["oversampled_keys"]) == sorted(truth.key[truth.planted == "oversampled"])
    assert info["n_skipped"] >= 2  # the corrupt images (and the truncated shard's break)


def test_loss_decreases(trained):
    curve = json.loads((trained / "train_info.json").read_text())["loss_curve"]
    assert np.mean(curve[-5:]) < np.mean(curve[:5]) - 0.05, curve


def test_same_seed_same_weights(trained, corpus, tmp_path):
    again = train_demo(corpus.out_dir, tmp_path / "again", steps=40, seed=0, **TINY_MODEL)
    a = UNet2DModel.from_pretrained(trained / "unet", low_cpu_mem_usage=False).state_dict()
    b = UNet2DModel.from_pretrained(again / "unet", low_cpu_mem_usage=False).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_steps_not_the_clock_decide_the_model_and_a_time_cap_warns(trained, corpus, tmp_path, caplog):
    info = json.loads((trained / "train_info.json").read_text())
    assert info["stopped_by"] == "steps" and info["steps_requested"] == 40
    with caplog.at_level("WARNING", logger="memscan"):
        capped = train_demo(corpus.out_dir, tmp_path / "capped", steps=40, seed=0, time_budget_s=0.0, **TINY_MODEL)
    info = json.loads((capped / "train_info.json").read_text())
    assert info["stopped_by"] == "time_budget" and info["steps"] == 1
    assert "stopped training after 1 of 40 steps" in caplog.text


def test_oversampled_keys_drawn_factor_times_as_often():
    planted = ["unique"] * 95 + ["oversampled"] * 5
    w = sample_weights(planted, oversample_factor=30)
    counts = torch.bincount(draw_batch(w, 400_000, torch.Generator().manual_seed(0)), minlength=100).double()
    ratio = counts[95:].mean() / counts[:95].mean()
    assert 28 < ratio < 32, ratio
    with pytest.raises(ValueError, match="oversample_factor must be >= 1, got 0.5"):
        sample_weights(planted, 0.5)


def test_checks_run_on_the_saved_model(trained, corpus):
    auc = eps_norm_auroc(trained, corpus.out_dir, t=100)
    assert 0 <= auc["auroc_repeated"] <= 1 and 0 <= auc["auroc_oversampled"] <= 1
    check = sample_check(trained, corpus.out_dir, n=8, num_inference_steps=2)
    shares = [check[c]["nearest"] for c in ("repeated", "oversampled", "unique")]
    assert 0 <= sum(shares) <= 1 and check["oversampled"]["share_of_draws"] > check["oversampled"]["share_of_corpus"]


def test_a_cached_demo_corpus_of_another_seed_or_design_is_refused(tmp_path):
    from scanner.demo.run import ensure_demo_corpus

    out = tmp_path / "demo"
    corpus = ensure_demo_corpus(out, seed=1, quick=True)
    assert ensure_demo_corpus(out, seed=1, quick=True) == corpus  # cached
    quick = "'quick': True, 'n_heldout': 100"
    with pytest.raises(ValueError, match=r"built with \{'seed': 1, 'dose_copies': None, 'captions': 'template', "
                       + quick + r"\}, not \{'seed': 0"):
        ensure_demo_corpus(out, seed=0, quick=True)
    with pytest.raises(ValueError, match=r"not \{'seed': 1, 'dose_copies': \[2, 4, 8, 16, 32\], 'captions': 'template', "
                       + quick + r"\}: use another --out"):
        ensure_demo_corpus(out, seed=1, quick=True, dose=True)
    assert ensure_demo_corpus(out, seed=1, quick=None) == corpus  # train-demo: whatever size is cached
    # the quick corpus is not the full demo's
    with pytest.raises(ValueError, match=r"not \{'seed': 1, 'dose_copies': None, 'captions': 'template', 'quick': "
                       r"False, 'n_heldout': 2000\}"):
        ensure_demo_corpus(out, seed=1)


def test_a_cached_corpus_with_another_heldout_size_gets_a_new_heldout_shard_and_keeps_its_shards(tmp_path,
                                                                                               monkeypatch):
    """Corpora cached before the held-out set grew (500 images, no n_heldout recorded): the corpus and so the
    model stay valid, only heldout/ is rebuilt at today's size; shards that are not this memscan's are refused."""
    from scanner.demo import run as demo

    monkeypatch.setitem(demo.QUICK_CORPUS, "n_heldout", 40)
    out = tmp_path / "demo"
    old = build_demo_corpus(out / "corpus", seed=1, **{**demo.QUICK_CORPUS, "n_heldout": 25})
    params = json.loads(old.manifest.read_text())["params"]
    del params["n_heldout"]  # as an older memscan wrote it; read as 500
    old.manifest.write_text(json.dumps({**json.loads(old.manifest.read_text()), "params": params}))
    before = {f.name: f.read_bytes() for f in old.shards}
    assert demo.ensure_demo_corpus(out, seed=1, quick=True) == out / "corpus"
    assert {f.name: f.read_bytes() for f in old.shards} == before
    manifest = json.loads(old.manifest.read_text())
    assert manifest["params"]["n_heldout"] == 40 and manifest["heldout"]["n_images"] == 40
    with tarfile.open(out / "corpus" / "heldout" / "00000.tar") as tf:
        assert len([m for m in tf.getnames() if m.endswith(".jpg")]) == 40
    assert not (out / "corpus.heldout-tmp").exists()
    # a shard this memscan would not build: refused, nothing replaced
    monkeypatch.setitem(demo.QUICK_CORPUS, "n_heldout", 30)
    old.shards[0].write_bytes(b"not the demo's shard")
    with pytest.raises(ValueError, match="is not the shard this memscan builds"):
        demo.ensure_demo_corpus(out, seed=1, quick=True)
    assert json.loads(old.manifest.read_text())["params"]["n_heldout"] == 40
