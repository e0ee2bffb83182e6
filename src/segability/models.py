"""The reference model shipped with segability: a small MONAI UNet trained on ``mni_lesions``.

The checkpoint (a state dict) and its JSON card live in ``segability/data/``; the card records the
training command, seed, epochs, validation Dice, training time, package version and the file's
sha256, which :func:`load_reference_model` checks before loading with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "REFERENCE_ARCH",
    "reference_unet",
    "load_reference_model",
    "reference_card",
    "reference_paths",
    "file_sha256",
]

# Small enough to train on 2 CPU cores in minutes; dropout so MC-dropout baselines apply.
REFERENCE_ARCH: dict[str, Any] = {
    "spatial_dims": 2,
    "in_channels": 1,
    "out_channels": 1,
    "channels": (16, 32, 64, 128),
    "strides": (2, 2, 2),
    "num_res_units": 1,
    "dropout": 0.1,
    "norm": "batch",
}


def reference_unet(**overrides: Any) -> nn.Module:
    """A fresh (untrained) MONAI ``UNet`` with the reference architecture.

    Example:
        >>> net = reference_unet()
        >>> sum(p.numel() for p in net.parameters()) < 1_000_000
        True
    """
    from monai.networks.nets import UNet

    return UNet(**{**REFERENCE_ARCH, **overrides})


def reference_paths() -> tuple[Path, Path]:
    """Paths of the shipped checkpoint and its card inside the installed package."""
    base = Path(str(resources.files("segability") / "data"))
    return base / "reference_unet.pt", base / "reference_unet.json"


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def reference_card() -> dict[str, Any]:
    """The JSON card of the shipped reference model."""
    _, card = reference_paths()
    if not card.exists():
        raise FileNotFoundError(
            f"the reference model card {card} is missing: run `segability train --task mni-lesions` to make it"
        )
    return json.loads(card.read_text())


def load_reference_model(
    weights: str | Path | None = None, *, device: str | torch.device = "cpu", check_hash: bool = True
) -> nn.Module:
    """The trained reference UNet in eval mode.

    Args:
        weights: a state-dict file; default the shipped checkpoint.
        device: where to put the model.
        check_hash: compare the shipped file's sha256 with its card.

    Raises:
        FileNotFoundError: the checkpoint is missing.
        ValueError: the checkpoint does not match its card.
    """
    path = Path(weights) if weights is not None else reference_paths()[0]
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: run `segability train --task mni-lesions`")
    arch = dict(REFERENCE_ARCH)
    if weights is None:
        card = reference_card()
        arch.update({k: tuple(v) if isinstance(v, list) else v for k, v in card.get("architecture", {}).items()})
        if check_hash and card.get("sha256") != file_sha256(path):
            raise ValueError(f"{path} does not match the sha256 in its card: the shipped checkpoint was altered")
    model = reference_unet(**arch)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval()
