"""Linear resizing as an explicit linear map, and its adjoint.

Linear, bilinear and trilinear interpolation with ``align_corners=False`` are separable: resizing
a grid of size ``s`` to size ``S`` applies one ``(S_d, s_d)`` matrix along every spatial axis ``d``.
Writing the resize as ``up(F) = U F`` lets the core take weighted sums of *resized* features at the
features' own resolution, ``sum_x (U F)(x) G(x) = sum_y F(y) (U^T G)(y)``, without ever building
``U F`` for all channels (see ``docs/performance.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F

__all__ = ["interpolation_mode", "resize", "resize_adjoint", "resize_adjoint_ones", "interpolation_matrix"]

_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def interpolation_mode(spatial_dims: int) -> str:
    """The linear interpolation mode of ``torch.nn.functional.interpolate`` for 1, 2 or 3 dims."""
    try:
        return _MODES[spatial_dims]
    except KeyError:
        raise ValueError(f"expected 1, 2 or 3 spatial dimensions, got {spatial_dims}") from None


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize ``x`` (B, C, *s) to ``size`` by linear interpolation, ``align_corners=False``.

    Returns ``x`` itself when it already has that size.
    """
    size = tuple(int(s) for s in size)
    if tuple(x.shape[2:]) == size:
        return x
    return F.interpolate(x, size=size, mode=interpolation_mode(len(size)), align_corners=False)


@lru_cache(maxsize=256)
def _matrix_cpu64(n_in: int, n_out: int) -> torch.Tensor:
    eye = torch.eye(n_in, dtype=torch.float64).unsqueeze(1)  # (n_in, 1, n_in) as a batch of signals
    cols = F.interpolate(eye, size=n_out, mode="linear", align_corners=False)  # (n_in, 1, n_out)
    return cols[:, 0, :].T.contiguous()  # (n_out, n_in)


def interpolation_matrix(
    n_in: int, n_out: int, *, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The ``(n_out, n_in)`` matrix of 1D linear resizing from ``n_in`` to ``n_out`` samples.

    It is built by resizing the identity with torch itself, so it carries exactly torch's weights.

    Example:
        >>> interpolation_matrix(2, 4)
        tensor([[1.0000, 0.0000],
                [0.7500, 0.2500],
                [0.2500, 0.7500],
                [0.0000, 1.0000]], dtype=torch.float64)
    """
    # copy=True: the cached matrix must not be handed out, or an in-place edit would corrupt it.
    return _matrix_cpu64(int(n_in), int(n_out)).to(dtype=dtype, device=device, copy=True)


def resize_adjoint(g: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Apply the adjoint of :func:`resize` to ``g`` (B, K, *S): the result has spatial ``size``.

    For any ``f`` of spatial size ``size``, ``<resize(f, S), g> == <f, resize_adjoint(g, size)>``.
    """
    size = tuple(int(s) for s in size)
    spatial = tuple(g.shape[2:])
    if spatial == size:
        return g
    out = g
    # Last axis first: it is contiguous (no movedim copy of the full-size tensor), and every later
    # product then runs on a tensor already S_d / s_d times smaller.
    last = len(size) - 1
    for axis in reversed(range(len(size))):
        n_out, n_in = spatial[axis], size[axis]
        if n_out == n_in:
            continue
        m = interpolation_matrix(n_in, n_out, dtype=g.dtype, device=g.device)  # (S_d, s_d)
        if axis == last:
            out = out @ m
        else:
            dim = 2 + axis
            out = torch.movedim(torch.movedim(out, dim, -1) @ m, -1, dim)
    return out


def resize_adjoint_ones(
    full_size: Sequence[int], size: Sequence[int], *, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``resize_adjoint`` of an all-ones grid of ``full_size``, shape ``size``, without building it.

    The adjoint is separable, so it is the outer product of the column sums of the per-axis
    interpolation matrices.

    Example:
        >>> resize_adjoint_ones((4,), (2,))
        tensor([2., 2.], dtype=torch.float64)
    """
    out = torch.ones((), dtype=dtype, device=device)
    for n_out, n_in in zip(full_size, size, strict=True):
        col = interpolation_matrix(int(n_in), int(n_out), dtype=dtype, device=device).sum(0)  # (s_d,)
        out = out.unsqueeze(-1) * col
    return out
