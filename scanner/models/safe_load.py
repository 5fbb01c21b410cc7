"""Checks run before handing a local directory to `from_pretrained`, and device / dtype placement.

Loading a pickle (`.bin`, `.pt`, `.ckpt`) can execute code hidden in the file, and a model checkout
is exactly the kind of file people download from strangers. So memscan loads `.safetensors` only,
unless the caller passes `allow_pickle=True`. The checks below run before diffusers / transformers
see the directory, so a refused checkpoint is never opened, and a broken layout fails with a message
naming the path and what was expected instead of a deep library traceback.
"""

from __future__ import annotations

from pathlib import Path

import torch

from scanner.errors import MissingPathError, UnsafeCheckpointError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def require_files(root: Path, relpaths: list[str], layout: str) -> None:
    """Raise FileNotFoundError naming `root`, every missing entry of `relpaths` and the expected `layout`."""
    if not root.is_dir():
        raise MissingPathError(f"model directory {str(root)!r} does not exist; expected {layout}")
    missing = [r for r in relpaths if not (root / r).exists()]
    if missing:
        found = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
        raise MissingPathError(f"model directory {str(root)!r} lacks {', '.join(missing)} (found: "
                                f"{', '.join(found[:20]) or 'nothing'}); expected {layout}")


def use_safetensors(component_dir: Path, allow_pickle: bool) -> bool:
    """The `use_safetensors` flag to pass to `from_pretrained(component_dir)`.

    True when the directory holds `.safetensors` weights; False (load the pickle) only when it holds
    pickles alone and `allow_pickle` is set. Raises FileNotFoundError when it holds neither and
    PermissionError when it holds only pickles and `allow_pickle` is False.
    """
    files = [p for p in component_dir.iterdir() if p.is_file()] if component_dir.is_dir() else []
    if any(p.name.endswith(".safetensors") for p in files):
        return True
    pickles = sorted(p.name for p in files if p.name.endswith(PICKLE_SUFFIXES))
    if not pickles:
        raise MissingPathError(f"{str(component_dir)!r} holds no weights (no *.safetensors, no pickle); found: "
                                f"{', '.join(sorted(p.name for p in files)) or 'nothing'}")
    if not allow_pickle:
        raise UnsafeCheckpointError(
            f"{str(component_dir)!r} holds only pickle weights ({', '.join(pickles)}), which can run arbitrary "
            "code when loaded; memscan loads *.safetensors only. Convert the checkpoint (load it once where you "
            "trust it and save_pretrained(..., safe_serialization=True)), or pass allow_pickle=True if you trust "
            "this file.")
    return False


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' -> cuda when torch sees a GPU, else cpu; 'cpu' / 'cuda' / 'cuda:1' / torch.device pass through."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but torch.cuda.is_available() is False "
                         "(no GPU or a CPU-only torch); use 'auto' or 'cpu'")
    return dev


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'float32' | 'float16' | 'bfloat16' (or the torch dtype itself) -> torch.dtype."""
    accepted = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64}
    if isinstance(dtype, torch.dtype) and dtype in accepted.values():
        return dtype
    if isinstance(dtype, str) and dtype in accepted:
        return accepted[dtype]
    raise ValueError(f"dtype must be one of {', '.join(accepted)} (or the torch dtype), got {dtype!r}")


def frozen(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move `module` to device (and dtype, only if it differs), eval mode, no parameter gradients.

    Frozen because the geometry differentiates in x only: parameter gradients would just cost memory.
    The dtype cast is skipped when already right because diffusers' `to(dtype)` warns on every cast.
    In float16 / bfloat16, GroupNorm and LayerNorm stay float32 (see `_norms_in_float32`).
    """
    module = module.to(device)
    if any(p.dtype != dtype for p in module.parameters() if p.is_floating_point()):
        module = module.to(dtype=dtype)
    if dtype in (torch.float16, torch.bfloat16):
        _norms_in_float32(module, dtype)
    return module.eval().requires_grad_(False)


def _norms_in_float32(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Run every GroupNorm / LayerNorm of `module` in float32, casting its output back to `dtype`.

    The forward-mode derivative of a normalization scales with 1 / std^3: in float16 a group with
    std < ~0.03 overflows to inf and the JVP turns NaN (measured on a tiny SD UNet on VAE latents),
    while the plain forward is fine. torch.autocast would keep norms in float32 too, but autocast and
    forward-mode AD fail together (conv -> GroupNorm -> conv: dtype mismatch in torch 2.14), so the
    norms are upcast here with hooks instead; they are a small part of the compute.
    """
    def upcast(norm, args):
        return tuple(a.float() if torch.is_tensor(a) else a for a in args)

    def downcast(norm, args, out):
        return out.to(dtype)

    for norm in module.modules():
        if isinstance(norm, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and not getattr(norm, "_memscan_float32", False):
            norm.float()
            norm.register_forward_pre_hook(upcast)
            norm.register_forward_hook(downcast)
            norm._memscan_float32 = True
