"""`memscan scan` and `memscan dedup` over the fault corpus (tests/fault_corpus.py), as a user runs them.

Exit 0; one error row with its reason per bad member, one shard row (null key) per damaged shard, every
occurrence of a repeated key an error naming its shards; every good sample kept with no error (scored by
scan, embedded by both); nothing written outside --out.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from fault_corpus import ABS_DIR, REPEATED_KEY_REASON, build_fault_corpus

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_fault_corpus(tmp_path_factory.mktemp("faults"))


def run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`memscan ARGS` as a user on a node of a cluster runs it: on the session's Ray (conftest.session_ray_env)."""
    return subprocess.run([sys.executable, "-m", "scanner", *args], cwd=cwd, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, check=False, timeout=600, env=env)


def tree(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*")}


def check_errors(corpus, out: Path) -> pd.DataFrame:
    errors = pd.read_parquet(out / "errors.parquet")
    problems = []
    for key, (shard, reason) in corpus.bad.items():
        rows = errors[errors["key"] == key]
        if len(rows) != 1 or reason not in rows["error"].iloc[0] or rows["shard"].iloc[0] != shard:
            problems.append(f"bad {key!r} ({corpus.what[key]}): want one row in {shard} saying {reason!r}, got "
                            f"{rows[['shard', 'error']].to_dict('records')}")
    shard_rows = errors[errors["key"].isna()]
    for shard, reason in corpus.shard_errors.items():
        rows = shard_rows[shard_rows["shard"] == shard]
        if len(rows) != 1 or reason not in rows["error"].iloc[0]:
            problems.append(f"shard {shard} ({corpus.what[shard]}): want one row saying {reason!r}, got "
                            f"{rows['error'].tolist()}")
    if set(shard_rows["shard"]) - set(corpus.shard_errors):
        problems.append(f"unexpected shard errors: {sorted(set(shard_rows['shard']) - set(corpus.shard_errors))}")
    for key, shards in corpus.repeated.items():
        rows = errors[errors["key"] == key]
        if sorted(rows["shard"]) != sorted(shards) or not all(
                REPEATED_KEY_REASON in e and all(s in e for s in shards) for e in rows["error"]):
            problems.append(f"repeated {key!r}: want a row per occurrence in {shards}, got {rows.to_dict('records')}")
    good_errors = errors[errors["key"].isin(list(corpus.good))]
    if len(good_errors):
        problems.append(f"good samples with errors: {good_errors.to_dict('records')}")
    expected = len(corpus.bad) + len(corpus.shard_errors) + sum(len(s) for s in corpus.repeated.values())
    if len(errors) != expected:
        problems.append(f"{len(errors)} error rows, expected {expected}")
    assert not problems, "\n".join(problems)
    return errors


@pytest.mark.slow
@pytest.mark.parametrize("command", ["scan", "dedup"])
def test_every_bad_input_is_an_error_row_and_every_good_row_is_kept(command, corpus, tiny_model_dir,
                                                                     tiny_embedder_dir, tmp_path, session_ray_env):
    work = tmp_path / "cwd" / "deeper"
    work.mkdir(parents=True)
    out = work / "out"
    if command == "scan":
        args = ["scan", "--config", str(ROOT / "configs" / "demo.yaml"), "--shards", str(corpus.dir),
                "--set", f"model.path={tiny_model_dir}", "--set", "data.resolution=8",
                "--set", f"neighbours.clip_checkpoint={tiny_embedder_dir}", "--set", "neighbours.image_size=32",
                "--set", "neighbours.generations=0", "--set", "geometry.probes=1", "--set", "geometry.lpca_k=5"]
    else:
        args = ["dedup", "--shards", str(corpus.dir), "--clip-checkpoint", str(tiny_embedder_dir)]
    watched = [tmp_path, corpus.root]
    before = {r: tree(r) for r in watched}
    proc = run([*args, "--no-progress", "--out", str(out)], cwd=work, env=session_ray_env())
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "Traceback" not in proc.stdout, proc.stdout[-4000:]
    errors = check_errors(corpus, out)
    scores = pd.read_parquet(out / "scores")
    good = scores[scores["key"].isin(list(corpus.good))]
    assert sorted(good["key"]) == sorted(corpus.good) and good["error"].isna().all()
    if command == "scan":
        assert good["score_norm"].notna().all() and good["lid_lpca"].notna().all()
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["embedded"] == len(corpus.good) and summary["counts"]["errors"] == len(errors)
    # nothing outside --out: member names like ../x and /abs/x are strings, never paths
    for r in watched:
        new = {f for f in tree(r) - before[r] if not f.startswith(str(out))}
        assert not new, f"written outside --out: {sorted(new)[:10]}"
    assert not os.path.exists(ABS_DIR)
