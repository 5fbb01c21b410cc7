"""img2dataset's metadata in the read stage's rows (KEY.json) and its failed downloads (NAME_stats.json).

The end-to-end test runs img2dataset itself (its CLI, in a subprocess) against python's http.server on 127.0.0.1
serving generated images, with a few urls that 404, and reads its shards back from local disk and from the local
S3 server. img2dataset is not a declared dependency (its metadata pins pandas<3 and webdataset<0.3; CI installs it
with --no-deps): that test skips when it cannot be imported.
"""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from fault_corpus import build_fault_corpus

from scanner.data.img2dataset import NO_META, download_stats, sample_meta, stats_path
from scanner.schema import typed_block
from scanner.stages.read import ReadSpec, read_shard

SHA = "df168344d8478cc7455a7e56c3b453f743f06a8b5a8d3c1c8a4af539acddb2b0"


def _rows(path: str) -> list[dict]:
    return [{c: v[i] for c, v in b.items()} for b in read_shard(path, ReadSpec()) for i in range(len(b["key"]))]


def test_sample_meta_takes_what_is_there_and_nulls_the_rest():
    full = json.dumps({"url": "http://e/x.jpg", "original_width": 640, "original_height": 480.0, "sha256": SHA.upper(),
                       "width": 256, "key": "000000012"}).encode()
    assert sample_meta(full) == {"url": "http://e/x.jpg", "download_sha256": SHA, "original_width": 640,
                                 "original_height": 480}
    assert sample_meta(None) == NO_META == {"url": None, "download_sha256": None, "original_width": -1,
                                            "original_height": -1}
    for bad in (b'{"url": "http://exa', b"\xff\xfe\x00garbage", b"[1, 2]", b"null", b""):
        assert sample_meta(bad) == NO_META, bad
    # wrong types: each field alone falls back (img2dataset writes null sizes and hash for failed downloads)
    odd = json.dumps({"url": 12, "original_width": True, "original_height": -3, "sha256": "abc"}).encode()
    assert sample_meta(odd) == NO_META
    assert sample_meta(b'{"url": "u", "original_width": null}') == {**NO_META, "url": "u"}


def test_read_rows_carry_the_metadata_and_a_bad_json_costs_nothing_but_the_metadata(tmp_path, caplog):
    corpus = build_fault_corpus(tmp_path)
    rows = [r for p in corpus.shards for r in _rows(str(p)) if r["key"] is not None]
    by_key = {r["key"]: r for r in rows}
    assert by_key["good_first_archive"]["url"] == "http://example.com/x.jpg"  # the fault corpus's default KEY.json
    for key in ("good_no_json", "good_invalid_json", "good_binary_json"):
        r = by_key[key]
        assert r["error"] is None and r["sha256"] is not None and r["width"] > 0, key  # the image is fine
        assert (r["url"], r["download_sha256"], r["original_width"], r["original_height"]) == (None, None, -1, -1)
    assert not [rec for rec in caplog.records if rec.levelno > 10 and "json" in rec.getMessage().lower()]
    with caplog.at_level("DEBUG", logger="memscan"):
        _rows(str(corpus.dir / f"{corpus.good['good_invalid_json']}.tar"))
    assert any("good_invalid_json" in rec.getMessage() and rec.levelno == 10 for rec in caplog.records)


def test_metadata_columns_stay_typed_when_every_row_is_null(tmp_path):
    """A shard not written by img2dataset has no url on any row: still `string` / `int64`, never Arrow null."""
    corpus = build_fault_corpus(tmp_path)
    (batch,) = list(read_shard(str(corpus.dir / "empty.tar"), ReadSpec()))
    assert all(v is None for v in batch["url"])
    table = typed_block(batch)
    assert table.schema.field("url").type == pa.string()
    assert table.schema.field("download_sha256").type == pa.string()
    assert table.schema.field("original_width").type == pa.int64()


def test_stats_path_sits_beside_the_tar():
    assert stats_path("/d/00012.tar") == "/d/00012_stats.json"
    assert stats_path("s3://b/p/00012.tar") == "s3://b/p/00012_stats.json"
    assert stats_path("simplecache::s3://b/p/00012.tar") == "s3://b/p/00012_stats.json"
    assert stats_path("pipe:aws s3 cp s3://b/p/00012.tar -") == "s3://b/p/00012_stats.json"
    assert stats_path("https://h/p/00012.tar?X-Amz-Signature=1") == "https://h/p/00012_stats.json"
    assert stats_path("/d/00012.tgz") is None


