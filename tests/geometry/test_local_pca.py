"""Local PCA LID on linear subspaces, a curved 2-sphere and duplicate clusters; skdim's lPCA as reference; the
corpus-level rule (`reference`) on known variances and on near-copies."""

import pytest
import torch

from scanner.geometry.local_pca import lid_from_spectra, local_pca, local_spectra
from scanner.models.analytic import SubspaceGaussian, random_rotation


def _knn_sets(points, k, queries=None):
    """(N, D) points -> (Q, k, D) neighbour sets of the first Q points (each set includes its query)."""
    q = points if queries is None else points[:queries]
    idx = torch.cdist(q, points).topk(k, largest=False).indices
    return points[idx]


@pytest.mark.parametrize("dim,d", [(10, 1), (10, 3), (64, 3), (64, 8)])
def test_recovers_d_on_linear_subspaces(dim, d):
    m = SubspaceGaussian(dim, d, seed=d)
    x, _ = m.sample(1000, seed=0)
    # k >= 5 d: with fewer neighbours the sample spread of a d = 8 ball pushes its smallest eigenvalue
    # under alpha * lambda_max now and then (3 of 50 points at k = 20), a property of the FO rule itself.
    k = max(20, 5 * d)
    lid = local_pca(_knn_sets(x, k, queries=50), alpha=0.05)
    assert lid.tolist() == [float(d)] * 50  # D = 10 < k: covariance path; D = 64 > k: Gram path


def test_recovers_2_on_a_rotated_sphere_in_r10():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3000, 3, generator=g, dtype=torch.float64)
    s = s / s.norm(dim=1, keepdim=True)
    x = torch.cat([s, torch.zeros(3000, 7, dtype=torch.float64)], dim=1) @ random_rotation(10, 3).T
    lid = local_pca(_knn_sets(x, 20, queries=100))
    assert lid.tolist() == [2.0] * 100


def test_exact_duplicate_cluster_is_zero():
    g = torch.Generator().manual_seed(0)
    for dtype, scale in ((torch.float32, 1.0), (torch.float32, 1e3), (torch.float64, 7.0)):
        point = torch.randn(1, 1, 300, generator=g).to(dtype) * scale
        assert local_pca(point.expand(4, 20, 300).clone()).tolist() == [0.0] * 4
    # One distinct member among copies spans one direction.
    pts = torch.randn(1, 20, 30, generator=g)
    pts[0, 2:] = pts[0, 1]
    assert local_pca(pts).tolist() == [1.0]


def test_gram_and_covariance_paths_agree():
    g = torch.Generator().manual_seed(1)
    # Same point sets embedded in D = 12 (> k = 10, Gram) and D = 8 (< k, covariance), anisotropic spreads.
    base = torch.randn(16, 10, 8, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 8, dtype=torch.float64)
    padded = torch.cat([base, torch.zeros(16, 10, 4, dtype=torch.float64)], dim=2) @ random_rotation(12, 5).T
    assert local_pca(padded, alpha=0.05).tolist() == local_pca(base, alpha=0.05).tolist()


def test_matches_skdim_lpca():
    skdim = pytest.importorskip("skdim")
    g = torch.Generator().manual_seed(2)
    # Noisy subspaces with varied noise, so the FO counts differ from point to point and from d.
    sets = []
    for i in range(12):
        d = 1 + i % 5
        u = random_rotation(16, 100 + i)[:, :d]
        z = torch.randn(25, d, generator=g, dtype=torch.float64) @ u.T
        sets.append(z + (0.05 + 0.05 * i) * torch.randn(25, 16, generator=g, dtype=torch.float64))
    sets = torch.stack(sets)
    ours = local_pca(sets, alpha=0.05).tolist()
    ref = [float(skdim.id.lPCA(ver="FO", alphaFO=0.05).fit(s.numpy()).dimension_) for s in sets]
    assert ours == ref and len(set(ours)) > 2


def test_reference_level_counts_directions_by_their_variance():
    # Sets drawn from N(0, diag(9, 9, 0.25, 0.25, 0.25)) rotated into R^40 (k = 2,000 > D: covariance path):
    # the sample eigenvalues sit within a few % of the variances. Fukunaga-Olsen's level is 0.05 x 9 = 0.45:
    # 2 directions; the corpus level 0.05 x reference 1 = 0.05: all 5; 0.5 x 1 = 0.5: 2 again.
    g = torch.Generator().manual_seed(3)
    std = torch.tensor([3.0, 3.0, 0.5, 0.5, 0.5], dtype=torch.float64)
    z = torch.randn(4, 2000, 5, generator=g, dtype=torch.float64) * std
    sets = torch.cat([z, torch.zeros(4, 2000, 35, dtype=torch.float64)], dim=2) @ random_rotation(40, 7).T
    spectra = local_spectra(sets)
    torch.testing.assert_close(spectra[:, :5], (std ** 2).expand(4, 5), rtol=0.1, atol=0.0)
    assert lid_from_spectra(spectra, 0.05).tolist() == [2.0] * 4 == local_pca(sets, 0.05).tolist()
    assert local_pca(sets, 0.05, reference=1.0).tolist() == [5.0] * 4
    assert local_pca(sets, 0.5, reference=1.0).tolist() == [2.0] * 4


def test_near_copies_are_a_point_at_the_corpus_scale_not_to_fukunaga_olsen():
    # 20 copies of one image, each with its own small edit (noise 1e-3): FO counts the edits' directions
    # (scale-free: k - 1 of them), the corpus level (typical largest eigenvalue 1) counts none; a set of 20
    # distinct images at the typical spread counts the same under both.
    g = torch.Generator().manual_seed(4)
    image = torch.randn(1, 1, 300, generator=g, dtype=torch.float64)
    copies = image + 1e-3 * torch.randn(3, 20, 300, generator=g, dtype=torch.float64)
    assert local_pca(copies, 0.05).tolist() == [19.0] * 3
    assert local_pca(copies, 0.05, reference=1.0).tolist() == [0.0] * 3
    distinct = torch.randn(3, 20, 300, generator=g, dtype=torch.float64) / 300 ** 0.5 * 3
    spectra = local_spectra(distinct)
    ref = float(spectra[:, 0].median())
    assert local_pca(distinct, 0.05, reference=ref).tolist() == local_pca(distinct, 0.05).tolist()


def test_bad_local_pca_parameters():
    with pytest.raises(ValueError, match=r"k \(neighbours per point\) must be an int >= 2, got 1"):
        local_pca(torch.zeros(3, 1, 5))
    with pytest.raises(ValueError, match=r"must be a \(B, k, D\) tensor, got \(3, 5\)"):
        local_pca(torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"alpha must be a float in \(0, 1\), got 1.5"):
        local_pca(torch.zeros(3, 4, 5), alpha=1.5)
    with pytest.raises(ValueError, match=r"reference must be a number > 0 .*got 0.0"):
        local_pca(torch.zeros(3, 4, 5), reference=0.0)
