"""The stage contract, and the check that the stages' columns flow (where they run: scanner.stages.cluster).

    class ScoreStage(Stage):
        name, runs = "score", "actor"            # runs: "task" (a Ray task, no state), "actor" (a Ray actor:
                                                 #   setup() once, then batches), "driver" (the sink)
        reads = ("image_model", "caption", "key")  # columns it needs; check_flow: an earlier stage writes each
        writes = ("vector",)                     # columns it adds (declared_writes(cfg) adds config-made ones)
        drops = ("image_model",)                 # columns it removes (the pixels, once consumed)
        def setup(self): ...                     # once per actor (or task): load the model
        def process(self, batch): ...            # numpy batch -> the same rows with `writes` added

    steps = [Step(ReadStage, read_spec, READ), Step(EmbedStage, cfg.neighbours, placements["embed"]), ...]
    check_flow(steps)                            # before Ray starts: every column read is written upstream
    ds = apply(ds, step, batch_size)             # Ray Data map_batches as the step's placement says

A stage gets its own typed config section only (a dataclass, parsed and validated once on the driver), never
the whole tree. Its rows never disappear: a row it cannot process gets `error` / `error_stage` and flows on, so
the sink accounts for every sample. Each batch a stage emits carries, on its first row, `stage_seconds_<name>`
(the batch's time) and `stage_info_<name>` (JSON: the device and Ray node that ran it, and a warning when the
device is not the one planned), which the sink sums into summary.json's `stages`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from scanner.schema import INFO_PREFIX

READ_CPUS = 0.5  # CPU each read + decode task reserves
SECONDS_PREFIX = "stage_seconds_"
STARTS = ("path", "split")  # the columns the pipeline starts from: one row per shard to read


class Stage:
    """One step of the scan pipeline: `setup` once, then `process` per batch (through __call__ under Ray)."""

    name: str = "stage"
    runs: str = "actor"  # task | actor | driver
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    drops: tuple[str, ...] = ()

    def __init__(self, cfg: Any, threads: int | None = None):
        """cfg: this stage's typed config section (a dataclass). threads: torch threads on a CPU actor (None:
        leave torch's)."""
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.cfg = cfg
        self.device = "cpu"  # what setup() placed the stage's model on
        self.warning: str | None = None  # setup()'s word when that is not what the plan asked for
        self._checked = False
        self.setup()

    @classmethod
    def declared_writes(cls, cfg: Any) -> tuple[str, ...]:
        """The columns this stage adds under `cfg` (the class's `writes`, plus any the config decides)."""
        return cls.writes

    def setup(self) -> None:
        """Load models; runs once per actor."""

    def process(self, batch: dict) -> dict | Iterator[dict]:
        raise NotImplementedError

    def info(self) -> str:
        node = None
        try:
            import ray

            if ray.is_initialized():
                node = ray.get_runtime_context().get_node_id()
        except Exception:  # noqa: BLE001 - where it ran is a record, never a reason to fail a batch
            node = None
        return json.dumps({"device": self.device, "node": node, "warning": self.warning})

    def _check_reads(self, batch: dict) -> None:
        if self._checked:
            return
        missing = [c for c in self.reads if c not in batch]
        if missing:
            raise KeyError(f"stage {self.name!r} reads {missing}, which no stage before it wrote (batch columns: "
                           f"{sorted(batch)})")
        self._checked = True

    def __call__(self, batch: dict):
        """numpy batch in; typed pyarrow Tables out (schema.typed_block), each with this stage's seconds and
        info on its first row. A generator: a stage's process may return one batch or yield several."""
        from scanner.schema import typed_block

        self._check_reads(batch)
        t0 = time.perf_counter()
        out = self.process(batch)
        outs = [out] if isinstance(out, dict) else out
        info = self.info()
        for b in outs:
            seconds = np.zeros(len(b["key"]), np.float64)
            infos = np.full(len(b["key"]), None, dtype=object)
            if len(seconds):
                seconds[0], infos[0] = time.perf_counter() - t0, info
            b[SECONDS_PREFIX + self.name] = seconds
            b[INFO_PREFIX + self.name] = infos
            yield typed_block(b)
            t0 = time.perf_counter()


@dataclass(frozen=True)
class Placement:
    """How one stage runs: `actors` actors (0 for a task stage) of `cpus` CPUs and `gpus` GPUs each, `threads`
    torch threads."""

    actors: int
    cpus: float
    gpus: float
    threads: int | None


@dataclass(frozen=True)
class Step:
    """A stage, the config section it gets, and how it is placed."""

    stage: type[Stage]
    cfg: Any
    placement: Placement | None = None

    @property
    def writes(self) -> tuple[str, ...]:
        return self.stage.declared_writes(self.cfg)


def check_flow(steps: list[Step]) -> None:
    """Every column a stage reads is written by a stage before it (the pipeline starts from STARTS). Raises
    ValueError naming the stage and the column: a wiring mistake fails on the driver, before Ray starts."""
    have = set(STARTS)
    for step in steps:
        missing = [c for c in step.stage.reads if c not in have]
        if missing:
            raise ValueError(f"stage {step.stage.name!r} reads {missing}, which no stage before it writes "
                             f"(available: {sorted(have)})")
        have |= set(step.writes)
        have -= set(step.stage.drops)


READ = Placement(0, READ_CPUS, 0.0, None)  # a read task: no actor, half a CPU


def run_local(stage: Stage, batch: dict) -> dict:
    """One batch through a stage in this process, as the next stage would receive it (a numpy batch): for tests
    and benchmarks that time or check a stage without Ray."""
    import pyarrow as pa
    from ray.data.block import BlockAccessor

    tables = list(stage(batch))
    return BlockAccessor.for_block(pa.concat_tables(tables)).to_batch_format("numpy")


def _run_task(batch: dict, stage: type[Stage], cfg: Any):
    """A task stage under Ray Data: the stage built in the task (its setup is cheap), then its batches."""
    yield from stage(cfg)(batch)


def apply(ds, step: Step, batch_size: int):
    """`ds.map_batches` with the step's stage as its placement says: a task per input row for a task stage (a
    shard to read), an actor pool for an actor stage."""
    import ray

    p = step.placement
    if step.stage.runs == "task":
        return ds.map_batches(_run_task, batch_size=1, num_cpus=p.cpus, fn_kwargs={"stage": step.stage, "cfg": step.cfg})
    if step.stage.runs != "actor":
        raise ValueError(f"stage {step.stage.name!r} runs on the {step.stage.runs}: it is not a Ray Data step")
    return ds.map_batches(step.stage, fn_constructor_kwargs={"cfg": step.cfg, "threads": p.threads},
                          batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=p.actors),
                          num_cpus=p.cpus, num_gpus=p.gpus)
