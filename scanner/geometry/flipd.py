"""FLIPD: LID of the model manifold from one score Jacobian trace (Kamkari et al. 2024; docs/method.md §2).

    FLIPD(x, t0) = D - sigma * tr(d eps / dx)(psi x, t0) + |eps(psi x, t0)|^2,   psi, sigma at t0

evaluated at the *un-noised* point psi x. For data on a d-dim linear subspace with spreads lambda_i,
each normal direction contributes 0 and each tangent one 1 - sigma^2 / (psi^2 lambda_i + sigma^2), so
FLIPD -> d as t0 -> 0.

`flipd_noised` evaluates the trace term where the network was trained, at noised points (docs/method.md §10):

    LID_theta(x, t0) = mean_j [ D - sigma * tr(d eps / dx)(psi x + sigma z_j, t0) ],   z_j ~ N(0, I) seeded

The |eps|^2 term is dropped: at a noised point eps is the noise itself (|eps|^2 ~ D), not the clean-point
correction. For a Gaussian on a subspace the score Jacobian is constant, so the value is the same for every
z and equals sum_i psi^2 lambda_i / (psi^2 lambda_i + sigma^2) -> d; for a mixture it is the average of
the closed form over the noised points. On a trained UNet the clean-point Jacobian is far from the ideal
denoiser's (FLIPD of -400 to -900 for D = 768 on the demo) while the noised one gives a dimension.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from scanner.geometry.cfg_norm import cfg_noises
from scanner.geometry.trace import (
    Linearization,
    bview,
    check_batch,
    check_choice,
    check_int,
    check_time,
    eps_trace,
    time_vector,
)

FLIPD_AT = ("noised", "clean")


def flipd_from_parts(dim: int, sigma: torch.Tensor, trace_eps: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """D - sigma tr(d eps/dx) + |eps|^2. sigma, trace_eps: (B,); eps: (B, ...) at psi x -> (B,)."""
    return dim - sigma.to(trace_eps.dtype) * trace_eps + eps.flatten(1).pow(2).sum(1)


def flipd(model: Any, x: torch.Tensor, t0: float, cond: Any = None, *, trace: str = "hutchinson",
          probes: int = 8, probe_dist: str = "rademacher", jvp: str = "autograd", fd_eps: float = 1e-3,
          seed: int = 0, chunk: int | None = None) -> torch.Tensor:
    """FLIPD(x, t0): (B,) in x's dtype (a dimension, in [0, D] up to estimator noise).

    x: (B, *sample_shape) clean points in model space; t0 in (0, 1). trace / probes / probe_dist / jvp /
    fd_eps / seed / chunk: as in `scanner.geometry.trace.eps_trace`.
    """
    check_time("t0", t0)
    check_batch(model, x)
    t = time_vector(t0, x)
    psi, sigma = model.psi_sigma(t)
    eps, tr = eps_trace(model, bview(psi, x) * x, t, cond, method=trace, probes=probes, probe_dist=probe_dist,
                        jvp=jvp, fd_eps=fd_eps, seed=seed, chunk=chunk)
    return flipd_from_parts(model.dim, sigma, tr, eps)


def flipd_noise(shape: tuple[int, ...], noises: int, seed: int | torch.Tensor) -> torch.Tensor:
    """(noises, B, *sample_shape) float64 standard normal z_j for `flipd_noised` (shape = (B, *sample_shape)).
    seed: an int for the batch, or (B,) per-row seeds (`trace.row_seeds`): a row's noises then do not depend
    on its batch. Drawn on the CPU with a private generator, so a GPU run sees the same numbers."""
    # the CFG norm's seeded noises (which check per-row seeds against the batch), on another stream than the probes' for the same seed
    return cfg_noises(shape, noises, seed ^ 0x5EED_F11D, torch.float64)


def flipd_noised_from_parts(dim: int, sigma: torch.Tensor, traces: torch.Tensor) -> torch.Tensor:
    """D - sigma * mean_j tr_j. sigma: (B,); traces: (noises, B) of tr(d eps/dx) at the noised points."""
    return dim - sigma.to(traces.dtype) * traces.mean(0)


def noised_traces(model: Any, x: torch.Tensor, t: torch.Tensor, psi: torch.Tensor, sigma: torch.Tensor,
                  cond: Any = None, *, noises: int = 2, trace: str = "hutchinson", probes: int = 4,
                  probe_dist: str = "rademacher", jvp: str = "autograd", fd_eps: float = 1e-3, scheme: str = "central",
                  seed: int | torch.Tensor = 0, chunk: int | None = None) -> torch.Tensor:
    """(noises, B) tr(d eps/dx) at psi x + sigma z_j, one `Linearization` per noise (its own probe seed,
    seed + j + 1, so the noises do not share probes). x: (B, *sample_shape); t, psi, sigma: (B,)."""
    z = flipd_noise(tuple(x.shape), noises, seed).to(device=x.device, dtype=x.dtype)
    out = []
    for j in range(noises):
        lin = Linearization(model, bview(psi, x) * x + bview(sigma, x) * z[j], t, cond, jvp=jvp, fd_eps=fd_eps,
                            scheme=scheme, chunk=chunk)
        out.append(lin.trace(trace, probes, probe_dist, seed + j + 1)[0])
        del lin
    return torch.stack(out)


def flipd_noised(model: Any, x: torch.Tensor, t0: float, cond: Any = None, *, noises: int = 2,
                 trace: str = "hutchinson", probes: int = 4, probe_dist: str = "rademacher", jvp: str = "autograd",
                 fd_eps: float = 1e-3, seed: int | torch.Tensor = 0, chunk: int | None = None) -> torch.Tensor:
    """LID_theta(x, t0) from the score Jacobian at `noises` seeded noised points psi x + sigma z_j: (B,) in x's
    dtype, a dimension in [0, D] up to estimator noise (see the module docstring).

    Cost per image: `noises` forwards and noises * probes directional derivatives (noises * D with
    trace="exact"). seed: an int, or (B,) per-row seeds. Other arguments as in `flipd`.
    """
    check_time("t0", t0)
    check_batch(model, x)
    check_int("noises", noises, 1)
    t = time_vector(t0, x)
    psi, sigma = model.psi_sigma(t)
    tr = noised_traces(model, x, t, psi, sigma, cond, noises=noises, trace=trace, probes=probes,
                       probe_dist=probe_dist, jvp=jvp, fd_eps=fd_eps, seed=seed, chunk=chunk)
    return flipd_noised_from_parts(model.dim, sigma, tr).to(x.dtype)


def find_knee(t0s: Sequence[float], values: Sequence[float]) -> int:
    """Index of the knee of a curve y(log t0) by Kneedle (Satopaa et al. 2011): rescale both axes to
    [0, 1] and take the point farthest from the chord between the end points. Needs >= 3 points."""
    if len(t0s) != len(values) or len(t0s) < 3:
        raise ValueError(f"need >= 3 (t0, value) pairs of equal length, got {len(t0s)} t0s and {len(values)} values")
    xs = torch.tensor([math.log(float(t)) for t in t0s], dtype=torch.float64)
    ys = torch.tensor([float(v) for v in values], dtype=torch.float64)
    order = torch.argsort(xs)
    xs, ys = xs[order], ys[order]
    xn = (xs - xs[0]) / (xs[-1] - xs[0]).clamp_min(1e-300)
    span = (ys.max() - ys.min()).clamp_min(1e-300)
    yn = (ys - ys.min()) / span
    chord = yn[0] + (yn[-1] - yn[0]) * xn
    return int(order[int(torch.argmax((yn - chord).abs()))])


def flipd_sweep(model: Any, x: torch.Tensor, t0s: Sequence[float], cond: Any = None, *, at: str = "clean",
                **kwargs: Any) -> dict:
    """FLIPD over a grid of t0: {"t0": [T], "median": [T] median FLIPD over the batch, "values": (T, B),
    "knee_index": int, "knee_t0": float}. at: "clean" (`flipd`) or "noised" (`flipd_noised`); kwargs go to
    it (same seed at each t0, so the probes and noises are shared and the curve is smooth in t0)."""
    t0s = [check_time("t0", t) for t in t0s]
    fn = flipd if check_choice("at", at, FLIPD_AT) == "clean" else flipd_noised
    values = torch.stack([fn(model, x, t, cond, **kwargs) for t in t0s])
    medians = values.median(dim=1).values.tolist()
    knee = find_knee(t0s, medians)
    return {"t0": t0s, "median": medians, "values": values, "knee_index": knee, "knee_t0": t0s[knee]}
