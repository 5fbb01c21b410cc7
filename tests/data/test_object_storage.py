"""Shards on object storage, over HTTP and through pipe: commands, against the same shards on local disk.

Real parts, started here: a moto S3 server on 127.0.0.1 (tests/conftest.py s3_server) read through s3fs, python's
http.server in a thread, `cat` behind pipe:. The shards are the fault corpus (tests/fault_corpus.py): every kind
of damage a shard can have must read the same from every store. Only the listing-scale test uses an in-memory
fsspec filesystem (counting its calls), because 10^5 objects on a real server would take minutes to upload.
"""

from __future__ import annotations

import shutil
import tarfile
import threading
from collections import Counter
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from fault_corpus import build_fault_corpus

from scanner.data.shards import (
    ShardList,
    ShardSpecError,
    expand_shards,
    iter_tar_samples,
    shard_name,
)
from scanner.stages.read import ReadSpec, read_shard

SPEC = ReadSpec(model_side=8, embed_side=16, preview_size=16)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_fault_corpus(tmp_path_factory.mktemp("faults"))


@pytest.fixture(scope="module")
def s3_corpus(s3_server, corpus):
    """The fault corpus's folder at s3://memscan-faults/shards/."""
    return s3_server.upload(corpus.dir, "memscan-faults", "shards")


def _rows(path: str) -> list[dict]:
    """read_shard's batches as one dict per row (arrays compared as bytes)."""
    rows = []
    for batch in read_shard(path, SPEC):
        n = len(batch["key"])
        for i in range(n):
            rows.append({c: (v[i].tobytes() if isinstance(v[i], np.ndarray) else v[i]) for c, v in batch.items()})
    return rows


def _same_rows(local: str, remote: str) -> int:
    """Asserts remote reads as local, row for row; returns how many rows were compared."""
    want, got = _rows(local), _rows(remote)
    assert len(got) == len(want), (remote, len(got), len(want))
    for w, g in zip(want, got):
        assert g == w, (remote, {c: (w[c], g[c]) for c in w if w[c] != g[c]})
    return len(want)


def _names(paths) -> list[str]:
    return [shard_name(p) for p in paths]


def test_every_way_of_naming_object_shards(s3_corpus, corpus, serve_dir, tmp_path):
    local = [str(p.resolve()) for p in sorted(corpus.shards)]
    names = _names(local)
    assert expand_shards(s3_corpus) == [f"{s3_corpus}/{n}.tar" for n in names]  # a prefix: its .tar objects
    assert expand_shards(s3_corpus + "/") == expand_shards(s3_corpus)
    assert expand_shards(f"{s3_corpus}/{{empty,gzip,pax}}.tar") == [f"{s3_corpus}/{n}.tar" for n in
                                                                     ("empty", "gzip", "pax")]
    assert _names(expand_shards(f"{s3_corpus}/trunc*.tar")) == [n for n in names if n.startswith("trunc")]
    assert expand_shards(f"{s3_corpus}/pax.tar") == [f"{s3_corpus}/pax.tar"]
    assert expand_shards(f"simplecache::{s3_corpus}/{{gzip,pax}}.tar") == [f"simplecache::{s3_corpus}/gzip.tar",
                                                                          f"simplecache::{s3_corpus}/pax.tar"]
    http = serve_dir(corpus.dir)
    assert expand_shards(f"{http}/{{gzip,pax}}.tar") == [f"{http}/gzip.tar", f"{http}/pax.tar"]
    assert expand_shards(f"pipe:cat {corpus.dir}/{{gzip,pax}}.tar") == [f"pipe:cat {corpus.dir}/gzip.tar",
                                                                       f"pipe:cat {corpus.dir}/pax.tar"]
    assert expand_shards(f"file://{corpus.dir}") == local
    # the same names everywhere, so a scan's outputs do not depend on where its shards live
    assert _names(expand_shards(s3_corpus)) == names
    assert shard_name(f"pipe:aws s3 cp {s3_corpus}/pax.tar -") == "pax"
    assert shard_name(f"{http}/pax.tar?X-Amz-Signature=abc") == "pax"
    with pytest.raises(ShardSpecError, match=r"shard path 's3://memscan-faults/shards/nope.tar' does not exist"):
        expand_shards(f"{s3_corpus}/nope.tar")  # one object, no brace range: a typo, refused at once
    with pytest.raises(ShardSpecError, match=r"matches no .tar shard"):
        expand_shards(f"{s3_corpus}/*.tgz")
    with pytest.raises(ShardSpecError, match=r"/nope.tar' does not exist"):
        expand_shards(f"{http}/nope.tar")


