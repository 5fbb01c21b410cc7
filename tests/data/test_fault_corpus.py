"""The fault corpus (tests/fault_corpus.py) through each reader the scan and dedup use, function by function.

Every shard must give exactly one row per planted sample (a repeated key once per occurrence), good
rows without an error, each bad member an error row saying why, each damaged shard one shard-level
row (key null) saying why, and nothing written outside the output directory. No Ray: the end-to-end
`memscan scan` / `memscan dedup` runs over the same corpus live with the CLI tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fault_corpus import ABS_DIR, REPEATED_KEY_REASON, build_fault_corpus

from scanner.corpus.keys import repeated_key_errors
from scanner.corpus.store import PartStore
from scanner.data.decode import DecodeError, decode_image
from scanner.data.shards import expand_shards, iter_tar_samples, shard_name
from scanner.stages.base import run_local
from scanner.stages.embed import EmbedStage
from scanner.stages.read import ReadSpec, read_shard
from scanner.stages.sink import SinkSpec, SinkStage

MAX_PIXELS = 64_000_000  # data.max_image_pixels' default


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_fault_corpus(tmp_path_factory.mktemp("faults"))


class RandomEmbedder:
    """What the embed stage needs of an Embedder (dim, embed), as a fixed random projection."""

    fingerprint, image_size, dim = "fault-corpus-test", 16, 8

    def __init__(self):
        self.w = np.random.default_rng(0).standard_normal((16 * 16 * 3, self.dim)).astype(np.float32)

    def embed(self, images: np.ndarray) -> np.ndarray:
        v = (images.reshape(len(images), self.w.shape[0]).astype(np.float32) / 255.0 - 0.5) @ self.w
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-6)


def _text(values) -> list[str | None]:
    """A text column as str or None (pandas 3 reads a missing string as NaN)."""
    return [None if v is None or (isinstance(v, float) and np.isnan(v)) else v for v in values]


def _problems(corpus, shard: str, rows: list[tuple[str | None, str | None]]) -> list[str]:
    """What is wrong with one shard's (key, error) rows against the truth; [] when all is right."""
    out = []
    got = sorted(k for k, _ in rows if k is not None)
    want = corpus.expected_keys(shard)
    if got != want:
        out.append(f"{shard}: missing {sorted(set(want) - set(got))}, unexpected {sorted(set(got) - set(want))}, "
                   f"{len(got)} keyed rows for {len(want)} planted samples")
    for key, error in rows:
        if key is None:
            continue
        if key in corpus.good or key in corpus.repeated:  # a repeat is only an error corpus-wide
            if error is not None:
                out.append(f"{shard}: good {key!r} ({corpus.what[key]}) has error {error!r}")
        elif key in corpus.bad and (error is None or corpus.bad[key][1] not in error):
            out.append(f"{shard}: bad {key!r} ({corpus.what[key]}) should say {corpus.bad[key][1]!r}, got {error!r}")
    shard_rows = [e for k, e in rows if k is None]
    if shard in corpus.shard_errors:
        if len(shard_rows) != 1 or corpus.shard_errors[shard] not in (shard_rows[0] or ""):
            out.append(f"{shard} ({corpus.what[shard]}): want one shard row saying {corpus.shard_errors[shard]!r}, "
                       f"got {shard_rows}")
    elif shard_rows:
        out.append(f"{shard}: unexpected shard rows {shard_rows}")
    return out


def _read_and_decode(path: str) -> list[dict]:
    """iter_tar_samples + decode_image, as scanner.data.load and the report use them."""
    rows = []
    for s in iter_tar_samples(path):
        s["pixels"] = None
        if s["error"] is None:
            try:
                s["pixels"], s["width"], s["height"] = decode_image(s["image"], 16, 3, MAX_PIXELS)
            except DecodeError as e:
                s["error"] = str(e)
        rows.append(s)
    return rows


def _batches(path: str) -> list[dict]:
    """The read stage's batches for one shard, at the scan's side and the embedder's."""
    return list(read_shard(path, ReadSpec(model_side=16, model_channels=3, embed_side=16, max_pixels=MAX_PIXELS,
                                          rows_per_batch=8)))


def _scan_rows(path: str) -> tuple[pd.DataFrame, int]:
    """The read stage's rows (what scan and dedup read) without the end-of-shard marker, and the marker's count."""
    batches = _batches(path)
    cols = ["key", "shard", "caption", "width", "height", "error", "error_stage", "marker", "n_rows", "row"]
    df = pd.DataFrame({c: np.concatenate([b[c] for b in batches]) for c in cols})
    df["image_max"] = np.concatenate([b["image_model"].reshape(len(b["image_model"]), -1).max(1) for b in batches])
    marker = df[df["marker"]]
    assert len(marker) == 1 and marker.index[0] == len(df) - 1, f"{path}: one marker, last"
    return df[~df["marker"]].reset_index(drop=True), int(marker["n_rows"].iloc[0])


