"""Shared helpers of the core tests: the DIRECT ProtoSeg computation, written with plain torch.

The core never resizes all channels (it uses the adjoint of the resize); the direct computation
does exactly that, with ``F.interpolate``, and takes full squared distances. It shares no code
with ``segability.core``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}

# One torch thread per test process: the suite also starts subprocesses (CLI runs, Ray workers),
# and two OpenMP threads per process on a 2-core machine thrash (10x slower steps were measured).
torch.set_num_threads(1)


def direct_protoseg(
    features: torch.Tensor, guide: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(probabilities (B, K, *S), prototypes (B, K, C), squared distances (B, K, *S))``."""
    size = tuple(guide.shape[2:])
    u = features
    if tuple(u.shape[2:]) != size:
        u = F.interpolate(u, size=size, mode=_MODES[len(size)], align_corners=False)
    w = torch.cat([1.0 - guide, guide], dim=1) if guide.shape[1] == 1 else guide
    if mask is not None:
        w = w * mask
    wf, uf = w.flatten(2), u.flatten(2)  # (B, K, N), (B, C, N)
    protos = wf @ uf.transpose(1, 2) / wf.sum(-1, keepdim=True)
    dist = ((uf.unsqueeze(1) - protos.unsqueeze(-1)) ** 2).sum(2)  # (B, K, N)
    return torch.softmax(-dist, dim=1).reshape(w.shape), protos, dist.reshape(w.shape)


@pytest.fixture
def direct_torch():
    """The direct computation (see :func:`direct_protoseg`)."""
    return direct_protoseg