def test_object_shards_read_exactly_as_local_ones(s3_corpus, corpus, serve_dir):
    """Every fault-corpus shard (good, truncated, corrupt, gzip, empty, not a tar) gives the same rows, decoded pixels
    included, from S3, S3 through simplecache::, HTTP and pipe:cat as from local disk."""
    http = serve_dir(corpus.dir)
    compared = {}
    for p in sorted(corpus.shards):
        local = str(p.resolve())
        for remote in (f"{s3_corpus}/{p.name}", f"simplecache::{s3_corpus}/{p.name}", f"{http}/{p.name}",
                       f"pipe:cat {local}"):
            compared[remote] = _same_rows(local, remote)
    # rows were compared from every store (not only shards that read as nothing)
    assert all(sum(n for r, n in compared.items() if r.startswith(k)) > 0
               for k in (s3_corpus, "simplecache::", http, "pipe:cat")), compared


def test_a_truncated_object_gives_the_rows_before_the_damage_then_an_error_row(s3_corpus, corpus):
    rows = [r for r in _rows(f"{s3_corpus}/truncated_data.tar") if not r["marker"]]
    assert rows[-1]["key"] is None and rows[-1]["error"].startswith("truncated or corrupt shard")
    good = [r["key"] for r in rows[:-1] if r["error"] is None]
    assert good and all(corpus.good.get(k) == "truncated_data" for k in good)


def test_missing_members_of_a_brace_range_are_error_rows_unless_strict(s3_server, corpus, tmp_path):
    for i in (0, 1, 3):
        shutil.copy(corpus.dir / "images.tar", tmp_path / f"{i:05d}.tar")
    url = s3_server.upload(tmp_path, "memscan-missing", "p")
    for spec in (f"{url}/{{00000..00003}}.tar", f"{tmp_path}/{{00000..00003}}.tar"):  # the same rule on local disk
        shards = expand_shards(spec)
        assert _names(shards) == ["00000", "00001", "00002", "00003"]
        assert isinstance(shards, ShardList) and _names(shards.missing) == ["00002"]
        assert expand_shards(shards) is shards  # handed on (embedder sample, held-out) without a second listing
        with pytest.raises(ShardSpecError, match=r"00002.tar' does not exist \(1 of 4 shards are missing\)"):
            expand_shards(shards, strict=True)
        rows = _rows(shards[2])
        assert len(rows) == 2 and rows[1]["marker"] and rows[1]["n_rows"] == 1
        assert rows[0]["key"] is None and rows[0]["error"].startswith("the shard does not exist")
        assert rows[0]["shard"] == "00002" and rows[0]["error_stage"] == "read"
        with pytest.raises(ShardSpecError, match=r"shard path '.*/p?00002.tar' does not exist .*1 of its 4 members "
                                                 r"are missing.*data.strict_shards is true"):
            expand_shards(spec, strict=True)
    with pytest.raises(ShardSpecError, match=r"'s3://memscan-missing/p/00007.tar' does not exist .*none of its 3"):
        expand_shards(f"{url}/{{00007..00009}}.tar")  # nothing at all: a wrong prefix, refused


def test_a_brace_range_lists_its_prefix_once_instead_of_probing_each_object(s3_server, tmp_path):
    """Counted on the S3 client itself (botocore's before-call event): 40 members, 30 of them present."""
    from local_s3 import counted_s3_calls

    for i in range(30):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"")
    url = s3_server.upload(tmp_path, "memscan-listing", "p")
    with counted_s3_calls() as calls:
        shards = expand_shards(f"{url}/{{00000..00039}}.tar")
    assert len(shards) == 40 and len(shards.missing) == 10
    assert calls == {"ListObjectsV2": 1}, calls


