"""Where the stages run: starting or attaching to Ray, sizing every actor pool from what the cluster has, and
the device an actor ends up on.

    start_ray(address, num_cpus)      # $RAY_ADDRESS (a cluster) or a local Ray on loopback
    placements = plan(cluster CPUs, cluster GPUs, ...)   # the one place actor counts and CPU / GPU shares are set
    device, warning = actor_device("auto")               # inside an actor: what it really got
"""

from __future__ import annotations

import logging
import math
import os

from scanner.stages.base import READ_CPUS, Placement

log = logging.getLogger("memscan")

# What a local Ray (the one memscan starts, and the tests' session Ray) is started with. Ray kills an idle worker
# beyond its soft limit (one a CPU) after 1 s, and Ray Data's hash-shuffle map tasks run in a worker pool of their
# own (a runtime env of their own), so every corpus-step shuffle started that pool again from cold: about 4 s each,
# whatever the data size, on 2 cores. Kept 10 s, they are reused across a step's shuffles: the corpus steps over
# 20,000 rows on Ray take 0.27 of the time, as fast as keeping them a minute, for the same memory
# (benchmarks/results/ray_workers.md).
LOCAL_RAY_SYSTEM_CONFIG = {"idle_worker_killing_time_threshold_ms": 10_000}


def start_ray(address: str | None = None, num_cpus: int | None = None, dashboard: bool = False) -> None:
    """Attach to `address` (or $RAY_ADDRESS), else start a local Ray on loopback; no-op when Ray is up."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:  # unreachable, refused, a client server that died
            from scanner.errors import ConfigError

            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ConfigError(f"RAY_ADDRESS={address}: could not connect to the Ray cluster ({type(e).__name__}: "
                              f"{first}); check the address, the cluster's auth token (RAY_AUTH_MODE=token, "
                              "~/.ray/auth_token), or unset RAY_ADDRESS for a local Ray") from None
        log.info("connected to the Ray cluster at %s", address)
        if address.startswith("ray://"):
            _refuse_ray_client_without_ray_data(address)
    else:
        _loopback_only()
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=dashboard,
                 logging_level=logging.WARNING, log_to_driver=False, configure_logging=True,
                 _system_config=LOCAL_RAY_SYSTEM_CONFIG)
        log.info("started a local Ray on %s (loopback only, dashboard %s)", ray.nodes()[0]["NodeManagerAddress"],
                 "on" if dashboard else "off")
    ray.data.DataContext.get_current().enable_progress_bars = False  # memscan prints its own progress line
    if not log.isEnabledFor(logging.DEBUG):  # Ray Data's per-dataset INFO lines would break that line; -v keeps them
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def _refuse_ray_client_without_ray_data(address: str) -> None:
    """Under Ray Client (RAY_ADDRESS=ray://HEAD:10001) stop at once, with what to do instead, when this Ray's Ray
    Data cannot execute a pipeline from a client driver, rather than after the model and embedder are loaded.

    Ray Data's streaming executor runs in the driver process. In Ray 2.60 it needs the driver's core worker
    (BlockRefCounter: global_worker.core_worker.add_object_out_of_scope_callback), which a Ray Client driver does
    not have: every pipeline fails with AttributeError: 'Worker' object has no attribute 'core_worker', memscan or
    not (benchmarks/results/cluster.md: four lines of plain Ray Data). Ray's maintainers: Ray Data does not
    support Ray Client; submit a job or run the driver on the head node (ray-project/ray#48682). Probed with a
    one-row dataset, not a version check, so a Ray whose Ray Data does run under Ray Client is let through.
    """
    import ray

    from scanner.errors import ConfigError

    logging.disable(logging.CRITICAL)  # Ray Data logs the probe's plan, and its failure with a full stack trace
    try:
        ray.data.range(1).take_all()
        return
    except Exception as e:  # noqa: BLE001 - whatever this Ray raises, the pipeline would raise it too
        error = f"{type(e).__name__}: {e}"
    finally:
        logging.disable(logging.NOTSET)
    ray.shutdown()
    raise ConfigError(
        f"RAY_ADDRESS={address}: Ray Client (ray://) cannot run Ray Data pipelines with Ray {ray.__version__} "
        f"({error}), and memscan's stages are one. Submit the scan as a job instead: ray job submit --address "
        "http://HEAD:8265 --working-dir . -- python jobs/scan.py --config ... --shards ... --out ... (README, "
        "On a Ray cluster), or run memscan on a node of the cluster with RAY_ADDRESS=HEAD:6379")


def _loopback_only() -> None:
    """Make a local Ray use 127.0.0.1 as its node address, so its servers are not reachable from the network.

    ray.init(_node_ip_address="127.0.0.1") is silently turned into the machine's routable address
    (services.resolve_ip_for_localhost). Ray itself uses loopback where it assumes a single-node
    machine (macOS, Windows), switched by RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0; its value is read
    when ray is imported, so it is also set on the already-imported constant. Checked by
    tests/test_scan.py::test_local_ray_listens_on_loopback_with_dashboard_off.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # also inherited by the workers Ray starts
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


EMBED_GPU = 0.25  # GPU share of the embedding actor where a GPU exists: it is ~10x lighter than scoring


def plan(cluster_cpus: float, cluster_gpus: float, score_actors: int | None, gpus_per_score_actor: float,
         embed: bool, use_gpu: bool, node_cpus: int = 1) -> dict[str, Placement]:
    """Actor counts and resource shares of the score and embed stages (None / False: the stage is off).

    cluster_cpus / cluster_gpus: what the Ray cluster has (ray.cluster_resources()), not what the driver sees:
    under `ray job submit` the driver usually runs on a head without a GPU. use_gpu: the config allows GPUs
    (model.device is not cpu). CPU only: every actor asks min(1, (CPUs - one read task) / actors): with 2 actors
    on 2 CPUs at one CPU each, no read task could ever be scheduled and the scan waited forever. Torch threads
    split `node_cpus` cores among the scoring actors; the embedding actor, idle most of the time, gets one.
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


def actor_device(requested: str) -> tuple[str, str | None]:
    """The device this process should run a model on, and a warning when it is not the one Ray planned.

    requested: model.device (auto | cpu | cuda). Ray gives a GPU actor its GPU through CUDA_VISIBLE_DEVICES, so
    "cuda" here is that actor's GPU. An actor Ray placed on a GPU that torch cannot use (a node that declares a
    GPU it does not have, or a CPU-only torch there): with `auto` it runs on the CPU and says so (the warning
    reaches summary.json's stages); with `cuda` it fails at once, naming the node's GPU ids and the torch build.
    """
    import torch

    if requested == "cpu":
        return "cpu", None
    gpu_ids: list = []
    try:
        import ray

        if ray.is_initialized():
            gpu_ids = list(ray.get_gpu_ids())
    except Exception:  # noqa: BLE001 - outside a Ray worker there is no plan to compare with
        gpu_ids = []
    if torch.cuda.is_available():
        return "cuda", None
    if gpu_ids or requested == "cuda":
        why = (f"Ray placed this actor on GPU {', '.join(str(g) for g in gpu_ids)}" if gpu_ids else
               "model.device is cuda") + (f" but torch {torch.__version__} (CUDA build {torch.version.cuda}) sees no "
                                          "usable CUDA device")
        if requested == "cuda":
            raise RuntimeError(f"{why}: set model.device: auto to run on the CPU instead, or fix the node's driver")
        return "cpu", f"{why}: running on the CPU"
    return "cpu", None
