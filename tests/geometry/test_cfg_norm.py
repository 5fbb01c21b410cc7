"""CFG-adjusted score norm on a class-conditional GMM against its closed form (docs/method.md §6)."""

import pytest
import torch

from scanner.geometry.cfg_norm import cfg_noises, cfg_norm
from scanner.models.analytic import ClassConditionalGMM, GaussianMixtureModel, random_gmm

T = 0.02


def _conditional(base, **kwargs):
    return ClassConditionalGMM(base.log_weights.exp(), base.means, eig=(base.lam, base.evecs), **kwargs)


def _grad_log(model, x, t):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model.log_prob(x, t).sum(), x)
    return g


def test_zero_when_the_condition_carries_no_information():
    # Every component identical: p(x | c) = p(x) for every c.
    one = random_gmm(8, 1, seed=0)
    m = ClassConditionalGMM([1.0, 2.0, 3.0], one.means.expand(3, -1), eig=(one.lam.expand(3, -1),
                                                                            one.evecs.expand(3, -1, -1)))
    x, _ = m.sample(6, seed=1)
    val = cfg_norm(m, x, T, m.encode_text(["0", "1", "2", "0", "1", "2"]), noises=3, seed=0)
    assert val.abs().max().item() < 1e-12


def test_matches_the_closed_form_and_is_positive():
    base = random_gmm(8, 3, seed=5)
    m = _conditional(base)
    x, labels = m.sample(10, seed=2)
    cond = labels  # each point conditioned on its own component
    est = cfg_norm(m, x, T, cond, noises=4, seed=7)
    t = torch.full((10,), T, dtype=torch.float64)
    psi, sigma = m.psi_sigma(t)
    truth = torch.zeros(10, dtype=torch.float64)
    for e in cfg_noises(tuple(x.shape), 4, 7, torch.float64):
        xt = psi[:, None] * x + sigma[:, None] * e
        s_mix = _grad_log(base, xt, t)
        s_cond = torch.stack([_grad_log(GaussianMixtureModel([1.0], base.means[c:c + 1], eig=(
            base.lam[c:c + 1], base.evecs[c:c + 1])), xt[i:i + 1], t[:1])[0] for i, c in enumerate(cond.tolist())])
        truth += sigma * (s_cond - s_mix).norm(dim=1)
    torch.testing.assert_close(est, truth / 4, rtol=1e-10, atol=1e-12)
    assert est.min().item() > 0
    # The empty prompt as cond gives exactly zero; an explicit uncond is the same as the default.
    assert cfg_norm(m, x, T, m.uncond(10), noises=2).abs().max().item() == 0.0
    torch.testing.assert_close(cfg_norm(m, x, T, cond, m.uncond(10), noises=4, seed=7), est)


def test_bad_cfg_norm_parameters():
    m = _conditional(random_gmm(4, 2, seed=0))
    x, labels = m.sample(3, seed=0)
    with pytest.raises(ValueError, match=r"t_cfg must be a float in \(0, 1\), got 1.0"):
        cfg_norm(m, x, 1.0, labels)
    with pytest.raises(ValueError, match="cfg_noises must be an int >= 1, got 0"):
        cfg_norm(m, x, T, labels, noises=0)
    with pytest.raises(ValueError, match="needs cond"):
        cfg_norm(m, x, T, None)
    with pytest.raises(ValueError, match="unconditional"):
        cfg_norm(random_gmm(4, 2), x, T, labels)
