"""The corpus steps as a workflow (scanner/corpus/workflow.py, run.py): a run killed inside any step resumes at that
step and ends with exactly the tables of an uninterrupted run; a config change redoes only the steps that read it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

TABLES = ("duplicates.parquet", "removal_list.parquet", "errors.parquet", "replications.parquet")


class Killed(Exception):
    """What a SIGKILL leaves: the step's output written, its completion record not."""


@pytest.fixture(scope="module")
def scanned(ray_session, tiny_model_dir, tiny_embedder_dir, tiny_corpus, tmp_path_factory):
    """A finished scan of the tiny corpus with every corpus step on: model scores, duplicates (the pixel check too),
    held-out calibration, replications. Returns (out, cfg, shard names)."""
    from scanner.config import load_config, shipped_config
    from scanner.pipeline import run_scan

    out = tmp_path_factory.mktemp("workflow") / "scan"
    cfg = load_config(shipped_config("demo"), [
        f"data.shards={tiny_corpus.shards[0].parent}", f"model.path={tiny_model_dir}", "data.resolution=8",
        "geometry.probes=2", "geometry.lpca_k=5", "ray.num_cpus=2", f"neighbours.clip_checkpoint={tiny_embedder_dir}",
        "neighbours.image_size=32", "neighbours.generations=2", "neighbours.gen_steps=2",
        f"classify.calibration_shards={tiny_corpus.out_dir / 'heldout'}", "corpus.executor=local"])
    run_scan(cfg, out, progress=False)
    from scanner.preflight import check_scan

    return out, check_scan(cfg), sorted(p.stem for p in tiny_corpus.shards)


def _tables(out: Path) -> dict[str, pd.DataFrame]:
    t = {n: pd.read_parquet(out / n) for n in TABLES if (out / n).exists()}
    t["scores"] = pd.concat([pd.read_parquet(f) for f in sorted((out / "scores").glob("*.parquet"))],
                            ignore_index=True)
    t["removal_list.txt"] = pd.DataFrame({"key": (out / "removal_list.txt").read_text().split()})
    return t


def _copy_parts(src: Path, dst: Path) -> Path:
    """What the stages left (part files, arrays, held-out parts, generations), without any corpus step's output."""
    for name in ("parts", "vectors", "embeddings", "thumbs", "previews", "heldout", "generations", "replications"):
        if (src / name).exists():
            shutil.copytree(src / name, dst / name)
    return dst


@pytest.mark.slow
def test_a_run_killed_inside_any_step_resumes_at_that_step_with_identical_tables(scanned, tmp_path, caplog):
    from scanner.corpus.run import build_steps, corpus_steps
    from scanner.corpus.store import PartStore
    from scanner.storage import Out

    out, cfg, names = scanned
    clean = _tables(out)
    embedder = str(cfg.neighbours.clip_checkpoint)
    steps = [s.name for s in build_steps(cfg, PartStore(Out(out), names), embedder, True)]
    assert steps == ["keys", "copies", "units", "links", "aligned", "groups", "lid", "replications", "cut", "tables",
                     "outputs"]
    for step in steps:
        work = _copy_parts(out, tmp_path / step)

        def kill(name, at=step):
            if name == at:
                raise Killed(at)

        with pytest.raises(Killed):
            corpus_steps(cfg, work, names, embedder=embedder, inside_step=kill)
        caplog.clear()
        with caplog.at_level("INFO", logger="memscan"):
            corpus_steps(cfg, work, names, embedder=embedder)
        resumed = [s for s in steps if f"corpus steps: {s} already done (resume)" in caplog.text]
        assert resumed == steps[:steps.index(step)], (step, resumed)  # it starts at the killed step
        got = _tables(work)
        assert set(got) == set(clean), step
        for name in clean:
            pd.testing.assert_frame_equal(got[name], clean[name], obj=f"{name} after a kill inside {step}")


@pytest.mark.slow
def test_a_config_change_redoes_only_the_steps_that_read_it(scanned, tmp_path, caplog):
    from scanner.corpus.run import corpus_steps

    out, cfg, names = scanned
    work = _copy_parts(out, tmp_path / "w")
    embedder = str(cfg.neighbours.clip_checkpoint)
    corpus_steps(cfg, work, names, embedder=embedder)
    cfg.classify.calibration_fpr = 0.05  # read by the cut only
    caplog.clear()
    with caplog.at_level("INFO", logger="memscan"):
        corpus_steps(cfg, work, names, embedder=embedder)
    ran = [s for s in ("keys", "copies", "links", "groups", "lid", "cut", "tables")
           if f"corpus steps: {s} done in" in caplog.text]
    assert ran == ["cut", "tables"], caplog.text[-2000:]
