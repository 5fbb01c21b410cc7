"""The pixel check of near-duplicate candidates (scanner.neighbours.align) and its 'aligned' links."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from inmemory import find_duplicate_groups

from scanner.config import ConfigError, NeighboursConfig
from scanner.neighbours.align import aligned_match, aligned_rmse, contrast, thumbnails


def _scene(rng, size=32):
    """A random smooth RGB image with sharp edges: a blurred noise field plus a few bright squares."""
    f = rng.random((size // 4, size // 4, 3))
    img = np.kron(f, np.ones((4, 4, 1)))
    for _ in range(3):
        y, x = rng.integers(0, size - 8, 2)
        img[y:y + 6, x:x + 6] = rng.random(3)
    return (img * 255).round().astype(np.uint8)


def _shift(img, dy, dx):
    """img moved by (dy, dx) px, the uncovered border filled from the edge (as the demo's shift edit)."""
    p = np.pad(img, ((2, 2), (2, 2), (0, 0)), mode="edge")
    h, w = img.shape[:2]
    return p[2 - dy:2 - dy + h, 2 - dx:2 - dx + w]


def test_a_shifted_copy_aligns_exactly_and_a_distinct_image_does_not():
    rng = np.random.default_rng(0)
    a = _scene(rng)
    b = _scene(rng)
    moved = [_shift(a, dy, dx) for dy, dx in [(1, 0), (0, -2), (2, 2), (-1, 1)]]
    t = thumbnails(np.stack([a] * 4 + [a]), 32)
    u = thumbnails(np.stack(moved + [b]), 32)
    r = aligned_rmse(t, u, 32, max_shift=2)
    assert np.all(r[:4] == 0), r  # moved back, the overlap is the same pixels: exactly 0
    assert r[4] > 0.1, r
    # without the shift search the moved copies are far apart; a shift beyond max_shift is not searched
    assert np.all(aligned_rmse(t[:4], u[:4], 32, max_shift=0) > 0.03)
    assert aligned_rmse(t[2:3], u[2:3], 32, max_shift=1)[0] > 0.03
    # symmetric
    np.testing.assert_allclose(aligned_rmse(u, t, 32, 2), r, atol=1e-7)


def test_a_flat_image_matches_nothing_however_close_its_pixels():
    """A flat image is within a few hundredths of every low-contrast image of its mean colour: RMSE alone would
    call them one picture. The match also asks for agreement better than either image's own contrast."""
    rng = np.random.default_rng(1)
    dark = np.clip(40 + rng.normal(0, 3, size=(32, 32, 3)), 0, 255).astype(np.uint8)  # contrast ~0.012
    flat = np.full((32, 32, 3), 40, np.uint8)
    scene = _scene(rng)
    t = thumbnails(np.stack([dark, scene, dark]), 32)
    u = thumbnails(np.stack([flat, _shift(scene, 1, -1), _shift(dark, 1, 0)]), 32)
    r = aligned_rmse(t, u, 32, 2)
    assert r[0] < 0.02 and r[1] == 0 and r[2] == 0, r
    assert contrast(u[:1], 32)[0] == 0.0
    assert 0.005 < contrast(t[:1], 32)[0] < 0.02
    # the flat pair fails on contrast alone; the shifted scene and the shifted low-contrast image still match
    assert aligned_match(t, u, 32, 2, 0.02).tolist() == [False, True, True]
    assert not aligned_match(u[:1], u[:1], 32, 2, 0.02)[0]  # not even its own copy: bytes and pHash find those
    x = t[1:2].reshape(32 * 32, 3).astype(float) / 255
    np.testing.assert_allclose(contrast(t[1:2], 32)[0], np.sqrt(((x - x.mean(0)) ** 2).mean()), rtol=1e-5)


def test_thumbnails_resize_and_validate():
    img = np.full((2, 64, 48, 3), 200, np.uint8)
    t = thumbnails(img, 16)
    assert t.shape == (2, 16 * 16 * 3) and t.dtype == np.uint8 and np.all(t == 200)
    with pytest.raises(ValueError, match="thumbnail rows"):
        aligned_rmse(t, t[:, :10], 16, 1)
    with pytest.raises(ValueError, match="max_shift"):
        aligned_rmse(t, t, 16, 16)


@pytest.mark.parametrize("key,value,accepted", [
    ("align_size", 4, "0 (off) or an int in [8, 256]"),
    ("align_min_cosine", 1.5, "a cosine in [-1, 1]"),
    ("align_max_rmse", -0.1, "an RMSE in [0, 1]"),
    ("align_max_shift", 16, "below half of align_size"),
])
def test_bad_align_settings_name_the_key(key, value, accepted):
    with pytest.raises(ConfigError, match=f"neighbours.{key}.*{accepted.split()[0]}"):
        NeighboursConfig(**{key: value}).validate()
    NeighboursConfig(align_size=0, align_max_shift=5).validate()  # off: the shift is not checked


def test_a_near_miss_is_linked_only_when_its_pixels_agree():
    """Three images whose embeddings sit at cosine 0.85 from a: a's shifted copy (linked, 'aligned'), a distinct
    image (not linked), and one above the threshold (linked by the embedding as before)."""
    rng = np.random.default_rng(1)
    a, other, c = _scene(rng), _scene(rng), _scene(rng)
    images = np.stack([a, _shift(a, 1, 1), other, c, _shift(c, 0, 1)])
    keys = [f"k{i}" for i in range(5)]
    e0 = np.array([1.0, 0, 0, 0])
    near = 0.85 * e0 + np.sqrt(1 - 0.85 ** 2) * np.array([0, 1.0, 0, 0])
    far = 0.85 * e0 + np.sqrt(1 - 0.85 ** 2) * np.array([0, 0, 1.0, 0])
    e3 = np.array([0, 0, 0, 1.0])
    v = np.stack([e0, near, far, e3, 0.99 * e3 + np.sqrt(1 - 0.99 ** 2) * np.array([0, 1.0, 0, 0])])
    v = v.astype(np.float32)
    thumbs = thumbnails(images, 32)
    kw = {"threshold": 0.93, "k": 4, "thumbs": thumbs}
    on = find_duplicate_groups(keys, v, None, align=(32, 0.8, 0.015, 2), **kw).set_index("key")
    off = find_duplicate_groups(keys, v, None, align=(32, 0.9, 0.015, 2), **kw).set_index("key")
    assert set(on.index) == {"k0", "k1", "k3", "k4"}
    assert on.loc["k0", "group_id"] == on.loc["k1", "group_id"] != on.loc["k3", "group_id"]
    assert on.loc["k1", "link"] == "aligned" and on.loc["k4", "link"] == "embedding"
    assert on.loc["k1", "similarity"] == pytest.approx(0.85, abs=1e-5)
    assert set(off.index) == {"k3", "k4"}  # 0.85 is below a 0.9 floor: never checked


def _by_kept(df: pd.DataFrame) -> pd.DataFrame:
    """key -> its group's kept key, keep and link: a grouping compared without the group numbering."""
    kept = df[df["keep"]].set_index("group_id")["key"]
    return pd.DataFrame({"key": df["key"].astype(object), "kept": df["group_id"].map(kept).astype(object),
                         "keep": df["keep"].astype(bool), "link": df["link"].astype(object)}
                        ).sort_values("key", ignore_index=True)


@pytest.mark.parametrize("executor", ["local", pytest.param("ray", marks=pytest.mark.slow)])
def test_the_corpus_steps_link_the_same_pairs_out_of_core(tmp_path, executor, request):
    """The corpus steps over part files (two shards, thumbs/ beside embeddings/) give the in-memory reference's
    groups and link names, in this process and as Ray tasks; with a shard's thumbs missing, its candidates are not
    checked (and the run says so; checked in this process only)."""
    from corpus_parts import context, run, split, write_parts

    from scanner.config import ScanConfig

    if executor == "ray":
        request.getfixturevalue("ray_session")
    rng = np.random.default_rng(2)
    n = 40
    base = [_scene(rng) for _ in range(n // 2)]
    images = np.stack(base + [_shift(b, 1, -1) for b in base])
    v = rng.normal(size=(n, 16)).astype(np.float32)
    v[n // 2:] = 0.88 * v[:n // 2] / np.linalg.norm(v[:n // 2], axis=1, keepdims=True) + 0.47 * rng.normal(
        size=(n // 2, 16)) / 4  # each shifted copy at cosine ~0.8-0.95 from its original
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    keys = [f"{i:04d}" for i in range(n)]
    thumbs = thumbnails(images, 32)
    sizes = [25, 15]
    frames = [pd.DataFrame({"key": k, "sha256": [f"h{x}" for x in k], "width": 32, "height": 32, "error": None,
                            "error_stage": None, "embed_error": None}) for k in split(np.array(keys), sizes)]
    cfg = ScanConfig()
    cfg.model.kind, cfg.neighbours.generations, cfg.neighbours.k = "none", 0, 10
    cfg.neighbours.verifier = "shift"  # this check; the affine verifier: tests/neighbours/test_verify.py
    align = (32, cfg.neighbours.align_min_cosine, cfg.neighbours.align_max_rmse, cfg.neighbours.align_max_shift)
    ref = find_duplicate_groups(keys, v, None, cfg.neighbours.dup_threshold, k=10, thumbs=thumbs, align=align)
    assert (ref.link == "aligned").sum() >= 5  # the case is not empty

    def steps(folder, arrays):
        out = tmp_path / folder
        ctx = context(out, write_parts(out, frames, arrays), cfg, executor)
        info = run(ctx, "keys", "copies", "units", "links", "aligned", "groups")
        parts = [ctx.out.read_parquet(f"corpus/groups/{f}") for f in ctx.out.names("corpus/groups", ".parquet")]
        return info, (pd.concat(parts) if parts else pd.DataFrame({"link": []}))

    info, dups = steps("both", {"embeddings": split(v, sizes), "thumbs": split(thumbs, sizes)})
    pd.testing.assert_frame_equal(_by_kept(dups), _by_kept(ref))
    assert info["aligned"]["linked"] == (ref.link == "aligned").sum() // 2  # here every aligned group is a pair
    assert info["aligned"]["checked"] >= info["aligned"]["linked"]

    if executor == "local":  # where the thumbs are read does not depend on the executor: once is enough (CI time)
        info, dups = steps("no_thumbs", {"embeddings": split(v, sizes)})
        assert info["aligned"]["linked"] == 0 and "aligned" not in set(dups.link)
