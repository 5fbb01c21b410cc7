"""A user's mistake ends in one sentence and exit 2, before Ray or any model starts; never in a traceback.

Each case runs `memscan` as a user types it (a subprocess). "Before Ray starts" is checked by the log:
memscan logs "started a local Ray" when it starts one, and the output directory gets no parts/.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from scanner.errors import (
    ConfigError,
    InputError,
    MemscanError,
    MissingPathError,
    ScanIncomplete,
    ShardSpecError,
    UnsafeCheckpointError,
)

ROOT = Path(__file__).resolve().parent.parent


def memscan(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scanner", *args], cwd=cwd, capture_output=True, text=True,
                          check=False, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def scan_args(shards, model, out, *sets: str, config: str = "configs/demo.yaml") -> list[str]:
    return ["scan", "--config", str(ROOT / config), "--shards", str(shards), "--set", f"model.path={model}",
            "--set", "data.resolution=8", "--set", "neighbours.enabled=false", *[a for s in sets for a in ("--set", s)],
            "--no-progress", "--out", str(out)]


def assert_user_error(proc: subprocess.CompletedProcess, command: str, *needles: str) -> None:
    err = proc.stderr
    assert proc.returncode == 2, (proc.returncode, err[-3000:])
    assert "Traceback" not in err and "started a local Ray" not in err, err[-3000:]
    line = next(ln for ln in err.splitlines() if ln.startswith(f"memscan {command}: error: "))
    for n in needles:
        assert n in line, (n, line)


def test_one_hierarchy_with_exit_codes_by_class():
    for cls in (ConfigError, InputError, ShardSpecError, MissingPathError, UnsafeCheckpointError):
        assert issubclass(cls, MemscanError) and cls.exit_code == 2, cls
    assert issubclass(ScanIncomplete, MemscanError) and ScanIncomplete.exit_code == 3
    # the builtins callers caught before the hierarchy existed still catch them
    assert issubclass(ConfigError, ValueError) and issubclass(ShardSpecError, ValueError)
    assert issubclass(MissingPathError, FileNotFoundError) and issubclass(UnsafeCheckpointError, PermissionError)


def test_missing_model_fails_before_ray(tiny_corpus, tmp_path):
    out = tmp_path / "o"
    proc = memscan(*scan_args(tiny_corpus.shards[0], tmp_path / "no-model", out))
    assert_user_error(proc, "scan", "model.path", "no-model", "does not exist")
    assert not (out / "parts").exists()


def test_wrong_model_kind_and_resolution_fail_before_ray(tiny_corpus, tiny_model_dir, tiny_sd_dir, tmp_path):
    proc = memscan(*scan_args(tiny_corpus.shards[0], tiny_sd_dir, tmp_path / "a"))
    assert_user_error(proc, "scan", "model.kind is 'pixel'", "looks like a latent model", "set model.kind: latent")
    proc = memscan(*scan_args(tiny_corpus.shards[0], tiny_model_dir, tmp_path / "b", "data.resolution=16"))
    assert_user_error(proc, "scan", "data.resolution is 16", "takes 8x8 images", "set data.resolution: 8")


def test_pickle_checkpoint_fails_before_ray(tiny_corpus, tiny_models, tmp_path):
    model = tiny_models.save_tiny_pixel(tmp_path / "pickled", safe_serialization=False)
    proc = memscan(*scan_args(tiny_corpus.shards[0], model, tmp_path / "o"))
    assert_user_error(proc, "scan", "only pickle weights", "allow_pickle")


def test_missing_or_pickled_clip_checkpoint_fails_before_ray(tiny_corpus, tiny_model_dir, tmp_path):
    proc = memscan(*scan_args(tiny_corpus.shards[0], tiny_model_dir, tmp_path / "a", "neighbours.enabled=true",
                              f"neighbours.clip_checkpoint={tmp_path / 'nope.safetensors'}"))
    assert_user_error(proc, "scan", "neighbours.clip_checkpoint", "nope.safetensors", "does not exist")
    import torch

    torch.save({"w": torch.zeros(2)}, tmp_path / "clip.pt")
    proc = memscan("dedup", "--shards", str(tiny_corpus.shards[0]), "--out", str(tmp_path / "b"),
                   "--clip-checkpoint", str(tmp_path / "clip.pt"))
    assert_user_error(proc, "dedup", "clip.pt", "pickle", "allow_pickle")


def test_shards_that_match_nothing_and_bad_keys_fail_at_once(tiny_model_dir, tmp_path):
    proc = memscan(*scan_args(f"{tmp_path}/none/{{00000..00003}}.tar", tiny_model_dir, tmp_path / "a"))
    assert_user_error(proc, "scan", "does not exist")
    proc = memscan(*scan_args(tmp_path, tiny_model_dir, tmp_path / "b", "geometry.probes=0"))
    assert_user_error(proc, "scan", "geometry.probes must be an int >= 1, got 0")
    proc = memscan(*scan_args(tmp_path, tiny_model_dir, tmp_path / "c", "geometry.prbes=4"))
    assert_user_error(proc, "scan", "unknown config key 'geometry.prbes'", "did you mean 'probes'")


def test_heldout_shards_that_match_nothing_fail_before_ray(tiny_corpus, tiny_model_dir, tmp_path):
    """The held-out images are scored only after the corpus: a wrong path must fail at once, not hours later."""
    out = tmp_path / "o"
    proc = memscan(*scan_args(tiny_corpus.shards[0], tiny_model_dir, out,
                              f"classify.calibration_shards={tmp_path / 'heldout'}"))
    assert_user_error(proc, "scan", "classify.calibration_shards", "heldout", "does not exist")
    assert not (out / "parts").exists()


def test_relative_paths_are_made_absolute_on_the_driver(tiny_model_dir, tiny_embedder_dir, tmp_path, monkeypatch):
    """A cluster job resolves paths where its driver runs; the actors get absolute ones, never a relative path
    to resolve against their own working directory."""
    from scanner.config import load_config
    from scanner.preflight import check_scan

    shutil.copytree(tiny_model_dir, tmp_path / "runs" / "model")
    shutil.copytree(tiny_embedder_dir, tmp_path / "emb")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "held").mkdir()
    (tmp_path / "held" / "00000.tar").write_bytes(b"")
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["model.path=runs/model", "data.resolution=8",
                                                       "neighbours.clip_checkpoint=emb",
                                                       "classify.calibration_shards=held"])
    checked = check_scan(cfg)
    assert checked.model.path == str(tmp_path / "runs" / "model")
    assert checked.neighbours.clip_checkpoint == str(tmp_path / "emb")
    assert checked.classify.calibration_shards == [str(tmp_path / "held" / "00000.tar")]
    assert cfg.model.path == "runs/model"  # the caller's config is not changed


@pytest.mark.parametrize("command", ["dedup", "train-embedder"])
def test_neighbour_commands_need_no_model_section(command, tmp_path):
    """`dedup` and `train-embedder` validate only the sections they use: the default config has no model.path."""
    proc = memscan(command, "--shards", str(tmp_path / "none"), "--out", str(tmp_path / "o"))
    assert_user_error(proc, command, "shard path", "does not exist")  # the shard spec, not model.path