def _embed_into_parts(corpus, out: Path) -> None:
    """read -> embed (a random projection) -> sink for every shard, in this process: the pipeline's parts."""
    class StandIn(EmbedStage):  # the stage's code with a stand-in embedder (no checkpoint to load)
        def setup(self):
            self.embedder = RandomEmbedder()
            self.align_size = 32  # the thumbnails the pixel check of near-duplicates reads

    stage = StandIn(None)
    sink = SinkStage(SinkSpec(str(out)))
    for p in corpus.shards:
        for batch in _batches(str(p)):
            sink.add(run_local(stage, batch))
    assert sorted(sink.done) == sorted(("corpus", shard_name(str(p))) for p in corpus.shards) and not sink.failed


def test_corpus_covers_every_fault_of_the_issue(corpus):
    """The truth is not vacuous: each fault kind of issue #15 is planted, in its own shard where it is one."""
    assert len(corpus.good) >= 40 and len(corpus.bad) >= 20
    for key in ["good_cmyk_jpeg", "good_png16_gray", "good_png16_rgb", "good_palette_trns_png", "good_rgba_png",
                "good_animated_gif", "good_animated_webp", "good_gray_jpeg", "good_no_caption",
                "good_invalid_utf8_caption", "good_invalid_json", "good_oversized_caption", "../good_escape_up",
                f"{ABS_DIR}/good_absolute", "good_gzip_a"]:
        assert key in corpus.good, key
    for key in ["bad_truncated_jpeg", "bad_empty_image", "bad_garbage_image", "bad_bomb_png_20000", "bad_caption_only",
                "bad_symlink", "bad_hardlink", "bad_char_device", "bad_fifo"]:
        assert key in corpus.bad, key
    assert corpus.repeated["repeat_in_shard"] == ["members", "members"]
    assert len(set(corpus.repeated["repeat_across_shards"])) == 2
    for shard in ["empty", "zero_bytes", "not_a_tar", "truncated_data", "truncated_gzip"]:
        assert shard in corpus.shard_errors, shard
    assert (corpus.dir / "zero_bytes.tar").stat().st_size == 0
    assert (corpus.dir / "gzip.tar").read_bytes()[:2] == b"\x1f\x8b"
    assert max(p.stat().st_size for p in corpus.shards) < 2_000_000  # bombs are tiny on disk
    # a directory spec picks up every file, damaged ones included
    assert expand_shards(str(corpus.dir)) == [str(p.resolve()) for p in corpus.shards]


def test_read_and_decode_give_one_row_per_planted_sample(corpus):
    problems = []
    for p in corpus.shards:
        name = shard_name(str(p))
        rows = _read_and_decode(str(p))
        problems += _problems(corpus, name, [(r["key"], r["error"]) for r in rows])
        for r in rows:
            if r["key"] in corpus.good and r["pixels"] is not None:
                if (r["width"], r["height"]) != corpus.sizes[r["key"]]:
                    problems.append(f"{r['key']}: size {(r['width'], r['height'])}, want {corpus.sizes[r['key']]}")
                if r["caption"] != corpus.captions[r["key"]]:
                    problems.append(f"{r['key']}: caption {str(r['caption'])[:80]!r}, "
                                    f"want {str(corpus.captions[r['key']])[:80]!r}")
    assert not problems, "\n".join(problems)


def test_formats_decode_to_what_they_show(corpus):
    """16-bit, CMYK, alpha and animated images decode to their picture (first frame), not to white or black."""
    rows = {r["key"]: r for r in iter_tar_samples(str(corpus.dir / "images.tar"))}
    assert len(corpus.reference) >= 6
    for key, want in corpus.reference.items():
        got, _, _ = decode_image(rows[key]["image"], want.shape[0], 3, MAX_PIXELS)
        diff = np.abs(got.astype(np.float64) - want).mean()
        assert diff < 8, f"{key} ({corpus.what[key]}): mean abs difference {diff:.1f} from what it shows"
    # a later frame is far from the first: the comparison above can tell frames apart
    first = corpus.reference["good_animated_webp"]
    assert np.abs((255 - first).astype(np.float64) - first).mean() > 30


