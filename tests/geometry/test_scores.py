"""compute_scores: one pass, the right columns, shared work, and separation of a sharp (memorized) mode."""

import pytest
import torch
from sklearn.metrics import roc_auc_score

from scanner.config import GeometryConfig
from scanner.geometry.flipd import flipd, flipd_noised
from scanner.geometry.p_laplace import p_laplace
from scanner.geometry.scores import compute_scores, score_columns
from scanner.models.analytic import ClassConditionalGMM, GaussianMixtureModel, random_gmm


class CountingGMM(GaussianMixtureModel):
    """A GMM that counts its eps calls and rows (to check what compute_scores shares)."""

    calls = rows = 0

    def eps(self, x, t, cond=None):
        self.calls += 1
        self.rows += x.shape[0]
        return super().eps(x, t, cond)


def _counting(seed=0, dim=6):
    b = random_gmm(dim, 3, seed=seed)
    return CountingGMM(b.log_weights.exp(), b.means, eig=(b.lam, b.evecs))


def test_columns_shapes_and_dtypes():
    m = _counting()
    x, _ = m.sample(5, seed=0)
    cfg = GeometryConfig(p_values=[1.0, 1.5, 2.0, 3.0], nb=True, cal_refs=["hflip"])
    out = compute_scores(m, x, cfg)
    assert list(out) == score_columns(cfg, False) == ["lid_flipd", "score_norm", "p_laplace_1", "p_laplace_1_5",
                                                      "p_laplace_2", "p_laplace_3", "score_norm_cal", "loss_cal",
                                                      "lid_nb"]
    assert all(v.shape == (5,) and v.dtype == torch.float32 and v.device.type == "cpu" for v in out.values())


def test_matches_the_standalone_estimators():
    m = _counting()
    x, _ = m.sample(6, seed=1)
    for t0 in (0.1, 0.05):  # shared evaluation, and a separate FLIPD time
        cfg = GeometryConfig(t0=t0, t_laplace=0.1, trace="exact", p_values=[1.0, 2.0, 3.0], cal_refs=[],
                             flipd_at="clean")
        out = compute_scores(m, x.double(), cfg)
        torch.testing.assert_close(out["lid_flipd"], flipd(m, x, t0, trace="exact").float())
        noised = compute_scores(m, x.double(), GeometryConfig(t0=t0, trace="exact", cal_refs=[], flipd_noises=3,
                                                              seed=4))
        torch.testing.assert_close(noised["lid_flipd"],
                                   flipd_noised(m, x, t0, noises=3, trace="exact", seed=4).float())
        assert torch.equal(noised["score_norm"], out["score_norm"])
        psi, _ = m.psi_sigma(torch.full((6,), 0.1, dtype=torch.float64))
        xt = psi[:, None] * x
        ref = p_laplace(m, xt, 0.1, [1.0, 2.0, 3.0], trace="exact")
        for p, col in ((1.0, "p_laplace_1"), (2.0, "p_laplace_2"), (3.0, "p_laplace_3")):
            torch.testing.assert_close(out[col], ref[p].float())
        torch.testing.assert_close(out["score_norm"], m.eps(xt, torch.full((6,), 0.1)).norm(dim=1).float())


@pytest.mark.parametrize("jvp,scheme,calls,rows", [
    ("autograd", "central", 3, 5),  # 1 forward + 4 directions (3 probes + e_hat) in 2 JVP calls of 2B
    ("fd", "central", 3, 9),  # 1 forward + 2 calls of (x + hv, x - hv) for 2 directions each
    ("fd", "forward", 3, 5),  # 1 forward + 2 calls of x + hv
    ("vjp", "central", 1, 1),  # 1 forward with its graph + 4 backwards
])
def test_forward_and_directions_are_shared(jvp, scheme, calls, rows):
    m = _counting()
    x, _ = m.sample(4, seed=0)
    cfg = GeometryConfig(probes=3, cal_refs=[], flipd_at="clean")
    out = compute_scores(m, x, cfg, jvp=jvp, fd_scheme=scheme)
    assert (m.calls, m.rows) == (calls, rows * 4)
    ref = compute_scores(_counting(), x, cfg)  # same probes, any derivative mode
    for k in out:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-3 if jvp == "fd" else 1e-6, atol=1e-4)


