"""Mirror-calibrated detectors: a quantity at x divided by the same quantity at mirrored copies of x.

score_norm_cal: |eps(psi x, t)| at the clean point. loss_cal: the denoising loss at noised points (below).

A low score norm at the clean image flags a sharp peak of the learned density, but it also flags
images that are merely *simple* (flat sky, plain backgrounds): their noise is easy to predict whatever
the model memorized. Measured on the demo (benchmarks/results/calibration.md, seed 0), the raw norm at t = 0.1
gives AUROC 0.79 for planted repeated images and the mirror-calibrated one 0.995.

A mirrored image keeps every statistic that makes an image simple (its spectrum, its histogram, its
edges) but is not the image the model saw, so it sits off the memorized peak. The ratio

    score_norm_cal(x) = |eps(psi x, t)| / geomean_g |eps(psi g(x), t)|,   g in refs (hflip, vflip, rot180)

is ~1 where the density is mirror-symmetric (simple or not) and << 1 on a memorized image. This is the
difficulty calibration of membership-inference attacks (a per-sample reference instead of a population
threshold) with a reference that costs one forward per mirror instead of a second model. A model trained
with random horizontal flips has seen hflip(x): use vflip / rot180 for it. On latents (Stable Diffusion)
the latent is mirrored, which matches the latent of the mirrored image up to the VAE's equivariance.

loss_cal asks the same question where the network was trained: at noised points psi x + sigma z, not at the
clean point psi x (where its outputs are off its training distribution, docs/method.md §10). The denoising loss
|eps(psi x + sigma z, t) - z|^2, averaged over seeded z, is the loss attack of membership inference (small on
a memorized image, which the network denoises almost exactly); dividing by the same loss at each mirror g(x),
noised by the mirrored noise g(z), calibrates it like score_norm_cal. The pairing makes the ratio exactly 1 for
a model whose density is mirror-symmetric, whatever the noises: psi g(x) + sigma g(z) = g(psi x + sigma z).
Closed form on a Gaussian N(mu, S), with C = psi^2 S + sigma^2 I:
E_z |eps - z|^2 = sigma^2 psi^2 |C^-1 (x - mu)|^2 + tr((sigma^2 C^-1 - I)^2).
"""

from __future__ import annotations

from typing import Any

import torch

from scanner.config import CAL_MIRRORS
from scanner.geometry.cfg_norm import cfg_noises
from scanner.geometry.trace import bview, check_int, check_time, time_vector

MIRRORS = dict(zip(CAL_MIRRORS, [(-1,), (-2,), (-2, -1)]))  # name -> spatial axes flipped


def check_refs(refs: list[str], sample_shape: tuple[int, ...] | None = None) -> list[str]:
    """refs, validated: names from MIRRORS; vflip / rot180 need samples with at least 2 spatial dims."""
    bad = [r for r in refs if r not in MIRRORS]
    if bad or not refs:
        raise ValueError(f"geometry.cal_refs must be a non-empty list of {sorted(MIRRORS)}, got {refs!r}")
    if sample_shape is not None and len(sample_shape) < 2:
        needs_2d = [r for r in refs if -2 in MIRRORS[r]]
        if needs_2d:
            raise ValueError(f"geometry.cal_refs {needs_2d} mirror a second spatial axis, but this model's samples "
                             f"are {tuple(sample_shape)}: use ['hflip']")
    return list(refs)


def mirror(x: torch.Tensor, ref: str) -> torch.Tensor:
    """x (B, *sample_shape) mirrored along the spatial axes of `ref`."""
    return x.flip(MIRRORS[ref])


def mirrored_points(x: torch.Tensor, refs: list[str], x_refs: dict[str, torch.Tensor] | None = None
                    ) -> dict[str, torch.Tensor]:
    """{ref: g(x)} for each mirror in refs: x mirrored in model space, or the caller's x_refs (a latent model:
    `pixel_mirrors`) once they are checked to be the mirrors asked for."""
    if x_refs is None:
        return {r: mirror(x, r) for r in refs}
    if set(x_refs) != set(refs):
        raise ValueError(f"x_refs has mirrors {sorted(x_refs)}, cal_refs asks for {sorted(refs)}")
    return {r: x_refs[r].to(x) for r in refs}


