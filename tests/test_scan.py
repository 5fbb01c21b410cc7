"""End to end: a real Ray Data scan of the tiny demo corpus with a tiny saved diffusers model."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from scanner.pipeline import run_scan
from scanner.procfs import cmdline

ROOT = Path(__file__).resolve().parent.parent


def _scores(out: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(f) for f in sorted((out / "scores").glob("*.parquet"))], ignore_index=True)


def test_scan_writes_one_row_per_readable_sample_and_every_error(ray_session, scan_config, tiny_corpus, tmp_path,
                                                                  capsys):
    out = tmp_path / "scan"
    summary = run_scan(scan_config(), out, progress=True)
    truth = pd.read_parquet(tiny_corpus.truth)
    scores = _scores(out)
    # the progress line ends at every shard done, with the image count and a rate
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    n = len(tiny_corpus.shards)
    assert last.startswith("scan: 100%") and f"{n}/{n}" in last, last
    assert f"{len(scores):,} images" in last and "img/s" in last, last
    readable = set(truth.loc[truth["readable"], "key"])
    # one file per input shard, one row per readable sample, no key twice
    assert sorted(f.stem for f in (out / "scores").glob("*.parquet")) == [p.stem for p in tiny_corpus.shards]
    assert readable <= set(scores["key"]) and not scores["key"].duplicated().any()
    assert len(scores) - len(readable) <= 1  # at most the one sample cut by the truncation, as an error row
    # planted corrupt samples and the truncated shard are in errors.parquet; good rows carry every score
    errors = pd.read_parquet(out / "errors.parquet")
    corrupt = set(truth.loc[truth["planted"] == "corrupt", "key"])
    assert corrupt <= set(errors["key"].dropna())
    assert ((errors["key"].isna()) & (errors["shard"] == tiny_corpus.truncated_shard)).sum() == 1
    good = scores[scores["error"].isna()]
    assert len(good) == len(readable - corrupt)
    for col in ("lid_flipd", "score_norm", "p_laplace_1", "p_laplace_2", "p_laplace_3", "lid_lpca", "lid_gap"):
        assert good[col].notna().all(), col
    assert set(good["mem_class"]) <= {"od", "dd", "none"} and set(good["verdict"]) <= {"suspected", "clear"}
    # captions: None exactly for the planted no_caption samples
    no_cap = set(truth.loc[truth["planted"] == "no_caption", "key"])
    assert set(good.loc[good["caption"].isna(), "key"]) == no_cap
    assert summary["counts"]["scored"] == len(good)
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["counts"]["errors"] == len(errors) and on_disk["config"]["geometry"]["probes"] == 2
    removal = pd.read_parquet(out / "removal_list.parquet")
    assert (out / "removal_list.txt").read_text().split() == removal["key"].tolist()
    assert set(removal["key"]) == set(good.loc[good["mem_class"] != "none", "key"])


@pytest.mark.slow
def test_rerun_skips_finished_shards_and_is_deterministic(ray_session, scan_config, tmp_path):
    out = tmp_path / "scan"
    run_scan(scan_config(), out, progress=False)
    first = _scores(out)
    stamp = {f.name: f.stat().st_mtime_ns for f in (out / "parts").glob("*.parquet")}
    summary = run_scan(scan_config(), out, progress=False)
    assert summary["resume"]["done_this_run"] == 0
    assert stamp == {f.name: f.stat().st_mtime_ns for f in (out / "parts").glob("*.parquet")}
    pd.testing.assert_frame_equal(first, _scores(out))


def test_missing_shard_path_fails_at_once(scan_config, tmp_path):
    from scanner.data.shards import ShardSpecError

    with pytest.raises(ShardSpecError, match="does not exist"):
        run_scan(scan_config(f"data.shards={tmp_path}/nothing/{{00000..00003}}.tar"), tmp_path / "o")


def _cli(args, env, **kw):
    """`memscan ARGS` in a process group of its own (a kill takes the driver and whatever it started); env from
    session_ray_env: the kill tests' drivers run on the session's Ray, as on a node of a cluster."""
    return subprocess.Popen([sys.executable, "-m", "scanner", *args], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.fixture(scope="module")
def kill_corpus(tmp_path_factory):
    """Many small shards: Ray finishes shards in bursts, and a kill must land between two of them."""
    from scanner.demo.corpus import build_demo_corpus

    corpus = build_demo_corpus(tmp_path_factory.mktemp("kill_corpus"), n_unique=60, n_repeated=2, repeat_copies=20,
                               n_oversampled=3, n_exact_dup_groups=3, n_near_dup_groups=3, n_corrupt=3,
                               n_no_caption=4, size=16, samples_per_shard=8, seed=0)
    assert len(corpus.shards) >= 12
    return corpus


def _kill_args(corpus, model_dir, out) -> list[str]:
    return ["scan", "--config", "configs/demo.yaml", "--shards", str(corpus.shards[0].parent),
            "--set", f"model.path={model_dir}", "--set", "data.resolution=8", "--set", "neighbours.enabled=false",
            "--set", "geometry.probes=48", "--set", "geometry.lpca_k=5", "--set", "data.batch_size=8",
            "--set", "ray.num_cpus=2", "--no-progress", "--out", str(out)]


@pytest.fixture(scope="module")
def clean_kill_run(kill_corpus, tiny_model_dir, tmp_path_factory, session_ray_env) -> tuple[pd.DataFrame, str]:
    """(scores, log) of the uninterrupted scan the killed ones must match, run with two scoring actors on the 2-CPU
    Ray (the killed runs have one): its rows must not depend on how many actors scored them, and two actors must
    leave a CPU share for the read task (test_as_many_scoring_actors_as_cpus_does_not_starve_the_read_stage)."""
    out = tmp_path_factory.mktemp("clean_scan")
    full = _cli(_kill_args(kill_corpus, tiny_model_dir, out) + ["--set", "ray.actors=2"], session_ray_env())
    log = full.communicate(timeout=300)[0]
    assert full.returncode == 0, log[-3000:]
    return _scores(out), log


@pytest.fixture(scope="module")
def clean_kill_scan(clean_kill_run) -> pd.DataFrame:
    return clean_kill_run[0]


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").glob("[0-9]*")]


def _local_parts(out: Path) -> set[str]:
    return {p.name for p in (out / "parts").glob("*.parquet")}


def _wait_for_parts(proc, out: Path | str, at_least: int = 1, timeout: float = 240, parts=_local_parts) -> int:
    """Polls until `parts(out)` (the part files written so far) has at_least names; fails if the scan ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        done = len(parts(out))
        if done >= at_least:
            return done
        time.sleep(0.02)
    raise AssertionError(f"the scan ended before it could be killed:\n{proc.stdout.read()[-2000:]}")


