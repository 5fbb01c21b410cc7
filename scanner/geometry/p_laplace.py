"""p-Laplace of the log-density, Delta_p u = div(|s|^{p-2} s), u = log p_t, s = grad u (docs/method.md §5).

JVP method (default): with J = ds/dx and s_hat = s / |s| (no symmetry of J assumed),

    Delta_p u = |s|^{p-2} [ tr J + (p - 2) s_hat^T J s_hat ]

from the trace FLIPD already needs plus one JVP along s_hat, for every p at once. In eps terms
(s = -eps / sigma): |s| = |eps| / sigma, tr J = -tr(d eps/dx) / sigma, s_hat^T J s_hat =
-e_hat^T (d eps/dx) e_hat / sigma with e_hat = eps / |eps| (the sign of s_hat cancels).

Flux method (paper b): the divergence theorem on a small ball, (D / r) mean_n v(x + r n) . n with
v = |s|^{p-2} s, here with antithetic pairs (n, -n) and each block of up to D directions orthonormal (a
random rotation): unbiased over directions like iid unit vectors, but with less variance, and exact
over directions once 2D directions form full bases. Black-box (score calls only); error O(r^2).
Delta_p at a point where s = 0 (a mode) is inf/nan for p < 2: the level sets are undefined there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from scanner.geometry.trace import (
    Linearization,
    bview,
    check_batch,
    check_int,
    check_positive,
    check_time,
    repeat_cond,
    time_vector,
)
from scanner.schema import p_column


def check_p_values(p_values: Sequence[float]) -> list[float]:
    """A non-empty list of p > 0 with distinct column names."""
    if isinstance(p_values, (int, float)) or len(p_values) == 0:
        raise ValueError(f"p_values must be a non-empty list of numbers > 0, got {p_values!r}")
    ps = [check_positive("p", p) for p in p_values]
    if len({p_column(p) for p in ps}) != len(ps):
        raise ValueError(f"p_values must be distinct, got {list(p_values)}")
    return ps


def p_laplace_from_parts(eps: torch.Tensor, sigma: torch.Tensor, trace_eps: torch.Tensor, quad_eps: torch.Tensor,
                         p_values: Sequence[float]) -> dict[float, torch.Tensor]:
    """eps: (B, ...) at the point; sigma, trace_eps = tr(d eps/dx), quad_eps = e_hat^T (d eps/dx) e_hat: (B,)
    -> {p: Delta_p u (B,)} in units of (score units)^(p-1) / (model-space unit)."""
    sigma = sigma.to(trace_eps.dtype)
    s_norm = eps.flatten(1).norm(dim=1) / sigma
    tr_j, quad_j = -trace_eps / sigma, -quad_eps / sigma
    return {p: s_norm.pow(p - 2) * (tr_j + (p - 2) * quad_j) for p in check_p_values(p_values)}


def unit_eps(eps: torch.Tensor) -> torch.Tensor:
    """e_hat = eps / |eps| per row: (1, B, ...) as one extra direction for `Linearization.trace`."""
    return (eps / bview(eps.flatten(1).norm(dim=1).clamp_min(torch.finfo(eps.dtype).tiny), eps))[None]


def p_laplace(model: Any, xt: torch.Tensor, t: float, p_values: Sequence[float], cond: Any = None, *,
              trace: str = "exact", probes: int = 8, probe_dist: str = "rademacher", jvp: str = "autograd",
              fd_eps: float = 1e-3, seed: int = 0, chunk: int | None = None) -> dict[float, torch.Tensor]:
    """Delta_p log p_t at the given points xt (no noising, no psi: pass psi x for the clean image) by the
    JVP method. xt: (B, *sample_shape); t in (0, 1) -> {p: (B,)} in xt's dtype. trace / probes /
    probe_dist / jvp ("autograd", "fd", "vjp") / fd_eps / seed / chunk: as in `scanner.geometry.trace`."""
    check_time("t", t)
    check_batch(model, xt)
    ps = check_p_values(p_values)
    tv = time_vector(t, xt)
    _, sigma = model.psi_sigma(tv)
    lin = Linearization(model, xt, tv, cond, jvp=jvp, fd_eps=fd_eps, chunk=chunk)
    tr, quad = lin.trace(trace, probes, probe_dist, seed, extra=unit_eps(lin.eps))
    return p_laplace_from_parts(lin.eps, sigma, tr, quad[0], ps)


def flux_directions(batch: int, dim: int, pairs: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, pairs, D) unit vectors, in blocks of up to D orthonormal ones (seeded random rotations)."""
    g = torch.Generator().manual_seed(int(seed))
    blocks, left = [], pairs
    while left > 0:
        m = min(dim, left)
        q, r = torch.linalg.qr(torch.randn(batch, dim, m, generator=g, dtype=torch.float64))
        blocks.append((q * torch.sign(torch.diagonal(r, dim1=1, dim2=2))[:, None, :]).transpose(1, 2))
        left -= m
    return torch.cat(blocks, dim=1).to(dtype)


def p_laplace_flux(model: Any, xt: torch.Tensor, t: float, p_values: Sequence[float], cond: Any = None, *,
                   radius: float = 0.01, directions: int = 128, seed: int = 0,
                   chunk: int | None = None) -> dict[float, torch.Tensor]:
    """Delta_p log p_t at xt as a boundary flux over a sphere of `radius` (model-space units):
    (D / r) mean_n v(xt + r n) . n over `directions` unit vectors (even: antithetic pairs), all p from the
    same score calls. xt: (B, *sample_shape) -> {p: (B,)}. chunk: rows per model call, rounded down to whole
    antithetic pairs of the batch (default and minimum 2B: one pair n, -n for every point per call)."""
    check_time("t", t)
    check_batch(model, xt)
    ps = check_p_values(p_values)
    radius = check_positive("radius", radius)
    check_int("directions", directions, 2)
    if directions % 2:
        raise ValueError(f"directions must be even (antithetic pairs n, -n), got {directions}")
    batch, dim, pairs = xt.shape[0], model.dim, directions // 2
    chunk = batch if chunk is None else check_int("chunk", chunk, 1)
    per_chunk = max(1, chunk // (2 * batch))
    dirs = flux_directions(batch, dim, pairs, seed, xt.dtype).to(xt.device)  # (B, pairs, D)
    _, sigma = model.psi_sigma(time_vector(t, xt))
    sums = {p: torch.zeros(batch, dtype=xt.dtype, device=xt.device) for p in ps}
    for k0 in range(0, pairs, per_chunk):
        n = min(per_chunk, pairs - k0)
        d = dirs[:, k0:k0 + n].transpose(0, 1).reshape(n, batch, *xt.shape[1:])  # (n, B, ...)
        pts = torch.cat([xt[None] + radius * d, xt[None] - radius * d]).reshape(2 * n * batch, *xt.shape[1:])
        tr = time_vector(t, pts)
        s = -model.eps(pts, tr, repeat_cond(cond, 2 * n, batch)) / bview(sigma.repeat(2 * n), pts)
        s = s.flatten(1).view(2, n, batch, dim)
        norm = s.norm(dim=-1)
        dflat = d.flatten(2)
        for p in ps:
            v = norm.pow(p - 2)[..., None] * s  # (2, n, B, D)
            sums[p] += ((v[0] - v[1]) * dflat).sum(-1).sum(0)
    scale = dim / (2 * radius * pairs)
    return {p: sums[p] * scale for p in ps}

