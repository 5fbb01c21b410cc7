"""`memscan dedup` (the scan pipeline without a model: run_scan with model.kind none, as the command builds it) end to
end on tiny corpora with a given checkpoint: the files it promises, replications in a scan, and the embed stage
against the embedder itself."""

from __future__ import annotations

import dataclasses
import os

import pandas as pd
import pytest

from scanner.config import NeighboursConfig
from scanner.demo.corpus import build_demo_corpus
from scanner.pipeline import run_scan


def run_dedup(shards, out, cfg: NeighboursConfig, progress: bool = False) -> dict:
    """What `memscan dedup --shards SHARDS --out OUT` runs: the default config's data and ray sections, these
    neighbours, no diffusion model."""
    from scanner.config import ScanConfig

    scan = ScanConfig(neighbours=cfg)
    scan.model.kind, scan.model.path = "none", None
    scan.data.shards = [str(shards)]
    return run_scan(scan.validate(), out, progress=progress, label="dedup")


@pytest.mark.slow
def test_run_dedup_writes_groups_removals_errors_and_summary(ray_session, tiny_checkpoint, tmp_path, capsys):
    corpus = build_demo_corpus(tmp_path / "demo", n_unique=40, n_repeated=2, repeat_copies=4, n_oversampled=2,
                               n_exact_dup_groups=3, n_near_dup_groups=3, n_corrupt=3, n_no_caption=2,
                               samples_per_shard=40, seed=0)
    cfg = NeighboursConfig(clip_checkpoint=str(tiny_checkpoint), image_size=32)
    out = tmp_path / "out"
    summary = run_dedup(str(tmp_path / "demo" / "shards"), out, cfg, progress=True)
    # one progress line for the one pipeline: every shard, every sample, a rate
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    n = len(corpus.shards)
    assert last.startswith("dedup: 100%") and f"{n}/{n}" in last and "img/s" in last, last
    dups = pd.read_parquet(out / "duplicates.parquet")
    removal = pd.read_parquet(out / "removal_list.parquet")
    errors = pd.read_parquet(out / "errors.parquet")
    assert list(dups.columns[:4]) == ["key", "group_id", "similarity", "keep"]
    assert dups.groupby("group_id").keep.sum().eq(1).all()
    assert set(removal.key) == set(dups.key[~dups.keep]) and set(removal.reason) == {"duplicate"}
    assert (out / "removal_list.txt").read_text().split() == removal.key.tolist()
    truth = pd.read_parquet(corpus.truth).set_index("key")
    # every byte-identical planted copy is found whatever the embedder (random weights here)
    exact = truth[truth.planted == "exact_dup"]
    assert set(exact.index) <= set(dups.key)
    # corrupt images are error rows (stage 'decode'), not exceptions; the truncated shard adds one more (read)
    corrupt = set(truth.index[truth.planted == "corrupt"])
    assert corrupt <= set(errors.key[errors.stage == "decode"]) and set(errors.stage) == {"decode", "read"}
    assert errors.key.isna().sum() == 1
    nb = summary["neighbours"]
    assert summary["counts"]["errors"] == len(errors) and nb["index"]["kind"] == "exact"
    assert nb["embedder"]["trained_on_this_corpus"] is False
    assert set(summary["stages"]) == {"read", "embed"}  # no model: no score stage
    assert summary["machine"]["cores"] == os.cpu_count() and "torch_threads" not in summary["machine"]
    assert summary["stages"]["read"]["error_rows"] == len(errors) - 1
    # a second run reads no shard again and gives the same groups
    before = {p.name: p.stat().st_mtime_ns for p in (out / "parts").glob("*.parquet")}
    assert len(before) == len(corpus.shards)  # one part file per shard
    again = run_dedup(str(tmp_path / "demo" / "shards"), out, dataclasses.replace(cfg))
    assert again["resume"]["done_this_run"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "parts").glob("*.parquet")} == before
    assert pd.read_parquet(out / "duplicates.parquet").equals(dups)
    # another embedder into the same --out is refused, not mixed with the first one's parts
    import pytest

    from scanner.errors import ConfigError

    with pytest.raises(ConfigError, match=r"part files made with another embedder .*Use a new --out"):
        run_dedup(str(tmp_path / "demo" / "shards"), out, dataclasses.replace(cfg, image_size=48, clip_checkpoint=None,
                                                                                 train_steps=2))


