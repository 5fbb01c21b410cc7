"""Safe checkpoint handling for the embedder: safetensors preferred, pickle only when trusted.

A pickle checkpoint (`torch.save` output: .pt, .pth, .bin, legacy or zip format) can run arbitrary
code when loaded, so memscan refuses it unless the config says `neighbours.allow_pickle: true`.
The format is read from the file's first bytes, not its name: a renamed pickle is still refused.

A checkpoint is either one weights file (loaded with `open_clip.create_model(name, pretrained=FILE)`,
the way a real CLIP or SSCD checkpoint is) or an open_clip *local directory* holding
`open_clip_config.json` + `open_clip_model.safetensors` (loaded with `create_model("local-dir:DIR")`);
`memscan train-embedder` writes the latter.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

from scanner.errors import InputError, MissingPathError, UnsafeCheckpointError

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
# The suffixes open_clip itself looks for in a local directory (factory._find_checkpoint_in_dir).
_DIR_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pth")


def sniff_format(path: str | Path) -> str:
    """'safetensors', 'pickle' (torch.save: zip or legacy pickle), 'numpy' or 'unknown', from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:2] == b"PK":
        # A zip: torch.save's archive holds a data.pkl; a numpy .npz holds only .npy arrays.
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile:
            return "unknown"
        if names and all(n.endswith(".npy") for n in names):
            return "numpy"
        return "pickle"
    if head[:1] == b"\x80":
        return "pickle"  # a raw pickle, protocol >= 2 (legacy torch.save)
    if head[:6] == b"\x93NUMPY":
        return "numpy"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        # safetensors: little-endian u64 header length, then a JSON object
        if 2 <= n <= 100_000_000 and head[8:9] == b"{":
            return "safetensors"
    return "unknown"


def _refuse_pickle(path: Path) -> None:
    raise UnsafeCheckpointError(
        f"checkpoint {str(path)!r} is a pickle file (torch.save format), which can execute code when loaded; "
        "memscan refuses it by default. Convert it to safetensors (safetensors.torch.save_file(state_dict, "
        "'model.safetensors')), or, if you trust the file, set neighbours.allow_pickle: true"
    )


def cache_dir() -> Path:
    """Where checkpoints in object storage are copied to on first use: $MEMSCAN_CACHE, else ~/.cache/memscan."""
    import os

    return Path(os.environ.get("MEMSCAN_CACHE") or Path.home() / ".cache" / "memscan")


def localize(path: str | Path) -> str:
    """A checkpoint's local path: itself, or for a URL (s3://..., gs://...) a copy under cache_dir() made on first
    use (a scan's embedder trained into an --out in object storage lives there; every actor copies it once)."""
    from scanner.storage import is_url, local_copy

    if not is_url(path):
        return str(path)
    try:
        return local_copy(str(path), cache_dir() / "checkpoints")
    except FileNotFoundError:
        raise MissingPathError(f"neighbours.clip_checkpoint {str(path)!r} does not exist") from None


def check_checkpoint(path: str | Path, allow_pickle: bool = False) -> dict:
    """Validate a checkpoint path before anything is loaded from it.

    Returns {'kind': 'file' | 'dir', 'path': str, 'format': str, 'config': dict | None}; for a
    directory, 'config' is its open_clip_config.json. Raises FileNotFoundError for a missing path and
    ValueError naming the file for a refused or unreadable format.
    """
    p = Path(localize(path)).expanduser()
    if not p.exists():
        raise MissingPathError(f"neighbours.clip_checkpoint {str(p)!r} does not exist")
    if p.is_dir():
        cfg_path = p / CONFIG_NAME
        if not cfg_path.is_file():
            raise InputError(f"checkpoint directory {str(p)!r} has no {CONFIG_NAME}; expected an open_clip local "
                             f"directory ({CONFIG_NAME} + {WEIGHTS_NAME}) or a single weights file")
        config = json.loads(cfg_path.read_text())
        if "model_cfg" not in config:
            raise InputError(f"{cfg_path} lacks 'model_cfg' (the open_clip architecture config)")
        files = sorted(f for g in _DIR_WEIGHT_GLOBS for f in p.glob(g))
        if not files:
            raise InputError(f"checkpoint directory {str(p)!r} holds no weights (*.safetensors, *.bin, *.pth)")
        formats = {f: sniff_format(f) for f in files}
        # open_clip picks a .safetensors file first when one exists; otherwise a pickle would be loaded.
        chosen = next((f for f in files if f.suffix == ".safetensors"), files[0])
        if formats[chosen] == "pickle" and not allow_pickle:
            _refuse_pickle(chosen)
        if chosen.suffix == ".safetensors" and formats[chosen] != "safetensors":
            raise InputError(f"{str(chosen)!r} is named .safetensors but is {formats[chosen]}")
        return {"kind": "dir", "path": str(p), "format": formats[chosen], "config": config}
    sibling = p.parent / CONFIG_NAME
    if sibling.is_file() and "memscan" in json.loads(sibling.read_text()):
        # the weights file of an embedder memscan trained: its directory also records the input transforms
        # (per-image normalisation, low-pass) the weights were trained with, which the file alone would drop
        return check_checkpoint(p.parent, allow_pickle)
    fmt = sniff_format(p)
    if fmt == "pickle" and not allow_pickle:
        _refuse_pickle(p)
    if fmt == "safetensors" and p.suffix != ".safetensors":
        # open_clip dispatches on the suffix and would hand a safetensors file to torch.load.
        raise InputError(f"checkpoint {str(p)!r} is a safetensors file; name it *.safetensors so open_clip reads it")
    if p.suffix == ".safetensors" and fmt != "safetensors":
        raise InputError(f"checkpoint {str(p)!r} is named .safetensors but its content is {fmt}")
    if fmt == "unknown":
        raise InputError(f"checkpoint {str(p)!r} is neither safetensors nor a torch checkpoint")
    return {"kind": "file", "path": str(p), "format": fmt, "config": None}


def checkpoint_digest(path: str | Path) -> str:
    """sha256 of a checkpoint's file names and bytes (a file, or a directory's config and weight files), 16 hex
    digits. Other files of a directory (the shipped embedder's calibration.json, measured with these very weights)
    are not the checkpoint: a table written beside the weights must not change their digest."""
    import hashlib

    h = hashlib.sha256()
    root = Path(localize(path))
    for f in sorted(root.iterdir()) if root.is_dir() else [root]:
        if root.is_dir() and not (f.name == CONFIG_NAME or f.suffix in (".safetensors", ".bin", ".pth")):
            continue
        if f.is_file():
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)
    return h.hexdigest()[:16]
