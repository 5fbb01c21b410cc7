"""FLIPD and NB on Gaussians on d-dim linear subspaces of R^D, where LID = d exactly (docs/method.md §2)."""

import pytest
import torch

from scanner.geometry.flipd import find_knee, flipd, flipd_noise, flipd_noised, flipd_sweep
from scanner.geometry.normal_bundle import nb_lid, rank_from_spectrum
from scanner.models.analytic import SubspaceGaussian, random_gmm

CASES = [(10, 1), (10, 3), (10, 8), (64, 1), (64, 3), (64, 8)]
T0 = 0.01  # sigma^2 = 0.002: each tangent direction contributes 1 - sigma^2 / (psi^2 lambda + sigma^2) > 0.996


def _case(dim, d, n=16):
    m = SubspaceGaussian(dim, d, seed=dim + d)
    return m, m.sample(n, seed=2)[0]


@pytest.mark.parametrize("dim,d", CASES)
def test_flipd_exact_trace_recovers_d_and_the_closed_form(dim, d):
    m, x = _case(dim, d)
    f = flipd(m, x, T0, trace="exact", chunk=4096)
    assert (f - d).abs().max().item() < 0.5
    torch.testing.assert_close(f, m.flipd_truth(x, T0), rtol=0, atol=1e-9)


@pytest.mark.parametrize("dim,d", CASES)
def test_flipd_hutchinson_recovers_d(dim, d):
    m, x = _case(dim, d)
    f32 = flipd(m, x, T0, probes=32, seed=0, chunk=4096)
    # 32 Rademacher probes: per-point std ~ sqrt(2 d (D - d) / D / 32) <= 0.66, so the typical point and the batch
    # mean are well inside 1.0; 256 probes put every point inside 1.0.
    assert (f32 - d).abs().median().item() < 0.5 and abs(f32.mean().item() - d) < 0.25
    f256 = flipd(m, x, T0, probes=256, seed=0, chunk=8192)
    assert (f256 - d).abs().max().item() < 1.0


@pytest.mark.parametrize("jvp", ["fd", "vjp"])
def test_flipd_other_derivative_modes_match_autograd(jvp):
    m, x = _case(64, 3, n=4)
    ref = flipd(m, x, T0, trace="exact", chunk=4096)
    est = flipd(m, x, T0, trace="exact", jvp=jvp, fd_eps=1e-5, chunk=4096)
    torch.testing.assert_close(est, ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("dim,d", CASES)
@pytest.mark.parametrize("rank", ["gap", "threshold"])
def test_normal_bundle_recovers_d_exactly(dim, d, rank):
    m, x = _case(dim, d)
    lid = nb_lid(m, x, 0.01, rank=rank, seed=0, chunk=8192)
    assert lid.tolist() == [float(d)] * x.shape[0]


def test_rank_from_spectrum():
    s = torch.tensor([[100.0, 90.0, 80.0, 1.0, 0.9], [5.0, 4.0, 3.0, 2.0, 1e-6]])
    assert rank_from_spectrum(s, "gap").tolist() == [3, 4]
    assert rank_from_spectrum(s, "threshold", 0.05).tolist() == [3, 4]
    assert rank_from_spectrum(torch.zeros(1, 3), "threshold").tolist() == [0]


def test_flipd_on_a_gmm_matches_its_closed_form():
    m = random_gmm(6, 3, seed=2)
    x, _ = m.sample(8, seed=0)
    torch.testing.assert_close(flipd(m, x, 0.05, trace="exact", chunk=256), m.flipd_truth(x, 0.05), rtol=0, atol=1e-9)


def test_find_knee_on_a_known_curve():
    t0s = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2]
    plateau_then_drop = [3.0, 3.0, 3.0, 3.0, 3.0, 2.0, 1.0, 0.0]  # bends at t0 = 0.02
    assert find_knee(t0s, plateau_then_drop) == 4
    assert find_knee(list(reversed(t0s)), list(reversed(plateau_then_drop))) == 3  # order-free
    with pytest.raises(ValueError, match="need >= 3"):
        find_knee([0.1, 0.2], [1.0, 2.0])


def test_flipd_sweep_follows_the_closed_form_and_finds_the_bend():
    m, x = _case(10, 3)
    t0s = [0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5]
    sweep = flipd_sweep(m, x, t0s, trace="exact", chunk=4096)
    truth = [m.flipd_truth(x, t).median().item() for t in t0s]
    assert sweep["median"] == pytest.approx(truth, abs=1e-9) and sweep["values"].shape == (8, 16)
    # Flat at d for small t0, dropping once sigma^2 reaches the spreads (0.5 .. 2): the knee sits where the
    # plateau ends, still near d.
    knee = sweep["knee_index"]
    assert sweep["knee_t0"] == t0s[knee] and 0.02 <= sweep["knee_t0"] <= 0.2 and sweep["median"][knee] > 2.0


# --- LID_theta at noised points (docs/method.md §10): dimensions the clean-point tests above do not use -----------
NOISED_CASES = [(12, 2), (20, 5), (48, 11)]


def _subspace_truth(m, t0):
    """sum_i psi^2 lambda_i / (psi^2 lambda_i + sigma^2) over the tangent spreads: the same at every point."""
    psi, sigma = m.psi_sigma(torch.tensor([t0], dtype=torch.float64))
    lam = m.lam[0][m.lam[0] > 0]
    return float((psi ** 2 * lam / (psi ** 2 * lam + sigma ** 2)).sum())


