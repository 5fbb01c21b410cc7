"""--out in object storage: a local S3 server (moto's server mode, on 127.0.0.1) holds everything a local --out
holds, the same tables, the same completion markers and resume; a scheme memscan cannot write is refused at once.

The server is the session's (tests/conftest.py s3_server: moto in its own process on 127.0.0.1); memscan reaches
it the way a user reaches any S3-compatible store, through the standard environment (AWS_ENDPOINT_URL and
credentials).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest


@pytest.fixture(scope="module")
def s3(s3_server):
    """The session's local S3 server (tests/conftest.py s3_server) with a bucket for these tests: yields (endpoint,
    the environment memscan subprocesses get, an s3fs filesystem on it)."""
    import s3fs

    client = s3_server.client()
    if "memscan-test" not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket="memscan-test")
    env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                      "AWS_DEFAULT_REGION")}
    return s3_server.endpoint, env, s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server.endpoint})


def _memscan(args: list[str], env: dict, cwd: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "scanner", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **env,
                                 "PYTHONUNBUFFERED": "1"}, **kw)


def _tables(out: str) -> dict[str, pd.DataFrame]:
    """Every user-facing table of a finished scan, read the way a user would (pandas over a path or a URL)."""
    from scanner.storage import Out

    o = Out(out)
    t = {name: o.read_parquet(name) for name in ("duplicates.parquet", "removal_list.parquet", "errors.parquet")
         if o.exists(name)}
    t["scores"] = pd.concat([o.read_parquet(f"scores/{f}") for f in o.names("scores", ".parquet")],
                            ignore_index=True).sort_values("key", ignore_index=True)
    t["removal_list.txt"] = pd.DataFrame({"key": o.read_text("removal_list.txt").split()})
    return t


def test_an_unwritable_scheme_is_refused_at_once_and_never_becomes_a_folder(tmp_path):
    for out in ("http://127.0.0.1:9/out", "pipe:cat", "s3:bucket/out", "ftp://host/out"):
        proc = _memscan(["dedup", "--shards", str(tmp_path), "--out", out], {}, cwd=tmp_path)
        text = proc.communicate(timeout=60)[0]
        assert proc.returncode == 2, (out, text)
        assert "memscan cannot write to" in text or "write a URL as" in text, text
    assert list(tmp_path.iterdir()) == []  # no folder named `http:`, `pipe:cat` or `s3:` appeared


@pytest.mark.slow
def test_dedup_into_a_bucket_gives_the_tables_of_a_local_run(s3, tiny_corpus, tiny_embedder_dir, tmp_path):
    _, env, fs = s3
    shards = str(tiny_corpus.shards[0].parent)
    args = ["--shards", shards, "--clip-checkpoint", str(tiny_embedder_dir), "--no-progress"]
    local = tmp_path / "local"
    runs = {}
    for name, out in (("local", str(local)), ("s3", "s3://memscan-test/dedup")):
        proc = _memscan(["dedup", *args, "--out", out], env, cwd=tmp_path)
        runs[name] = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, runs[name][-3000:]
    assert "results in s3://memscan-test/dedup" in runs["s3"]
    assert not any(p.name.startswith("s3:") for p in tmp_path.iterdir())  # nothing local stands in for the bucket
    a, b = _tables(str(local)), _tables("s3://memscan-test/dedup")
    assert set(a) == set(b) and len(a["scores"]) > 0 and len(a["duplicates.parquet"]) > 0
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], obj=name)
    # everything a local --out holds: parts and their completion markers, arrays, previews, summary, report
    listed = {p.removeprefix("memscan-test/dedup/") for p in fs.find("memscan-test/dedup")}
    local_files = {str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()}
    assert local_files == listed, (local_files ^ listed)
    for f in ("summary.json", "report.html", "parts/_run.json", "removal_list.txt", "previews/00000.parquet"):
        assert f in listed, f


@pytest.mark.slow
def test_a_scan_into_a_bucket_killed_mid_way_resumes_there(s3, tiny_corpus, tiny_model_dir, tmp_path):
    """SIGKILL while shards are being written to the bucket; the rerun of the same command reads only the shards
    whose part file is not in the bucket and ends with the same tables as an uninterrupted local scan."""
    _, env, fs = s3
    shards = str(tiny_corpus.shards[0].parent)
    common = ["scan", "--config", "demo", "--shards", shards, "--set", f"model.path={tiny_model_dir}",
              "--set", "data.resolution=8", "--set", "neighbours.enabled=false", "--set", "geometry.probes=2",
              "--set", "geometry.lpca_k=5", "--set", "ray.num_cpus=2", "--no-progress"]
    out = "s3://memscan-test/scan"
    proc = _memscan([*common, "--out", out], env, cwd=tmp_path, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        fs.invalidate_cache()
        if len(fs.glob("memscan-test/scan/parts/*.parquet")) >= 1:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    fs.invalidate_cache()
    done = {p.rsplit("/", 1)[-1] for p in fs.glob("memscan-test/scan/parts/*.parquet")}
    n = len(tiny_corpus.shards)
    assert 1 <= len(done) < n, done
    again = _memscan([*common, "--out", out], env, cwd=tmp_path)
    text = again.communicate(timeout=600)[0]
    assert again.returncode == 0, text[-3000:]
    assert f"resuming: {len(done)} of" in text, text[-3000:]
    local = _memscan([*common, "--out", str(tmp_path / "local")], env, cwd=tmp_path)
    assert local.communicate(timeout=600)[0] and local.returncode == 0
    a, b = _tables(str(tmp_path / "local")), _tables(out)
    assert not b["scores"]["key"].duplicated().any()  # no row doubled by the kill
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], obj=name)
