"""CFG-adjusted score norm (Wen et al. 2024; paper a fig. 3; docs/method.md §6).

    cfg_norm(x) = mean_k | eps(x_t^k, t, c) - eps(x_t^k, t, empty) |,   x_t^k = psi x + sigma eps_k

at a small t (paper a: 0.02) over a few seeded noises eps_k. Large for memorized prompts. The noises
come from `cfg_noises`, drawn on the CPU with a private generator: a rerun gives the same numbers.
"""

from __future__ import annotations

from typing import Any

import torch

from scanner.geometry.trace import bview, check_batch, check_int, check_time, time_vector


def cfg_noises(shape: tuple[int, ...], n: int, seed: int | torch.Tensor, dtype: torch.dtype = torch.float32
               ) -> torch.Tensor:
    """(n, *shape) standard normal noises from a seeded CPU generator (shape includes the batch). seed: an int,
    or (B,) per-row seeds (scanner.geometry.trace.row_seeds) so a row's noises do not depend on its batch."""
    if isinstance(seed, torch.Tensor):
        if seed.shape != (shape[0],):
            raise ValueError(f"per-row seeds must be ({shape[0]},), got {tuple(seed.shape)}")
        return torch.stack([cfg_noises(tuple(shape[1:]), n, int(s), dtype) for s in seed.tolist()], dim=1)
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(n, *shape, generator=g, dtype=torch.float64).to(dtype)


def cfg_norm(model: Any, x: torch.Tensor, t: float, cond: Any, uncond: Any = None, *, noises: int = 2,
             seed: int | torch.Tensor = 0) -> torch.Tensor:
    """x: (B, *sample_shape) clean points; cond: the model's conditioning for them (from `encode_text`);
    uncond: the empty-prompt conditioning (default `model.uncond(B)`) -> (B,) in x's dtype, eps units
    (equivalently sigma * |s(x_t | c) - s(x_t)|)."""
    check_time("t_cfg", t)
    check_batch(model, x)
    check_int("cfg_noises", noises, 1)
    if not getattr(model, "conditional", False):
        raise ValueError(f"cfg_norm needs a conditional model; {type(model).__name__} is unconditional")
    if cond is None:
        raise ValueError("cfg_norm needs cond (the captions' conditioning), got None")
    batch = x.shape[0]
    uncond = model.uncond(batch) if uncond is None else uncond
    tv = time_vector(t, x)
    psi, sigma = model.psi_sigma(tv)
    total = torch.zeros(batch, dtype=x.dtype, device=x.device)
    # One noise at a time with batch B: conditionings are opaque, so they are never re-stacked here.
    for e in cfg_noises(tuple(x.shape), noises, seed, x.dtype).to(x.device):
        xt = bview(psi, x) * x + bview(sigma, x) * e
        total += (model.eps(xt, tv, cond) - model.eps(xt, tv, uncond)).flatten(1).norm(dim=1)
    return total / noises
