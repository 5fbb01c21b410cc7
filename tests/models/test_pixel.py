"""PixelScoreModel against the UNet2DModel and scheduler it wraps (tiny random components, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scanner.models.pixel import PixelScoreModel


def _finite_difference_jvp(f, x, v, h=1e-2):
    return (f(x + h * v) - f(x - h * v)) / (2 * h)


def test_shapes_and_resolution(pixel_model):
    assert pixel_model.sample_shape == (3, 8, 8)
    assert pixel_model.dim == 192
    assert pixel_model.resolution == 8
    assert pixel_model.conditional is False


def test_psi_sigma_is_the_scheduler_at_the_rounded_timestep(pixel_model):
    t = torch.tensor([0.0, 0.0004, 0.0006, 0.3, 0.9996, 1.0])
    psi, sigma = pixel_model.psi_sigma(t)
    alpha_bar = pixel_model.schedule.alphas_cumprod[torch.tensor([0, 0, 1, 300, 999, 999])]  # round(t * 1000), clamped
    torch.testing.assert_close(psi, alpha_bar.sqrt().float())
    torch.testing.assert_close(sigma, (1 - alpha_bar).sqrt().float())
    torch.testing.assert_close(psi**2 + sigma**2, torch.ones(6))
    assert psi.dtype == sigma.dtype == torch.float32


def test_eps_equals_the_unet_and_score_divides_by_sigma(pixel_model):
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.1, 0.5])
    eps = pixel_model.eps(x, t)
    with torch.no_grad():
        direct = pixel_model.unet(x, torch.tensor([100, 500])).sample
    torch.testing.assert_close(eps, direct)
    _, sigma = pixel_model.psi_sigma(t)
    torch.testing.assert_close(pixel_model.score(x, t), -eps / sigma.view(-1, 1, 1, 1))
    torch.testing.assert_close(pixel_model.eps(x, torch.tensor(0.1)), pixel_model.eps(x, torch.tensor([0.1, 0.1])))


def test_v_prediction_is_converted_to_eps(tmp_path, make_tiny_pixel):
    model = PixelScoreModel.from_pretrained(make_tiny_pixel(tmp_path, prediction_type="v_prediction"))
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.2, 0.7])
    with torch.no_grad():
        v = model.unet(x, torch.tensor([200, 700])).sample
    psi, sigma = (s.view(-1, 1, 1, 1) for s in model.psi_sigma(t))
    torch.testing.assert_close(model.eps(x, t), sigma * x + psi * v)


def test_jvp_matches_finite_difference_and_vjp_runs(pixel_model):
    g = torch.Generator().manual_seed(2)
    x, v = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    t = torch.tensor([0.3, 0.3])

    def f(x):
        return pixel_model.eps(x, t)

    with pixel_model.jvp_context():
        out, jv = torch.func.jvp(f, (x,), (v,))
    torch.testing.assert_close(out, f(x))
    fd = _finite_difference_jvp(f, x, v)
    assert ((jv - fd).norm() / jv.norm()).item() < 1e-3
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad((f(x) * v).sum(), x)  # reverse mode too, for exact traces
    assert grad.shape == x.shape and torch.isfinite(grad).all()


def test_encode_images_scales_to_unit_range(pixel_model):
    images = torch.tensor([0, 255], dtype=torch.uint8).repeat(192).view(2, 8, 8, 3)
    x = pixel_model.encode_images(images)
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    torch.testing.assert_close(pixel_model.encode_images(images.numpy()), x)  # numpy is accepted too


def test_gray_model_takes_the_channel_mean(tmp_path, make_tiny_pixel):
    model = PixelScoreModel.from_pretrained(make_tiny_pixel(tmp_path, in_channels=1))
    rgb = np.zeros((1, 8, 8, 3), dtype=np.uint8)
    rgb[..., 0] = 255  # mean of (255, 0, 0) = 85 -> 85 / 127.5 - 1
    x = model.encode_images(rgb)
    assert x.shape == (1, 1, 8, 8)
    torch.testing.assert_close(x, torch.full((1, 1, 8, 8), 85 / 127.5 - 1))


def test_bad_inputs_name_what_is_accepted(pixel_model):
    with pytest.raises(ValueError, match=r"\(B, 8, 8, C\) uint8 at the model resolution 8"):
        pixel_model.encode_images(torch.zeros(1, 16, 16, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        pixel_model.encode_images(torch.zeros(1, 8, 8, 3))
    with pytest.raises(ValueError, match="unconditional"):
        pixel_model.eps(torch.zeros(1, 3, 8, 8), torch.tensor([0.1]), cond=torch.zeros(1, 4, 16))
    with pytest.raises(ValueError, match=r"x must be \(B, 3, 8, 8\)"):
        pixel_model.eps(torch.zeros(1, 3, 16, 16), torch.tensor([0.1]))
    with pytest.raises(ValueError, match="one entry per sample"):
        pixel_model.eps(torch.zeros(2, 3, 8, 8), torch.tensor([0.1, 0.2, 0.3]))
