"""The stage contract, and the one place that decides actor counts and CPU/GPU shares.

    class Score(Stage):
        name, reads, writes = "score", ("image_model", "caption"), ("lid_flipd", ...)
        def setup(self): ...                     # once per actor: load the model
        def process(self, batch): ...            # numpy batch -> the same rows with `writes` added

    ds = apply(ds, Score, cfg_dict, plan["score"])

A stage's rows never disappear: a row it cannot process gets `error` / `error_stage` and flows on,
so the sink can still account for every sample. Each call adds `stage_seconds_<name>` (the batch's
time on its first row, 0 elsewhere) so the driver can report seconds per stage without reaching
into the actors (summary.json's `stages`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from scanner.schema import typed_block

READ_CPUS = 0.5  # CPU each read + decode task reserves
SECONDS_PREFIX = "stage_seconds_"


class Stage:
    """A Ray Data actor stage: `setup` once per actor, then `process` per batch (via __call__)."""

    name: str = "stage"
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()

    def __init__(self, cfg: dict, threads: int | None = None):
        """cfg: plain data (a config as a dict): Ray keeps no object-store reference it could lose when it
        restarts this actor (ray#53727). threads: torch threads on a CPU actor (None: leave torch's)."""
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.cfg = cfg
        self.setup()

    def setup(self) -> None:
        """Load models; runs once per actor."""

    def process(self, batch: dict) -> dict:
        raise NotImplementedError

    def __call__(self, batch: dict):
        """numpy batch in, typed pyarrow Table out (schema.typed_block), with this stage's seconds."""
        t0 = time.perf_counter()
        out = self.process(batch)
        seconds = np.zeros(len(out["key"]), np.float64)
        if len(seconds):
            seconds[0] = time.perf_counter() - t0
        out[SECONDS_PREFIX + self.name] = seconds
        return typed_block(out)


@dataclass(frozen=True)
class Placement:
    """How one actor stage runs: `actors` actors of `cpus` CPUs and `gpus` GPUs each, `threads` torch threads."""

    actors: int
    cpus: float
    gpus: float
    threads: int | None


EMBED_GPU = 0.25  # GPU share of the embedding actor where a GPU exists: it is ~10x lighter than scoring


def plan(cluster_cpus: float, cluster_gpus: float, score_actors: int | None, gpus_per_score_actor: float,
         embed: bool, use_gpu: bool, node_cpus: int = 1) -> dict[str, Placement]:
    """Actor counts and resource shares of the score and embed stages (None / False: the stage is off).

    CPU only: every actor asks min(1, (CPUs - one read task) / actors): with 2 actors on 2 CPUs at one
    CPU each, no read task could ever be scheduled and the scan waited forever. Torch threads split
    `node_cpus` cores among the scoring actors; the embedding actor, idle most of the time, gets one.
    With GPUs: each scoring actor asks gpus_per_score_actor, the embedding actor EMBED_GPU, and the scoring
    actors' share shrinks when both would not fit on the GPUs there are.
    """
    from scanner.errors import ConfigError

    n_actors = (score_actors or 0) + (1 if embed else 0)
    out: dict[str, Placement] = {}
    if n_actors == 0:
        return out
    if use_gpu and cluster_gpus > 0:
        embed_gpu = EMBED_GPU if embed else 0.0
        per = gpus_per_score_actor
        if score_actors and per * score_actors + embed_gpu > cluster_gpus:
            per = (cluster_gpus - embed_gpu) / score_actors
            if per <= 0:
                raise ConfigError(f"ray.actors={score_actors} scoring actors and the embedding actor do not fit on "
                                  f"{cluster_gpus:g} GPUs: lower ray.actors")
        if score_actors:  # rounded down: 4 x 0.938 + 0.25 would ask for more than 4 GPUs and one actor never starts
            out["score"] = Placement(score_actors, 0.0, math.floor(per * 1000) / 1000, None)
        if embed:
            out["embed"] = Placement(1, 0.0, embed_gpu, None)
        return out
    # rounded down, like the GPU share: rounded up, 6 actors on 3 CPUs would ask for 6 x 0.417 and leave a
    # read task 0.498 of the 0.5 CPU it needs
    share = min(1.0, math.floor((cluster_cpus - READ_CPUS) / n_actors * 1000) / 1000)
    if share <= 0:
        raise ConfigError(f"ray.actors={score_actors} scoring actors do not fit beside a read task on "
                          f"{cluster_cpus:g} CPUs: lower ray.actors")
    if score_actors:
        out["score"] = Placement(score_actors, share, 0.0, max(1, node_cpus // score_actors))
    if embed:
        out["embed"] = Placement(1, share, 0.0, 1)
    return out


def apply(ds, stage: type[Stage], cfg: dict, placement: Placement, batch_size: int):
    """`ds.map_batches` with `stage` on an actor pool as `placement` says."""
    import ray

    return ds.map_batches(stage, fn_constructor_kwargs={"cfg": cfg, "threads": placement.threads},
                          batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=placement.actors),
                          num_cpus=placement.cpus, num_gpus=placement.gpus)
