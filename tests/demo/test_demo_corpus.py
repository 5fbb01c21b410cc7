"""The demo corpus builder: determinism, and the planted truth checked against the tars themselves."""

import io
import json
import tarfile

import pandas as pd
import pytest
from PIL import Image

from scanner.demo.corpus import PLANTED, build_demo_corpus

TINY = {"n_unique": 60, "n_repeated": 2, "repeat_copies": 20, "n_oversampled": 3, "n_exact_dup_groups": 3,
        "n_near_dup_groups": 3, "n_corrupt": 3, "n_no_caption": 4, "samples_per_shard": 40, "seed": 1,
        "n_heldout": 300}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_demo_corpus(tmp_path_factory.mktemp("demo"), **TINY)


def read_shard(path) -> tuple[dict[str, dict[str, bytes]], Exception | None]:
    """key -> {ext: bytes} for every member read completely, and the error that stopped reading (or None)."""
    samples: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(path, "r|") as tf:
            for info in tf:
                data = tf.extractfile(info).read()
                if len(data) != info.size:
                    raise tarfile.ReadError(f"{info.name} cut at {len(data)} of {info.size} bytes")
                key, ext = info.name.split(".", 1)
                samples.setdefault(key, {})[ext] = data
    except (tarfile.TarError, EOFError, OSError) as e:
        return samples, e
    return samples, None


def decodes(data: bytes) -> bool:
    try:
        Image.open(io.BytesIO(data)).load()
        return True
    except (OSError, SyntaxError, ValueError):  # what PIL raises on bad image bytes
        return False


def test_same_seed_gives_byte_identical_shards(corpus, tmp_path):
    again = build_demo_corpus(tmp_path / "again", **TINY)
    assert [p.name for p in again.shards] == [p.name for p in corpus.shards]
    for a, b in zip(corpus.shards, again.shards):
        assert a.read_bytes() == b.read_bytes(), a.name
    pd.testing.assert_frame_equal(pd.read_parquet(corpus.truth), pd.read_parquet(again.truth))
    other = build_demo_corpus(tmp_path / "other", **{**TINY, "seed": 2})
    assert other.shards[0].read_bytes() != corpus.shards[0].read_bytes()


def test_truth_counts_and_groups(corpus):
    truth = pd.read_parquet(corpus.truth)
    assert list(truth.columns[:5]) == ["key", "group_id", "planted", "copies", "readable"]
    assert set(truth.planted) <= set(PLANTED)
    assert truth.key.is_unique and truth.key.str.fullmatch(r"\d{9}").all()
    n = truth.planted.value_counts()
    assert n["repeated"] == TINY["n_repeated"] * TINY["repeat_copies"]
    for c in ("oversampled", "corrupt", "no_caption"):
        assert n[c] == TINY[f"n_{c}"]
    grouped = truth.planted.isin(["exact_dup", "near_dup", "repeated"])
    assert truth.group_id[grouped].notna().all() and truth.group_id[~grouped].isna().all()
    assert (truth.copies[~grouped] == 1).all()
    sizes = truth[grouped].groupby("group_id").agg(planted=("planted", "first"), n=("key", "size"),
                                                   copies=("copies", "first"), kinds=("planted", "nunique"))
    assert (sizes.kinds == 1).all() and (sizes.n == sizes.copies).all()
    assert sizes[sizes.planted == "exact_dup"].n.between(2, 3).all()
    assert sizes[sizes.planted == "near_dup"].n.between(2, 4).all()
    assert len(sizes[sizes.planted == "exact_dup"]) == TINY["n_exact_dup_groups"]
    assert len(sizes[sizes.planted == "near_dup"]) == TINY["n_near_dup_groups"]
    # Shuffled across shards: a repeated image's copies do not all sit in one shard.
    assert (truth[truth.planted == "repeated"].groupby("group_id").shard.nunique() > 1).all()
    manifest = json.loads(corpus.manifest.read_text())
    assert manifest["counts"] == n.reindex(list(PLANTED), fill_value=0).to_dict()
    assert manifest["truncated_shard"] == corpus.shards[-1].stem