def test_noised_flipd_costs_one_forward_and_a_trace_pass_per_noise():
    m = _counting()
    x, _ = m.sample(4, seed=0)
    cfg = GeometryConfig(probes=3, cal_refs=[], flipd_noises=2, flipd_probes=2)
    compute_scores(m, x, cfg, jvp="vjp")
    assert (m.calls, m.rows) == (3, 3 * 4)  # the clean forward + one forward (with its graph) per noise
    m.calls = m.rows = 0
    compute_scores(m, x, cfg, jvp="autograd")  # 1 + 2 JVP calls (4 directions), then per noise 1 + 1 (2 probes)
    assert (m.calls, m.rows) == (1 + 2 + 2 * 2, 4 + 2 * 8 + 2 * (4 + 8))


def test_seeded():
    m = random_gmm(6, 3, seed=0)
    x, _ = m.sample(4, seed=0)
    a, b, c = (compute_scores(m, x, GeometryConfig(seed=s, cal_refs=["hflip"])) for s in (3, 3, 4))
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["lid_flipd"], c["lid_flipd"])


def test_conditional_model_adds_cfg_norm_only_with_cond():
    b = random_gmm(6, 3, seed=2)
    m = ClassConditionalGMM(b.log_weights.exp(), b.means, eig=(b.lam, b.evecs))
    x, labels = m.sample(4, seed=0)
    cfg = GeometryConfig(cal_refs=["hflip"])
    with_cond = compute_scores(m, x, cfg, cond=labels)
    assert list(with_cond) == score_columns(cfg, True) and with_cond["cfg_norm"].min().item() > 0
    assert list(compute_scores(m, x, cfg)) == score_columns(cfg, False)


def test_sharp_mode_separates_from_broad_mode():
    # A "memorized" sharp component (variance 0.3) next to a broad one (variance 1), means 1 apart in R^16,
    # scored with the default config (8 Rademacher probes, t0 = t_laplace = 0.1). Measured AUROC of "sharp
    # vs broad", lower value flags sharp: FLIPD 0.895, Delta_1 0.996, Delta_2 0.997 (Delta_3 0.989; score_norm
    # 0.12, i.e. it flags the other way). Thresholds sit just below the measurement.
    dim = 16
    means = torch.zeros(2, dim, dtype=torch.float64)
    means[0, 0] = 1.0
    covs = torch.stack([0.3 * torch.eye(dim, dtype=torch.float64), torch.eye(dim, dtype=torch.float64)])
    m = GaussianMixtureModel([0.2, 0.8], means, covs)
    x, labels = m.sample(200, seed=5)
    out = compute_scores(m, x, GeometryConfig(p_values=[1.0, 2.0, 3.0], cal_refs=[]), chunk=4096)
    sharp = (labels == 0).numpy()
    auroc = {k: roc_auc_score(sharp, -v.numpy()) for k, v in out.items()}
    assert auroc["lid_flipd"] > 0.85 and auroc["p_laplace_1"] > 0.97 and auroc["p_laplace_2"] > 0.97, auroc