def test_download_stats_sums_the_shards_that_have_them(tmp_path):
    def stats(name, count, ok, dl, rs):
        (tmp_path / f"{name}_stats.json").write_text(json.dumps({"count": count, "successes": ok,
                                                                 "failed_to_download": dl, "failed_to_resize": rs,
                                                                 "status_dict": {}}))
    stats("00000", 10, 7, 2, 1)
    stats("00001", 10, 10, 0, 0)
    (tmp_path / "00002_stats.json").write_text("{not json")
    shards = [str(tmp_path / f"{i:05d}.tar") for i in range(4)]  # 00003 has no stats file: not an error
    assert download_stats(shards) == {"shards": 4, "shards_with_stats": 2, "count": 20, "successes": 17,
                                      "failed_to_download": 2, "failed_to_resize": 1, "failed": 3,
                                      "unreadable_stats": 1}
    assert download_stats([])["shards_with_stats"] == 0


@pytest.mark.slow
def test_img2dataset_shards_carry_url_size_and_hash_and_the_failed_downloads_add_up(tmp_path, serve_dir, s3_server,
                                                                                    monkeypatch, session_ray_env):
    monkeypatch.setenv("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations would look for updates on the network
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # its `import imghdr`: not memscan's to fix
            import img2dataset  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError, or a dependency of it failing at import
        pytest.skip(f"img2dataset cannot be imported ({type(e).__name__}: {e}): CI installs it with --no-deps")
    from PIL import Image

    from scanner.data.shards import expand_shards

    www = tmp_path / "www"
    www.mkdir()
    rng = np.random.default_rng(0)
    sizes, hashes = {}, {}
    for i in range(9):
        w, h = 20 + 4 * i, 36 - 2 * i
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(www / f"im{i}.jpg", quality=90)
        sizes[f"im{i}.jpg"] = (w, h)
        hashes[f"im{i}.jpg"] = hashlib.sha256((www / f"im{i}.jpg").read_bytes()).hexdigest()
    (www / "im9.jpg").write_bytes((www / "im0.jpg").read_bytes())  # the same image at a second url
    sizes["im9.jpg"], hashes["im9.jpg"] = sizes["im0.jpg"], hashes["im0.jpg"]
    base = serve_dir(www)
    urls = [f"{base}/im{i}.jpg" for i in range(10)] + [f"{base}/gone{i}.jpg" for i in range(3)]  # 3 answer 404
    with open(tmp_path / "urls.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["url", "caption"])
        w.writerows([u, f"caption of {u.rsplit('/', 1)[1]}"] for u in urls)
    out = tmp_path / "out"
    # img2dataset's own CLI (its console script's code: `img2dataset --url_list ...`), run by this interpreter
    cmd = [sys.executable, "-c", "import sys; from img2dataset import main; sys.exit(main())",
           "--url_list", str(tmp_path / "urls.csv"), "--input_format", "csv", "--url_col", "url", "--caption_col",
           "caption", "--output_format", "webdataset", "--output_folder", str(out), "--processes_count", "1",
           "--thread_count", "4", "--image_size", "16", "--number_sample_per_shard", "5", "--enable_wandb", "False",
           "--retries", "0", "--timeout", "5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    url = s3_server.upload(out, "memscan-img2dataset", "laion")
    for spec in (str(out), url):
        shards = expand_shards(spec)
        rows = [r for s in shards for r in _rows(s) if r["key"] is not None and r["error"] is None]
        assert len(rows) == 10, spec  # every image the server had
        for r in rows:
            name = r["url"].rsplit("/", 1)[1]
            assert r["url"] == f"{base}/{name}" and r["caption"] == f"caption of {name}"
            assert (r["original_width"], r["original_height"]) == sizes[name]  # before img2dataset resized it
            assert (r["width"], r["height"]) == (16, 16)  # as stored, after
            assert r["download_sha256"] == hashes[name]  # of the bytes downloaded (the stored image is re-encoded)
        stats = download_stats(shards)
        assert stats["shards_with_stats"] == stats["shards"] == len(shards) == 3, stats
        assert stats["count"] == len(urls) and stats["failed_to_download"] == 3 and stats["failed_to_resize"] == 0
        assert len(rows) + stats["failed"] == len(urls)  # seen + failed = urls

    # memscan dedup, as a user on a node of a cluster runs it (the session's Ray), over the bucket: the removal list
    # names the second url's copy by its url, and the summary's downloads add up with the rows seen
    proc = subprocess.run([sys.executable, "-m", "scanner", "dedup", "--shards", url, "--out", str(tmp_path / "scan"),
                           "--no-progress"], capture_output=True, text=True, timeout=600, check=False,
                          env=session_ray_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    removal = pd.read_parquet(tmp_path / "scan" / "removal_list.parquet")
    assert len(removal) == 1 and removal["url"][0] in (f"{base}/im0.jpg", f"{base}/im9.jpg"), removal
    summary = json.loads((tmp_path / "scan" / "summary.json").read_text())
    assert summary["counts"]["seen"] + summary["downloads"]["failed"] == len(urls), summary["downloads"]
    assert summary["shards"] == {"listed": 3, "missing": 0, "missing_first": []}
