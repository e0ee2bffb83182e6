"""What an analysis is asked to do, as frozen dataclasses validated once, in ``__post_init__``.

:class:`Readout` says how to read the network output, :class:`Scoring` what to score and against
what, :class:`Capture` which layers and how to hold their outputs, :class:`Windows` how to cut a
large volume. :class:`AnalysisConfig` groups them; its :meth:`~AnalysisConfig.settings` (written
to ``settings.json``) and :meth:`~AnalysisConfig.fingerprint` (compared by ``--resume``) are derived
from the fields, never listed by hand. A field whose metadata says ``result=False`` (batch size,
memory budget, ...) does not change any number and is left out of the fingerprint.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from segability.errors import UsageError

__all__ = ["OutputKind", "GuideKind", "EmptyRule", "Readout", "Scoring", "Capture", "Windows", "AnalysisConfig", "describe"]

OutputKind = Literal["auto", "sigmoid", "softmax", "probabilities"]
GuideKind = Literal["prediction", "label"]
EmptyRule = Literal["one", "nan"]
OUTPUT_KINDS = ("auto", "sigmoid", "softmax", "probabilities")
GUIDE_KINDS = ("prediction", "label")


def _choice(value: Any, choices: Sequence[str], argument: str) -> None:
    if value not in choices:
        raise UsageError(f"{argument} must be one of {', '.join(map(repr, choices))}, got {value!r}", argument=argument)


def _int(value: Any, argument: str, *, low: int, none: bool = False) -> None:
    if value is None and none:
        return
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < low:
        raise UsageError(f"{argument} must be an integer >= {low}{' or None' if none else ''}, got {value!r}", argument=argument)


def _bool(value: Any, argument: str) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise UsageError(f"{argument} must be True or False, got {value!r}", argument=argument)


def _no_result(default: Any = dataclasses.MISSING) -> Any:
    """A field that changes how a run goes, not its numbers (left out of the fingerprint)."""
    return field(default=default, metadata={"result": False})


@dataclass(frozen=True)
class Readout:
    """How to read the network output.

    Args:
        output: "sigmoid" for one-channel logits (default when K == 1), "softmax" for K-channel
            logits (default when K > 1), "probabilities" when the model returns them; "auto".
        target: the target class: the channel of a K-channel output or one-hot label, and the
            label value of a multi-class label map; None means 1 (and 0/1 labels for a one-channel model).
        output_key: the entry of a dict output.
        classes: score several classes in one pass (one-vs-rest prototypes from each class's
            probability): class indices, or "all" (every foreground class: 1..K-1 of a softmax,
            every channel of a multi-label sigmoid). The tables then get ``class`` and
            ``class_name`` columns. None (default): the one ``target``, tables as for a binary task.
        class_names: names of the classes by index, for the ``class_name`` column.
    """

    output: OutputKind = "auto"
    target: int | None = None
    output_key: str | None = None
    classes: tuple[int, ...] | Literal["all"] | None = None
    class_names: Mapping[int, str] | None = None

    def __post_init__(self) -> None:
        _choice(self.output, OUTPUT_KINDS, "output")
        _int(self.target, "target", low=0, none=True)
        if self.output_key is not None and not isinstance(self.output_key, str):
            raise UsageError(f"output_key must be a string or None, got {self.output_key!r}", argument="output_key")
        if self.classes is not None and self.classes != "all":
            if isinstance(self.classes, (str, bytes)) or not isinstance(self.classes, Sequence) or not self.classes:
                raise UsageError(f'classes must be "all", None or a non-empty list of class indices, got {self.classes!r}', argument="classes")
            for c in self.classes:
                _int(c, "classes", low=0)
            if len(set(self.classes)) != len(self.classes):
                raise UsageError(f"classes must not repeat a class, got {list(self.classes)}", argument="classes")
            object.__setattr__(self, "classes", tuple(int(c) for c in self.classes))
        if self.classes is not None and self.target is not None:
            raise UsageError("give target (one class) or classes (several), not both", argument="classes")
        if self.class_names is not None:
            if not isinstance(self.class_names, Mapping) or not all(
                isinstance(k, (int, np.integer)) and not isinstance(k, bool) and isinstance(v, str) for k, v in self.class_names.items()
            ):
                raise UsageError(f"class_names must map class indices to names, got {self.class_names!r}", argument="class_names")
            object.__setattr__(self, "class_names", {int(k): v for k, v in self.class_names.items()})

    @property
    def target_index(self) -> int:
        return 1 if self.target is None else int(self.target)

    @property
    def multi(self) -> bool:
        """Several classes scored at once (tables with a ``class`` column)."""
        return self.classes is not None

    def resolve_classes(self, k: int, kind: str) -> tuple[int, ...]:
        """The classes to score for a ``k``-channel output read as ``kind`` ("sigmoid", "softmax",
        "probabilities"); a class outside the output is an error naming ``classes``."""
        if self.classes is None:
            return (self.target_index,)
        if self.classes == "all":
            if k == 1:
                return (1,)
            return tuple(range(k)) if kind == "sigmoid" else tuple(range(1, k))
        bad = [c for c in self.classes if (k > 1 and c >= k) or (k == 1 and c != 1)]
        if bad:
            valid = "1 (the one channel)" if k == 1 else f"0..{k - 1}"
            raise UsageError(f"classes {bad} are not classes of the {k}-channel output (valid: {valid})", argument="classes")
        return self.classes

    def class_name(self, c: int) -> str:
        """The name of class ``c`` (from ``class_names``, else its index)."""
        return (self.class_names or {}).get(int(c), str(int(c)))

    def class_columns(self, c: int) -> dict[str, Any]:
        """The class columns of a table row for class ``c``: none for a single-target run, whose
        tables stay as they were."""
        return {"class": int(c), "class_name": self.class_name(c)} if self.multi else {}


@dataclass(frozen=True)
class Scoring:
    """What every layer is scored against.

    Args:
        guide: prototypes from the network's "prediction" (label-free) or the "label".
        units: also score every unit (channel).
        mask: pixels that shape the prototypes: None, "nonzero" (any image channel != 0), a tensor
            (N, 1, *S) for tensor images, or a callable images -> (B, 1, *S).
        empty: Dice of two empty maps: "one" or "nan".
        keep_maps: keep the feature segmentation maps of the first ``keep_maps`` images.
        chunk_size: channels resized at once for unit maps (memory bound); automatic when None.
    """

    guide: GuideKind = "prediction"
    units: bool = False
    mask: Any = None
    empty: EmptyRule = "one"
    keep_maps: int = 0
    chunk_size: int | None = _no_result(None)

    def __post_init__(self) -> None:
        _choice(self.guide, GUIDE_KINDS, "guide")
        _bool(self.units, "units")
        _choice(self.empty, ("one", "nan"), "empty")
        _int(self.keep_maps, "keep_maps", low=0)
        _int(self.chunk_size, "chunk_size", low=1, none=True)
        ok = self.mask is None or (isinstance(self.mask, str) and self.mask == "nonzero")
        ok = ok or isinstance(self.mask, (torch.Tensor, np.ndarray)) or callable(self.mask)
        if not ok:
            raise UsageError(f"mask must be None, 'nonzero', a tensor (N, 1, *spatial) or a callable, got {self.mask!r}", argument="mask")


@dataclass(frozen=True)
class Capture:
    """Which layers to capture and how to hold their outputs.

    Args:
        layers: "auto" (each stage of the network: :func:`segability.capture.default_layers`; every convolution of a plain conv net) or a selection: names, glob patterns, types, modules,
            predicates (see :func:`segability.capture.resolve_layers`).
        reshape: callable turning a layer output into (B, C, *spatial) features, or None to use
            the automatic rules (tokens, channels-last).
        batch_size: images per forward pass.
        memory_budget: bytes of layer outputs kept from the prediction pass; layers beyond it are
            scored in a second pass inside their hooks.
        low_memory: keep no layer output (budget 0): every batch runs twice.
    """

    layers: Any = "auto"
    reshape: Callable[[torch.Tensor], torch.Tensor | None] | None = None
    batch_size: int = _no_result(8)
    memory_budget: int = _no_result(512 * 2**20)
    low_memory: bool = _no_result(False)

    def __post_init__(self) -> None:
        if self.reshape is not None and not callable(self.reshape):
            raise UsageError(f"reshape must be a callable or None, got {self.reshape!r}", argument="reshape")
        _int(self.batch_size, "batch_size", low=1)
        _int(self.memory_budget, "memory_budget", low=0)
        _bool(self.low_memory, "low_memory")
        if isinstance(self.layers, str) and self.layers != "auto" and not self.layers:
            raise UsageError("layers must be 'auto' or a selection, got an empty string", argument="layers")

    @property
    def keep_bytes(self) -> int:
        return 0 if self.low_memory else self.memory_budget


@dataclass(frozen=True)
class Windows:
    """Sliding windows over a large volume (MONAI's windows; scores accumulated over them).

    Args:
        roi_size: window size per spatial dim; a size <= 0 takes the whole axis.
        overlap: window overlap fraction in [0, 1).
        sw_batch_size: windows per forward pass.
    """

    roi_size: tuple[int, ...]
    overlap: float = 0.25
    sw_batch_size: int = _no_result(1)

    def __post_init__(self) -> None:
        roi = self.roi_size
        if not isinstance(roi, (list, tuple)) or not 1 <= len(roi) <= 3 or not all(
            isinstance(r, (int, np.integer)) and not isinstance(r, bool) for r in roi
        ):
            raise UsageError(f"roi_size must give 1-3 integer window sizes, got {roi!r}", argument="roi_size")
        object.__setattr__(self, "roi_size", tuple(int(r) for r in roi))
        if isinstance(self.overlap, bool) or not isinstance(self.overlap, (int, float)) or not 0 <= self.overlap < 1:
            raise UsageError(f"overlap must be a number in [0, 1), got {self.overlap!r}", argument="overlap")
        _int(self.sw_batch_size, "sw_batch_size", low=1)


@dataclass(frozen=True)
class AnalysisConfig:
    """Everything an analysis is asked to do (see the classes of its fields)."""

    readout: Readout = field(default_factory=Readout)
    scoring: Scoring = field(default_factory=Scoring)
    capture: Capture = field(default_factory=Capture)
    windows: Windows | None = None

    def __post_init__(self) -> None:
        for name, kind in (("readout", Readout), ("scoring", Scoring), ("capture", Capture)):
            if not isinstance(getattr(self, name), kind):
                raise UsageError(f"{name} must be a {kind.__name__}, got {type(getattr(self, name)).__name__}", argument=name)
        if self.windows is not None and not isinstance(self.windows, Windows):
            raise UsageError(f"windows must be a Windows or None, got {type(self.windows).__name__}", argument="windows")

    def settings(self) -> dict[str, Any]:
        """Every option, flat and JSON-ready (callables and tensors by name)."""
        return _flat(self, result_only=False)

    def fingerprint(self) -> dict[str, Any]:
        """The options that change a result (those a resumed run must share)."""
        return _flat(self, result_only=True)


def describe(value: Any) -> Any:
    """A JSON-ready description of an option value."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return [describe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): describe(v) for k, v in value.items()}
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return f"{type(value).__name__}{tuple(value.shape)}"
    if isinstance(value, type):
        return value.__name__
    return getattr(value, "__qualname__", None) or type(value).__name__


def _flat(config: AnalysisConfig, *, result_only: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in (config.readout, config.scoring, config.capture, config.windows):
        if part is None:
            continue
        for f in dataclasses.fields(part):
            if result_only and not f.metadata.get("result", True):
                continue
            out[f.name] = describe(getattr(part, f.name))
    if config.windows is None:
        out["roi_size"] = None
    return out
