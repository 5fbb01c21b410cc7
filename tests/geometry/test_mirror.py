"""score_norm_cal against closed forms: the ratio itself, and a planted confound it must cancel."""

import pytest
import torch
from sklearn.metrics import roc_auc_score

from scanner.config import ConfigError, GeometryConfig, ScanConfig
from scanner.geometry.mirror import check_refs, mirror, mirror_calibrated_norm
from scanner.geometry.scores import compute_scores
from scanner.models.analytic import GaussianMixtureModel, random_gmm
from scanner.models.base import ScoreModel


class ImageGMM(ScoreModel):
    """A GMM whose samples are (C, H, W) images, so that vflip and rot180 have a meaning."""

    conditional = False

    def __init__(self, gmm: GaussianMixtureModel, shape: tuple[int, int, int]):
        self.gmm, self.sample_shape = gmm, shape

    def psi_sigma(self, t):
        return self.gmm.psi_sigma(t)

    def eps(self, x, t, cond=None):
        return self.gmm.eps(x.flatten(1), t).view_as(x)

    def sample(self, n, seed=0):
        x, labels = self.gmm.sample(n, seed)
        return x.view(n, *self.sample_shape), labels


def _closed_form_ratio(m, x, t, refs):
    tv = torch.full((x.shape[0],), t, dtype=torch.float64)
    psi, _ = m.psi_sigma(tv)
    norm = lambda y: m.eps(psi.view(-1, *[1] * (y.dim() - 1)) * y, tv).flatten(1).norm(dim=1)
    ref = torch.stack([norm(x.flip(d)) for d in refs]).log().mean(0).exp()
    return norm(x) / ref


def test_ratio_is_the_closed_form_ratio_and_shares_the_score_norm_forward():
    m = ImageGMM(random_gmm(12, 3, seed=1), (3, 2, 2))
    x, _ = m.sample(7, seed=2)
    want = _closed_form_ratio(m, x, 0.1, [(-1,), (-2,), (-2, -1)])
    got = mirror_calibrated_norm(m, x, 0.1, ["hflip", "vflip", "rot180"])
    torch.testing.assert_close(got, want)
    assert torch.equal(mirror(x, "rot180"), x.flip(-1).flip(-2))
    # inside compute_scores: t_cal == t_laplace reuses score_norm's forward, t_cal != t_laplace does not
    for t_lap in (0.1, 0.4):
        out = compute_scores(m, x, GeometryConfig(t_laplace=t_lap, t0=t_lap, t_cal=0.1, cal_refs=["hflip", "vflip",
                                                                                                 "rot180"]))
        torch.testing.assert_close(out["score_norm_cal"], want.float())


def test_mirror_calibration_cancels_a_planted_simplicity_confound():
    # R^(1x4x4). "Memorized": 10 sharp components (variance 1e-3) at random, asymmetric images. "Simple": one
    # equally sharp component at a flat grey image (mirror-symmetric), like the flat crops that top the raw
    # score norm on the demo. "Broad": N(0, I). The raw norm cannot tell memorized from simple; the ratio can,
    # because a mirrored simple image is just as likely, and a mirrored memorized image is nowhere near a peak.
    # Measured: raw AUROC 0.816, calibrated 1.000 (memorized vs the rest, low flags).
    dim, g = 16, torch.Generator().manual_seed(0)
    mem_means = torch.randn(10, dim, generator=g, dtype=torch.float64)
    means = torch.cat([mem_means, torch.full((1, dim), 0.5, dtype=torch.float64), torch.zeros(1, dim,
                                                                                              dtype=torch.float64)])
    var = torch.tensor([1e-3] * 11 + [1.0], dtype=torch.float64)
    covs = var[:, None, None] * torch.eye(dim, dtype=torch.float64)
    m = ImageGMM(GaussianMixtureModel([0.02] * 10 + [0.3, 0.5], means, covs), (1, 4, 4))
    x, labels = m.sample(600, seed=1)
    memorized = (labels < 10).numpy()
    out = compute_scores(m, x, GeometryConfig(t_laplace=0.1, t0=0.1, t_cal=0.1, cal_refs=["hflip", "vflip"]))
    raw = roc_auc_score(memorized, -out["score_norm"].numpy())
    cal = roc_auc_score(memorized, -out["score_norm_cal"].numpy())
    simple = (labels == 10).numpy()
    assert raw < 0.87 and cal > 0.99, (raw, cal)
    # on the symmetric components the ratio is exactly 1: mirroring preserves |x - mean| there
    torch.testing.assert_close(out["score_norm_cal"][torch.from_numpy(simple)],
                               torch.ones(int(simple.sum())), atol=1e-3, rtol=0)


def test_bad_refs_name_the_key_and_the_accepted_values():
    with pytest.raises(ValueError, match=r"geometry.cal_refs must be a non-empty list of \['hflip', 'rot180', "
                                         r"'vflip'\], got \['flip'\]"):
        check_refs(["flip"])
    with pytest.raises(ValueError, match=r"cal_refs \['vflip'\] mirror a second spatial axis.*\(6,\)"):
        compute_scores(random_gmm(6, 2), torch.zeros(2, 6, dtype=torch.float64), GeometryConfig(cal_refs=["vflip"]))
    with pytest.raises(ConfigError, match=r"geometry.cal_refs must be a list of hflip, vflip, rot180"):
        GeometryConfig(cal_refs=["diagonal"]).validate()
    cfg = ScanConfig()
    cfg.model.kind, cfg.geometry.cal_refs = "none", []
    with pytest.raises(ConfigError, match=r"classify.detector is score_norm_cal but geometry.cal_refs is \[\]"):
        cfg.validate()
