"""On a GPU, the adapters give the CPU's eps, JVP and encodings within precision-dependent tolerances.

The same tiny random checkpoints as tests/models (its conftest builds them), loaded twice: float32 on
the CPU as the reference, then on cuda in float32 (cuDNN may use TF32 convolutions: ~1e-3) and in
float16 / bfloat16 (the production setting for SD; run on the CPU, these gave at worst 0.8 % and
4.4 % relative error on the JVP).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from scanner.models.latent import LatentSDScoreModel
from scanner.models.pixel import PixelScoreModel

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]

# Relative L2 error allowed per forward dtype.
TOLERANCE = {"float32": 5e-3, "float16": 3e-2, "bfloat16": 1e-1}  # CPU-simulated: 0.8 % and 4.4 % worst


def _tiny_builders():
    # The builders live in tests/models/conftest.py, which pytest only offers to tests below it.
    spec = importlib.util.spec_from_file_location("tiny_components", Path(__file__).parent / "models" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.cpu() - b.cpu()).norm() / b.cpu().norm()).item()


def _eps_and_jvp(model, x, t, cond):
    with model.jvp_context():
        return torch.func.jvp(lambda x: model.eps(x, t, cond), (x,), (torch.ones_like(x),))


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    builders = _tiny_builders()
    pixel = builders.save_tiny_pixel(tmp_path_factory.mktemp("pixel"))
    return pixel, builders.save_tiny_sd(tmp_path_factory.mktemp("sd"))


@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_pixel_eps_and_jvp_agree_with_cpu(tiny_dirs, dtype):
    cpu = PixelScoreModel.from_pretrained(tiny_dirs[0])
    gpu = PixelScoreModel.from_pretrained(tiny_dirs[0], device="cuda", dtype=dtype)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8, generator=g)
    x, t = cpu.encode_images(images), torch.tensor([0.05, 0.1, 0.3, 0.6])
    eps_cpu, jvp_cpu = _eps_and_jvp(cpu, x, t, None)
    eps_gpu, jvp_gpu = _eps_and_jvp(gpu, gpu.encode_images(images.cuda()), t.cuda(), None)
    assert eps_gpu.dtype == jvp_gpu.dtype == torch.float32  # geometry stays float32 whatever the forward dtype
    assert _rel(eps_gpu, eps_cpu) < TOLERANCE[dtype]
    assert _rel(jvp_gpu, jvp_cpu) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_latent_encodings_eps_and_jvp_agree_with_cpu(tiny_dirs, dtype):
    cpu = LatentSDScoreModel.from_pretrained(tiny_dirs[1])
    gpu = LatentSDScoreModel.from_pretrained(tiny_dirs[1], device="cuda", dtype=dtype)
    images = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    captions = ["a cat", "a dog"]
    x_cpu, x_gpu = cpu.encode_images(images), gpu.encode_images(images.cuda())
    cond_cpu, cond_gpu = cpu.encode_text(captions), gpu.encode_text(captions)
    assert _rel(x_gpu, x_cpu) < 5e-3 and _rel(cond_gpu, cond_cpu) < 5e-3  # VAE and CLIP run float32 everywhere
    t = torch.tensor([0.02, 0.3])
    eps_cpu, jvp_cpu = _eps_and_jvp(cpu, x_cpu, t, cond_cpu)
    eps_gpu, jvp_gpu = _eps_and_jvp(gpu, x_cpu.cuda(), t.cuda(), cond_gpu)
    assert eps_gpu.dtype == jvp_gpu.dtype == torch.float32
    assert _rel(eps_gpu, eps_cpu) < TOLERANCE[dtype]
    assert _rel(jvp_gpu, jvp_cpu) < TOLERANCE[dtype]
    uncond_cpu, _ = _eps_and_jvp(cpu, x_cpu, t, None)
    uncond_gpu, _ = _eps_and_jvp(gpu, x_cpu.cuda(), t.cuda(), None)
    assert _rel(uncond_gpu, uncond_cpu) < TOLERANCE[dtype]


def test_latent_demo_model_scores_agree_with_cpu(tmp_path_factory):
    """The latent demo's own kind of model (trained here for a few steps: SD layout, locally written tokenizer),
    every score column from compute_scores on cuda against the CPU, float32 forward (issue 17, item 5)."""
    from scanner.config import GeometryConfig
    from scanner.demo.corpus import build_demo_corpus
    from scanner.demo.latent import RESOLUTION, train_latent_demo
    from scanner.demo.train import load_images
    from scanner.geometry.mirror import pixel_mirrors
    from scanner.geometry.scores import compute_scores
    from scanner.geometry.trace import row_seeds

    corpus = build_demo_corpus(tmp_path_factory.mktemp("lc"), n_unique=30, n_repeated=2, repeat_copies=4,
                               n_oversampled=1, n_exact_dup_groups=1, n_near_dup_groups=1, n_corrupt=0,
                               n_no_caption=0, captions="unique", truncate_last_shard=False, seed=5)
    model_dir = train_latent_demo(corpus.out_dir, tmp_path_factory.mktemp("lm") / "m", steps=20, vae_steps=20,
                                  batch_size=16, progress=False)
    data = load_images(corpus.out_dir, RESOLUTION, 3)
    images, captions, keys = torch.from_numpy(data.images[:8]), data.captions[:8], data.keys[:8]
    cfg = GeometryConfig(probes=2, flipd_noises=2, p_values=[1.0, 2.0])
    cols = {}
    for device in ("cpu", "cuda"):
        model = LatentSDScoreModel.from_pretrained(model_dir, device=device)
        x = model.encode_images(images.to(device))
        refs = pixel_mirrors(model, images.to(device), cfg.cal_refs)
        cols[device] = compute_scores(model, x, cfg, model.encode_text(captions), seeds=row_seeds(keys, cfg.seed),
                                      x_refs=refs)
    assert cols["cpu"].keys() == cols["cuda"].keys() and "cfg_norm" in cols["cpu"]
    for name, ref in cols["cpu"].items():
        assert _rel(cols["cuda"][name], ref) < TOLERANCE["float32"], name
