"""Analytic score models: closed-form truth for the geometry tests (docs/method.md §1).

A Gaussian mixture noised by the VP process stays a Gaussian mixture:

    p_t = sum_k w_k N(psi m_k, psi^2 Sigma_k + sigma^2 I)

so its score, score Jacobian, Jacobian trace and log-density are closed forms. Each covariance is
kept as its eigen-decomposition Sigma_k = Q_k diag(lam_k) Q_k^T, which makes every noise level one
elementwise division: C_k(t)^-1 = Q_k diag(1 / (psi^2 lam_k + sigma^2)) Q_k^T. Zero eigenvalues
(data on a subspace) are fine: C_k(t) is full rank for t > 0.

Schedule: the continuous linear-beta VP schedule of Song et al. (2021),
alpha_bar(t) = exp(-beta_min t - (beta_max - beta_min) t^2 / 2) with beta_min = 0.1, beta_max = 20.
It is the continuous limit of DDPM's discrete linear betas 1e-4 .. 0.02 over 1000 steps, so t means
the same noise level here as round(t * 1000) does for the pixel adapter, without the rounding.

Everything is computed in `dtype` (float64 by default, for truth); outputs are cast back to x's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from scanner.models.base import ScoreModel


def vp_alpha_bar(t: torch.Tensor, beta_min: float = 0.1, beta_max: float = 20.0) -> torch.Tensor:
    """alpha_bar(t) of the continuous linear-beta VP schedule; t: any shape in [0, 1]."""
    return torch.exp(-beta_min * t - 0.5 * (beta_max - beta_min) * t * t)


def random_rotation(dim: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A Haar-random (dim, dim) orthogonal matrix from a seeded Gaussian QR (sign-fixed)."""
    g = torch.Generator().manual_seed(int(seed))
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(dtype)