def _assert_same_rows(out: Path | pd.DataFrame, clean: pd.DataFrame) -> None:
    a = out if isinstance(out, pd.DataFrame) else _scores(out)
    assert len(a) == len(clean) and not a["key"].duplicated().any()
    assert set(a["key"]) == set(clean["key"])
    a, b = a.set_index("key").sort_index(), clean.set_index("key").sort_index()
    pd.testing.assert_series_equal(a["score_norm"], b["score_norm"], check_exact=False, rtol=1e-5)


@pytest.mark.slow
def test_sigkill_mid_run_and_inside_the_corpus_steps_then_resume_loses_and_doubles_nothing(
        kill_corpus, tiny_model_dir, clean_kill_scan, tmp_path, session_ray_env):
    """One output folder, the driver SIGKILLed twice: first between shards, then (the resumed run) after every
    shard is scored, while finalize streams the parts (LID_*, classes, tables). The resumed run scores only the
    missing shards; the last run scores nothing again, redoes the corpus steps and writes exactly the clean run's
    tables: no row lost or doubled. (One chain rather than two scans from scratch: CI time.)"""
    out = tmp_path / "killed"
    args = _kill_args(kill_corpus, tiny_model_dir, out)
    proc = _cli(args, session_ray_env())
    _wait_for_parts(proc, out)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = len(list((out / "parts").glob("*.parquet")))
    assert 0 < done_at_kill < len(kill_corpus.shards)
    # resumed: it must say so, score the rest, and be killed inside the corpus steps
    proc = _cli(args, session_ray_env())
    deadline, log = time.time() + 240, []
    for line in proc.stdout:
        log.append(line)
        if "corpus steps:" in line:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        assert time.time() < deadline, "no corpus step started"
    proc.wait()
    assert any("resuming" in ln for ln in log), "".join(log)[-3000:]
    assert not (out / "summary.json").exists(), "the kill came after the corpus steps"
    assert len(list((out / "parts").glob("*.parquet"))) == len(kill_corpus.shards)
    rerun = _cli(args, session_ray_env())
    log = rerun.communicate(timeout=300)[0]
    assert rerun.returncode == 0, log[-3000:]
    _assert_same_rows(out, clean_kill_scan)
    a = _scores(out).set_index("key").sort_index()
    b = clean_kill_scan.set_index("key").sort_index()
    pd.testing.assert_series_equal(a["lid_lpca"], b["lid_lpca"])
    pd.testing.assert_series_equal(a["mem_class"], b["mem_class"])
    assert not (out / "corpus-work").exists()


