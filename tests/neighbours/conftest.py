"""Shared fixtures: a tiny open_clip embedder checkpoint (random weights: fine for plumbing tests)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """An open_clip local directory (config + safetensors) of the default architecture at 32 px, random weights."""
    import open_clip

    from scanner.neighbours.embed import DEFAULT_ARCH, register_architectures
    from scanner.neighbours.train_embedder import save_embedder

    torch.manual_seed(0)
    register_architectures()
    model = open_clip.create_model(DEFAULT_ARCH, force_image_size=32)
    return save_embedder(model, DEFAULT_ARCH, 32, tmp_path_factory.mktemp("emb") / "tiny", {"note": "random"})