def test_ten_to_the_five_members_cost_one_listing(tmp_path):
    """10^5 brace members (100 missing) against an in-memory fsspec store that counts its calls; and where listing
    is refused (PermissionError, as S3 without ListBucket), one check per object instead."""
    import fsspec
    from fsspec.implementations.memory import MemoryFile, MemoryFileSystem

    class Counting(MemoryFileSystem):
        protocol = "countingmem"
        store: ClassVar[dict] = {}  # its own, not MemoryFileSystem's (shared by every memory:// in the process)
        pseudo_dirs: ClassVar[list] = [""]
        calls: ClassVar[Counter] = Counter()
        refuse_listing = False

        @classmethod
        def _strip_protocol(cls, path):
            return super()._strip_protocol(path.replace("countingmem://", "memory://", 1))

        def ls(self, path, detail=True, **kw):
            self.calls["ls"] += 1
            if self.refuse_listing:
                raise PermissionError("AccessDenied: ListObjectsV2")
            return super().ls(path, detail=detail, **kw)

        def info(self, path, **kw):
            self.calls["info"] += 1
            return super().info(path, **kw)

    fsspec.register_implementation("countingmem", Counting, clobber=True)
    Counting.store.clear()
    # written into the store directly: a pipe_file() per object would take longer than the expansion under test
    Counting.store.update({f"/b/p/{i:05d}.tar": MemoryFile(None, f"/b/p/{i:05d}.tar", b"") for i in range(100_000)
                           if i % 1000 != 7})
    shards = expand_shards("countingmem://b/p/{00000..99999}.tar")
    assert len(shards) == 100_000 and len(shards.missing) == 100
    assert Counting.calls == {"ls": 1}, Counting.calls
    Counting.calls.clear()
    Counting.refuse_listing = True
    shards = expand_shards("countingmem://b/p/{00000..00099}.tar")
    assert len(shards) == 100 and _names(shards.missing) == ["00007"]
    assert Counting.calls == {"ls": 1, "info": 100}, Counting.calls


def _within(seconds: float, fn):
    """fn() run in a thread; fails (instead of hanging the suite) when it takes longer than `seconds`."""
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(value=fn()), daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds} s"
    return out["value"]


def test_a_failing_pipe_command_is_an_error_row_naming_its_status_and_stderr(corpus, tmp_path):
    good = corpus.dir / "images.tar"
    rows = _within(30, lambda: list(iter_tar_samples(f"pipe:cat {tmp_path}/none.tar")))
    assert len(rows) == 1 and rows[0]["key"] is None
    assert "exited with status 1" in rows[0]["error"] and "No such file or directory" in rows[0]["error"]
    # fails midway: the samples it wrote before, then one row with its exit status and stderr tail
    size = good.stat().st_size
    cmd = f"pipe:head -c {size // 2} {good}; echo 'connection reset by peer' >&2; exit 3"
    rows = _within(30, lambda: list(iter_tar_samples(cmd)))
    local = [r for r in iter_tar_samples(str(good)) if r["error"] is None]
    assert 0 < sum(r["error"] is None for r in rows) < len(local)
    assert [r["key"] for r in rows if r["error"] is None] == [r["key"] for r in local][:len(rows) - 2]
    assert rows[-1]["key"] is None and rows[-1]["error"].startswith(f"the pipe: command {cmd[5:]!r} exited with "
                                                                     "status 3; stderr: 'connection reset by peer'")
    assert "its output: truncated or corrupt shard" in rows[-1]["error"]
    assert shard_name(cmd) == "images"
    # a command that never stops writing, and one that reads stdin: neither hangs the reader
    rows = _within(30, lambda: list(iter_tar_samples(f"pipe:yes {good}")))
    assert len(rows) == 1 and rows[0]["error"].startswith("not a tar archive")
    rows = _within(30, lambda: list(iter_tar_samples(f"pipe:cat # {good}")))
    assert len(rows) == 1 and rows[0]["error"].startswith("not a tar archive")
    rows = _within(30, lambda: list(iter_tar_samples(f"pipe:cat {good}; exit 4")))  # complete, yet it failed
    assert [r["key"] for r in rows[:-1]] == [r["key"] for r in iter_tar_samples(str(good))]
    assert rows[-1]["key"] is None and "exited with status 4; no stderr" in rows[-1]["error"]


def test_a_consumer_that_stops_early_leaves_no_command_running(corpus):
    import random
    import subprocess

    pause = f"300.{random.randrange(10**6):06d}"  # no other process on the machine sleeps exactly this long
    it = iter_tar_samples(f"pipe:cat {corpus.dir / 'images.tar'}; sleep {pause}")
    next(it)
    it.close()  # the generator's finally kills the command's process group
    out = subprocess.run(["pgrep", "-f", f"sleep {pause}"], capture_output=True, text=True, check=False)
    assert out.stdout.strip() == "", out.stdout


