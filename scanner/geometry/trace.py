"""Jacobian-vector products of eps_theta and the trace tr(d eps / dx) (docs/method.md §2).

Every geometry column needs only quadratic forms v^T J v, J = d eps_theta / dx at one point x (the
trace is a sum of them, Delta_p adds one along eps / |eps|). Three ways to get them:
- "autograd": J v by `torch.func.jvp` (forward mode, exact) under `model.jvp_context()` (math attention);
- "fd": J v by central differences (eps(x + h v) - eps(x - h v)) / 2h, 2 forwards, no autograd at all
  (black-box eps; error O(h^2)), or scheme="forward", (eps(x + h v) - eps(x)) / h, 1 forward reusing
  eps(x) (error O(h)). h = fd_eps / max|v|: no entry of x moves by more than fd_eps whatever the
  direction (a basis vector, a Rademacher probe or a unit vector);
- "vjp": v^T J^T by reverse mode; v^T J^T v = v^T J v, so one backward per direction gives the same
  quadratic form (on a CPU a backward costs ~1-1.5 forwards, a forward-mode JVP ~4-5).
The trace is exact (D basis directions) or Hutchinson, mean_k z_k^T J z_k with seeded Rademacher or
Gaussian z_k. Directions are stacked into rows of (n * B) and evaluated `chunk` pairs at a time, so
memory stays that of one call of `chunk` rows whatever the number of probes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

JVP_MODES = ("autograd", "fd")  # true JVPs (eps_jvp)
QUAD_MODES = ("autograd", "fd", "vjp")  # quadratic forms v^T J v (Linearization)
FD_SCHEMES = ("central", "forward")
TRACE_METHODS = ("exact", "hutchinson")
PROBE_DISTS = ("rademacher", "gaussian")


# --- argument checks shared by the estimators: ValueError naming the value and the accepted range --------
def check_time(name: str, t: float) -> float:
    if not isinstance(t, (int, float)) or not 0.0 < float(t) < 1.0:
        raise ValueError(f"{name} must be a float in (0, 1), got {t!r}")
    return float(t)


def check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value


def check_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_batch(model: Any, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or tuple(x.shape[1:]) != tuple(model.sample_shape) or x.shape[0] < 1:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be (B, {', '.join(map(str, model.sample_shape))}) with B >= 1, got {shape}")


def time_vector(t: float, x: torch.Tensor) -> torch.Tensor:
    """A (B,) tensor filled with t, in x's floating dtype, on x's device."""
    return torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)


def bview(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) broadcastable against x, in x's dtype."""
    return v.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))


def flat_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row inner product over all non-batch dims: (R, ...) x (R, ...) -> (R,)."""
    return (a * b).flatten(1).sum(1)


def repeat_cond(cond: Any, n: int, batch: int) -> Any:
    """Conditioning for n stacked copies of a batch (row = copy * B + b). Opaque conds pass through when
    they broadcast (None, leading dim 1); tensors with leading dim B are tiled."""
    if cond is None or n == 1 or not isinstance(cond, torch.Tensor) or cond.dim() == 0 or cond.shape[0] == 1:
        return cond
    if cond.shape[0] != batch:
        raise ValueError(f"cond must have leading dimension {batch} (the batch) or 1, got {tuple(cond.shape)}")
    return cond.repeat(n, *([1] * (cond.dim() - 1)))


# --- JVPs --------------------------------------------------------------------------------------------------
def eps_jvp(model: Any, x: torch.Tensor, t: torch.Tensor, v: torch.Tensor, cond: Any = None, *,
            jvp: str = "autograd", fd_eps: float = 1e-3, scheme: str = "central",
            eps_x: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(eps(x) or None, J v) with J = d eps / dx at x, one row per sample.

    x, v: (R, *sample_shape); t: (R,); cond: the model's conditioning for the R rows (or broadcastable).
    Returns eps(x) for "autograd" (free) and None for "fd" (it needs eps(x) only for scheme="forward",
    passed as eps_x). fd_eps: the largest change of any entry of x in the finite difference.
    """
    check_choice("jvp", jvp, JVP_MODES)
    if jvp == "autograd":
        with model.jvp_context():
            out, tangent = torch.func.jvp(lambda y: model.eps(y, t, cond), (x,), (v,))
        return out, tangent
    check_positive("fd_eps", fd_eps)
    check_choice("scheme", scheme, FD_SCHEMES)
    h = fd_eps / v.flatten(1).abs().amax(1).clamp_min(torch.finfo(v.dtype).tiny)  # (R,)
    hb = bview(h, x)
    rows = x.shape[0]
    if scheme == "forward":
        if eps_x is None:
            raise ValueError("scheme='forward' needs eps_x, the eps at x it differences against")
        return None, (model.eps(x + hb * v, t, cond) - eps_x) / hb
    # One call of 2R rows (x + hv, x - hv) is cheaper than two calls of R on most backends.
    both = model.eps(torch.cat([x + hb * v, x - hb * v]), torch.cat([t, t]), repeat_cond(cond, 2, rows))
    return None, (both[:rows] - both[rows:]) / (2 * hb)


