"""The detector's cut from held-out images (scanner/corpus/calibrate.py): a false-positive rate on non-members."""


import numpy as np
import pytest
import torch
from inmemory import score_heldout_locally

from scanner.corpus.calibrate import calibrated_cut, cut_fpr_interval, heldout_scores, member_cut


def test_cut_is_the_fpr_quantile_in_the_flagging_direction():
    v = np.r_[np.arange(1000) / 1000.0, np.nan]  # the NaN is ignored
    low, high = calibrated_cut(v, 0.01, "low"), calibrated_cut(v, 0.01, "high")
    assert np.mean(v[:1000] <= low) == pytest.approx(0.01, abs=1e-3)
    assert np.mean(v[:1000] >= high) == pytest.approx(0.01, abs=1e-3)
    with pytest.raises(ValueError, match="no finite detector value"):
        calibrated_cut(np.array([np.nan]), 0.01, "low")
    with pytest.raises(ValueError, match="direction must be 'low' or 'high'"):
        calibrated_cut(v, 0.01, "up")


@pytest.mark.parametrize("n,fpr", [(500, 0.01), (100, 0.01), (2000, 0.001), (300, 0.05)])
def test_fpr_interval_covers_the_rate_the_cut_really_applies(n, fpr):
    """Held-out values drawn from U(0, 1): the cut's true false-positive rate is the cut itself (or 1 - cut for a
    high-flags column). Over 2,000 seeded draws of n images the 95 % interval must hold it at least 95 % of the
    time (binomial sd 0.5 %: >= 0.94) and not be loose (<= 0.99), and it must narrow as n grows."""
    lo, hi = cut_fpr_interval(n, fpr)
    assert lo < fpr < hi
    u = np.random.default_rng(n).random((2000, n))
    for direction in ("low", "high"):
        rate = np.array([calibrated_cut(x, fpr, direction) for x in u])
        rate = rate if direction == "low" else 1.0 - rate
        covered = np.mean((rate >= lo) & (rate <= hi))
        assert 0.94 <= covered <= 0.99, (direction, covered, lo, hi)
    lo4, hi4 = cut_fpr_interval(4 * n, fpr)
    assert hi4 - lo4 < 0.75 * (hi - lo)
    with pytest.raises(ValueError, match="0 < fpr < 1"):
        cut_fpr_interval(n, 0.0)


def test_heldout_scores_match_the_geometry_on_the_same_images(scan_config, tiny_corpus, tmp_path):
    """The stage path (read, decode, score as held-out rows, sink) gives the detector the geometry gives on the
    held-out images decoded by hand: a calibration that scored images differently from the scan would set a
    meaningless cut."""
    from scanner.data.load import load_images
    from scanner.geometry.mirror import mirror_calibrated_loss, mirror_calibrated_norm
    from scanner.geometry.trace import row_seeds
    from scanner.models.loading import load_score_model

    held = tiny_corpus.out_dir / "heldout"
    model = None
    for detector in ("loss_cal", "score_norm_cal"):
        cfg = scan_config(f"classify.calibration_shards={held}", "classify.calibration_max_images=100",
                          f"classify.detector={detector}")
        out = heldout_scores(cfg, score_heldout_locally(cfg, tmp_path / detector))
        assert out["images"] == 100 and out["errors"] == 0 and out["shards"] == ["00000"]
        keys, images, _, _ = load_images(str(held), cfg.data.resolution)
        model = model or load_score_model(cfg.model)
        x = model.encode_images(torch.from_numpy(images[:100]))
        g = cfg.geometry
        direct = (mirror_calibrated_loss(model, x, g.t_loss, g.cal_refs, noises=g.loss_noises,
                                         seed=row_seeds(list(keys[:100]), g.seed) + 3)
                  if detector == "loss_cal" else mirror_calibrated_norm(model, x, g.t_cal, g.cal_refs))
        np.testing.assert_allclose(out["values"], direct.numpy(), rtol=1e-4, err_msg=detector)


def test_detector_threshold_uses_the_heldout_cut_and_records_it(scan_config, tiny_corpus, tmp_path):
    from scanner.corpus.classify import thresholds

    held = tiny_corpus.out_dir / "heldout"
    cfg = scan_config(f"classify.calibration_shards={held}", "classify.calibration_fpr=0.05",
                      "classify.detector_threshold=0.123")
    held_scores = heldout_scores(cfg, score_heldout_locally(cfg, tmp_path))
    # a corpus of no rows: the cut must come from the held-out images alone
    t = thresholds(cfg, {"loss_cal": np.zeros(0), "lid_flipd": np.zeros(0)}, None, held_scores)
    vals = held_scores["values"]
    assert t["threshold"] == pytest.approx(np.quantile(vals, 0.05)) and t["threshold"] != 0.123
    assert t["calibration"]["images"] == 120 and t["calibration"]["fpr"] == 0.05
    assert t["calibration"]["fpr_interval"] == pytest.approx(list(cut_fpr_interval(120, 0.05)))
    assert "0.05 quantile of 120 held-out images" in t["rule"]