def test_truth_agrees_with_the_tars(corpus):
    truth = pd.read_parquet(corpus.truth).set_index("key")
    samples = {}
    for path in corpus.shards:
        got, err = read_shard(path)
        truncated = path.stem == corpus.truncated_shard
        assert (err is not None) == truncated, (path.name, err)
        complete = {k for k, m in got.items() if {"jpg", "json"} <= set(m)}
        in_shard = truth[truth.shard == path.stem]
        assert complete == set(in_shard.index[in_shard.readable]), path.name
        samples.update({k: got[k] for k in complete})
    assert 0 < (~truth.readable).sum() < 40
    for key, m in samples.items():
        row = truth.loc[key]
        meta = json.loads(m["json"])
        assert meta["key"] == key and (meta["width"], meta["height"]) == (32, 32)
        assert ("txt" in m) == (row.planted != "no_caption"), key
        if "txt" in m:
            assert m["txt"].decode() == meta["caption"] and meta["caption"]
        if row.planted == "corrupt":
            assert not decodes(m["jpg"]), key
        else:
            img = Image.open(io.BytesIO(m["jpg"]))
            assert img.size == (32, 32) and img.mode == "RGB" and decodes(m["jpg"]), key
    groups = truth[truth.group_id.notna() & truth.readable].groupby("group_id")
    for gid, g in groups:
        blobs = {samples[k]["jpg"] for k in g.index}
        if g.planted.iloc[0] == "exact_dup":
            assert len(blobs) == 1, gid
        else:
            assert len(blobs) > 1, gid  # near_dup and repeated contain variants


def test_bad_arguments_name_the_value(tmp_path):
    with pytest.raises(ValueError, match="repeat_copies must be an int >= 2, got 1"):
        build_demo_corpus(tmp_path, repeat_copies=1)
    with pytest.raises(ValueError, match="samples_per_shard"):
        build_demo_corpus(tmp_path, samples_per_shard=0)


def test_dose_groups_planted_per_copy_count_and_off_by_default(corpus, tmp_path):
    dose = build_demo_corpus(tmp_path / "dose", **{**TINY, "dose_copies": (2, 4, 8), "dose_groups": 2})
    truth = pd.read_parquet(dose.truth)
    d = truth[truth.planted == "dose"]
    per_group = d.groupby("group_id").agg(n=("key", "size"), copies=("copies", "first"))
    assert sorted(per_group["copies"]) == [2, 2, 4, 4, 8, 8] and (per_group["n"] == per_group["copies"]).all()
    assert json.loads((dose.out_dir / "demo_corpus.json").read_text())["params"]["dose_copies"] == [2, 4, 8]
    # without the option nothing moves: the fixture corpus has no dose rows and no dose params
    assert "dose" not in set(pd.read_parquet(corpus.truth).planted)
    assert "dose_copies" not in json.loads((corpus.out_dir / "demo_corpus.json").read_text())["params"]
    with pytest.raises(ValueError, match=r"dose_copies must be ints >= 2 \(copies per group\), got \[2, 1\]"):
        build_demo_corpus(tmp_path / "bad", dose_copies=(2, 1))


def test_every_copy_edit_is_planted_by_default(tmp_path):
    """The default plants every edit (ALL_EDITS: the four the embedder always found and the copies people make);
    each changes the pixels of an image of the same size, a flip is the mirror, grayscale has no colour, a border
    is a solid frame."""
    import numpy as np

    from scanner.demo.corpus import ALL_EDITS, COPY_EDITS, MORE_EDITS

    c = build_demo_corpus(tmp_path / "edits", **{**TINY, "n_near_dup_groups": 40, "truncate_last_shard": False})
    truth = pd.read_parquet(c.truth)
    near = truth[truth.planted == "near_dup"]
    assert set(near["edit"]) == {"copy", *ALL_EDITS}
    assert "near_dup_edits" not in json.loads(c.manifest.read_text())["params"]  # the default is not recorded
    images = {}
    for shard in c.shards:
        samples, err = read_shard(shard)
        assert err is None
        images |= {k: np.asarray(Image.open(io.BytesIO(m["jpg"])).convert("RGB"), dtype=float)
                   for k, m in samples.items() if k in set(near["key"])}
    for gid, g in near.groupby("group_id"):
        base = images[g.loc[g.edit == "copy", "key"].iloc[0]]
        for key, edit in zip(g.key, g.edit):
            if edit == "hflip":  # the mirror of the original, up to JPEG
                assert np.abs(images[key] - base[:, ::-1]).mean() < 4, gid
            elif edit in MORE_EDITS:  # an edit that changes the pixels, on an image of the same size
                assert images[key].shape == base.shape and np.abs(images[key] - base).mean() > 1, (gid, edit)
            if edit == "grayscale":
                assert np.abs(images[key] - images[key].mean(-1, keepdims=True)).max() < 3, gid
            if edit == "border":  # the outermost rows and columns are one flat colour
                edge = np.concatenate([images[key][0], images[key][-1], images[key][:, 0], images[key][:, -1]])
                assert edge.std() < 6, gid
    old = build_demo_corpus(tmp_path / "four", **TINY, near_dup_edits=COPY_EDITS)
    assert set(pd.read_parquet(old.truth)["edit"].dropna()) <= {"copy", *COPY_EDITS}
    assert json.loads(old.manifest.read_text())["params"]["near_dup_edits"] == list(COPY_EDITS)
    with pytest.raises(ValueError, match="near_dup_edits must be a non-empty list of"):
        build_demo_corpus(tmp_path / "bad", **TINY, near_dup_edits=("blur",))


