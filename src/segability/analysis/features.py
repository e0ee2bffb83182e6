"""Layer outputs read as features (B, C, *spatial), the layers chosen by default, and the mask."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from segability.analysis.inputs import Batch
from segability.analysis.results import INPUT
from segability.capture import default_layers, resolve_layers
from segability.core.resize import resize
from segability.errors import UsageError

__all__ = ["layer_features", "tokens_to_grid", "layer_names", "batch_mask", "shape_text", "hookable", "model_device"]


def hookable(model: Any) -> nn.Module:
    """``model`` itself when forward hooks can be put on it; else a usage error that says why."""
    if not isinstance(model, nn.Module):
        raise UsageError(f"model must be a torch.nn.Module, got {type(model).__name__}", argument="model")
    if isinstance(model, torch.jit.ScriptModule):
        raise UsageError("model: TorchScript modules cannot take forward hooks; give the Python nn.Module", argument="model")
    return model


def model_device(model: nn.Module, device: str | torch.device | None = None) -> tuple[torch.device, torch.dtype]:
    """Where the model runs (``device``, else its parameters' device) and the input dtype it takes."""
    params = next(iter(model.parameters()), None)
    dev = torch.device(device) if device is not None else (params.device if params is not None else torch.device("cpu"))
    dtype = params.dtype if params is not None and params.is_floating_point() else torch.float32
    return dev, dtype


def layer_names(model: nn.Module, layers: Any = "auto") -> list[str]:
    """The names of the layers to analyse: ``"auto"`` or a selection.

    The one rule for ``layers="auto"``, used by the analysis, windows, batch runs and integrations:
    :func:`segability.capture.default_layers` (each encoder/decoder stage, transformer block and
    Swin stage, and the convolutions outside them; every convolution for a plain convolutional net).
    """
    if isinstance(layers, str) and layers == "auto":
        names = default_layers(model)
        if not names:
            raise UsageError(
                "layers='auto' found no convolution, stage or transformer block in the model: choose layers by name or type",
                argument="layers",
            )
    else:
        names = [n for n, _ in resolve_layers(model, layers)]
    if INPUT in names:
        raise UsageError(f"a model layer is named {INPUT!r}, which is reserved for the input image", argument="layers")
    return names


def shape_text(shape: Sequence[int]) -> str:
    """``"16x64x64"`` for a shape (the ``shape`` column)."""
    return "x".join(str(int(s)) for s in shape)


def tokens_to_grid(tokens: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor | None:
    """Reshape transformer tokens (B, N, C) to a grid (B, C, *g) when N fits the input grid.

    The grid is ``spatial // p`` for a patch size p (isotropic), with or without one leading class
    token. Returns None when no patch size fits.

    Example:
        >>> import torch
        >>> tokens_to_grid(torch.zeros(2, 16, 5), (32, 32)).shape  # 8x8 patches of a 32x32 image
        torch.Size([2, 5, 4, 4])
    """
    b, n, c = tokens.shape
    for p in range(1, max(spatial) + 1):
        if any(s % p for s in spatial):
            continue
        grid = [s // p for s in spatial]
        cells = math.prod(grid)
        if cells == n:
            return tokens.transpose(1, 2).reshape(b, c, *grid)
        if cells == n - 1:
            return tokens[:, 1:].transpose(1, 2).reshape(b, c, *grid)
    return None


def _on_input_grid(grid: Sequence[int], spatial: Sequence[int]) -> bool:
    """Whether ``grid`` is the input grid reduced by one integer factor p (floor or ceil)."""
    for p in range(1, max(spatial) + 1):
        if all(g in (s // p, -(-s // p)) for g, s in zip(grid, spatial, strict=True)):
            return True
    return False


def _channels_first(feats: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
    """(B, C, *g) features; a channels-last output (B, *g, C) is moved when only that reading fits.

    Swin-type blocks return (B, *g, C). An output is read as channels-last only when its middle
    dimensions are the input grid reduced by one factor and its last ones are not; anything else
    (anisotropic strides included) stays channels-first.
    """
    if _on_input_grid(feats.shape[1:-1], spatial) and not _on_input_grid(feats.shape[2:], spatial):
        return feats.movedim(-1, 1)
    return feats


def layer_features(
    output: torch.Tensor,
    batch: int,
    spatial: Sequence[int],
    reshape: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor | None, str]:
    """A layer output read as (B, C, *spatial) features, or None and why it cannot be.

    The rules of :func:`analyze`: a ``reshape`` callable first (None falls through); then outputs
    with the input's number of dims (channels-last moved to channels-first when only that reading
    fits the grid); then transformer tokens (B, N, C) on the grid ``spatial // p``.
    """
    spatial = tuple(spatial)
    if reshape is not None:
        reshaped = reshape(output)
        if reshaped is not None:
            if not isinstance(reshaped, torch.Tensor) or reshaped.ndim != len(spatial) + 2 or reshaped.shape[0] != batch:
                got = tuple(reshaped.shape) if isinstance(reshaped, torch.Tensor) else type(reshaped).__name__
                raise UsageError(
                    f"reshape must return features (B={batch}, C, *spatial) with {len(spatial)} spatial dims "
                    f"(or None), got {got} for an output {tuple(output.shape)}"
                )
            return reshaped, ""
    shape = tuple(output.shape)
    if not output.is_floating_point():
        return None, f"skipped: output {shape} is not floating point ({output.dtype})"
    if output.ndim < 3 or shape[0] != batch:
        return None, f"skipped: output {shape} is not a batch of {batch} feature maps"
    if output.ndim == len(spatial) + 2:
        return _channels_first(output, spatial), ""
    if output.ndim == 3 and len(spatial) >= 2:
        grid = tokens_to_grid(output, spatial)
        if grid is not None:
            return grid, ""
        return None, f"skipped: token output {shape} does not fit the input grid {spatial} at any patch size; give reshape="
    return None, f"skipped: output {shape} is not (B, C, *spatial) with {len(spatial)} spatial dims"


def batch_mask(
    mask: Any, batch: Batch, device: torch.device, size: tuple[int, ...]
) -> torch.Tensor | None:
    """The batch's mask (B, 1, *size) in [0, 1], on ``device``, at the guide's grid ``size``."""
    if mask is None:
        return None
    if isinstance(mask, (torch.Tensor, np.ndarray)):
        m = batch.masks
    elif isinstance(mask, str) and mask == "nonzero":
        m = (batch.images != 0).any(dim=1, keepdim=True)
    elif callable(mask):
        m = mask(batch.images)
        expected = (batch.images.shape[0], 1, *batch.images.shape[2:])
        if not isinstance(m, torch.Tensor) or tuple(m.shape) != expected:
            got = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise UsageError(f"the mask callable must return a tensor of shape {expected}, got {got}")
    else:
        raise UsageError(f"mask must be None, 'nonzero', a tensor (N, 1, *spatial) or a callable, got {mask!r}")
    m = m.to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(m).all()) or float(m.min()) < 0 or float(m.max()) > 1:
        raise UsageError("mask values must be finite and lie in [0, 1]")
    return resize(m, size)
