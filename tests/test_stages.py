"""The stages: the contract (columns checked before Ray starts and on the first batch, each batch says where it ran),
the one place that sizes actor pools and CPU / GPU shares (stages.cluster.plan), and the device an actor takes."""

from __future__ import annotations

import pytest

from scanner.errors import ConfigError
from scanner.stages.cluster import EMBED_GPU, plan


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


def test_the_pipeline_checks_that_every_column_read_is_written_upstream():
    """check_flow: a stage that reads a column no earlier stage writes fails on the driver, naming both."""
    from scanner.config import ScanConfig
    from scanner.pipeline import build_steps
    from scanner.stages.base import READ, Step, check_flow
    from scanner.stages.embed import EmbedStage
    from scanner.stages.read import ReadSpec, ReadStage
    from scanner.stages.score import ScoreSpec, ScoreStage
    from scanner.stages.sink import SinkSpec, SinkStage

    cfg = ScanConfig()
    cfg.model.path = "/m"
    placements = plan(2, 0, 1, 1.0, embed=True, use_gpu=False, node_cpus=2)
    from scanner.storage import Out

    steps = build_steps(cfg, "/e", Out("/out"), placements)  # read -> embed -> score -> sink: it flows
    assert [s.stage.name for s in steps] == ["read", "embed", "score", "sink"]
    assert "image_embed" not in steps[0].writes or steps[1].stage.drops == ("image_embed",)
    # the read stage configured without the embedder's side writes no image_embed: the embed stage cannot run
    no_embed_side = Step(ReadStage, ReadSpec(model_side=16), READ)
    with pytest.raises(ValueError, match=r"stage 'embed' reads \['image_embed'\], which no stage before it writes"):
        check_flow([no_embed_side, Step(EmbedStage, cfg.neighbours, placements["embed"])])
    # a stage after the one that consumed the pixels cannot read them
    with pytest.raises(ValueError, match=r"stage 'score' reads \['image_model'\]"):
        check_flow([Step(ReadStage, ReadSpec(model_side=16), READ), Step(ScoreStage, ScoreSpec.of(cfg)),
                    Step(ScoreStage, ScoreSpec.of(cfg))])
    check_flow([Step(ReadStage, ReadSpec(model_side=16), READ), Step(ScoreStage, ScoreSpec.of(cfg)),
                Step(SinkStage, SinkSpec("/out"))])


def test_a_stage_refuses_a_batch_without_its_columns_and_records_where_it_ran():
    import json

    import numpy as np

    from scanner.stages.base import INFO_PREFIX, SECONDS_PREFIX, Stage, run_local

    class Double(Stage):
        name, reads, writes = "double", ("x",), ("y",)

        def process(self, batch):
            return {**batch, "y": batch["x"] * 2}

    stage = Double(None)
    out = run_local(stage, {"key": np.array(["a", "b"], dtype=object), "x": np.array([1, 2])})
    assert out["y"].tolist() == [2, 4] and out[SECONDS_PREFIX + "double"][1] == 0
    info = json.loads(out[INFO_PREFIX + "double"][0])
    assert info["device"] == "cpu" and info["warning"] is None and out[INFO_PREFIX + "double"][1] is None
    assert info["node"] is None or isinstance(info["node"], str)  # the Ray node id where one is up
    with pytest.raises(KeyError, match=r"stage 'double' reads \['x'\], which no stage before it wrote"):
        run_local(Double(None), {"key": np.array(["a"], dtype=object)})


def test_an_actor_on_a_declared_gpu_without_cuda_runs_on_the_cpu_and_says_so(monkeypatch):
    """A node that declares a GPU torch cannot use (`ray start --num-gpus 1` on a CPU machine, a CPU-only torch):
    model.device auto runs on the CPU with a warning summary.json keeps; cuda fails at once, naming why."""
    import ray
    import torch

    from scanner.stages.cluster import actor_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [0])
    device, warning = actor_device("auto")
    assert device == "cpu" and "Ray placed this actor on GPU 0 but torch" in warning and "on the CPU" in warning
    with pytest.raises(RuntimeError, match="Ray placed this actor on GPU 0 .*set model.device: auto"):
        actor_device("cuda")
    assert actor_device("cpu") == ("cpu", None)
    monkeypatch.setattr(ray, "get_gpu_ids", list)
    assert actor_device("auto") == ("cpu", None)  # no GPU planned, none used: nothing to say
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert actor_device("auto") == ("cuda", None)
