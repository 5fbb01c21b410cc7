"""Traces and JVPs: exact trace against the closed form, FD against autograd, seeded Hutchinson."""

import pytest
import torch

from scanner.geometry.trace import eps_jvp, eps_trace
from scanner.models.analytic import random_gmm


@pytest.fixture(scope="module")
def gmm():
    return random_gmm(16, 3, seed=7)


def _points(m, n=8, t=0.1):
    x, _ = m.sample(n, seed=1)
    tv = torch.full((n,), t, dtype=torch.float64)
    psi, _ = m.psi_sigma(tv)
    return psi[:, None] * x, tv


@pytest.mark.parametrize("jvp", ["autograd", "vjp"])
def test_exact_trace_matches_closed_form_and_is_chunk_invariant(gmm, jvp):
    x, t = _points(gmm)
    _, sigma = gmm.psi_sigma(t)
    truth = -sigma * gmm.score_jacobian_trace(x, t)  # d eps/dx = -sigma ds/dx
    for chunk in (None, 24, 1024):
        eps, tr = eps_trace(gmm, x, t, method="exact", jvp=jvp, chunk=chunk)
        torch.testing.assert_close(tr, truth, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(eps, gmm.eps(x, t), rtol=0, atol=0)


def test_fd_exact_trace_matches_closed_form(gmm):
    x, t = _points(gmm)
    _, sigma = gmm.psi_sigma(t)
    _, tr = eps_trace(gmm, x, t, method="exact", jvp="fd", fd_eps=1e-4, chunk=1024)
    torch.testing.assert_close(tr, -sigma * gmm.score_jacobian_trace(x, t), rtol=1e-6, atol=0)


@pytest.mark.parametrize("scheme,fd_eps,tol",
                         [("central", 1e-4, 1e-7), ("central", 1e-3, 1e-5), ("forward", 1e-6, 1e-4)])
def test_fd_jvp_agrees_with_autograd_jvp_float64(gmm, scheme, fd_eps, tol):
    # Stated tolerance (relative, max over rows): central O(fd_eps^2), forward O(fd_eps) in float64.
    x, t = _points(gmm)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eps, jv = eps_jvp(gmm, x, t, v, jvp="autograd")
    _, jv_fd = eps_jvp(gmm, x, t, v, jvp="fd", fd_eps=fd_eps, scheme=scheme, eps_x=eps)
    rel = (jv_fd - jv).norm(dim=1) / jv.norm(dim=1)
    assert rel.max().item() < tol


def test_hutchinson_is_seeded_and_unbiased(gmm):
    x, t = _points(gmm)
    _, exact = eps_trace(gmm, x, t, method="exact", chunk=1024)
    runs = [eps_trace(gmm, x, t, probes=16, seed=s, chunk=1024)[1] for s in (3, 3, 4)]
    assert torch.equal(runs[0], runs[1])  # same seed, same numbers, bit for bit
    assert not torch.equal(runs[0], runs[2])
    # Chunking changes only how rows are grouped, not which probe a row gets.
    torch.testing.assert_close(eps_trace(gmm, x, t, probes=16, seed=3, chunk=8)[1], runs[0], rtol=1e-12, atol=1e-12)
    many = eps_trace(gmm, x, t, probes=4096, seed=0, chunk=8192)[1]
    assert ((many - exact).abs() / exact.abs()).max().item() < 0.03


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_hutchinson_variance_shrinks_with_probes(gmm, dist):
    x, t = _points(gmm, n=32)
    _, exact = eps_trace(gmm, x, t, method="exact", chunk=1024)
    errs = [(eps_trace(gmm, x, t, probes=k, probe_dist=dist, seed=1, chunk=8192)[1] - exact).pow(2).mean().sqrt()
            for k in (4, 64, 1024)]
    assert errs[0] > errs[1] > errs[2]


def _tiny_unet_model():
    from diffusers import DDPMScheduler, UNet2DModel

    from scanner.models import pixel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       norm_num_groups=8, attention_head_dim=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    return pixel.PixelScoreModel(unet, DDPMScheduler(num_train_timesteps=1000))


def test_fd_jvp_agrees_with_autograd_through_a_unet_with_attention():
    # float32 network: central differences at fd_eps = 1e-2 agree with forward-mode AD to 2 % (stated tolerance);
    # the residual is float32 round-off / (2h) plus O(h^2) curvature.
    m = _tiny_unet_model()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 8, 8, generator=g) * 2 - 1
    t = torch.full((2,), 0.1)
    v = (torch.randint(0, 2, x.shape, generator=g) * 2 - 1).float()
    eps, jv = eps_jvp(m, x, t, v, jvp="autograd")
    _, jv_fd = eps_jvp(m, x, t, v, jvp="fd", fd_eps=1e-2)
    rel = ((jv_fd - jv).flatten(1).norm(dim=1) / jv.flatten(1).norm(dim=1)).max().item()
    assert rel < 0.02
    torch.testing.assert_close(eps, m.eps(x, t), rtol=1e-5, atol=1e-5)
    a = eps_trace(m, x, t, probes=2, seed=5)[1]
    assert torch.equal(a, eps_trace(m, x, t, probes=2, seed=5)[1])


def test_bad_trace_parameters(gmm):
    x, t = _points(gmm, n=2)
    with pytest.raises(ValueError, match="probes must be an int >= 1, got 0"):
        eps_trace(gmm, x, t, probes=0)
    with pytest.raises(ValueError, match="method must be one of 'exact', 'hutchinson', got 'lanczos'"):
        eps_trace(gmm, x, t, method="lanczos")
    with pytest.raises(ValueError, match="probe_dist must be one of"):
        eps_trace(gmm, x, t, probe_dist="sphere")
    with pytest.raises(ValueError, match="fd_eps must be a finite number > 0, got -0.1"):
        eps_jvp(gmm, x, t, x, jvp="fd", fd_eps=-0.1)
    with pytest.raises(ValueError, match="jvp must be one of 'autograd', 'fd', got 'vjp'"):
        eps_jvp(gmm, x, t, x, jvp="vjp")