class GaussianMixtureModel(ScoreModel):
    """Unconditional GMM in R^D with a closed-form noised score.

    weights: (K,) positive (normalized here); means: (K, D); covs: (K, D, D) symmetric PSD, or
    eig=(lam (K, D) >= 0, Q (K, D, D) orthogonal columns) to give the decomposition exactly.
    x: (B, D). t: (B,) in (0, 1].
    """

    conditional = False

    def __init__(self, weights: Any, means: Any, covs: Any = None, *, eig: tuple[Any, Any] | None = None,
                 beta_min: float = 0.1, beta_max: float = 20.0, dtype: torch.dtype = torch.float64):
        self.dtype = dtype
        w = torch.as_tensor(weights, dtype=torch.float64)
        m = torch.as_tensor(means, dtype=torch.float64)
        if m.dim() != 2 or w.shape != (m.shape[0],) or not bool((w > 0).all()):
            raise ValueError(f"weights must be (K,) positive and means (K, D); got weights {tuple(w.shape)}, "
                             f"means {tuple(m.shape)}")
        k, d = m.shape
        if (covs is None) == (eig is None):
            raise ValueError("give exactly one of covs (K, D, D) or eig=(lam (K, D), Q (K, D, D))")
        if eig is None:
            c = torch.as_tensor(covs, dtype=torch.float64)
            if c.shape != (k, d, d):
                raise ValueError(f"covs must be (K, D, D) = ({k}, {d}, {d}), got {tuple(c.shape)}")
            lam, q = torch.linalg.eigh(0.5 * (c + c.transpose(1, 2)))
        else:
            lam, q = (torch.as_tensor(a, dtype=torch.float64) for a in eig)
            if lam.shape != (k, d) or q.shape != (k, d, d):
                raise ValueError(f"eig must be (lam ({k}, {d}), Q ({k}, {d}, {d})), got {tuple(lam.shape)}, "
                                 f"{tuple(q.shape)}")
        if bool((lam < -1e-9 * lam.abs().max().clamp_min(1.0)).any()):
            raise ValueError(f"covariances must be PSD; smallest eigenvalue {lam.min().item():.3g}")
        self.log_weights = torch.log(w / w.sum()).to(dtype)
        self.means, self.lam, self.evecs = m.to(dtype), lam.clamp_min(0).to(dtype), q.to(dtype)
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)
        self.sample_shape = (d,)

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    def psi_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t: (B,) in (0, 1] -> (psi, sigma), each (B,) in t's dtype (at least float32)."""
        t = torch.as_tensor(t)
        out = t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32
        ab = vp_alpha_bar(t.to(torch.float64), self.beta_min, self.beta_max)
        return ab.sqrt().to(out), (1.0 - ab).sqrt().to(out)

    # --- closed forms -------------------------------------------------------------------------
    def _parts(self, x: torch.Tensor, t: torch.Tensor):
        """-> y (B,K,D) coordinates of x - psi m_k in each eigenbasis, var (B,K,D) = psi^2 lam + sigma^2,
        log_comp (B,K) = log w_k + log N_k(x), sigma (B,)."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must be (B, {self.dim}), got {tuple(x.shape)}")
        x = x.to(self.dtype)
        t = torch.as_tensor(t, dtype=self.dtype).reshape(-1).expand(x.shape[0])
        psi, sigma = self.psi_sigma(t)
        diff = x[:, None, :] - psi[:, None, None] * self.means[None]  # (B, K, D)
        y = torch.einsum("bkd,kde->bke", diff, self.evecs)
        var = psi[:, None, None] ** 2 * self.lam[None] + sigma[:, None, None] ** 2
        log_norm = -0.5 * ((y * y / var).sum(-1) + torch.log(var).sum(-1) + self.dim * torch.log(
            torch.tensor(2 * torch.pi, dtype=self.dtype)))
        return y, var, self.log_weights[None] + log_norm, sigma

    def log_prob(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log p_t(x): (B,) in the model dtype; differentiable (autograd truth for the tests)."""
        _, _, log_comp, _ = self._parts(x, t)
        return torch.logsumexp(log_comp, dim=1)

    def component_scores(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (s_k (B,K,D) = grad log N_k(x), responsibilities r (B,K)), model dtype."""
        y, var, log_comp, _ = self._parts(x, t)
        s_k = -torch.einsum("bke,kde->bkd", y / var, self.evecs)
        return s_k, torch.softmax(log_comp, dim=1)

    def score(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """grad log p_t(x) = sum_k r_k s_k: (B, D) in x's dtype."""
        s_k, r = self.component_scores(x, t)
        return (r[..., None] * s_k).sum(1).to(x.dtype)

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """-sigma * score: (B, D) in x's dtype."""
        _, sigma = self.psi_sigma(torch.as_tensor(t, dtype=self.dtype).reshape(-1).expand(x.shape[0]))
        return (-sigma[:, None] * self.score(x.to(self.dtype), t, cond)).to(x.dtype)

    def score_jacobian(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """J = d score / dx = -sum r_k C_k^-1 + sum r_k s_k s_k^T - s s^T: (B, D, D), model dtype."""
        y, var, log_comp, _ = self._parts(x, t)
        r = torch.softmax(log_comp, dim=1)
        s_k = -torch.einsum("bke,kde->bkd", y / var, self.evecs)
        s = (r[..., None] * s_k).sum(1)
        c_inv = torch.einsum("kde,bke,kfe->bkdf", self.evecs, 1.0 / var, self.evecs)
        return (-(r[..., None, None] * c_inv).sum(1) + torch.einsum("bk,bkd,bkf->bdf", r, s_k, s_k)
                - s[:, :, None] * s[:, None, :])

    def score_jacobian_trace(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """tr J = -sum r_k tr C_k^-1 + sum r_k |s_k|^2 - |s|^2: (B,), model dtype; no D x D matrix."""
        y, var, log_comp, _ = self._parts(x, t)
        r = torch.softmax(log_comp, dim=1)
        s_k = -torch.einsum("bke,kde->bkd", y / var, self.evecs)
        s = (r[..., None] * s_k).sum(1)
        return -(r * (1.0 / var).sum(-1)).sum(1) + (r * (s_k * s_k).sum(-1)).sum(1) - (s * s).sum(-1)

    def flipd_truth(self, x: torch.Tensor, t0: float) -> torch.Tensor:
        """FLIPD(x, t0) = D + sigma^2 (tr J + |s|^2) at psi x, closed form: (B,), model dtype."""
        t = torch.full((x.shape[0],), float(t0), dtype=self.dtype)
        psi, sigma = self.psi_sigma(t)
        xt = psi[:, None] * x.to(self.dtype)
        s = self.score(xt, t)
        return self.dim + sigma ** 2 * (self.score_jacobian_trace(xt, t) + (s * s).sum(-1))

    def p_laplace_truth(self, x: torch.Tensor, t: float, p: float) -> torch.Tensor:
        """Delta_p log p_t = div(|s|^{p-2} s) by autograd of the closed-form log-density alone (s = grad log_prob,
        then the trace of the Jacobian of |s|^{p-2} s): (B,), model dtype. Independent of `score` and of
        the p-Laplace formula, so it checks both. Cost O(B D) autograd passes: tests only."""
        tv = torch.full((1,), float(t), dtype=self.dtype)
        grad_u = torch.func.grad(lambda y: self.log_prob(y[None], tv)[0])

        def flux_field(y: torch.Tensor) -> torch.Tensor:
            s = grad_u(y)
            return s.norm() ** (p - 2) * s

        jac = torch.func.vmap(torch.func.jacrev(flux_field))(x.to(self.dtype))
        return torch.diagonal(jac, dim1=1, dim2=2).sum(-1)

    def sample(self, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """n clean samples: (x (n, D) model dtype, component labels (n,) int64); seeded."""
        g = torch.Generator().manual_seed(int(seed))
        labels = torch.multinomial(self.log_weights.exp().to(torch.float64), n, replacement=True, generator=g)
        z = torch.randn(n, self.dim, generator=g, dtype=torch.float64).to(self.dtype)
        x = self.means[labels] + torch.einsum("nde,ne->nd", self.evecs[labels], self.lam[labels].sqrt() * z)
        return x, labels


def random_gmm(dim: int, components: int, seed: int = 0, spreads: tuple[float, float] = (0.1, 1.6),
               mean_scale: float = 1.5, **kwargs: Any) -> GaussianMixtureModel:
    """A seeded GMM with full covariances: means ~ N(0, mean_scale^2 I), each covariance a random rotation of
    variances uniform in `spreads`, weights uniform in [0.5, 1.5] (normalized)."""
    g = torch.Generator().manual_seed(int(seed))
    means = torch.randn(components, dim, generator=g, dtype=torch.float64) * mean_scale
    lam = spreads[0] + (spreads[1] - spreads[0]) * torch.rand(components, dim, generator=g, dtype=torch.float64)
    q = torch.stack([random_rotation(dim, int(seed) * 1000 + k) for k in range(components)])
    weights = torch.rand(components, generator=g, dtype=torch.float64) + 0.5
    return GaussianMixtureModel(weights, means, eig=(lam, q), **kwargs)


class SubspaceGaussian(GaussianMixtureModel):
    """N(mean, U diag(spreads) U^T) on a random d-dim linear subspace of R^D (U: first d columns of a
    seeded random rotation). spreads: (d,) variances lambda_i > 0 (default linspace(0.5, 2, d)).

    `basis` (D, d) spans the subspace; `sample` draws on it. FLIPD -> d as t0 -> 0 (docs/method.md §2).
    """

    def __init__(self, ambient_dim: int, intrinsic_dim: int, spreads: Sequence[float] | None = None,
                 seed: int = 0, mean: Any = None, **kwargs: Any):
        if not 1 <= intrinsic_dim <= ambient_dim:
            raise ValueError(f"intrinsic_dim must be in [1, ambient_dim={ambient_dim}], got {intrinsic_dim}")
        lam = torch.zeros(ambient_dim, dtype=torch.float64)
        lam[:intrinsic_dim] = (torch.linspace(0.5, 2.0, intrinsic_dim, dtype=torch.float64) if spreads is None
                               else torch.as_tensor(spreads, dtype=torch.float64))
        if bool((lam[:intrinsic_dim] <= 0).any()):
            raise ValueError(f"spreads must be {intrinsic_dim} variances > 0, got {list(spreads or [])}")
        q = random_rotation(ambient_dim, seed)
        mu = torch.zeros(ambient_dim, dtype=torch.float64) if mean is None else torch.as_tensor(mean)
        super().__init__([1.0], mu[None], eig=(lam[None], q[None]), **kwargs)
        self.intrinsic_dim = intrinsic_dim
        self.basis = self.evecs[0, :, :intrinsic_dim]


class ClassConditionalGMM(GaussianMixtureModel):
    """A GMM whose condition selects one component: eps(x, t, c) is the score of component c alone,
    eps(x, t, None or -1) the full mixture. Conditioning: (B,) int64 component ids, -1 = unconditional.

    encode_text maps captions "0", "1", ... (or the names in `class_names`) to ids; None / "" -> -1.
    """

    conditional = True

    def __init__(self, *args: Any, class_names: Sequence[str] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(self.n_components)]

    def encode_text(self, captions: Sequence[str | None]) -> torch.Tensor:
        ids = []
        for c in captions:
            if c is None or c == "":
                ids.append(-1)
            elif c in self.class_names:
                ids.append(self.class_names.index(c))
            else:
                raise ValueError(f"caption must be one of {self.class_names} or empty, got {c!r}")
        return torch.tensor(ids, dtype=torch.int64)

    def uncond(self, batch_size: int) -> torch.Tensor:
        return torch.full((batch_size,), -1, dtype=torch.int64)

    def score(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        s_k, r = self.component_scores(x, t)
        mix = (r[..., None] * s_k).sum(1)
        if cond is None:
            return mix.to(x.dtype)
        c = torch.as_tensor(cond, dtype=torch.int64).reshape(-1).expand(x.shape[0])
        if bool(((c < -1) | (c >= self.n_components)).any()):
            raise ValueError(f"cond ids must be in [-1, {self.n_components - 1}], got {c.tolist()}")
        picked = s_k[torch.arange(x.shape[0]), c.clamp_min(0)]
        return torch.where((c >= 0)[:, None], picked, mix).to(x.dtype)
