"""LatentSDScoreModel against the VAE, UNet, CLIP text encoder and scheduler it wraps (tiny, CPU)."""

from __future__ import annotations

import pytest
import torch


def test_shapes_resolution_and_schedule(sd_model):
    assert sd_model.sample_shape == (4, 8, 8)  # 16 px images, VAE downsamples x2
    assert sd_model.resolution == 16 and sd_model.dim == 256
    assert sd_model.conditional is True
    t = torch.tensor([0.02, 0.3])
    psi, sigma = sd_model.psi_sigma(t)
    # SD's scaled-linear schedule: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)[torch.tensor([20, 300])]
    torch.testing.assert_close(psi, alpha_bar.sqrt().float())
    torch.testing.assert_close(psi**2 + sigma**2, torch.ones(2))


def test_encode_images_is_the_scaled_posterior_mean(sd_model):
    images = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = sd_model.encode_images(images)
    assert x.shape == (2, 4, 8, 8) and x.dtype == torch.float32
    pixels = images.permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        mean = sd_model.vae.encode(pixels).latent_dist.mean
    torch.testing.assert_close(x, mean * sd_model.vae.config.scaling_factor)
    torch.testing.assert_close(sd_model.encode_images(images), x)  # the mean, not a sample: deterministic


def test_encode_text_and_uncond(sd_model):
    cond = sd_model.encode_text(["a cat", "a dog", None, ""])
    assert cond.shape == (4, 12, 16) and cond.dtype == torch.float32
    assert not torch.allclose(cond[0], cond[1])
    torch.testing.assert_close(cond[2], cond[3])  # None is the empty prompt
    uncond = sd_model.uncond(3)
    assert uncond.shape == (3, 12, 16)
    torch.testing.assert_close(uncond, sd_model.encode_text([""] * 3))


def test_eps_equals_the_unet_with_the_caption_embedding(sd_model):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([0.02, 0.3])
    cond = sd_model.encode_text(["a cat", "a dog"])
    eps = sd_model.eps(x, t, cond)
    with torch.no_grad():
        direct = sd_model.unet(x, torch.tensor([20, 300]), encoder_hidden_states=cond).sample
    torch.testing.assert_close(eps, direct)
    # cond None is the empty prompt; a (1, L, E) cond broadcasts over the batch
    torch.testing.assert_close(sd_model.eps(x, t), sd_model.eps(x, t, sd_model.uncond(2)))
    torch.testing.assert_close(sd_model.eps(x, t, cond[:1]), sd_model.eps(x, t, cond[:1].expand(2, -1, -1)))
    assert not torch.allclose(sd_model.eps(x, t), eps)


def test_jvp_through_cross_attention_matches_finite_difference(sd_model):
    g = torch.Generator().manual_seed(2)
    x, v = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([0.3, 0.3])
    cond = sd_model.encode_text(["a cat", "a dog"])

    def f(x):
        return sd_model.eps(x, t, cond)

    with sd_model.jvp_context():
        out, jv = torch.func.jvp(f, (x,), (v,))
    torch.testing.assert_close(out, f(x))
    h = 1e-2
    fd = (f(x + h * v) - f(x - h * v)) / (2 * h)
    assert ((jv - fd).norm() / jv.norm()).item() < 1e-3


def test_half_precision_jvp_stays_finite_on_small_latents(sd_dir, sd_model):
    # Tiny-VAE latents have std ~0.07: a float16 GroupNorm's JVP (~1/std^3) overflowed to NaN here until
    # the norms were kept in float32. The CPU runs float16 too, so this guards it without a GPU.
    from scanner.models.latent import LatentSDScoreModel

    half = LatentSDScoreModel.from_pretrained(sd_dir, dtype=torch.float16)
    images = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    x, t, v = sd_model.encode_images(images), torch.tensor([0.02, 0.3]), torch.ones(2, 4, 8, 8)
    cond = sd_model.encode_text(["a cat", "a dog"])
    with half.jvp_context():
        _, jv_half = torch.func.jvp(lambda x: half.eps(x, t, cond), (x,), (v,))
        _, jv = torch.func.jvp(lambda x: sd_model.eps(x, t, cond), (x,), (v,))
    assert jv_half.dtype == torch.float32 and torch.isfinite(jv_half).all()
    assert ((jv_half - jv).norm() / jv.norm()).item() < 3e-2


def test_score_norm_cal_mirrors_the_image_then_encodes_it(sd_model):
    # A VAE's latent of a flipped image is not the flipped latent, so a latent model's mirror images are made in
    # pixels and encoded (pixel_mirrors), and score_norm_cal uses them instead of flipping x.
    from scanner.geometry.mirror import mirror, mirror_calibrated_norm, pixel_mirrors

    images = torch.randint(0, 256, (3, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    x = sd_model.encode_images(images)
    refs = pixel_mirrors(sd_model, images, ["hflip", "vflip"])
    torch.testing.assert_close(refs["hflip"], sd_model.encode_images(images.flip(2)))
    torch.testing.assert_close(refs["vflip"], sd_model.encode_images(images.flip(1)))
    assert (refs["hflip"] - mirror(x, "hflip")).abs().max() > 1e-3  # the tiny VAE is not flip-equivariant
    cond = sd_model.encode_text(["a cat", "a dog", "a cow"])
    cal = mirror_calibrated_norm(sd_model, x, 0.1, ["hflip", "vflip"], cond, x_refs=refs)
    psi, _ = sd_model.psi_sigma(torch.tensor([0.1]))
    t = torch.full((3,), 0.1)

    def norm(z):
        return sd_model.eps(psi * z, t, cond).flatten(1).norm(dim=1)

    want = norm(x) / (norm(refs["hflip"]) * norm(refs["vflip"])).sqrt()
    torch.testing.assert_close(cal, want)
    assert not torch.allclose(cal, mirror_calibrated_norm(sd_model, x, 0.1, ["hflip", "vflip"], cond))
    with pytest.raises(ValueError, match="x_refs has mirrors"):
        mirror_calibrated_norm(sd_model, x, 0.1, ["hflip", "rot180"], cond, x_refs=refs)


def test_one_column_alone_matches_the_full_scores(sd_model):
    """compute_scores(only=...) on a text-conditional latent model: cfg_norm with per-row seeds and score_norm_cal with
    pixel mirrors are the values of the full call (what calibrate.py relies on for held-out images)."""
    from scanner.config import GeometryConfig
    from scanner.geometry.mirror import pixel_mirrors
    from scanner.geometry.scores import compute_scores
    from scanner.geometry.trace import row_seeds

    images = torch.randint(0, 256, (3, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    x = sd_model.encode_images(images)
    cond = sd_model.encode_text(["a cat", "a dog", "a cow"])
    cfg = GeometryConfig(cal_refs=["hflip", "vflip"], t_laplace=0.4, t_cal=0.1, probes=1, flipd_noises=1,
                         loss_noises=2)
    seeds = row_seeds(["a", "b", "c"], cfg.seed)
    refs = pixel_mirrors(sd_model, images, cfg.cal_refs)
    full = compute_scores(sd_model, x, cfg, cond, seeds=seeds, x_refs=refs)
    for col in ("cfg_norm", "score_norm_cal", "loss_cal", "score_norm"):
        one = compute_scores(sd_model, x, cfg, cond, seeds=seeds, x_refs=refs, only=col)
        torch.testing.assert_close(one[col], full[col], rtol=1e-5, atol=1e-6)