@pytest.mark.slow
def test_a_scan_into_a_bucket_killed_mid_way_resumes_there(s3_server, kill_corpus, tiny_model_dir, clean_kill_scan,
                                                           session_ray_env):
    """SIGKILL while shards are being written to a bucket on the local S3 server (moto, 127.0.0.1; memscan finds it
    through the standard AWS_* environment); the rerun of the same command reads only the shards whose part file is
    not in the bucket and ends with the uninterrupted local scan's rows, none lost or doubled."""
    import s3fs
    from out_tables import tables

    client = s3_server.client()
    if "memscan-kill" not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket="memscan-kill")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server.endpoint})

    def bucket_parts(out: str) -> set[str]:
        fs.invalidate_cache()
        return {p.rsplit("/", 1)[-1] for p in fs.glob(f"{out.removeprefix('s3://')}/parts/*.parquet")}

    out = "s3://memscan-kill/scan"
    args = _kill_args(kill_corpus, tiny_model_dir, out)
    proc = _cli(args, session_ray_env())
    _wait_for_parts(proc, out, parts=bucket_parts)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = bucket_parts(out)
    assert 1 <= len(done) < len(kill_corpus.shards), done
    again = _cli(args, session_ray_env())
    log = again.communicate(timeout=300)[0]
    assert again.returncode == 0, log[-3000:]
    assert f"resuming: {len(done)} of" in log, log[-3000:]
    scores = tables(out)["scores"]
    _assert_same_rows(scores, clean_kill_scan)
    b = clean_kill_scan.set_index("key").sort_index()
    pd.testing.assert_series_equal(scores.set_index("key").sort_index()["mem_class"], b["mem_class"])


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds Ray's worker processes through /proc")
@pytest.mark.slow
def test_scoring_worker_killed_mid_run_is_retried_by_ray_without_lost_or_doubled_rows(kill_corpus, tiny_model_dir,
                                                                                      clean_kill_scan, tmp_path,
                                                                                      session_ray_env):
    """SIGKILL the Ray worker process of the scoring actor (not the driver): Ray restarts the actor and retries
    its task, the job exits 0, and the driver's per-shard row numbers drop anything a retry sends twice."""
    out = tmp_path / "worker_killed"
    before = set(_pids())
    proc = _cli(_kill_args(kill_corpus, tiny_model_dir, out), session_ray_env())
    _wait_for_parts(proc, out)
    # the session's raylet started the actor: its process is new since the scan began, and retitled by Ray
    workers = [p for p in _pids() if p not in before and "ScoreStage" in cmdline(p)]
    assert workers, "no scoring actor process found on the session's Ray"
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    done_at_kill = len(list((out / "parts").glob("*.parquet")))
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log[-3000:]
    assert done_at_kill < len(kill_corpus.shards), "the kill came after the last shard: nothing was retried"
    assert all(not Path(f"/proc/{p}").exists() or "ScoreStage" not in cmdline(p) for p in workers)
    _assert_same_rows(out, clean_kill_scan)


