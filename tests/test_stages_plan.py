"""stages.base.plan: the one place that sizes actor pools and CPU / GPU shares (no Ray needed)."""

from __future__ import annotations

import pytest

from scanner.errors import ConfigError
from scanner.stages.base import EMBED_GPU, plan


def test_gpu_scoring_actors_leave_room_for_the_embedding_actor():
    one = plan(16, 1, 1, 1.0, embed=True, use_gpu=True)
    assert one["score"].gpus == 1 - EMBED_GPU and one["embed"].gpus == EMBED_GPU  # both fit on one GPU
    assert one["score"].cpus == 0 and one["score"].threads is None
    four = plan(64, 4, 4, 1.0, embed=True, use_gpu=True)
    assert four["score"].actors == 4 and four["score"].gpus * 4 + four["embed"].gpus <= 4
    roomy = plan(64, 8, 2, 1.0, embed=True, use_gpu=True)
    assert roomy["score"].gpus == 1.0  # enough GPUs: the configured share is kept
    assert plan(16, 1, 1, 1.0, embed=False, use_gpu=True)["score"].gpus == 1.0
    assert "score" not in plan(16, 1, None, 1.0, embed=True, use_gpu=True)  # dedup: no scoring stage


def test_cpu_actors_never_starve_the_read_task():
    p = plan(2, 0, 1, 1.0, embed=True, use_gpu=False, node_cpus=2)
    assert p["score"].cpus == p["embed"].cpus == 0.75  # 2 CPUs - one read task (0.5), shared by 2 actors
    assert p["score"].threads == 2 and p["embed"].threads == 1
    assert plan(16, 0, 2, 1.0, embed=True, use_gpu=False, node_cpus=16)["score"].cpus == 1.0
    assert plan(16, 0, 2, 1.0, embed=True, use_gpu=False, node_cpus=16)["score"].threads == 8
    five = plan(3, 0, 5, 1.0, embed=True, use_gpu=False)  # 2.5 / 6 = 0.41666...: rounded up, reading would starve
    assert five["score"].cpus * 5 + five["embed"].cpus + 0.5 <= 3
    with pytest.raises(ConfigError, match="ray.actors=2 .* do not fit beside a read task on 0.5 CPUs"):
        plan(0.5, 0, 2, 1.0, embed=False, use_gpu=False)
    with pytest.raises(ConfigError, match="lower ray.actors"):
        plan(16, 0.25, 1, 1.0, embed=True, use_gpu=True)
