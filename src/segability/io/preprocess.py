"""Optional preprocessing: a small config (JSON or YAML) built from MONAI transforms, or a callable.

A callable (``file.py:fn`` or ``package.module:fn``) takes and returns
``{"image": ..., "label": ...}``, as a MONAI ``Compose`` of dictionary transforms does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["build_preprocess", "load_preprocess"]

PREPROCESS_KEYS = ("orientation", "spacing", "intensity", "size")


def _floats(value: Any, name: str, count: int | None = None) -> list[float]:
    items = value if isinstance(value, (list, tuple)) else [value]
    try:
        out = [float(v) for v in items]
    except (TypeError, ValueError):
        raise ValueError(f"preprocess.{name} must be a number or a list of numbers, got {value!r}") from None
    if count is not None and len(out) != count:
        raise ValueError(f"preprocess.{name} must have {count} numbers, got {value!r}")
    return out


def build_preprocess(config: Mapping[str, Any]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Build the preprocessing of a small config from MONAI dictionary transforms.

    Steps, applied in this order when present:

    - ``orientation``: axis codes such as ``"RAS"`` (``Orientationd``; image and label).
    - ``spacing``: target voxel spacing, e.g. ``[1.0, 1.0, 2.0]`` (``Spacingd``; bilinear for the
      image, nearest for the label).
    - ``intensity``: one of ``{"range": [a_min, a_max], "to": [0, 1], "clip": true}``
      (``ScaleIntensityRanged``), ``{"scale": [min, max]}`` (``ScaleIntensityd``) or
      ``{"normalize": true, "nonzero": false}`` (``NormalizeIntensityd``); image only.
    - ``size``: spatial size to crop or pad to, centred (``ResizeWithPadOrCropd``; image and label).

    Args:
        config: the mapping (e.g. read from JSON or YAML).

    Returns:
        A callable on ``{"image": ..., "label": ...}`` dicts (``label`` optional).

    Raises:
        ValueError: unknown keys or malformed values (named as ``preprocess.<key>``).

    Example:
        >>> import torch
        >>> pre = build_preprocess({"intensity": {"range": [0, 100], "clip": True}, "size": [4, 4]})
        >>> out = pre({"image": torch.full((1, 2, 6), 50.0)})
        >>> tuple(out["image"].shape), float(out["image"].max())
        ((1, 4, 4), 0.5)
    """
    from monai.transforms import (
        Compose,
        NormalizeIntensityd,
        Orientationd,
        ResizeWithPadOrCropd,
        ScaleIntensityd,
        ScaleIntensityRanged,
        Spacingd,
    )

    if not isinstance(config, Mapping):
        raise ValueError(f"preprocess must be a mapping with keys {list(PREPROCESS_KEYS)}, got {type(config).__name__}")
    unknown = sorted(set(config) - set(PREPROCESS_KEYS))
    if unknown:
        raise ValueError(f"preprocess: unknown key(s) {unknown}; expected some of {list(PREPROCESS_KEYS)}")
    both = dict(keys=["image", "label"], allow_missing_keys=True)
    steps: list[Any] = []
    if config.get("orientation") is not None:
        codes = config["orientation"]
        if not isinstance(codes, str) or not codes.isalpha():
            raise ValueError(f"preprocess.orientation must be axis codes such as 'RAS', got {codes!r}")
        steps.append(Orientationd(axcodes=codes.upper(), **both))
    if config.get("spacing") is not None:
        pixdim = _floats(config["spacing"], "spacing")
        if any(v <= 0 for v in pixdim):
            raise ValueError(f"preprocess.spacing must be positive, got {config['spacing']!r}")
        steps.append(Spacingd(keys="image", pixdim=pixdim, mode="bilinear"))
        steps.append(Spacingd(keys="label", pixdim=pixdim, mode="nearest", allow_missing_keys=True))
    if config.get("intensity") is not None:
        steps.append(_intensity_step(config["intensity"], ScaleIntensityRanged, ScaleIntensityd, NormalizeIntensityd))
    if config.get("size") is not None:
        size = config["size"]
        sizes = size if isinstance(size, (list, tuple)) else [size]
        if not sizes or not all(isinstance(s, int) and s > 0 for s in sizes):
            raise ValueError(f"preprocess.size must be a list of positive integers, got {size!r}")
        steps.append(ResizeWithPadOrCropd(spatial_size=list(sizes), **both))
    compose = Compose(steps)

    def preprocess(item: dict[str, Any]) -> dict[str, Any]:
        return compose(dict(item))

    preprocess.config = dict(config)  # type: ignore[attr-defined]
    return preprocess


