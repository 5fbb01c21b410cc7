"""Shared fixtures: a tiny open_clip embedder checkpoint (random weights: fine for plumbing tests)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_embedder_dir):
    """tests/conftest.py's tiny_embedder_dir under the name these tests use."""
    return tiny_embedder_dir
