"""Local PCA LID of the data manifold (Fukunaga-Olsen; docs/method.md §3), batched in torch.

For each point's k neighbours: centre, eigen-decompose the covariance, count eigenvalues above a level.
Fukunaga-Olsen's level is alpha * the set's own largest eigenvalue (scikit-dimension's `lPCA(ver="FO")`):
scale-free, so k near-copies of one image (a JPEG re-encode, a colour tweak) count as many directions as k
distinct images. With `reference` the level is alpha * reference instead, one number for the whole corpus
(memscan passes the corpus median of the largest eigenvalue): a neighbourhood whose spread is a small fraction
of the typical one counts 0 directions, which is what "the data is a point here" means (docs/method.md §3: exact
duplicates give LID_* ~ 0).

With D > k the k x k Gram matrix X_c X_c^T has the same nonzero eigenvalues as the D x D covariance X_c^T X_c,
at O(k^2 D) instead of O(D^3): that is what makes latent / pixel D cheap. An exact duplicate cluster has zero
covariance: LID 0, not a count of round-off eigenvalues.
"""

from __future__ import annotations

import torch

from scanner.geometry.trace import check_int


def local_spectra(neighbours: torch.Tensor) -> torch.Tensor:
    """neighbours: (B, k, D) float, k >= 2 points per set (include the query point yourself if wanted) ->
    (B, min(k, D)) float64: the eigenvalues of each set's covariance (1/k normalisation), largest first; all zero
    for a set of (near-)identical points at the round-off level of the input dtype."""
    if not isinstance(neighbours, torch.Tensor) or neighbours.dim() != 3:
        shape = tuple(neighbours.shape) if isinstance(neighbours, torch.Tensor) else type(neighbours).__name__
        raise ValueError(f"neighbours must be a (B, k, D) tensor, got {shape}")
    _, k, dim = neighbours.shape
    check_int("k (neighbours per point)", k, 2)
    x = neighbours.to(torch.float64)
    # Shift by a member before centring: exact duplicates become exact zeros (a mean can be off by an ulp).
    x = x - x[:, :1]
    x = x - x.mean(dim=1, keepdim=True)
    gram = x @ x.transpose(1, 2) if dim > k else x.transpose(1, 2) @ x  # (B, k, k) or (B, D, D)
    lam = torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0.0) / k  # descending
    # Round-off level of a cluster of (near-)identical points stored in the input dtype.
    eps = torch.finfo(neighbours.dtype).eps if neighbours.dtype.is_floating_point else 0.0
    scale = neighbours.detach().abs().flatten(1).amax(1).to(torch.float64)
    zero = lam[:, 0] * k <= k * dim * (8 * eps * scale) ** 2
    return torch.where(zero[:, None], torch.zeros_like(lam), lam)


def lid_from_spectra(spectra: torch.Tensor, alpha: float = 0.05, reference: float | None = None) -> torch.Tensor:
    """spectra (B, m) from local_spectra -> LID (B,) float32: #{eigenvalues > alpha * level}, level = each set's
    largest eigenvalue (reference None: Fukunaga-Olsen) or the one number `reference` > 0 for every set."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be a float in (0, 1), got {alpha!r}")
    if reference is not None and (isinstance(reference, bool) or not isinstance(reference, (int, float))
                                  or not reference > 0):
        raise ValueError(f"reference must be a number > 0 (a corpus's typical largest eigenvalue), got {reference!r}")
    level = spectra[:, :1] if reference is None else torch.full_like(spectra[:, :1], float(reference))
    count = ((spectra > alpha * level) & (spectra > 0)).sum(1)
    return count.to(torch.float32)


def local_pca(neighbours: torch.Tensor, alpha: float = 0.05, reference: float | None = None) -> torch.Tensor:
    """neighbours: (B, k, D) float -> LID (B,) float32 on the input device (local_spectra, then lid_from_spectra)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be a float in (0, 1), got {alpha!r}")
    return lid_from_spectra(local_spectra(neighbours), alpha, reference)