@pytest.mark.slow
def test_a_failed_shard_write_is_an_error_and_the_rerun_completes_it(ray_session, scan_config, tiny_corpus,
                                                                      tmp_path, monkeypatch):
    from scanner.errors import ScanIncomplete
    from scanner.storage import Out

    real = Out.write_parquet
    victim = tiny_corpus.shards[1].stem

    def disk_full_for_victim(self, rel, df, schema=None):
        if rel == f"parts/{victim}.parquet":
            raise OSError(28, "No space left on device")
        return real(self, rel, df, schema)

    monkeypatch.setattr(Out, "write_parquet", disk_full_for_victim)
    out = tmp_path / "scan"
    with pytest.raises(ScanIncomplete, match=rf"1 of {len(tiny_corpus.shards)} shards could not be written"
                                                      rf".*{victim}: OSError.*No space left on device.*rerun"):
        run_scan(scan_config(), out, progress=False)
    parts = sorted(f.stem for f in (out / "parts").glob("*.parquet"))
    assert parts == sorted(p.stem for p in tiny_corpus.shards if p.stem != victim)  # the others are saved
    monkeypatch.setattr(Out, "write_parquet", real)
    summary = run_scan(scan_config(), out, progress=False)
    assert summary["resume"]["done_this_run"] == 1
    truth = pd.read_parquet(tiny_corpus.truth)
    scores = _scores(out)
    assert set(truth.loc[truth["readable"], "key"]) <= set(scores["key"]) and not scores["key"].duplicated().any()


@pytest.mark.slow
def test_same_key_in_two_shards_is_reported_and_an_empty_shard_is_fine(ray_session, scan_config, tiny_corpus,
                                                                       tmp_path):
    """A shard copied under a second name repeats every key: each copy becomes an error row, none is merged."""
    import shutil
    import tarfile

    shards = tmp_path / "shards"
    shards.mkdir()
    first = tiny_corpus.shards[0]
    shutil.copy(first, shards / first.name)
    shutil.copy(first, shards / "00099.tar")
    tarfile.open(shards / "00100.tar", "w").close()  # a valid tar with no member
    out = tmp_path / "scan"
    summary = run_scan(scan_config(f"data.shards={shards}"), out, progress=False)
    scores = _scores(out)
    assert sorted(scores["shard"].unique()) == [first.stem, "00099"]  # the empty shard has no rows, no crash
    n = len(pd.read_parquet(out / "scores" / f"{first.stem}.parquet"))
    assert len(scores) == 2 * n  # both copies kept
    dup = scores["error"].fillna("").str.contains("is repeated")
    in_first = scores["shard"] == first.stem
    assert (dup & in_first).sum() == (dup & ~in_first).sum() > 0  # every repeated key flagged in both shards
    assert set(scores.loc[dup & in_first, "key"]) == set(scores.loc[dup & ~in_first, "key"])
    # the error names both shards that carry the key, so either row says where the other copy is
    assert scores.loc[dup, "error"].str.contains(f"in shards {first.stem}, 00099;").all()
    errors = pd.read_parquet(out / "errors.parquet")
    assert errors["error"].str.contains("is repeated").sum() == dup.sum()
    assert summary["counts"]["scored"] == int(scores["error"].isna().sum())