@pytest.mark.parametrize("direction", ["low", "high"])
def test_member_cut_flags_fpr_of_ordinary_members_whatever_the_memorized_tail(direction):
    """Ordinary members ~ N(1, 0.05) and a memorized 3 % far out on the flagging side: the members' cut is the
    normal's 1 % quantile, 1 -+ 2.326 x 0.05, and flags 1 % of the ordinary members; a plain 1 % quantile of the same
    corpus lands inside the memorized tail and flags none of them. A larger tail (15 %) moves the cut outwards:
    it flags fewer ordinary members, never more."""
    rng = np.random.default_rng(0)
    sign = -1 if direction == "low" else 1
    ordinary = rng.normal(1.0, 0.05, 20000)
    memorized = 1.0 + sign * rng.uniform(0.5, 0.7, 600)
    m = member_cut(np.r_[ordinary, memorized, np.nan], 0.01, direction)
    assert m["z"] == pytest.approx(2.3263, abs=1e-4) and m["rows"] == 20600
    assert m["cut"] == pytest.approx(1.0 + sign * 2.3263 * 0.05, abs=0.01)
    flags = (lambda v: v <= m["cut"]) if direction == "low" else (lambda v: v >= m["cut"])
    assert np.mean(flags(ordinary)) == pytest.approx(0.01, abs=0.005)
    assert np.mean(flags(memorized)) == 1.0
    naive = calibrated_cut(np.r_[ordinary, memorized], 0.01, direction)
    assert np.mean((ordinary <= naive) if direction == "low" else (ordinary >= naive)) == 0
    heavy = member_cut(np.r_[ordinary, 1.0 + sign * rng.uniform(0.5, 0.7, 3500)], 0.01, direction)
    assert 0 < sign * (heavy["cut"] - m["cut"]) < 0.06
    with pytest.raises(ValueError, match="no finite detector value"):
        member_cut(np.array([np.nan]), 0.01, direction)


def test_detector_threshold_takes_the_stricter_of_the_heldout_and_the_members_cut(scan_config, tiny_corpus, tmp_path):
    """With calibration_members the cut is the held-out quantile or the members' cut, whichever flags less, and
    summary.json records both; without it, the held-out quantile alone."""
    from scanner.corpus.classify import thresholds

    held = tiny_corpus.out_dir / "heldout"
    args = (f"classify.calibration_shards={held}", "classify.calibration_fpr=0.05")
    held_scores = heldout_scores(scan_config(*args), score_heldout_locally(scan_config(*args), tmp_path))
    held_cut = np.quantile(held_scores["values"], 0.05)

    def detector_threshold(values, cfg):
        return thresholds(cfg, {"loss_cal": values}, None, held_scores)

    rng = np.random.default_rng(1)
    tight = held_cut + 0.1 + rng.normal(0, 1e-3, 500)  # members barely spread: their cut lies above the held-out cut
    wide = held_cut + rng.normal(0, 10.0, 500)  # members spread wide: their cut lies far below it
    t = detector_threshold(tight, scan_config(*args))
    assert t["threshold"] == pytest.approx(held_cut) and not t["calibration"]["members"]["binding"]
    t = detector_threshold(wide, scan_config(*args))
    m = member_cut(wide, 0.05, "low")
    assert m["cut"] < held_cut - 5 and t["threshold"] == pytest.approx(m["cut"])
    assert t["calibration"]["members"]["binding"] and t["calibration"]["heldout_cut"] == pytest.approx(held_cut)
    assert t["calibration"]["flagged_share_of_heldout"] == 0.0  # 10 sd below: none of the 120
    assert "the stricter of the 0.05 quantile of 120 held-out images" in t["rule"]
    t = detector_threshold(wide, scan_config(*args, "classify.calibration_members=false"))
    assert t["threshold"] == pytest.approx(held_cut) and "members" not in t["calibration"]


def test_heldout_shards_without_a_readable_image_name_the_key(scan_config, tmp_path):
    """Held-out shards with nothing scoreable: a user error naming the key (the scored corpus is kept)."""
    import io
    import tarfile

    from scanner.errors import ConfigError

    bad = tmp_path / "held" / "00000.tar"
    bad.parent.mkdir()
    with tarfile.open(bad, "w") as tf:  # one member that is not an image
        info = tarfile.TarInfo("000000000.jpg")
        data = b"not a jpeg"
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    cfg = scan_config(f"classify.calibration_shards={bad.parent}")
    with pytest.raises(ConfigError, match=r"classify.calibration_shards: none of the held-out images .* \(1 error rows\)"):
        heldout_scores(cfg, score_heldout_locally(cfg, tmp_path / "out"))


def test_a_cfg_norm_detector_encodes_no_mirror_images(tiny_sd_dir, monkeypatch):
    """Held-out images scored for cfg_norm alone skip the latent model's mirror images (a VAE encode each): the
    column does not use them. score_norm_cal does."""
    from scanner.config import load_config, shipped_config
    from scanner.geometry import mirror
    from scanner.stages.score import ScoreSpec, ScoreStage

    calls = []
    real = mirror.pixel_mirrors
    monkeypatch.setattr(mirror, "pixel_mirrors", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = load_config(shipped_config("demo-latent"), [f"model.path={tiny_sd_dir}", "data.resolution=16"])
    n = 3
    batch = {"key": np.array(list("abc"), dtype=object), "caption": np.array(["a cat"] * n, dtype=object),
             "marker": np.zeros(n, bool), "error": np.array([None] * n, dtype=object),
             "error_stage": np.array([None] * n, dtype=object), "split": np.array(["heldout"] * n, dtype=object),
             "image_model": np.random.default_rng(0).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)}
    for only, encodes in (("cfg_norm", 0), ("score_norm_cal", 1), ("loss_cal", 1)):
        stage = ScoreStage(ScoreSpec(cfg.model, cfg.geometry, cfg.data.resolution, detector=only))
        calls.clear()
        out = stage.process(dict(batch))
        assert len(calls) == encodes and np.isfinite(out[only]).all() and out["error"].tolist() == [None] * n, only
