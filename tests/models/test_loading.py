"""load_score_model: adapter choice, device / dtype resolution, safetensors-only loading, clear errors."""

from __future__ import annotations

import shutil

import pytest
import torch

from scanner.config import ModelConfig
from scanner.errors import UnsafeCheckpointError
from scanner.models.latent import LatentSDScoreModel
from scanner.models.loading import load_score_model, model_resolution
from scanner.models.pixel import PixelScoreModel


def test_loads_each_kind_with_its_resolution(pixel_dir, sd_dir):
    pixel = load_score_model(ModelConfig(kind="pixel", path=str(pixel_dir), device="auto"))
    assert isinstance(pixel, PixelScoreModel) and model_resolution(pixel) == 8
    assert pixel.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    latent = load_score_model(ModelConfig(kind="latent", path=str(sd_dir), device="cpu", dtype="float16"))
    assert isinstance(latent, LatentSDScoreModel) and model_resolution(latent) == 16
    assert latent.dtype == torch.float32  # half precision is a GPU setting; the CPU runs float32


def test_missing_directory_names_path_and_layout(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=r"no-such-model.*does not exist.*model_index.json, vae/, unet/"):
        load_score_model(ModelConfig(kind="latent", path=str(missing)))
    with pytest.raises(FileNotFoundError, match=r"no-such-model.*unet/config.json"):
        PixelScoreModel.from_pretrained(missing)


def test_kind_mismatch_says_what_was_found(pixel_dir, sd_dir, tmp_path):
    with pytest.raises(ValueError, match=r"model.kind is 'pixel' but .* looks like a latent model .*vae/.*"
                                         r"UNet2DConditionModel.*set model.kind: latent"):
        load_score_model(ModelConfig(kind="pixel", path=str(sd_dir)))
    with pytest.raises(ValueError, match=r"looks like a pixel model .*UNet2DModel.*set model.kind: pixel"):
        load_score_model(ModelConfig(kind="latent", path=str(pixel_dir)))
    (tmp_path / "weights.txt").write_text("not a model")
    with pytest.raises(ValueError, match=r"not a diffusers model directory.*found: weights.txt"):
        load_score_model(ModelConfig(kind="pixel", path=str(tmp_path)))
    with pytest.raises(ValueError, match="'none' scans neighbours only"):
        load_score_model(ModelConfig(kind="none"))


def test_pickle_checkpoints_are_refused_unless_allowed(tmp_path, make_tiny_pixel, pixel_model):
    root = make_tiny_pixel(tmp_path, safe_serialization=False)
    assert (root / "unet" / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(UnsafeCheckpointError, match=r"unet.*only pickle weights \(diffusion_pytorch_model.bin\).*"
                                              r"allow_pickle=True"):
        load_score_model(ModelConfig(kind="pixel", path=str(root), device="cpu"))
    trusted = load_score_model(ModelConfig(kind="pixel", path=str(root), device="cpu"), allow_pickle=True)
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([0.5])
    torch.testing.assert_close(trusted.eps(x, t), pixel_model.eps(x, t))  # same seed, same weights


def test_pickled_text_encoder_is_refused_before_anything_loads(tmp_path, sd_dir):
    root = shutil.copytree(sd_dir, tmp_path / "sd")
    (root / "text_encoder" / "model.safetensors").unlink()
    (root / "text_encoder" / "pytorch_model.bin").write_bytes(b"a pickle memscan must not open")
    with pytest.raises(UnsafeCheckpointError, match=r"text_encoder.*only pickle weights \(pytorch_model.bin\)"):
        LatentSDScoreModel.from_pretrained(root)
    (root / "text_encoder" / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"text_encoder.*holds no weights"):
        LatentSDScoreModel.from_pretrained(root)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when no GPU exists")
def test_cuda_without_gpu_is_a_clear_error(pixel_dir):
    with pytest.raises(ValueError, match=r"device 'cuda' was requested but torch.cuda.is_available\(\) is False"):
        load_score_model(ModelConfig(kind="pixel", path=str(pixel_dir), device="cuda"))


def test_model_resolution_needs_an_image_model():
    from scanner.models.base import ScoreModel

    with pytest.raises(TypeError, match="ScoreModel has no image resolution"):
        model_resolution(ScoreModel())