@pytest.mark.parametrize("dim,d", NOISED_CASES)
def test_flipd_noised_exact_trace_is_the_subspace_closed_form_whatever_the_noise(dim, d):
    m, x = _case(dim, d)
    for t0 in (T0, 0.1, 0.4):
        f = flipd_noised(m, x, t0, noises=3, trace="exact", seed=7, chunk=4096)
        assert f.shape == (16,)
        torch.testing.assert_close(f, torch.full_like(f, _subspace_truth(m, t0)), rtol=0, atol=1e-9)
    # -> d as t0 -> 0, and below d (never below 0) as the noise swamps the smaller spreads
    assert abs(_subspace_truth(m, T0) - d) < 0.05 and 0 < _subspace_truth(m, 0.4) < d - 0.5


@pytest.mark.parametrize("dim,d", NOISED_CASES)
def test_flipd_noised_hutchinson_recovers_d(dim, d):
    m, x = _case(dim, d)
    f = flipd_noised(m, x, T0, noises=2, probes=64, seed=0, chunk=8192)
    # 2 x 64 Rademacher probes: per-point std ~ sqrt(2 d (D - d) / D / 128) <= 0.7
    assert (f - d).abs().median().item() < 0.6 and abs(f.mean().item() - d) < 0.35


def test_flipd_noised_on_a_mixture_is_the_closed_form_at_the_noised_points():
    m = random_gmm(6, 3, seed=5)
    x, _ = m.sample(8, seed=1)
    t0, noises = 0.05, 4
    t = torch.full((8,), t0, dtype=torch.float64)
    psi, sigma = m.psi_sigma(t)
    z = flipd_noise(tuple(x.shape), noises, 3)
    truth = torch.stack([m.dim + sigma ** 2 * m.score_jacobian_trace(psi[:, None] * x + sigma[:, None] * zj, t)
                         for zj in z]).mean(0)
    torch.testing.assert_close(flipd_noised(m, x, t0, noises=noises, trace="exact", seed=3, chunk=256), truth,
                               rtol=0, atol=1e-9)


def test_flipd_noised_converges_to_the_monte_carlo_of_the_mixture_closed_form():
    # overlapping components, so the Jacobian varies with the noise and the noised average is not the
    # clean-point value (checked below: the test would catch an estimator that ignored the noise)
    m = random_gmm(6, 3, seed=5, mean_scale=0.6, spreads=(0.05, 0.5))
    x, _ = m.sample(4, seed=1)
    t0 = 0.2
    t = torch.full((4,), t0, dtype=torch.float64)
    psi, sigma = m.psi_sigma(t)
    g = torch.Generator().manual_seed(123)  # the truth's own noises, independent of the estimator's
    mc = torch.stack([m.dim + sigma ** 2 * m.score_jacobian_trace(
        psi[:, None] * x + sigma[:, None] * torch.randn(x.shape, generator=g, dtype=torch.float64), t)
        for _ in range(4000)])
    truth, se = mc.mean(0), mc.std(0) / 4000 ** 0.5
    est = flipd_noised(m, x, t0, noises=800, probes=8, seed=0, chunk=8192)
    tol = 4 * (mc.std(0) / 800 ** 0.5 + se) + 0.02  # the estimator's noise spread plus the probes' share
    assert ((est - truth).abs() <= tol).all(), (est, truth, tol)
    clean = m.dim + sigma ** 2 * m.score_jacobian_trace(psi[:, None] * x, t)
    assert ((clean - truth).abs() > tol).any()


def test_flipd_noised_rows_do_not_depend_on_their_batch():
    from scanner.geometry.trace import row_seeds

    m, x = _case(20, 5, n=6)
    seeds = row_seeds([f"k{i}" for i in range(6)])
    whole = flipd_noised(m, x, 0.1, noises=2, probes=3, seed=seeds)
    parts = torch.cat([flipd_noised(m, x[i:i + 2], 0.1, noises=2, probes=3, seed=seeds[i:i + 2]) for i in (0, 2, 4)])
    torch.testing.assert_close(whole, parts, rtol=0, atol=1e-12)
    other = flipd_noised(m, x, 0.1, noises=2, probes=3, seed=seeds + 1)
    assert not torch.equal(whole, other)


def test_flipd_sweep_at_noised_points_follows_the_subspace_closed_form():
    m, x = _case(12, 2)
    t0s = [0.005, 0.01, 0.05, 0.1, 0.3, 0.6]
    sweep = flipd_sweep(m, x, t0s, at="noised", trace="exact", chunk=4096)
    assert sweep["median"] == pytest.approx([_subspace_truth(m, t) for t in t0s], abs=1e-9)
    with pytest.raises(ValueError, match="at must be one of 'noised', 'clean', got 'psi'"):
        flipd_sweep(m, x, t0s, at="psi")


def test_bad_flipd_and_nb_parameters():
    m, x = _case(10, 3, n=2)
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=rf"t0 must be a float in \(0, 1\), got {bad}"):
            flipd(m, x, bad)
    with pytest.raises(ValueError, match="probes must be an int >= 1, got 0"):
        flipd(m, x, 0.1, probes=0)
    with pytest.raises(ValueError, match=r"x must be \(B, 10\) with B >= 1, got \(2, 11\)"):
        flipd(m, torch.zeros(2, 11, dtype=torch.float64), 0.1)
    with pytest.raises(ValueError, match=r"nb_t must be a float in \(0, 1\), got 2"):
        nb_lid(m, x, 2)
    with pytest.raises(ValueError, match="noises must be an int >= 1, got 0"):
        flipd_noised(m, x, 0.1, noises=0)
    with pytest.raises(ValueError, match=r"t0 must be a float in \(0, 1\), got 1.0"):
        flipd_noised(m, x, 1.0)
    with pytest.raises(ValueError, match="samples must be an int >= 0, got -1"):
        nb_lid(m, x, 0.01, samples=-1)
    with pytest.raises(ValueError, match="rank must be one of 'gap', 'threshold', got 'elbow'"):
        nb_lid(m, x, 0.01, rank="elbow")