def _directions(method: str, shape: tuple[int, ...], batch: int, probes: int, dist: str, seed: int | torch.Tensor,
                per_chunk: int, dtype: torch.dtype, device: torch.device) -> Iterator[torch.Tensor]:
    """Yields direction blocks (n, B, *shape). Exact: basis vectors e_j; Hutchinson: seeded probes, drawn
    on the CPU with a private generator so a rerun (and a GPU run) sees the same numbers."""
    dim = math.prod(shape)
    if method == "exact":
        for j0 in range(0, dim, per_chunk):
            n = min(per_chunk, dim - j0)
            e = torch.zeros(n, batch, dim, dtype=dtype, device=device)
            e[torch.arange(n), :, torch.arange(j0, j0 + n)] = 1.0
            yield e.view(n, batch, *shape)
        return
    if isinstance(seed, torch.Tensor):  # one seed per row: a row's probes do not depend on its batch
        if seed.shape != (batch,):
            raise ValueError(f"per-row seeds must be ({batch},), got {tuple(seed.shape)}")
        z = torch.stack([_probes((probes, *shape), dist, int(s)) for s in seed.tolist()], dim=1)
        for k0 in range(0, probes, per_chunk):
            yield z[k0:k0 + per_chunk].to(device=device, dtype=dtype)
        return
    g = torch.Generator().manual_seed(int(seed))
    for k0 in range(0, probes, per_chunk):
        n = min(per_chunk, probes - k0)
        yield _probes((n, batch, *shape), dist, g).to(device=device, dtype=dtype)


def _probes(shape: tuple[int, ...], dist: str, gen: torch.Generator | int) -> torch.Tensor:
    """float64 Rademacher or Gaussian probes of `shape` from a generator (or a seed for a fresh one)."""
    g = gen if isinstance(gen, torch.Generator) else torch.Generator().manual_seed(gen)
    if dist == "rademacher":
        return torch.randint(0, 2, shape, generator=g).to(torch.float64) * 2 - 1
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def row_seeds(keys, seed: int = 0) -> torch.Tensor:
    """(B,) int64 seeds from sample keys (and the config seed): the probes and noises of an image then
    depend on the image alone, not on the batch Ray happened to put it in, so reruns agree row by row."""
    import hashlib

    return torch.tensor([int.from_bytes(hashlib.blake2b(f"{seed}:{k}".encode(), digest_size=7).digest(), "little")
                         for k in keys], dtype=torch.int64)


def _tile(a: torch.Tensor, n: int) -> torch.Tensor:
    """(B, ...) -> (n * B, ...), row = copy * B + b."""
    return a.unsqueeze(0).expand(n, *a.shape).reshape(n * a.shape[0], *a.shape[1:])