def test_heldout_images_lie_outside_the_corpus_and_leave_it_unchanged(corpus, tmp_path):
    """heldout/00000.tar: n_heldout samples (jpg + txt + json) none of which is a corpus image, not even after a
    JPEG round trip (8x8 RMSE >= the builder's 0.05); the corpus itself is the same with or without them."""
    import numpy as np

    held, err = read_shard(corpus.out_dir / "heldout" / "00000.tar")
    assert err is None and len(held) == 300
    assert all(set(m) == {"jpg", "txt", "json"} for m in held.values())
    manifest = json.loads(corpus.manifest.read_text())
    assert manifest["heldout"] == {"shards": ["heldout/00000.tar"], "n_images": 300}

    def small(data):
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((8, 8), Image.Resampling.BOX),
                          dtype=np.float32).ravel() / 255

    truth = pd.read_parquet(corpus.truth).set_index("key")
    members = {k: m for p in corpus.shards for k, m in read_shard(p)[0].items() if "jpg" in m and decodes(m["jpg"])}
    assert not {m["jpg"] for m in members.values()} & {m["jpg"] for m in held.values()}
    # the bases themselves (an edited variant may sit nearer to anything than its base does)
    a = np.stack([small(m["jpg"]) for k, m in members.items() if truth.loc[k, "edit"] in (None, "copy")
                  or pd.isna(truth.loc[k, "edit"])])
    b = np.stack([small(m["jpg"]) for m in held.values()])
    rmse = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).mean(-1))
    assert rmse.min() > 0.04  # 0.05 on the uncompressed images; JPEG moves 8x8 means by well under 0.01

    none = build_demo_corpus(tmp_path / "none", **{**TINY, "n_heldout": 0})
    for x, y in zip(corpus.shards, none.shards):
        assert x.read_bytes() == y.read_bytes(), x.name
    pd.testing.assert_frame_equal(pd.read_parquet(corpus.truth), pd.read_parquet(none.truth))
    assert not list((none.out_dir / "heldout").glob("*.tar"))


def test_featureless_photo_crops_are_refused():
    """A crop of the colour wheel passes the std screen (std 87 of 255) but has no fine detail: such crops look alike
    at any position and scale, so two of them would be an unplanted duplicate. The builder refuses them, and keeps
    textured ones; without the screen about 8 % of the demo's crops would be featureless."""
    import numpy as np

    from scanner.demo.corpus import _MIN_CROP_DETAIL, _MIN_CROP_STD, _detail, _image_pool, _load_photos, _resize

    wheel, gravel = _load_photos()["colorwheel"][100:164, 100:164], _load_photos()["gravel"][:64, :64]
    assert wheel.std() > _MIN_CROP_STD and _detail(_resize(wheel, 32)) < _MIN_CROP_DETAIL
    assert _detail(_resize(gravel, 32)) > 10 * _MIN_CROP_DETAIL
    pool = _image_pool(300, 32, np.random.default_rng(3))
    crops = [b for b in pool if b.kind == "photo"]
    assert len(crops) > 150 and min(_detail(b.image) for b in crops) >= _MIN_CROP_DETAIL
