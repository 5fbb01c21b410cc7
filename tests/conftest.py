"""Shared fixtures: one Ray for the session, a tiny random pixel diffusion model, a tiny demo corpus, a local S3
server."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# benchmarks/inmemory.py (in-memory references of the corpus steps) is tested here and used by tests as a reference
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

TINY_CORPUS = {"n_unique": 60, "n_repeated": 2, "repeat_copies": 20, "n_oversampled": 3, "n_exact_dup_groups": 3,
               "n_near_dup_groups": 3, "n_corrupt": 3, "n_no_caption": 4, "size": 16, "samples_per_shard": 25, "seed": 0,
               "n_heldout": 120}


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One Ray for the session, started after the local S3 server so that its workers inherit the AWS_* environment
    (a Ray worker's environment is its raylet's, not the driver's): a `memscan` subprocess on this Ray
    (session_ray_env) can read shards from the bucket, as on a cluster whose nodes hold the credentials."""
    import logging

    import ray

    from scanner.stages.cluster import LOCAL_RAY_SYSTEM_CONFIG

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level=logging.WARNING,
                 log_to_driver=False, _system_config=LOCAL_RAY_SYSTEM_CONFIG)
        ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def session_ray_env(ray_session):
    """env() for a `memscan` subprocess whose subject is not how memscan starts Ray: the environment (read when
    called) with RAY_ADDRESS at this session's Ray, as a driver on a node of a cluster runs. Starting and stopping
    a Ray of its own costs each subprocess about 10 s on 2 cores (a 105-image `memscan dedup`: 21-24 s alone,
    11-13 s on the running Ray). The README's first commands, its bucket dedup (whose own Ray's workers must get the
    driver's AWS_* environment) and the local-Ray tests start their own."""
    address = ray_session.get_runtime_context().gcs_address

    def env() -> dict[str, str]:
        return {**os.environ, "RAY_ADDRESS": address, "PYTHONUNBUFFERED": "1"}
    return env


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random 8x8 RGB UNet2DModel + DDPMScheduler saved with save_pretrained (loads like a real model)."""
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny_model")
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=8)
    unet.save_pretrained(d / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(d / "scheduler")
    return d


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    from scanner.demo.corpus import build_demo_corpus

    return build_demo_corpus(tmp_path_factory.mktemp("tiny_corpus"), **TINY_CORPUS)


@pytest.fixture
def scan_config(tiny_model_dir, tiny_corpus):
    """A fast scan config over the tiny corpus with the tiny model (no neighbours: tested on their own)."""
    from scanner.config import load_config

    def make(*overrides):
        return load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "demo.yaml"), [
            f"data.shards={tiny_corpus.shards[0].parent}", f"model.path={tiny_model_dir}", "data.resolution=8",
            "neighbours.enabled=false", "geometry.probes=2", "geometry.lpca_k=5", "ray.num_cpus=2",
            *overrides])
    return make


def tiny_builders():
    """tests/models/conftest.py's save_tiny_pixel / save_tiny_sd, for tests outside tests/models
    (pytest offers a conftest's names only to the tests below it)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("tiny_components", Path(__file__).parent / "models" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def tiny_models():
    """tiny_builders() as a fixture: test modules cannot `from conftest import` (several conftest.py files)."""
    return tiny_builders()


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A random Stable Diffusion layout at 16 px (vae/, unet/, text_encoder/, tokenizer/, scheduler/)."""
    return tiny_builders().save_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def tiny_embedder_dir(tmp_path_factory):
    """An open_clip local directory of memscan's copy-detection tower at 32 px, random weights."""
    import open_clip
    import torch

    from scanner.neighbours.embed import DEFAULT_ARCH, register_architectures
    from scanner.neighbours.train_embedder import save_embedder

    torch.manual_seed(0)
    register_architectures()
    model = open_clip.create_model(DEFAULT_ARCH, force_image_size=32)
    return save_embedder(model, DEFAULT_ARCH, 32, tmp_path_factory.mktemp("emb") / "tiny", {"note": "random"})


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip cleanly where torch sees no CUDA device (CI, these machines)."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no usable torch CUDA however it fails
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A local S3 (moto's server mode, benchmarks/local_s3.py) for the session: `endpoint`, `client()`,
    `upload(folder, bucket, prefix)`. Found by s3fs / boto3 / the aws CLI through their standard environment
    (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID=testing, ...), which is set for this process and every subprocess it starts
    (Ray workers started after it, `memscan` runs). Stopped at the end of the session."""
    from local_s3 import UNSET, LocalS3

    server = LocalS3(log=tmp_path_factory.mktemp("moto") / "server.log")
    try:
        server.start()
    except RuntimeError as e:
        pytest.fail(str(e))
    with pytest.MonkeyPatch.context() as mp:
        for k, v in server.env.items():
            mp.setenv(k, v)
        for k in UNSET:  # a developer's own would win
            mp.delenv(k, raising=False)
        try:
            yield server
        finally:
            server.stop()