class Linearization:
    """eps at x, plus the quadratic forms v^T (d eps/dx) v for any directions v, sharing that one forward.

    x: (B, *sample_shape); t: (B,). jvp: "autograd" (forward-mode JVPs), "fd" (finite differences; scheme
    "central" or "forward") or "vjp" (reverse mode: v^T J v = v^T J^T v, so a VJP gives the same quadratic
    form; the forward keeps its graph and each direction costs one backward of B rows).
    chunk: (direction, sample) pairs per model call for "autograd" / "fd"; default 2B.
    """

    def __init__(self, model: Any, x: torch.Tensor, t: torch.Tensor, cond: Any = None, *, jvp: str = "autograd",
                 fd_eps: float = 1e-3, scheme: str = "central", chunk: int | None = None):
        self.mode = check_choice("jvp", jvp, QUAD_MODES)
        if jvp == "fd":
            check_positive("fd_eps", fd_eps)
            check_choice("scheme", scheme, FD_SCHEMES)
        self.model, self.x, self.t, self.cond = model, x, t, cond
        self.fd_eps, self.scheme, self.batch = fd_eps, scheme, x.shape[0]
        self.per_call = max(1, (2 * self.batch if chunk is None else check_int("chunk", chunk, 1)) // self.batch)
        if jvp == "vjp":
            with torch.enable_grad():
                self._xg = x.detach().requires_grad_(True)
                self._out = model.eps(self._xg, t, cond)
            self.eps = self._out.detach()
        else:
            self.eps = model.eps(x, t, cond)

    def quads(self, v: torch.Tensor) -> torch.Tensor:
        """v: (n, B, *sample_shape) directions -> (n, B) values of v^T (d eps/dx) v."""
        n, b, shape = v.shape[0], self.batch, self.x.shape[1:]
        if self.mode == "vjp":
            out = []
            for vi in v:
                (g,) = torch.autograd.grad(self._out, self._xg, vi, retain_graph=True)
                out.append(flat_dot(vi, g))
            return torch.stack(out)
        res = []
        for k0 in range(0, n, self.per_call):
            m = min(self.per_call, n - k0)
            vr = v[k0:k0 + m].reshape(m * b, *shape)
            _, jv = eps_jvp(self.model, _tile(self.x, m), self.t.repeat(m), vr, repeat_cond(self.cond, m, b),
                            jvp=self.mode, fd_eps=self.fd_eps, scheme=self.scheme,
                            eps_x=_tile(self.eps, m) if self.mode == "fd" else None)
            res.append(flat_dot(vr, jv).view(m, b))
        return torch.cat(res)

    def trace(self, method: str = "hutchinson", probes: int = 8, probe_dist: str = "rademacher",
              seed: int | torch.Tensor = 0, extra: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """tr(d eps/dx): (B,), exact (D directions) or Hutchinson (`probes` seeded probes; seed: an int for the
        batch, or (B,) seeds, one per row, see `row_seeds`). extra: (m, B, ...) more directions whose quadratic
        forms (m, B) are returned too, packed into the last probe call."""
        check_choice("method", method, TRACE_METHODS)
        check_choice("probe_dist", probe_dist, PROBE_DISTS)
        check_int("probes", probes, 1)
        x = self.x
        blocks = _directions(method, tuple(x.shape[1:]), self.batch, probes, probe_dist, seed, self.per_call,
                             x.dtype, x.device)
        total, count, extra_q = torch.zeros(self.batch, dtype=x.dtype, device=x.device), 0, None
        block = next(blocks)
        while block is not None:
            nxt = next(blocks, None)
            if nxt is None and extra is not None:
                q = self.quads(torch.cat([block, extra.to(block.dtype)]))
                q, extra_q = q[:block.shape[0]], q[block.shape[0]:]
            else:
                q = self.quads(block)
            total += q.sum(0)
            count += block.shape[0]
            block = nxt
        return total / (count if method == "hutchinson" else 1), extra_q


def eps_trace(model: Any, x: torch.Tensor, t: torch.Tensor, cond: Any = None, *, method: str = "hutchinson",
              probes: int = 8, probe_dist: str = "rademacher", jvp: str = "autograd", fd_eps: float = 1e-3,
              scheme: str = "central", seed: int = 0, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """tr(d eps_theta / dx) at x: returns (eps(x) (B, *sample_shape), trace (B,)), in x's dtype.

    x: (B, *sample_shape); t: (B,). method "exact" takes D JVPs per sample (small D only), "hutchinson"
    `probes` seeded probes (the same for every call with the same seed, batch shape and chunking-independent).
    jvp / fd_eps / scheme / chunk: as in `Linearization`.
    """
    lin = Linearization(model, x, t, cond, jvp=jvp, fd_eps=fd_eps, scheme=scheme, chunk=chunk)
    return lin.eps, lin.trace(method, probes, probe_dist, seed)[0]