def test_shard_names_are_unique_and_pipe_commands_name_their_tar(corpus, tmp_path, s3_corpus):
    (tmp_path / "other").mkdir()
    shutil.copy(corpus.dir / "pax.tar", tmp_path / "other" / "pax.tar")
    with pytest.raises(ShardSpecError, match=r"would both be named 'pax'.*parts/pax.parquet"):
        expand_shards([str(corpus.dir / "pax.tar"), str(tmp_path / "other" / "pax.tar")])
    with pytest.raises(ShardSpecError, match=r"would both be named 'pax'"):
        expand_shards([f"{s3_corpus}/pax.tar", f"simplecache::{s3_corpus}/pax.tar"])
    with pytest.raises(ShardSpecError, match=r"the pipe: command 'pipe:curl -s http://h/shard' names no .tar file"):
        expand_shards("pipe:curl -s http://h/shard")
    assert shard_name("pipe:gsutil cat 'gs://b/my dir/00012.tar'") == "00012"
    assert shard_name("pipe:curl -sL https://h/p/00012.tar?sig=1 | zcat") == "00012"
    assert shard_name("s3://b/p/00012.tar") == shard_name("simplecache::s3://b/p/00012.tar") == "00012"


def test_a_store_memscan_cannot_reach_is_a_clear_refusal(tmp_path):
    pytest.importorskip("fsspec")
    with pytest.raises(ShardSpecError, match=r"'nosuchproto://b/x.tar'.*Protocol not known.*pipe:CMD"):
        expand_shards("nosuchproto://b/x.tar")
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(ShardSpecError, match=r"reading gs:// needs a package that is not installed.*memscan\[gcs\]"):
            expand_shards("gs://b/{0..3}.tar")


def test_an_object_that_vanished_after_listing_is_one_error_row(s3_server, corpus, tmp_path):
    shutil.copy(corpus.dir / "images.tar", tmp_path / "00000.tar")
    url = s3_server.upload(tmp_path, "memscan-vanish", "p")
    (path,) = expand_shards(f"{url}/00000.tar")
    s3_server.client().delete_object(Bucket="memscan-vanish", Key="p/00000.tar")
    rows = list(iter_tar_samples(path))
    assert len(rows) == 1 and rows[0]["key"] is None and rows[0]["error"].startswith("the shard does not exist")


def test_an_unreadable_member_stream_is_data_not_a_crash(tmp_path):
    """A tar whose gzip stream is cut (tarfile raises from deep inside) gives an error row read through S3 too:
    covered shard by shard above; here the same through a local file:// URL, which is read as the local path."""
    p = tmp_path / "x.tar"
    with tarfile.open(p, "w") as tf:
        tf.add(__file__, arcname="k.jpg")
    assert [r["key"] for r in iter_tar_samples(f"file://{p}")] == ["k"]
    assert expand_shards(f"file://{tmp_path}/x.tar") == [str(Path(p).resolve())]


@pytest.mark.slow
def test_memscan_scan_over_s3_with_a_missing_shard(s3_server, tiny_corpus, tiny_model_dir, tmp_path,
                                                    session_ray_env):
    """`memscan scan` as a user on a node of a cluster types it (a subprocess on the session's Ray, whose workers
    hold the AWS_* environment; a Ray of memscan's own gets the driver's: the README's bucket dedup) over
    an S3 brace range one past the last shard: the scan completes, the missing shard is one row of errors.parquet,
    and the parts carry the metadata columns (null here: the demo corpus's KEY.json has no url)."""
    import subprocess
    import sys

    import pandas as pd

    root = Path(__file__).resolve().parents[2]
    url = s3_server.upload(tiny_corpus.shards[0].parent, "memscan-scan", "tiny")
    n = len(tiny_corpus.shards)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "scanner", "scan", "--config", str(root / "configs" / "demo.yaml"),
           "--shards", f"{url}/{{00000..{n:05d}}}.tar", "--set", f"model.path={tiny_model_dir}",
           "--set", "data.resolution=8", "--set", "neighbours.enabled=false", "--set", "geometry.probes=2",
           "--set", "geometry.lpca_k=5", "--set", "ray.num_cpus=2", "--no-progress", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600, check=False,
                          env=session_ray_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"1 of the {n + 1} shards of" in proc.stderr  # the driver says which shard is missing, once
    errors = pd.read_parquet(out / "errors.parquet")
    gone = errors[errors["shard"] == f"{n:05d}"]
    assert len(gone) == 1 and gone["error"].iloc[0].startswith("the shard does not exist"), errors
    # part by part: the sink writes a column that is null on every row of a shard as Arrow null (error, url, ...)
    parts = pd.concat([pd.read_parquet(p) for p in sorted((out / "parts").glob("*.parquet"))], ignore_index=True)
    assert {"url", "original_width", "original_height", "download_sha256"} <= set(parts.columns)
    samples = parts[parts["key"].notna()]
    assert samples["url"].isna().all() and (samples["original_width"] == -1).all()
    assert len(samples) == sum(1 for p in tiny_corpus.shards for r in iter_tar_samples(str(p)) if r["key"] is not None)
