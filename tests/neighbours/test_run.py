"""run_dedup end to end on a tiny demo corpus with a given checkpoint: the files `memscan dedup` promises."""

from __future__ import annotations

import dataclasses

import pandas as pd

from scanner.config import NeighboursConfig
from scanner.data.demo import build_demo_corpus
from scanner.neighbours.run import run_dedup


def test_run_dedup_writes_groups_removals_errors_and_summary(tiny_checkpoint, tmp_path):
    corpus = build_demo_corpus(tmp_path / "demo", n_unique=40, n_repeated=2, repeat_copies=4, n_oversampled=2,
                               n_exact_dup_groups=3, n_near_dup_groups=3, n_corrupt=3, n_no_caption=2,
                               samples_per_shard=40, seed=0)
    cfg = NeighboursConfig(clip_checkpoint=str(tiny_checkpoint), image_size=32)
    out = tmp_path / "out"
    summary = run_dedup(str(tmp_path / "demo" / "shards"), out, cfg, log=lambda s: None)
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
    # corrupt images are error rows (stage 'embed'), not exceptions; the truncated shard adds one more
    corrupt = set(truth.index[truth.planted == "corrupt"])
    assert corrupt <= set(errors.key.dropna()) and set(errors.stage) == {"embed"}
    assert summary["counts"]["errors"] == len(errors) and summary["index"]["kind"] == "flat"
    assert summary["embedder"]["trained_on_this_corpus"] is False
    # a second run re-embeds nothing and gives the same groups
    before = {p.name: p.stat().st_mtime_ns for p in (out / "embeddings").rglob("*.parquet")}
    assert len(before) == len(corpus.shards)  # one file per shard, under one embedder fingerprint
    run_dedup(str(tmp_path / "demo" / "shards"), out, dataclasses.replace(cfg), log=lambda s: None)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "embeddings").rglob("*.parquet")} == before
    assert pd.read_parquet(out / "duplicates.parquet").equals(dups)


def test_run_dedup_with_model_writes_replications(tiny_checkpoint, tiny_model_dir, tiny_corpus, tmp_path):
    """Generations from the model are matched against the corpus; a match enters the removal list as 'replicated'.

    rep_threshold=-1 makes every generation a replication (a random model copies nothing), so the
    test checks the plumbing: one row per generation, seeds, PNGs for the report, removal reasons.
    """
    cfg = NeighboursConfig(clip_checkpoint=str(tiny_checkpoint), image_size=32, generations=3, gen_steps=2,
                           rep_threshold=-1.0)
    out = tmp_path / "out"
    summary = run_dedup(str(tiny_corpus.shards[0].parent), out, cfg, log=lambda s: None, model_dir=str(tiny_model_dir))
    reps = pd.read_parquet(out / "replications.parquet")
    assert list(reps.columns[:5]) == ["gen_id", "caption", "seed", "matched_key", "similarity"]
    assert reps.gen_id.tolist() == [0, 1, 2] and reps.seed.tolist() == [0, 1, 2] and reps.replicated.all()
    assert sorted(p.name for p in (out / "replications").glob("*.png")) == ["gen_0.png", "gen_1.png", "gen_2.png"]
    removal = pd.read_parquet(out / "removal_list.parquet")
    dups = pd.read_parquet(out / "duplicates.parquet")
    expected = set(reps.matched_key) - set(dups.key[~dups.keep])
    assert set(removal.key[removal.reason == "replicated"]) == expected
    assert summary["replications"]["replicated"] == 3 and summary["replications"]["rate"] == 1.0
    # the threshold is what decides: above every similarity, nothing replicates and nothing is removed for it
    cfg2 = dataclasses.replace(cfg, rep_threshold=float(reps.similarity.max()) + 1e-4)
    run_dedup(str(tiny_corpus.shards[0].parent), tmp_path / "out2", cfg2, log=lambda s: None,
              model_dir=str(tiny_model_dir))
    assert not pd.read_parquet(tmp_path / "out2" / "replications.parquet").replicated.any()
    assert "replicated" not in set(pd.read_parquet(tmp_path / "out2" / "removal_list.parquet").reason)


def test_ray_actor_embedding_writes_the_same_files_as_in_process(ray_session, tiny_checkpoint, tiny_corpus, tmp_path,
                                                                 capsys):
    cfg = NeighboursConfig(clip_checkpoint=str(tiny_checkpoint), image_size=32)
    spec = str(tiny_corpus.shards[0].parent)
    n = len(tiny_corpus.shards)
    local = run_dedup(spec, tmp_path / "local", cfg, log=lambda s: None, progress=True)
    err_local = capsys.readouterr().err
    actors = run_dedup(spec, tmp_path / "ray", cfg, log=lambda s: None, use_ray=True, progress=True)
    err_actors = capsys.readouterr().err
    assert len(actors["embedding_files"]) == n
    # in process and through Ray actors alike, the progress line ends at every shard and every sample embedded
    rows = sum(int(pd.read_parquet(f)["key"].notna().sum()) for f in actors["embedding_files"])
    for err in (err_local, err_actors):
        last = err.replace("\r", "\n").strip().splitlines()[-1]
        assert last.startswith("embed: 100%") and f"{n}/{n}" in last and f"{rows:,} images" in last, last
        assert "img/s" in last, last
    import numpy as np

    for a, b in zip(local["embedding_files"], actors["embedding_files"]):
        a, b = pd.read_parquet(a), pd.read_parquet(b)
        assert a["key"].tolist() == b["key"].tolist() and a["error"].isna().tolist() == b["error"].isna().tolist()
        good = a["embedding"].notna()
        assert good.any() or a["error"].notna().all()
        assert not good.any() or np.allclose(np.stack(a["embedding"][good]), np.stack(b["embedding"][good]), atol=1e-5)
    da, db = (pd.read_parquet(tmp_path / d / "duplicates.parquet") for d in ("local", "ray"))
    assert da[["key", "group_id", "keep"]].equals(db[["key", "group_id", "keep"]])


def test_a_key_repeated_across_shards_is_an_error_row_not_a_crash(tiny_checkpoint, tmp_path):
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
    summary = run_dedup(str(shards), out, cfg, log=lambda s: None)
    errors = pd.read_parquet(out / "errors.parquet")
    repeated = errors[errors.error.str.contains("is repeated")]
    import tarfile

    with tarfile.open(first) as tf:
        keys_in_first = {m.name.split(".")[0] for m in tf.getmembers()}
    assert set(repeated.key) == keys_in_first and len(repeated) == 2 * len(keys_in_first)
    assert repeated.error.str.contains(f"in shards {first.stem}, 00099;").all() and set(repeated.stage) == {"read"}
    # nothing else is lost: every other readable key is embedded, and no repeated key reaches a group
    dups = pd.read_parquet(out / "duplicates.parquet")
    assert not set(dups.key) & keys_in_first
    truth = pd.read_parquet(corpus.truth)
    good = set(truth.key[truth.readable & (truth.planted != "corrupt")]) - keys_in_first
    assert summary["counts"]["embedded"] == len(good)