def test_bad_parameters_name_value_and_range():
    m = random_gmm(4, 2, seed=0)
    x, _ = m.sample(2, seed=0)
    with pytest.raises(ValueError, match=r"geometry.t0 must be a float in \(0, 1\), got 1.5"):
        compute_scores(m, x, GeometryConfig(t0=1.5))
    with pytest.raises(ValueError, match=r"geometry.probes must be an int >= 1, got 0"):
        compute_scores(m, x, GeometryConfig(probes=0))
    with pytest.raises(ValueError, match=r"geometry.p_values must be a non-empty list of numbers > 0"):
        compute_scores(m, x, GeometryConfig(p_values=[1.0, -2.0]))
    with pytest.raises(ValueError, match=r"x must be \(B, 4\) with B >= 1, got \(2, 5\)"):
        compute_scores(m, torch.zeros(2, 5), GeometryConfig())
    with pytest.raises(ValueError, match="jvp must be one of 'autograd', 'fd', 'vjp', got 'hvp'"):
        compute_scores(m, x, GeometryConfig(), jvp="hvp")
    with pytest.raises(ValueError, match="fd_scheme must be one of 'central', 'forward', got 'backward'"):
        compute_scores(m, x, GeometryConfig(jvp="fd"), fd_scheme="backward")


def test_per_row_seeds_make_an_images_scores_independent_of_its_batch():
    """Ray cuts batches as blocks arrive, so the same image lands in different batches on different runs."""
    from scanner.geometry.trace import row_seeds

    b = random_gmm(6, 3, seed=2)
    m = ClassConditionalGMM(b.log_weights.exp(), b.means, eig=(b.lam, b.evecs))
    x, labels = m.sample(6, seed=0)
    keys = [f"{i:09d}" for i in range(6)]
    cfg = GeometryConfig(probes=3, cal_refs=["hflip"])
    whole = compute_scores(m, x, cfg, cond=labels, seeds=row_seeds(keys, cfg.seed))
    order = [4, 1, 5]  # three of them, in another order, in a smaller batch
    part = compute_scores(m, x[order], cfg, cond=labels[order], seeds=row_seeds([keys[i] for i in order], cfg.seed))
    for col in whole:
        torch.testing.assert_close(part[col], whole[col][order], rtol=1e-6, atol=1e-6)
    # a batch-wide seed does not have that property (the probes follow the row position)
    batchwise = compute_scores(m, x[order], cfg, cond=labels[order])
    assert not torch.allclose(batchwise["p_laplace_1"], compute_scores(m, x, cfg, cond=labels)["p_laplace_1"][order])
    assert not torch.equal(row_seeds(keys, 0), row_seeds(keys, 1))


@pytest.mark.parametrize("t_cal", [0.1, 0.4])
def test_one_column_alone_is_the_full_calls_value_at_its_own_cost(t_cal):
    """only=...: the held-out images of a calibrated cut need the detector alone; the value must be the one the full
    call gives, from that column's own forwards (score_norm 1, score_norm_cal 1 + one per mirror, loss_cal
    loss_noises x (1 + mirrors))."""
    m = _counting(seed=3)
    x, _ = m.sample(5, seed=1)
    cfg = GeometryConfig(cal_refs=["hflip"], t_laplace=0.4, t_cal=t_cal, loss_noises=3)
    full = compute_scores(m, x, cfg)
    for col, calls in (("score_norm", 1), ("score_norm_cal", 2), ("loss_cal", 6), ("lid_flipd", None)):
        m.calls = 0
        one = compute_scores(m, x, cfg, only=col)
        assert list(one) == [col]
        torch.testing.assert_close(one[col], full[col])
        if calls is not None:
            assert m.calls == calls, col
    with pytest.raises(ValueError, match="only='cfg_norm' is not a column"):
        compute_scores(m, x, cfg, only="cfg_norm")  # an unconditional call has no cfg_norm

    b = random_gmm(6, 3, seed=2)
    cm = ClassConditionalGMM(b.log_weights.exp(), b.means, eig=(b.lam, b.evecs))
    x, labels = cm.sample(4, seed=0)
    seeds = torch.arange(4) * 7
    full = compute_scores(cm, x, cfg, cond=labels, seeds=seeds)
    torch.testing.assert_close(compute_scores(cm, x, cfg, cond=labels, seeds=seeds, only="cfg_norm")["cfg_norm"],
                               full["cfg_norm"])
