"""FLIPD: LID of the model manifold from one score Jacobian trace (Kamkari et al. 2024; method.md §2).

    FLIPD(x, t0) = D - sigma * tr(d eps / dx)(psi x, t0) + |eps(psi x, t0)|^2,   psi, sigma at t0

evaluated at the *un-noised* point psi x. For data on a d-dim linear subspace with spreads lambda_i,
each normal direction contributes 0 and each tangent one 1 - sigma^2 / (psi^2 lambda_i + sigma^2), so
FLIPD -> d as t0 -> 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from scanner.geometry.trace import bview, check_batch, check_time, eps_trace, time_vector


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


def flipd_sweep(model: Any, x: torch.Tensor, t0s: Sequence[float], cond: Any = None, **kwargs: Any) -> dict:
    """FLIPD over a grid of t0: {"t0": [T], "median": [T] median FLIPD over the batch, "values": (T, B),
    "knee_index": int, "knee_t0": float}. kwargs go to `flipd` (same seed at each t0, so the probes are
    shared and the curve is smooth in t0)."""
    t0s = [check_time("t0", t) for t in t0s]
    values = torch.stack([flipd(model, x, t, cond, **kwargs) for t in t0s])
    medians = values.median(dim=1).values.tolist()
    knee = find_knee(t0s, medians)
    return {"t0": t0s, "median": medians, "values": values, "knee_index": knee, "knee_t0": t0s[knee]}