@pytest.mark.slow
def test_local_ray_listens_on_loopback_with_dashboard_off(tmp_path):
    """memscan's own local Ray (not the test session's): loopback node address, no dashboard."""
    code = ("import ray, json; from scanner.config import load_config; from scanner.pipeline import init_ray; "
            "cfg = load_config(None, ['model.kind=none', 'ray.num_cpus=1']); init_ray(cfg); "
            "n = ray.nodes()[0]; ctx = ray.get_runtime_context(); "
            "print(json.dumps({'ip': n['NodeManagerAddress'], 'dash': ray.worker.get_dashboard_url()}))")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["ip"] == "127.0.0.1" and not info["dash"]


def test_text_columns_are_typed_where_they_are_made_and_stay_none_through_ray(scan_config, tiny_corpus, tmp_path):
    """A batch whose `error` (or `caption`) is None on every row: left to Ray's inference it became Arrow `null`
    and came back as float NaN (CI caught it: no row looked scoreable, and its block could not be merged with
    one that carried a string error). Each stage now hands Ray a typed table (schema.typed_block)."""
    import numpy as np
    import pyarrow as pa
    from ray.data._internal.arrow_ops import transform_pyarrow
    from ray.data.block import BlockAccessor

    from scanner.schema import typed_block
    from scanner.stages.read import ReadSpec, read_shard
    from scanner.stages.score import ScoreSpec, ScoreStage
    from scanner.stages.sink import SinkSpec, SinkStage

    def to_numpy(table):  # what the next stage receives from Ray Data
        return BlockAccessor.for_block(table).to_batch_format("numpy")

    cfg = scan_config()
    shard = str(tiny_corpus.shards[0])
    first = next(read_shard(shard, ReadSpec(cfg.data.resolution, cfg.data.channels)))
    keep = np.array([e is None for e in first["error"]]) & ~first["marker"]
    clean = {k: v[keep] for k, v in first.items()}
    assert set(clean["split"]) == {"corpus"}
    clean["caption"] = np.array([None] * int(keep.sum()), dtype=object)  # a shard with no caption at all
    block = typed_block(clean)
    assert block.schema.field("error").type == pa.string() and block.schema.field("caption").type == pa.string()
    # the untyped way still loses None: the reason typed_block exists (this assertion guards the test itself)
    assert BlockAccessor.batch_to_block(clean).schema.field("error").type == pa.null()

    scored = next(ScoreStage(ScoreSpec.of(cfg))(to_numpy(block)))
    assert scored.schema.field("error").type == pa.string()
    out = to_numpy(scored)
    assert all(e is None for e in out["error"]) and all(c is None for c in out["caption"])
    assert np.isfinite(out["score_norm"]).all() and np.isfinite(out["p_laplace_1"]).all()
    # blocks with and without string errors merge, and the collector keeps None as None
    with_error = typed_block(dict(out, error=np.array(["boom"] + [None] * (len(out["key"]) - 1), dtype=object)))
    assert transform_pyarrow.concat([scored, with_error]).num_rows == 2 * len(out["key"])
    sink = SinkStage(SinkSpec(str(tmp_path)))
    sink.add(out)
    rows = sink.rows[("corpus", out["shard"][0])][0]
    assert rows["error"].isna().all() and rows["caption"].isna().all() and rows["score_norm"].notna().all()


@pytest.mark.slow
def test_as_many_scoring_actors_as_cpus_does_not_starve_the_read_stage(kill_corpus, clean_kill_run):
    """2 actors x 1 CPU on a 2-CPU Ray left no CPU for reading: the scan waited forever (now each asks for less).
    The scan is the kill tests' clean reference, which runs with two actors."""
    from scanner.stages.cluster import plan

    assert plan(2, 0, 2, 1.0, embed=False, use_gpu=False)["score"].cpus == 0.75
    assert plan(8, 0, 2, 1.0, embed=True, use_gpu=False)["score"].cpus == 1.0
    scores, log = clean_kill_run
    assert "score: 2 actor(s) x (0.75 CPU, 0 GPU)" in log, log[-3000:]
    assert scores["shard"].nunique() == len(kill_corpus.shards)