@torch.no_grad()
def pixel_mirrors(model: Any, images: torch.Tensor, refs: list[str]) -> dict[str, torch.Tensor]:
    """{ref: model.encode_images(the images mirrored)}: the mirror images of a latent model's points, mirrored
    where the image lives (pixels) and encoded, since a VAE's latent of a flipped image is not the flipped
    latent. images: (B, H, W, C) uint8, as encode_images takes them."""
    # channels last: each of MIRRORS' spatial axes (counted from the end) sits one further left
    return {r: model.encode_images(images.flip([a - 1 for a in MIRRORS[r]])) for r in check_refs(refs)}


@torch.no_grad()
def mirror_calibrated_norm(model: Any, x: torch.Tensor, t: float, refs: list[str], cond: Any = None,
                           norm_x: torch.Tensor | None = None,
                           x_refs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """(B,) |eps(psi x, t)| / geometric mean over refs of |eps(psi g(x), t)|. x: clean points in model space.

    norm_x: |eps(psi x, t)| when the caller already has it (one forward saved). x_refs: the mirrored points
    g(x) per ref when they are not x mirrored in model space (a latent model: `pixel_mirrors`). Cost:
    len(refs) forwards (+ 1 without norm_x).
    """
    refs = check_refs(refs, tuple(model.sample_shape))
    points = mirrored_points(x, refs, x_refs)
    tv = time_vector(t, x)
    psi, _ = model.psi_sigma(tv)
    scale = bview(psi, x)
    if norm_x is None:
        norm_x = model.eps(scale * x, tv, cond).flatten(1).norm(dim=1)
    log_ref = torch.stack([model.eps(scale * points[r], tv, cond).flatten(1).norm(dim=1).log() for r in refs])
    return norm_x / log_ref.mean(dim=0).exp()


def loss_noise(shape: tuple[int, ...], noises: int, seed: int | torch.Tensor) -> torch.Tensor:
    """(noises, B, *sample_shape) float64 standard normal z_j for `mirror_calibrated_loss`: seed an int or (B,)
    per-row seeds (`trace.row_seeds`), on a stream of their own (not FLIPD's, the CFG norm's or the probes')."""
    return cfg_noises(shape, noises, seed ^ 0x1055_CA1, torch.float64)


@torch.no_grad()
def denoising_loss(model: Any, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor, cond: Any = None) -> torch.Tensor:
    """(B,) mean_j |eps(psi x + sigma z_j, t) - z_j|^2. x: (B, *sample_shape) clean points; t: (B,);
    z: (noises, B, *sample_shape)."""
    psi, sigma = model.psi_sigma(t)
    a, b = bview(psi, x), bview(sigma, x)
    z = z.to(device=x.device, dtype=x.dtype)
    return torch.stack([(model.eps(a * x + b * zj, t, cond) - zj).flatten(1).pow(2).sum(1) for zj in z]).mean(0)


@torch.no_grad()
def mirror_calibrated_loss(model: Any, x: torch.Tensor, t: float, refs: list[str], cond: Any = None, *,
                           noises: int = 8, seed: int | torch.Tensor = 0,
                           x_refs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """(B,) loss_cal: the denoising loss at x over its geometric mean at the mirrors g(x), each noised by g(z_j)
    (see the module docstring). x: clean points in model space; seed: an int or (B,) per-row seeds; x_refs as in
    `mirror_calibrated_norm`. Cost: noises * (1 + len(refs)) forwards."""
    refs = check_refs(refs, tuple(model.sample_shape))
    check_time("t_loss", t)
    check_int("loss_noises", noises, 1)
    points = mirrored_points(x, refs, x_refs)
    tv = time_vector(t, x)
    z = loss_noise(tuple(x.shape), noises, seed)
    loss_x = denoising_loss(model, x, tv, z, cond)
    log_ref = torch.stack([denoising_loss(model, points[r], tv, z.flip(MIRRORS[r]), cond).log() for r in refs])
    return loss_x / log_ref.mean(dim=0).exp()
