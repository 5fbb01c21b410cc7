"""Normal-bundle LID (Stanczuk et al. 2023; docs/method.md §2).

K noised copies psi x + sigma eps_k at a small t; near a d-dim manifold their scores point along the
(D - d)-dim normal space with size ~ 1/sigma, so the K x D score matrix has D - d large singular
values. LID = D - rank, the rank read off the spectrum by the largest log-gap, or by counting singular
values above rel_threshold * the largest.

The score matrix is centred over the K copies by default: the score's tangent part at psi x (the drift
along the manifold, ~ grad log of the on-manifold density) is the same for all copies and would add a
rank-one O(1) direction whose log-gap competes with the normal/tangent gap; the normal part
(-eps_normal / sigma) is zero-mean and survives centring. Needs K - 1 >= D - d: the reference estimator
on toy and small-image models only (D + 16 score calls per image; ~65k at Stable Diffusion scale).
"""

from __future__ import annotations

from typing import Any

import torch

from scanner.geometry.trace import bview, check_batch, check_choice, check_int, check_time, repeat_cond, time_vector

RANK_METHODS = ("gap", "threshold")


def rank_from_spectrum(svals: torch.Tensor, method: str = "gap", rel_threshold: float = 0.01) -> torch.Tensor:
    """svals: (B, m) singular values (any order) -> (B,) int64 rank.

    "gap": the i in [1, m - 1] maximizing log s_i - log s_(i+1) (sorted descending);
    "threshold": #{s_i > rel_threshold * s_max}; an all-zero spectrum has rank 0.
    """
    check_choice("rank", method, RANK_METHODS)
    if not 0.0 < rel_threshold < 1.0:
        raise ValueError(f"rel_threshold must be in (0, 1), got {rel_threshold!r}")
    s = svals.to(torch.float64).sort(dim=1, descending=True).values
    if method == "threshold":
        return (s > rel_threshold * s[:, :1]).sum(1)
    if s.shape[1] < 2:
        raise ValueError(f"the largest log-gap needs >= 2 singular values, got {s.shape[1]}")
    logs = torch.log(s.clamp_min(torch.finfo(torch.float64).tiny))
    return torch.argmax(logs[:, :-1] - logs[:, 1:], dim=1) + 1


def nb_lid(model: Any, x: torch.Tensor, t: float, cond: Any = None, *, samples: int = 0, seed: int = 0,
           rank: str = "gap", rel_threshold: float = 0.01, center: bool = True,
           chunk: int | None = None) -> torch.Tensor:
    """Normal-bundle LID: (B,) in x's dtype, integers in [0, D].

    x: (B, *sample_shape) clean points; t in (0, 1) (small: docs/method.md uses 0.01); samples: K noised
    copies per point (0 = D + 16); chunk: rows per model call (default B). Seeded noises.
    """
    check_time("nb_t", t)
    check_batch(model, x)
    check_int("samples", samples, 0)
    dim, batch = model.dim, x.shape[0]
    k = samples or dim + 16
    if k < 2:
        raise ValueError(f"samples must be >= 2 (K noised copies), got {samples}")
    chunk = batch if chunk is None else check_int("chunk", chunk, 1)
    per_chunk = max(1, chunk // batch)
    tv = time_vector(t, x)
    psi, sigma = model.psi_sigma(tv)
    g = torch.Generator().manual_seed(int(seed))
    noise = torch.randn(k, batch, *x.shape[1:], generator=g, dtype=torch.float64).to(x.dtype).to(x.device)
    scores = []
    for k0 in range(0, k, per_chunk):
        n = min(per_chunk, k - k0)
        pts = (bview(psi, x) * x)[None] + bview(sigma, x)[None] * noise[k0:k0 + n]
        rows = pts.reshape(n * batch, *x.shape[1:])
        eps = model.eps(rows, tv.repeat(n), repeat_cond(cond, n, batch))
        scores.append((-eps / bview(sigma.repeat(n), rows)).flatten(1).view(n, batch, dim))
    mat = torch.cat(scores).transpose(0, 1).to(torch.float64)  # (B, K, D)
    if center:
        mat = mat - mat.mean(dim=1, keepdim=True)
    svals = torch.linalg.svdvals(mat)
    return (dim - rank_from_spectrum(svals, rank, rel_threshold)).to(x.dtype)
