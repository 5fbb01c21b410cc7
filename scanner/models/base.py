"""The score-model protocol every estimator in `scanner.geometry` consumes.

A diffusion model under the variance-preserving forward process (docs/method.md §1):

    x_t = psi(t) x + sigma(t) eps,   psi = sqrt(alpha_bar_t),  sigma = sqrt(1 - alpha_bar_t)
    s(x_t, t) = grad log p_t(x_t) = -eps_theta(x_t, t) / sigma(t)

Shapes: `x` is (B, *sample_shape) float32 in *model space* (pixels scaled to [-1, 1] for a pixel
model, VAE latents x scaling_factor for a latent model, R^D for analytic models); `t` is (B,) in
(0, 1). Discrete-time models map t to the timestep round(t * num_train_timesteps) and report the
psi / sigma of that timestep, so psi_sigma() and eps() always agree.

Conditioning is opaque to the geometry: whatever `encode_text` returns is passed back as `cond`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch


class ScoreModel:
    """Base class of all score models (analytic, pixel UNet, latent Stable Diffusion).

    Subclasses set `sample_shape` and `conditional` and implement `psi_sigma` and `eps`.
    `eps` must be differentiable in `x` with torch autograd *and* `torch.func.jvp`.
    """

    sample_shape: tuple[int, ...] = ()
    conditional: bool = False
    device: torch.device = torch.device("cpu")

    @property
    def dim(self) -> int:
        """Ambient dimension D (pixels or latent entries)."""
        return int(math.prod(self.sample_shape))

    def psi_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t: (B,) in (0, 1) -> (psi, sigma), each (B,) float32 on t's device."""
        raise NotImplementedError

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """Noise prediction eps_theta(x, t[, cond]); same shape as x."""
        raise NotImplementedError

    def score(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """s(x, t) = -eps(x, t) / sigma(t); same shape as x."""
        _, sigma = self.psi_sigma(t)
        return -self.eps(x, t, cond) / sigma.view(-1, *([1] * (x.dim() - 1)))

    # --- real-data adapters (pixel / latent models) -------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, H, W, C) uint8 at the model resolution -> x: (B, *sample_shape) float32."""
        raise NotImplementedError(f"{type(self).__name__} does not encode images")

    def encode_text(self, captions: Sequence[str | None]) -> Any:
        """Conditioning for captions; None or '' means the empty prompt. Conditional models only."""
        raise NotImplementedError(f"{type(self).__name__} is not text-conditional")

    def uncond(self, batch_size: int) -> Any:
        """Conditioning of the empty prompt for a batch (the unconditional score of CFG)."""
        return self.encode_text([""] * batch_size)

    def jvp_context(self) -> AbstractContextManager:
        """Wrap every `torch.func.jvp` through `eps` in this: `with model.jvp_context(): torch.func.jvp(...)`.

        Selects the math scaled-dot-product-attention backend: the flash and memory-efficient kernels
        (on CPU and GPU) have no forward-mode derivative, so a JVP through attention fails without it.
        Math attention is slower, so keep plain forwards outside. Harmless for models without attention.
        """
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
