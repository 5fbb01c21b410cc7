"""Tiny random diffusers / transformers components saved with save_pretrained, as a real checkout would be.

A few channels and layers each, seeded, so a whole directory builds in well under a second and every
test loads it back through the same `from_pretrained` path a Stable Diffusion checkout takes.
`tests/test_gpu_agreement.py` imports the `save_tiny_*` builders from this file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

# A character-level CLIP BPE vocabulary: every letter alone and word-final ("</w>"), no merges.
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
TINY_VOCAB = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{c: 2 + i for i, c in enumerate(_LETTERS)},
              **{c + "</w>": 28 + i for i, c in enumerate(_LETTERS)}}
TINY_MAX_LENGTH = 12  # tokens per prompt (SD: 77)
TINY_HIDDEN = 16  # text embedding width = UNet cross_attention_dim (SD v1: 768)


def save_tiny_pixel(root: Path, in_channels: int = 3, prediction_type: str = "epsilon",
                    safe_serialization: bool = True) -> Path:
    """root/unet (UNet2DModel, 8x8, one attention block) + root/scheduler (DDPM); returns root."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=in_channels, out_channels=in_channels, layers_per_block=1,
                       block_out_channels=(8, 16), norm_num_groups=8, attention_head_dim=4,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    unet.save_pretrained(root / "unet", safe_serialization=safe_serialization)
    DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type).save_pretrained(root / "scheduler")
    return root


def save_tiny_sd(root: Path) -> Path:
    """A Stable Diffusion layout at 16 px: VAE x2 downsampling to 4x8x8 latents, cross-attention UNet, CLIP."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
                  norm_num_groups=8, sample_size=16, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2).save_pretrained(root / "vae")
    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                         norm_num_groups=8, cross_attention_dim=TINY_HIDDEN, attention_head_dim=2,
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).save_pretrained(root / "unet")
    text_config = CLIPTextConfig(vocab_size=len(TINY_VOCAB), hidden_size=TINY_HIDDEN, intermediate_size=32,
                                 num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=TINY_MAX_LENGTH,
                                 bos_token_id=0, eos_token_id=1, pad_token_id=1)
    CLIPTextModel(text_config).save_pretrained(root / "text_encoder")
    # The files an SD checkout's tokenizer/ holds (written by hand: no hub download).
    (root / "tokenizer").mkdir(parents=True)
    (root / "tokenizer" / "vocab.json").write_text(json.dumps(TINY_VOCAB))
    (root / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    (root / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": TINY_MAX_LENGTH}))
    # SD v1.5's scheduler: PNDM class, scaled-linear betas 0.00085 .. 0.012.
    PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  skip_prk_steps=True, steps_offset=1).save_pretrained(root / "scheduler")
    # what an SD v1.5 checkout's model_index.json says, so StableDiffusionPipeline.from_pretrained loads it too
    from scanner.demo.latent import model_index

    (root / "model_index.json").write_text(json.dumps(model_index("PNDMScheduler")))
    return root


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny convolutions gain nothing from threads, and on a shared 2-core machine two spinning OpenMP
    threads make a JVP 10-50x slower (measured: 65 ms vs 0.7-2 s). Restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def make_tiny_pixel():
    """The `save_tiny_pixel` builder, for tests that need a variant (gray, v-prediction, pickled)."""
    return save_tiny_pixel


@pytest.fixture(scope="session")
def pixel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_pixel(tmp_path_factory.mktemp("pixel"))


@pytest.fixture(scope="session")
def sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_sd(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="session")
def pixel_model(pixel_dir: Path):
    from scanner.models.pixel import PixelScoreModel

    return PixelScoreModel.from_pretrained(pixel_dir)


@pytest.fixture(scope="session")
def sd_model(sd_dir: Path):
    from scanner.models.latent import LatentSDScoreModel

    return LatentSDScoreModel.from_pretrained(sd_dir)
