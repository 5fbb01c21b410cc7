"""The analytic score models against autograd of their own closed-form log-density (float64)."""

import pytest
import torch

from scanner.models.analytic import (
    ClassConditionalGMM,
    GaussianMixtureModel,
    SubspaceGaussian,
    random_gmm,
    vp_alpha_bar,
)
from scanner.models.base import ScoreModel


def _autograd_score(model, x, t):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model.log_prob(x, t).sum(), x)
    return g


def test_schedule_is_vp_and_matches_ddpm_linear_betas():
    from diffusers import DDPMScheduler

    m = random_gmm(3, 2, seed=0)
    t = torch.tensor([0.01, 0.1, 0.5, 0.9], dtype=torch.float64)
    psi, sigma = m.psi_sigma(t)
    torch.testing.assert_close(psi**2 + sigma**2, torch.ones_like(t), rtol=0, atol=1e-15)
    # The continuous linear-beta schedule is DDPM's 1e-4 .. 0.02 over 1000 steps without the rounding.
    ddpm = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod.to(torch.float64)
    steps = torch.round(t * 1000).long()
    torch.testing.assert_close(vp_alpha_bar(t), ddpm[steps], rtol=0.03, atol=1e-4)


@pytest.mark.parametrize("dim,components", [(2, 3), (16, 4)])
def test_gmm_score_jacobian_trace_match_autograd(dim, components):
    m = random_gmm(dim, components, seed=1)
    assert isinstance(m, ScoreModel) and m.sample_shape == (dim,) and m.dim == dim
    x, _ = m.sample(8, seed=2)
    t = torch.full((8,), 0.2, dtype=torch.float64)
    s = m.score(x, t)
    torch.testing.assert_close(s, _autograd_score(m, x, t), rtol=1e-10, atol=1e-10)
    _, sigma = m.psi_sigma(t)
    torch.testing.assert_close(m.eps(x, t), -sigma[:, None] * s, rtol=1e-12, atol=1e-12)
    hess = torch.stack([torch.autograd.functional.hessian(lambda y: m.log_prob(y[None], t[:1])[0], xi) for xi in x])
    torch.testing.assert_close(m.score_jacobian(x, t), hess, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(m.score_jacobian_trace(x, t), torch.diagonal(hess, dim1=1, dim2=2).sum(-1),
                               rtol=1e-9, atol=1e-9)


def test_gmm_log_prob_integrates_to_one_in_1d():
    m = GaussianMixtureModel([1.0, 3.0], [[-1.0], [2.0]], [[[0.3]], [[1.5]]])
    grid = torch.linspace(-15, 15, 30001, dtype=torch.float64)[:, None]
    dens = m.log_prob(grid, torch.full((grid.shape[0],), 0.3, dtype=torch.float64)).exp()
    assert abs(torch.trapezoid(dens, grid[:, 0]).item() - 1.0) < 1e-8


def test_float32_inputs_stay_float32():
    m = random_gmm(4, 2, seed=0)
    x = torch.randn(3, 4)
    assert m.eps(x, torch.full((3,), 0.1)).dtype == torch.float32


def test_subspace_gaussian_lives_on_its_subspace_with_its_spreads():
    m = SubspaceGaussian(12, 3, spreads=[0.5, 1.0, 2.0], seed=4)
    x, _ = m.sample(20000, seed=0)
    basis = m.basis
    torch.testing.assert_close(basis.T @ basis, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-12)
    residual = x - (x @ basis) @ basis.T
    assert residual.abs().max().item() < 1e-12
    cov = torch.cov((x @ basis).T)
    torch.testing.assert_close(torch.diagonal(cov), torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64), rtol=0.05,
                               atol=0)


def test_subspace_flipd_truth_tends_to_d():
    m = SubspaceGaussian(10, 3, seed=0)
    x, _ = m.sample(16, seed=1)
    errs = [(m.flipd_truth(x, t0) - 3).abs().max().item() for t0 in (0.1, 0.01, 0.001)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 0.01


def test_class_conditional_gmm_selects_components():
    base = random_gmm(5, 3, seed=3)
    m = ClassConditionalGMM(base.log_weights.exp(), base.means, eig=(base.lam, base.evecs),
                            class_names=["cat", "dog", "eel"])
    assert m.conditional
    x, _ = m.sample(6, seed=0)
    t = torch.full((6,), 0.1, dtype=torch.float64)
    cond = m.encode_text(["cat", "dog", "eel", "", None, "dog"])
    assert cond.tolist() == [0, 1, 2, -1, -1, 1] and m.uncond(4).tolist() == [-1] * 4
    s = m.score(x, t, cond)
    for i, c in enumerate(cond.tolist()):
        ref = base if c < 0 else GaussianMixtureModel([1.0], base.means[c:c + 1], eig=(base.lam[c:c + 1],
                                                                                       base.evecs[c:c + 1]))
        torch.testing.assert_close(s[i], _autograd_score(ref, x[i:i + 1], t[:1])[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m.score(x, t), base.score(x, t))
    with pytest.raises(ValueError, match="'fox'"):
        m.encode_text(["fox"])


def test_bad_parameters_raise_value_errors():
    with pytest.raises(ValueError, match="intrinsic_dim must be in"):
        SubspaceGaussian(4, 5)
    with pytest.raises(ValueError, match="PSD"):
        GaussianMixtureModel([1.0], [[0.0, 0.0]], [[[1.0, 0.0], [0.0, -1.0]]])
    with pytest.raises(ValueError, match=r"x must be \(B, 3\)"):
        random_gmm(3, 2).eps(torch.zeros(2, 4), torch.full((2,), 0.1))
