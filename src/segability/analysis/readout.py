"""How a network output is read: the target's probability map (the guide) and the prediction."""

from __future__ import annotations

from typing import Any

import torch

from segability.analysis.config import OutputKind
from segability.capture import first_tensor
from segability.errors import UsageError

__all__ = ["output_tensor", "class_probabilities", "model_probabilities", "label_target", "label_targets"]


def output_tensor(out: Any, output_key: str | None = None) -> torch.Tensor:
    """The tensor of a model output: itself, the first of a tuple/list (deep supervision), or the
    ``output_key`` entry of a dict."""
    if isinstance(out, dict):
        if output_key is None or output_key not in out:
            raise UsageError(f"the model returns a dict: give output_key, one of {sorted(map(str, out))}")
        out = out[output_key]
    elif isinstance(out, (tuple, list)):
        out = first_tensor(out)
    if not isinstance(out, torch.Tensor):
        raise UsageError(f"the model output must be a tensor (or tuple/list/dict of tensors), got {type(out).__name__}")
    return out


def _read(out: Any, output: OutputKind, output_key: str | None) -> tuple[torch.Tensor, str]:
    """The output tensor (float) and how to read it ("sigmoid", "softmax" or "probabilities")."""
    out = output_tensor(out, output_key)
    if out.ndim < 3:
        raise UsageError(f"the model output must have shape (B, K, *spatial), got {tuple(out.shape)}")
    k = out.shape[1]
    kind = output
    if kind == "auto":
        kind = "sigmoid" if k == 1 else "softmax"
    out = out.float() if out.dtype in (torch.float16, torch.bfloat16) else out
    if kind == "softmax" and k == 1:
        raise UsageError("output='softmax' needs a K-channel output with K > 1; use 'sigmoid' for one channel")
    if kind == "probabilities":
        lo, hi = float(out.min()), float(out.max())
        if lo < -1e-4 or hi > 1 + 1e-4:  # NaN compares False: a NaN output is reported per image later
            raise UsageError(
                f"output='probabilities' but the model output lies in [{lo:g}, {hi:g}], not [0, 1]: "
                "give output='sigmoid' or 'softmax' for logits"
            )
        out = out.clamp(0, 1)
    elif kind not in ("sigmoid", "softmax"):
        raise UsageError(f'output must be "auto", "sigmoid", "softmax" or "probabilities", got {output!r}')
    return out, kind


def class_probabilities(
    out: Any, output: OutputKind = "auto", classes: tuple[int, ...] = (1,), output_key: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every class's probability map and binarised prediction from one model output.

    Args:
        out: the model's output: a tensor (B, K, *S); a tuple/list (deep supervision: the first
            element is used); or a dict (``output_key`` picks the entry).
        output: "sigmoid" for one-channel logits (default when K == 1) or independent channels (a
            multi-label output), "softmax" for K-channel logits (default when K > 1),
            "probabilities" when the model already returns them.
        classes: the classes of interest (channels for K > 1; ignored for K == 1).
        output_key: the key of a dict output.

    Returns:
        ``(probabilities (B, len(classes), *S), predictions (B, len(classes), *S) 0/1, K)``. A
        softmax (or K-channel probabilities) predicts ``argmax == class``; a sigmoid (and one
        channel of probabilities) predicts ``probability > 0.5``.

    Example:
        >>> logits = torch.tensor([[[[2.0]], [[0.0]], [[1.0]]]])  # one pixel, 3 classes
        >>> prob, pred, k = class_probabilities(logits, classes=(1, 2))
        >>> [round(p, 3) for p in prob.flatten().tolist()], pred.flatten().tolist(), k
        ([0.09, 0.245], [0.0, 0.0], 3)
    """
    out, kind = _read(out, output, output_key)
    k = out.shape[1]
    if k > 1:
        bad = [c for c in classes if not 0 <= c < k]
        if bad:
            name = "target" if len(classes) == 1 else "classes"
            got = bad[0] if len(bad) == 1 else bad
            raise UsageError(f"{name} must be a class index in [0, {k - 1}] for a {k}-channel output, got {got}", argument=name)
    index = list(classes) if k > 1 else [0]
    if kind == "sigmoid":
        prob = torch.sigmoid(out[:, index])
        return prob, (prob > 0.5).to(prob.dtype), k
    soft = torch.softmax(out, dim=1) if kind == "softmax" else out
    if k == 1:
        return soft, (soft > 0.5).to(soft.dtype), k
    arg = soft.argmax(1, keepdim=True)
    picked = torch.tensor(index, device=out.device).view(1, -1, *([1] * (out.ndim - 2)))
    return soft[:, index], (arg == picked).to(soft.dtype), k


def model_probabilities(
    out: Any, output: OutputKind = "auto", target: int = 1, output_key: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The target's probability map and binarised prediction (:func:`class_probabilities` for one class).

    Returns:
        ``(probability (B, 1, *S), prediction (B, 1, *S) 0/1, K)``. For K > 1 the prediction is
        ``argmax == target`` (softmax) or ``probability > 0.5`` (sigmoid); for K == 1 it is
        ``probability > 0.5``.
    """
    return class_probabilities(out, output, (target,), output_key)


def label_targets(label: torch.Tensor, k: int, classes: tuple[int, ...], target_given: bool) -> torch.Tensor:
    """:func:`label_target` for each of ``classes``: (B, len(classes), *S)."""
    return torch.cat([label_target(label, k, c, target_given) for c in classes], dim=1)


def label_target(label: torch.Tensor, k: int, target: int | None, target_given: bool) -> torch.Tensor:
    """Binary float32 target mask (B, 1, *S) from a label map (B, 1, *S) or one-hot labels (B, K, *S).

    A binary target (one-channel model output, no ``target`` given) needs 0/1 labels; a label map
    with more values takes ``target`` (the label value of the class of interest; None means 1).
    """
    target = 1 if target is None else int(target)
    label = label.float() if not label.is_floating_point() else label
    if label.shape[1] > 1:
        values = torch.unique(label)
        if not bool(((values == 0) | (values == 1)).all()):
            raise UsageError(
                f"one-hot labels {tuple(label.shape)} must hold only 0 and 1, got values {values[:8].tolist()}"
            )
        if not 0 <= target < label.shape[1]:
            raise UsageError(f"target {target} is not a channel of the one-hot labels {tuple(label.shape)}")
        return label[:, target : target + 1].to(torch.float32)
    values = torch.unique(label)
    binary = bool(((values == 0) | (values == 1)).all())
    if not binary and k == 1 and not target_given:
        raise UsageError(
            f"labels contain values {values[:8].tolist()} but the model has one output channel (a binary "
            "target): labels must be 0/1, or pass target=k to use the label value k as the target"
        )
    if binary and not target_given:
        return label.to(torch.float32)
    return (label == target).to(torch.float32)
