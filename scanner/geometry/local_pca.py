"""Local PCA LID of the data manifold (Fukunaga-Olsen; method.md §3), batched in torch.

For each point's k neighbours: centre, eigen-decompose the covariance, count eigenvalues above
alpha * lambda_max (scikit-dimension's `lPCA(ver="FO")` rule). With D > k the k x k Gram matrix
X_c X_c^T has the same nonzero eigenvalues as the D x D covariance X_c^T X_c, at O(k^2 D) instead of
O(D^3): that is what makes latent / pixel D cheap. An exact duplicate cluster has zero covariance:
LID 0, not a count of round-off eigenvalues.
"""

from __future__ import annotations

import torch

from scanner.geometry.trace import check_int


def local_pca(neighbours: torch.Tensor, alpha: float = 0.05) -> torch.Tensor:
    """neighbours: (B, k, D) float, k >= 2 points per set (include the query point yourself if wanted);
    alpha in (0, 1) -> LID (B,) float32 on the input device: #{eigenvalues > alpha * lambda_max}."""
    if not isinstance(neighbours, torch.Tensor) or neighbours.dim() != 3:
        shape = tuple(neighbours.shape) if isinstance(neighbours, torch.Tensor) else type(neighbours).__name__
        raise ValueError(f"neighbours must be a (B, k, D) tensor, got {shape}")
    _, k, dim = neighbours.shape
    check_int("k (neighbours per point)", k, 2)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be a float in (0, 1), got {alpha!r}")
    x = neighbours.to(torch.float64)
    # Shift by a member before centring: exact duplicates become exact zeros (a mean can be off by an ulp).
    x = x - x[:, :1]
    x = x - x.mean(dim=1, keepdim=True)
    gram = x @ x.transpose(1, 2) if dim > k else x.transpose(1, 2) @ x  # (B, k, k) or (B, D, D)
    lam = torch.linalg.eigvalsh(gram)  # ascending
    lam_max = lam[:, -1]
    # Round-off level of a cluster of (near-)identical points stored in the input dtype.
    eps = torch.finfo(neighbours.dtype).eps if neighbours.dtype.is_floating_point else 0.0
    scale = neighbours.detach().abs().flatten(1).amax(1).to(torch.float64)
    zero = lam_max <= k * dim * (8 * eps * scale) ** 2
    count = (lam > alpha * lam_max[:, None]).sum(1)
    return torch.where(zero, torch.zeros_like(count), count).to(torch.float32)