def test_scan_reader_gives_one_row_per_planted_sample(corpus):
    problems = []
    for p in corpus.shards:
        name = shard_name(str(p))
        df, n_rows = _scan_rows(str(p))
        errors = [None if e is None else f"{st}: {e}" for e, st in zip(_text(df["error"]), df["error_stage"])]
        problems += _problems(corpus, name, list(zip(_text(df["key"]), errors)))
        if n_rows != len(df) or list(df["row"]) != list(range(len(df))):
            problems.append(f"{name}: marker counts {n_rows} rows, {len(df)} sent, positions {list(df['row'])}")
        if set(df["shard"]) - {name}:
            problems.append(f"{name}: shard column {set(df['shard'])}")
        good = df[df["key"].isin(list(corpus.good))]
        if (good["width"] <= 0).any() or (good["image_max"] == 0).any():
            problems.append(f"{name}: good rows without size or pixels: {list(good['key'][good['width'] <= 0])}")
        bad = df[df["error"].notna()]
        if (bad["image_max"] != 0).any() or bad["error_stage"].isna().any():
            problems.append(f"{name}: error rows with pixels or without a stage: {list(bad['key'])}")
    assert not problems, "\n".join(problems)


def test_embedded_parts_give_one_row_per_planted_sample_and_flag_repeats_corpus_wide(corpus, tmp_path):
    out = tmp_path / "out"
    _embed_into_parts(corpus, out)
    store = PartStore(out, [str(p) for p in corpus.shards])
    df = pd.concat([store.read(i) for i in range(len(store))], ignore_index=True)  # row i is gid i
    embeddings = np.concatenate([store.array("embeddings", i) for i in range(len(store))])
    problems = []
    for name, part in df.groupby("shard"):
        problems += _problems(corpus, name, list(zip(_text(part["key"]), _text(part["error"]))))
    assert not problems, "\n".join(problems)
    assert set(df["shard"]) <= {shard_name(str(p)) for p in corpus.shards}  # names, never paths
    ok = df["error"].isna().to_numpy()
    assert (np.abs(embeddings[ok]).sum(1) > 0).all() and (embeddings[~ok] == 0).all()
    thumbs = np.concatenate([store.array("thumbs", i) for i in range(len(store))])  # row-aligned with the parts
    assert thumbs.shape == (len(df), 32 * 32 * 3) and thumbs.dtype == np.uint8 and (thumbs[~ok] == 0).all()
    # corpus-wide: every occurrence of a repeated key is an error naming every shard that holds the key
    keyed = df[df["key"].notna()]
    errs = pd.Series(repeated_key_errors(keyed["key"].tolist(), keyed["shard"].tolist()), index=keyed.index)
    flagged = keyed[errs.notna()]
    assert sorted(flagged["key"]) == sorted(k for k, ss in corpus.repeated.items() for _ in ss)
    for key, shards in corpus.repeated.items():
        for err in errs[flagged.index[flagged["key"] == key]]:
            assert REPEATED_KEY_REASON in err and all(s in err for s in shards), (key, err)
    # the corpus steps find the same repeats out of core, and duplicate search sees the good samples, once each
    from corpus_parts import context, run

    from scanner.config import ScanConfig
    from scanner.corpus.rows import masks, repeated

    ctx = context(out, [str(p) for p in corpus.shards], ScanConfig())
    run(ctx, "keys")
    gids, rep = repeated(ctx.store)
    assert gids.tolist() == sorted(flagged.index) and all(rep[g] == errs[g] for g in rep)
    searched = np.concatenate([masks(ctx.store, i)["searched"] for i in range(len(ctx.store))])
    assert sorted(df["key"][searched]) == sorted(corpus.good)


def test_nothing_is_written_outside_the_output_dir(corpus, tmp_path, monkeypatch):
    """`../` and absolute member names are strings: reading, decoding, scanning and embedding create no file
    anywhere but the output directory, wherever the process runs."""
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)

    def tree(root: Path) -> set[str]:
        return {str(p) for p in root.rglob("*")}

    watched = [tmp_path, corpus.root]
    before = {r: tree(r) for r in watched}
    out = work / "out"
    for p in corpus.shards:
        _read_and_decode(str(p))
    _embed_into_parts(corpus, out)
    for r in watched:
        new = {f for f in tree(r) - before[r] if not f.startswith(str(out))}
        assert not new, f"written outside the output dir: {sorted(new)}"
    assert not os.path.exists(ABS_DIR)
    escaped = [os.path.basename(n) for n in corpus.escape_names]
    assert escaped and not any((d / e).exists() for d in (work.parent, corpus.root, corpus.dir.parent)
                               for e in escaped)
    assert sorted(p.name for p in (out / "parts").iterdir()) == sorted(
        f"{shard_name(str(p))}.parquet" for p in corpus.shards)


def test_member_larger_than_the_limit_is_an_error_row_and_the_next_sample_is_read(corpus):
    rows = list(iter_tar_samples(str(corpus.dir / "gzip.tar"), max_member_bytes=40))
    assert [r["key"] for r in rows] == ["good_gzip_a", "good_gzip_b"]
    assert all(r["image"] is None and "bytes (> 40)" in r["error"] for r in rows)