@pytest.mark.slow
def test_scan_with_model_writes_replications(ray_session, scan_config, tiny_checkpoint, tmp_path):
    """Generations from the model are matched against the corpus; a match enters the removal list as 'replicated'.

    rep_threshold=-1 makes every generation a replication (a random model copies nothing), so the
    test checks the plumbing: one row per generation, seeds, PNGs for the report, removal reasons.
    """
    sets = ["neighbours.enabled=true", f"neighbours.clip_checkpoint={tiny_checkpoint}", "neighbours.image_size=32",
            "neighbours.generations=3", "neighbours.gen_steps=2"]
    out = tmp_path / "out"
    summary = run_scan(scan_config(*sets, "neighbours.rep_threshold=-1.0"), out, progress=False)
    reps = pd.read_parquet(out / "replications.parquet")
    assert list(reps.columns[:5]) == ["gen_id", "caption", "seed", "matched_key", "similarity"]
    assert reps.gen_id.tolist() == [0, 1, 2] and reps.seed.tolist() == [0, 1, 2] and reps.replicated.all()
    assert sorted(p.name for p in (out / "replications").glob("*.png")) == ["gen_0.png", "gen_1.png", "gen_2.png"]
    removal = pd.read_parquet(out / "removal_list.parquet")
    dups = pd.read_parquet(out / "duplicates.parquet")
    expected = set(reps.matched_key) - set(dups.key[~dups.keep])
    assert set(removal.key[removal.reason == "replicated"]) == expected
    rep = summary["neighbours"]["replications"]
    assert rep["replicated"] == 3 and rep["rate"] == 1.0
    assert set(summary["stages"]) == {"read", "embed", "score"}
    # the threshold is what decides: at the highest cosine, only generations that reach it replicate
    run_scan(scan_config(*sets, "neighbours.rep_threshold=1.0"), out, progress=False)  # parts reused
    strict = pd.read_parquet(out / "replications.parquet")
    assert strict.replicated.tolist() == (strict.similarity >= 1.0).tolist()
    removed = set(pd.read_parquet(out / "removal_list.parquet").query("reason == 'replicated'").key)
    assert removed == set(strict.matched_key[strict.replicated]) - set(dups.key[~dups.keep])


def test_embed_stage_is_the_embedder_on_the_read_stage_images(tiny_checkpoint, tiny_corpus):
    """One decode feeds the embedder: the stage's vectors and pHashes are the embedder's and phash64's on the
    same pixels, decoded at the embedder's side exactly as a direct decode_image would."""
    import numpy as np

    from scanner.data.decode import decode_image
    from scanner.data.shards import iter_tar_samples
    from scanner.neighbours.embed import load_embedder
    from scanner.neighbours.phash import phash64
    from scanner.stages.embed import EmbedStage
    from scanner.stages.read import ReadSpec, read_shard

    cfg = NeighboursConfig(clip_checkpoint=str(tiny_checkpoint), image_size=32)
    shard = str(tiny_corpus.shards[0])
    batch = next(read_shard(shard, ReadSpec(model_side=8, embed_side=32)))
    from scanner.stages.base import run_local

    out = run_local(EmbedStage(cfg), batch)
    ok = np.array([e is None for e in out["error"]]) & ~out["marker"]
    assert ok.sum() > 10 and "image_embed" not in out and out["stage_seconds_embed"][0] > 0
    raw = {s["key"]: s["image"] for s in iter_tar_samples(shard)}
    direct = np.stack([decode_image(raw[k], 32)[0] for k in out["key"][ok]])
    emb = load_embedder(cfg)
    np.testing.assert_allclose(out["embedding"][ok], emb.embed(direct), atol=1e-5)
    np.testing.assert_array_equal(out["phash"][ok], phash64(direct).astype(np.int64))
    assert (out["embedding"][~ok] == 0).all() and all(e is None for e in out["embed_error"])


@pytest.mark.slow
def test_a_key_repeated_across_shards_is_an_error_row_not_a_crash(ray_session, tiny_checkpoint, tmp_path):
    """A shard copied under a second name repeats every key: dedup still writes every table, each copy of a
    repeated key is an error row naming both shards, and the other shards' rows are grouped as usual."""
    import shutil

    corpus = build_demo_corpus(tmp_path / "demo", n_unique=30, n_repeated=1, repeat_copies=3, n_oversampled=1,
                               n_exact_dup_groups=2, n_near_dup_groups=1, n_corrupt=1, n_no_caption=1,
                               samples_per_shard=20, truncate_last_shard=False, seed=1)
    shards = tmp_path / "shards"
    shards.mkdir()
    for p in corpus.shards:
        shutil.copy(p, shards / p.name)
    first = corpus.shards[0]
    shutil.copy(first, shards / "00099.tar")
    cfg = NeighboursConfig(clip_checkpoint=str(tiny_checkpoint), image_size=32)
    out = tmp_path / "out"
    summary = run_dedup(str(shards), out, cfg)
    errors = pd.read_parquet(out / "errors.parquet")
    repeated = errors[errors.error.str.contains("is repeated")]
    import tarfile

    with tarfile.open(first) as tf:
        keys_in_first = {m.name.split(".")[0] for m in tf.getmembers()}
    truth = pd.read_parquet(corpus.truth)
    corrupt = keys_in_first & set(truth.key[truth.planted == "corrupt"])  # their decode error comes first
    assert set(repeated.key) == keys_in_first - corrupt and len(repeated) == 2 * len(keys_in_first - corrupt)
    assert repeated.error.str.contains(f"in shards {first.stem}, 00099;").all() and set(repeated.stage) == {"read"}
    assert all((errors.key == k).sum() == 2 for k in corrupt)  # still an error row in each copy
    # nothing else is lost: every other readable key is embedded, and no repeated key reaches a group
    dups = pd.read_parquet(out / "duplicates.parquet")
    assert not set(dups.key) & keys_in_first
    good = set(truth.key[truth.readable & (truth.planted != "corrupt")]) - keys_in_first
    assert summary["counts"]["embedded"] == len(good)