def _intensity_step(spec: Any, range_cls: Any, scale_cls: Any, normalize_cls: Any) -> Any:
    if not isinstance(spec, Mapping):
        raise ValueError(f"preprocess.intensity must be a mapping with 'range', 'scale' or 'normalize', got {spec!r}")
    kinds = [k for k in ("range", "scale", "normalize") if k in spec]
    if len(kinds) != 1:
        raise ValueError(f"preprocess.intensity needs exactly one of 'range', 'scale', 'normalize', got keys {sorted(spec)}")
    allowed = {"range": {"range", "to", "clip"}, "scale": {"scale"}, "normalize": {"normalize", "nonzero"}}[kinds[0]]
    extra = sorted(set(spec) - allowed)
    if extra:
        raise ValueError(f"preprocess.intensity: unknown key(s) {extra} with {kinds[0]!r}; allowed {sorted(allowed)}")
    if kinds[0] == "range":
        a_min, a_max = _floats(spec["range"], "intensity.range", 2)
        b_min, b_max = _floats(spec.get("to", [0.0, 1.0]), "intensity.to", 2)
        if a_max == a_min:
            raise ValueError(f"preprocess.intensity.range must have two different values, got {spec['range']!r}")
        return range_cls(keys="image", a_min=a_min, a_max=a_max, b_min=b_min, b_max=b_max, clip=bool(spec.get("clip", False)))
    if kinds[0] == "scale":
        lo, hi = _floats(spec["scale"], "intensity.scale", 2)
        return scale_cls(keys="image", minv=lo, maxv=hi)
    if not spec["normalize"]:
        raise ValueError("preprocess.intensity.normalize must be true when given")
    return normalize_cls(keys="image", nonzero=bool(spec.get("nonzero", False)))


def load_preprocess(
    spec: str | os.PathLike | Mapping[str, Any] | Callable[[dict[str, Any]], dict[str, Any]] | None,
    *,
    argument: str = "--preprocess",
) -> Callable[[dict[str, Any]], dict[str, Any]] | None:
    """The preprocessing named by ``spec``: None; a config mapping; a ``.json`` / ``.yaml`` / ``.yml``
    file with that config; a callable; ``file.py:fn`` / ``package.module:fn``; or a MONAI bundle
    folder (its ``preprocessing``, see :class:`~segability.io.bundle.BundlePreprocess`).

    A callable takes ``{"image": MetaTensor (C, *S), "label": MetaTensor (when paired)}`` and
    returns the same kind of dict (a MONAI ``Compose`` of dictionary transforms fits).

    Raises:
        ValueError: a missing file, a malformed config, or YAML without PyYAML installed.

    Example:
        >>> load_preprocess(None) is None
        True
    """
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        return build_preprocess(spec)
    if callable(spec):
        return spec
    text = os.fspath(spec)
    lower = text.lower()
    from segability.io.bundle import bundle_preprocess, is_bundle

    if is_bundle(text):  # a MONAI bundle folder: its own preprocessing (segability.io.bundle)
        return bundle_preprocess(text, argument=argument)
    if lower.endswith((".json", ".yaml", ".yml")):
        path = Path(text).expanduser()
        if not path.is_file():
            raise ValueError(f"{argument}: file {text!r} not found")
        raw = path.read_text()
        if lower.endswith(".json"):
            try:
                config = json.loads(raw)
            except ValueError as exc:
                raise ValueError(f"{argument}: {text} is not valid JSON: {exc}") from exc
        else:
            try:
                import yaml
            except ImportError:
                raise ValueError(f"{argument}: reading YAML needs PyYAML (pip install pyyaml); or write the config as JSON") from None
            try:
                config = yaml.safe_load(raw)
            except yaml.YAMLError as exc:
                raise ValueError(f"{argument}: {text} is not valid YAML: {exc}") from exc
        try:
            return build_preprocess(config or {})
        except ValueError as exc:
            raise ValueError(f"{argument}: {text}: {exc}") from exc
    from segability.io.models import load_callable

    return load_callable(text, argument=argument)
