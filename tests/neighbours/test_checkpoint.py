"""Checkpoint safety: pickles are refused unless allowed; safetensors and open_clip local dirs load."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from scanner.config import NeighboursConfig
from scanner.errors import UnsafeCheckpointError
from scanner.neighbours.checkpoint import WEIGHTS_NAME, sniff_format
from scanner.neighbours.embed import DEFAULT_ARCH, load_embedder


def _cfg(path, **kw):
    return NeighboursConfig(clip_model=kw.pop("clip_model", DEFAULT_ARCH), clip_checkpoint=str(path), **kw)


def test_local_dir_loads_and_embeds_unit_vectors(tiny_checkpoint):
    emb = load_embedder(_cfg(tiny_checkpoint))
    x = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    v = emb.embed(x)
    assert v.shape == (5, emb.dim) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    # other input sizes are resized to the tower's own side; same image, same vector
    big = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)
    assert emb.embed(big).shape == (5, emb.dim)
    np.testing.assert_allclose(emb.embed(x[:2]), v[:2], atol=1e-5)


def test_unknown_architecture_name_is_refused(tiny_checkpoint, tmp_path):
    lone = tmp_path / "lone.safetensors"  # a weights file with no open_clip directory around it
    shutil.copy(tiny_checkpoint / WEIGHTS_NAME, lone)
    with pytest.raises(ValueError, match="not an open_clip architecture"):
        load_embedder(_cfg(lone, clip_model="ViT-Nope-99"))


def test_the_weights_file_of_a_memscan_embedder_keeps_its_input_transforms(tiny_checkpoint):
    """Pointing at open_clip_model.safetensors inside a directory memscan wrote loads that directory: its
    recorded input normalisation and low-pass apply (the file alone dropped them, and a trained demo
    embedder fell from pair precision 0.996 to 0.33)."""
    import json

    assert "memscan" in json.loads((tiny_checkpoint / "open_clip_config.json").read_text())
    by_file = load_embedder(_cfg(tiny_checkpoint / WEIGHTS_NAME, clip_model="ViT-Nope-99"))
    by_dir = load_embedder(_cfg(tiny_checkpoint))
    assert by_file.fingerprint == by_dir.fingerprint
    x = np.random.default_rng(3).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(by_file.embed(x), by_dir.embed(x))


def test_pickle_checkpoint_refused_by_default(tiny_checkpoint, tmp_path):
    state = load_file(str(tiny_checkpoint / WEIGHTS_NAME))
    pt = tmp_path / "model.pt"
    torch.save(state, pt)
    assert sniff_format(pt) == "pickle"
    with pytest.raises(UnsafeCheckpointError, match=r"model\.pt.*neighbours\.allow_pickle"):
        load_embedder(_cfg(pt))
    # a renamed pickle is recognised by its bytes, not its name
    disguised = tmp_path / "model.safetensors"
    shutil.copy(pt, disguised)
    with pytest.raises(UnsafeCheckpointError, match="allow_pickle"):
        load_embedder(_cfg(disguised))


def test_pickle_in_local_dir_refused_unless_allowed(tiny_checkpoint, tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(tiny_checkpoint / "open_clip_config.json", d)
    torch.save(load_file(str(tiny_checkpoint / WEIGHTS_NAME)), d / "open_clip_pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="allow_pickle"):
        load_embedder(_cfg(d))
    emb = load_embedder(_cfg(d, allow_pickle=True))  # trusted: loads, same weights, same vectors
    ref = load_embedder(_cfg(tiny_checkpoint))
    x = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(emb.embed(x), ref.embed(x), atol=1e-5)


def test_missing_or_unset_checkpoint_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="train-embedder"):
        load_embedder(NeighboursConfig(clip_checkpoint=None))
    with pytest.raises(FileNotFoundError, match="nope"):
        load_embedder(_cfg(tmp_path / "nope.safetensors"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="junk.safetensors"):
        load_embedder(_cfg(junk))


def test_safetensors_file_roundtrip_with_matching_arch(tiny_checkpoint, tmp_path):
    """A lone safetensors file loads through create_model(name, pretrained=file) when the arch matches."""
    import open_clip

    from scanner.neighbours.embed import ARCHITECTURES, register_architectures

    name = "memscan-test-arch-32"
    cfg = {**ARCHITECTURES[DEFAULT_ARCH], "vision_cfg": {**ARCHITECTURES[DEFAULT_ARCH]["vision_cfg"], "image_size": 32}}
    ARCHITECTURES[name] = cfg
    try:
        register_architectures()
        assert name in open_clip.list_models()
        f = tmp_path / "w.safetensors"
        save_file(load_file(str(tiny_checkpoint / WEIGHTS_NAME)), str(f))
        emb = load_embedder(_cfg(f, clip_model=name))
        ref = load_embedder(_cfg(tiny_checkpoint))
        x = np.random.default_rng(2).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
        # the lone file carries no input_norm record: dataset mean/std is used, so compare shapes only
        assert emb.embed(x).shape == ref.embed(x).shape
    finally:
        ARCHITECTURES.pop(name)


def test_registration_leaves_no_folder_and_survives_a_rescan(tmp_path, monkeypatch):
    """register_architectures writes open_clip's json files to a temporary folder that is removed at once; the
    architectures stay known even when open_clip rescans its config paths later (another add_model_config)."""
    import tempfile

    import open_clip

    from scanner.neighbours.embed import ARCHITECTURES, register_architectures

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    name = "memscan-test-arch-rescan"
    ARCHITECTURES[name] = ARCHITECTURES[DEFAULT_ARCH]
    try:
        register_architectures()
        assert name in open_clip.list_models()
        assert list(tmp_path.iterdir()) == []
        other = tmp_path / "other"
        other.mkdir()
        open_clip.add_model_config(other)  # rescans every path, ours included (gone)
        assert name in open_clip.list_models()
    finally:
        ARCHITECTURES.pop(name)
