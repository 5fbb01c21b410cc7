"""New shards against a finished scan (`--against`), and reference sets (`--reference`).

- A chain of scans (shard 0; shard 1 against it; shard 2 against that) gives the same duplicate groups over the
  three shards as one scan of all three, and each link of the chain names only its own images for removal.
- Copies of held-out images (byte copies, re-encodes, resizes, flips) planted in a corpus are removed with reason
  `reference` and the reference image's key; no reference image is removed, no other image for `reference`.
- A folder that is not a finished scan, one whose corpus steps did not finish, one made with another embedder, and
  a reference that cannot be read are refused at once with exit 2, naming what differs.
"""

from __future__ import annotations

import glob
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scanner.config import NEIGHBOUR_SECTIONS, load_config
from scanner.demo.corpus import build_demo_corpus
from scanner.pipeline import run_scan

ROOT = Path(__file__).resolve().parent.parent


def dedup(shards: list[Path], out: Path, against: list[Path] = (), reference: list[str] = (), *sets: str) -> dict:
    """`memscan dedup` in this process (the session's Ray): the CLI's config with the shipped embedder."""
    cfg = load_config(None, list(sets), sections=NEIGHBOUR_SECTIONS)
    cfg.model.kind, cfg.model.path = "none", None
    cfg.data.shards = [str(s) for s in shards]
    cfg.incremental.against = [str(a) for a in against]
    cfg.incremental.reference = list(reference)
    return run_scan(cfg, out, progress=False, label="dedup")


def partition(out: Path) -> set[frozenset]:
    """Every duplicate group of a scan over all the rows its corpus steps read (old ones too), as sets of keys."""
    g = pd.concat([pd.read_parquet(f) for f in glob.glob(f"{out}/corpus/groups/*.parquet")])
    return {frozenset(x["key"]) for _, x in g.groupby("group_id")}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inc")
    build_demo_corpus(root / "corpus", n_unique=300, n_heldout=50, seed=0)
    return root / "corpus"


@pytest.fixture(scope="module")
def chain(corpus, ray_session, tmp_path_factory) -> dict:
    """Week 1 (shard 0), week 2 (shard 1) against week 1, week 3 (shard 2) against week 2, and all at once. The
    inverted-file search (one list at this size: exact), so that weeks 2 and 3 search the lists week 1 kept."""
    root = tmp_path_factory.mktemp("chain")
    s = [corpus / "shards" / f"0000{i}.tar" for i in range(3)]
    out = {"a": root / "a", "b": root / "b", "c": root / "c", "whole": root / "whole"}
    ivf = "neighbours.index=ivf"
    summaries = {"a": dedup(s[:1], out["a"], (), (), ivf), "b": dedup(s[1:2], out["b"], [out["a"]], (), ivf),
                 "c": dedup(s[2:], out["c"], [out["b"]], (), ivf), "whole": dedup(s, out["whole"], (), (), ivf)}
    return {"out": out, "summary": summaries}


@pytest.mark.slow
def test_incremental_chain_gives_the_groups_of_one_scan(chain):
    out = chain["out"]
    whole, inc = partition(out["whole"]), partition(out["c"])
    assert len(whole) > 50  # the demo's planted groups, most spanning shards
    assert inc == whole
    # groups that link new images to old ones exist (the test would be empty otherwise)
    d = pd.read_parquet(out["c"] / "duplicates.parquet")
    mixed = d.groupby("group_id")["role"].agg(set)
    assert (mixed.map(lambda r: {"new", "old"} <= r)).sum() >= 5
    # duplicates.parquet: every group with a new image, whole (its old members too), as the one scan has it
    wd = pd.read_parquet(out["whole"] / "duplicates.parquet")
    new_keys = set(pd.read_parquet(out["c"] / "scores")["key"])
    want = {frozenset(x["key"]) for _, x in wd.groupby("group_id") if new_keys & set(x["key"])}
    assert {frozenset(x["key"]) for _, x in d.groupby("group_id")} == want
    # each week's removal list and scores name its own images only; an old image in a group is kept over new ones
    for week, shard in (("b", "00001"), ("c", "00002")):
        rem = pd.read_parquet(out[week] / "removal_list.parquet")
        assert len(rem) and set(rem["shard"]) == {shard}
        assert sorted(p.name for p in (out[week] / "scores").iterdir()) == [f"{shard}.parquet"]
        dd = pd.read_parquet(out[week] / "duplicates.parquet")
        for _, grp in dd.groupby("group_id"):
            if (grp["role"] == "old").any():
                assert grp.loc[grp["keep"], "role"].tolist() == ["old"]
    # the chain is recorded: week 3 read week 2's and week 1's part files where they are
    s = chain["summary"]["c"]
    assert [a["out"] for a in s["against"]] == [str(out["b"])]
    listed = json.loads((out["c"] / "corpus" / "shards.json").read_text())
    assert [(x["name"], x["out"], x["role"]) for x in listed] == [
        ("00000", str(out["a"]), "old"), ("00001", str(out["b"]), "old"), ("00002", str(out["c"]), "new")]
    assert not (out["c"] / "parts" / "00000.parquet").exists()  # old shards are not read again
    # week 3's rows were searched against the lists weeks 1 and 2 kept: only its own rows assigned and asked
    index = s["neighbours"]["index"]
    assert index["reused_index"]["sources"] == 2 and 0 < index["reused_index"]["new_rows"] <= s["corpus"]["asking_rows"]
    assert index["recall_at_k"] == 1.0
    # the summary's counts are this week's (shard 2, truncated: its damaged tail is a shard error row)
    assert s["counts"]["seen"] == len(pd.read_parquet(out["c"] / "scores")) == len(new_keys)
    assert s["corpus"]["rows_by_role"]["old"] == chain["summary"]["b"]["corpus"]["rows"]


