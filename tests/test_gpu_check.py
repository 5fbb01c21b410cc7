"""benchmarks/gpu_check.sh --tiny: the GPU check's CPU-possible part (a one-shard laion-sd15 scan through
load_score_model, the inverted file, the throughput measurement) at tiny size, so the script a GPU day runs is
known to work before that day."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_tiny_runs_every_part(tmp_path, session_ray_env):
    # its scan on the session's Ray (RAY_ADDRESS): a GPU day's run starts a local one, which the README's tests cover
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--tiny", str(tmp_path)], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900, check=False,
                          env=session_ray_env())
    assert proc.returncode == 0, proc.stdout[-4000:]
    res = json.loads((tmp_path / "gpu.json").read_text())
    scan = res["scan"]["float16"]
    assert scan["exit"] == 0 and 0 < scan["scored"] <= scan["seen"]
    assert scan["devices"]["score"] == {"cpu": scan["devices"]["score"]["cpu"]}  # no GPU here: said, not hidden
    assert res["ivf"]["recall_at_k"] >= 0.8 and res["ivf"]["nlist"] >= 2
    t = res["throughput"]
    assert t["img_per_s"] > 0 and t["scoring_in_forwards"] >= 1 and "cfg_norm" in t["columns"]
    assert "| scoring," in (tmp_path / "gpu.md").read_text()