def _shard(path: Path, samples: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for key, jpg in samples:
            for name, data in ((f"{key}.jpg", jpg), (f"{key}.txt", b"a planted copy")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def _planted_copies(heldout: Path, n_each: int = 4) -> tuple[list[tuple[str, bytes]], dict[str, str]]:
    """Copies of held-out images: n_each byte copies, JPEG re-encodes, 1.5x upscales, horizontal flips."""
    from PIL import Image

    with tarfile.open(heldout) as tf:
        jpgs = sorted((m.name[:-4], tf.extractfile(m).read()) for m in tf.getmembers() if m.name.endswith(".jpg"))
    samples, source = [], {}
    for j, (key, data) in enumerate(jpgs[:4 * n_each]):
        img = Image.open(io.BytesIO(data)).convert("RGB")
        kind = ("bytes", "jpeg", "resize", "flip")[j // n_each]
        if kind == "bytes":
            out = data
        else:
            if kind == "resize":
                img = img.resize((img.width * 3 // 2, img.height * 3 // 2), Image.BICUBIC)
            elif kind == "flip":
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=70 if kind == "jpeg" else 90)
            out = buf.getvalue()
        copy = f"planted-{kind}-{j:02d}"
        samples.append((copy, out))
        source[copy] = key
    return samples, source


@pytest.mark.slow
def test_reference_set_removes_every_planted_copy(corpus, ray_session, tmp_path):
    samples, source = _planted_copies(corpus / "heldout" / "00000.tar")
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(2):
        shutil.copy(corpus / "shards" / f"0000{i}.tar", shards)
    _shard(shards / "00007.tar", samples)
    out = tmp_path / "out"
    summary = dedup(sorted(shards.glob("*.tar")), out, reference=[str(corpus / "heldout")])
    rem = pd.read_parquet(out / "removal_list.parquet")
    ref = rem[rem["reason"] == "reference"]
    assert dict(zip(ref["key"], ref["matched_key"])) == source  # every planted copy, matched to its source, no other
    # a reference image is never removed nor scored (its keys may be the corpus's: another data set's names)
    assert set(rem["shard"]) <= {"00000", "00001", "00007"}
    assert sorted(p.name for p in (out / "scores").iterdir()) == ["00000.parquet", "00001.parquet", "00007.parquet"]
    d = pd.read_parquet(out / "duplicates.parquet")
    assert not d.loc[d["role"] == "reference", "keep"].eq(False).any()
    assert set(d.loc[d["role"] == "reference", "key"]) == set(source.values())
    assert summary["reference"][0]["shards"] == 1 and summary["counts"]["removed_by_reason"]["reference"] == 16
    # the reference's part files were made under --out once; a rerun resumes without embedding them again
    assert (out / "reference" / "0" / "parts" / "00000.parquet").exists()


def memscan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scanner", *args], cwd=ROOT, capture_output=True, text=True,
                          check=False, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_bad_against_and_reference_are_refused_at_once(tmp_path, tiny_embedder_dir):
    """Each refused with exit 2 and one sentence naming what differs, before Ray starts (no parts/ written)."""
    shard = tmp_path / "shards" / "00001.tar"
    shard.parent.mkdir()
    _shard(shard, [("k1", _jpeg())])
    not_scan = tmp_path / "not-a-scan"
    not_scan.mkdir()
    unfinished = tmp_path / "unfinished"  # a scan killed in its corpus steps: parts and summary, no outputs step
    (unfinished / "parts").mkdir(parents=True)
    (unfinished / "summary.json").write_text("{}")
    (unfinished / "parts" / "_run.json").write_text(json.dumps({"embedder": None}))
    other = tmp_path / "other-embedder"  # a finished scan made with another embedder
    for rel in ("corpus/outputs", "parts"):
        (other / rel).mkdir(parents=True)
    for rel, obj in (("summary.json", {}), ("corpus/outputs/_done.json", {}), ("corpus/shards.json", []),
                     ("corpus/edges.json", []),
                     ("parts/_run.json", {"embedder": {"digest": "0" * 16, "image_size": 64, "align_size": 32}})):
        (other / rel).write_text(json.dumps(obj))
    cases = [(["--against", str(not_scan)], "is not a finished memscan scan"),
             (["--against", str(unfinished)], "its corpus steps did not complete"),
             (["--against", str(other)], "was made with another embedder (digest"),
             (["--reference", str(tmp_path / "missing" / "*.tar")], "cannot be read")]
    for extra, says in cases:
        out = tmp_path / f"out-{len(extra[1])}-{extra[0]}"
        p = memscan("dedup", "--shards", str(shard), "--out", str(out), "--no-progress", *extra)
        assert p.returncode == 2, (extra, p.stdout[-2000:], p.stderr[-2000:])
        assert says in p.stderr, (extra, p.stderr[-2000:])
        assert "Traceback" not in p.stderr and "started a local Ray" not in p.stderr + p.stdout
        assert not (out / "parts").exists() or not list((out / "parts").glob("*.parquet"))


def _jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.slow
def test_scan_against_keeps_the_old_cut_and_scores_only_new_shards(ray_session, scan_config, tiny_corpus, tmp_path):
    """`memscan scan --against`: the new shards are scored, their LID* counted among old and new rows, at the old
    scan's cut; nothing of the old shards is scored again."""
    shards = [str(p) for p in tiny_corpus.shards]
    on = ("neighbours.enabled=true", "neighbours.generations=0")
    a = run_scan(scan_config(*on, f"data.shards={shards[:1]}".replace("'", "")), tmp_path / "a", progress=False)
    cfg = scan_config(*on, f"data.shards={shards[1:]}".replace("'", ""))
    cfg.incremental.against = [str(tmp_path / "a")]
    b = run_scan(cfg, tmp_path / "b", progress=False)
    assert b["thresholds"]["from_scan"] == str(tmp_path / "a")
    assert b["thresholds"]["threshold"] == a["thresholds"]["threshold"] is not None
    assert sorted(p.stem for p in (tmp_path / "b" / "scores").glob("*.parquet")) == \
        [p.stem for p in tiny_corpus.shards[1:]]
    scores = pd.concat([pd.read_parquet(f) for f in (tmp_path / "b" / "scores").glob("*.parquet")])
    assert scores["lid_lpca"].notna().mean() > 0.9  # LID* of the new rows, from neighbours old and new
    assert b["against"][0]["out"] == str(tmp_path / "a") and b["counts"]["seen"] == len(scores)


@pytest.mark.slow
def test_a_key_the_old_scan_holds_is_an_error_row_of_the_new_copy(chain, corpus, tmp_path):
    """Samples re-downloaded under keys week 1 scanned: each new copy is an error row; week 1's rows stay."""
    unique = set(pd.read_parquet(corpus / "truth.parquet").query("planted == 'unique'")["key"])  # readable ones
    with tarfile.open(corpus / "shards" / "00000.tar") as tf:
        members = [m for m in tf.getmembers() if m.name.endswith(".jpg") and m.name[:-4] in unique][:5]
        again = [(m.name[:-4], tf.extractfile(m).read()) for m in members]
    _shard(tmp_path / "00009.tar", again + [("fresh-key", _jpeg())])
    out = tmp_path / "out"
    s = dedup([tmp_path / "00009.tar"], out, [chain["out"]["a"]], (), "neighbours.index=ivf")
    errors = pd.read_parquet(out / "errors.parquet")
    rep = errors[errors["error"].str.contains("is repeated")]
    assert sorted(rep["key"]) == sorted(k for k, _ in again) and set(rep["shard"]) == {"00009"}
    assert s["counts"]["repeated_key_rows"] == 5
    assert set(pd.read_parquet(out / "removal_list.parquet")["key"]) <= {"fresh-key"}


@pytest.mark.slow
def test_remove_old_lists_the_old_images_a_new_group_drops(chain, corpus, tmp_path):
    """keep_old false and --remove-old: a new, larger copy of an old image is kept by the keep rule (largest first),
    and the old image is listed for removal, matched to it."""
    from PIL import Image

    unique = set(pd.read_parquet(corpus / "truth.parquet").query("planted == 'unique'")["key"])
    with tarfile.open(corpus / "shards" / "00000.tar") as tf:
        members = [m for m in tf.getmembers() if m.name.endswith(".jpg") and m.name[:-4] in unique][:6]
        larger = []
        for m in members:
            img = Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB")
            buf = io.BytesIO()
            img.resize((img.width * 2, img.height * 2), Image.BICUBIC).save(buf, "JPEG", quality=95)
            larger.append((f"big-{m.name[:-4]}", buf.getvalue()))
    _shard(tmp_path / "00008.tar", larger)
    out = tmp_path / "out"
    dedup([tmp_path / "00008.tar"], out, [chain["out"]["a"]], (), "neighbours.index=ivf",
          "incremental.keep_old=false", "incremental.remove_old=true")
    rem = pd.read_parquet(out / "removal_list.parquet")
    old = rem[rem["shard"] == "00000"]
    assert len(old) >= 4 and set(old["reason"]) == {"duplicate"}
    assert all(f"big-{k}" == m for k, m in zip(old["key"], old["matched_key"]))  # each for its larger new copy
    assert not (rem["shard"] == "00008").any()  # the new copies are kept
