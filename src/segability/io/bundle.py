"""MONAI bundles: the network, its weights, its preprocessing and its window size from a bundle folder.

A MONAI bundle is a folder with ``configs/inference.json`` (or ``.yaml``), optionally
``configs/metadata.json``, and ``models/model.pt``. :func:`read_bundle` reads the config with
``monai.bundle.ConfigParser`` and finds what segability needs:

- ``network_def`` (or ``network``): the architecture, built by :func:`bundle_network`, the model
  factory a run records (``segability.io.bundle:bundle_network`` with ``bundle`` and
  ``config_sha256`` as its arguments, so a resumed run or ``qc --run`` builds it again, and a changed
  config is noticed);
- ``models/model.pt``: the state dict (or a checkpoint holding it under ``model``, ``state_dict``,
  ...), loaded as ``--weights`` are; ``models/model.ts`` alone (TorchScript) is refused: it cannot
  take forward hooks;
- ``preprocessing``: the transforms run on each file instead of segability's own preprocessing
  (:class:`BundlePreprocess`; ``--preprocess BUNDLE_DIR`` names it);
- ``inferer``: a ``SlidingWindowInferer``'s ``roi_size`` is the default window size.

A bundle's config may hold Python expressions (``"$..."``) that MONAI evaluates while parsing, as
MONAI's own ``run`` does: give only bundles you trust. Errors are
:class:`~segability.errors.UsageError` naming the argument (``bundle`` by default).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from segability.errors import UsageError

__all__ = ["BUNDLE_FACTORY", "Bundle", "BundlePreprocess", "read_bundle", "bundle_network", "load_bundle",
           "bundle_preprocess", "is_bundle"]  # fmt: skip

BUNDLE_FACTORY = "segability.io.bundle:bundle_network"
CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
NETWORK_KEYS = ("network_def", "network")


@dataclass(frozen=True)
class Bundle:
    """What segability takes from a MONAI bundle folder.

    Attributes:
        folder: the bundle folder (absolute).
        config: ``configs/inference.json`` (or ``.yaml`` / ``.yml``).
        metadata: ``configs/metadata.json`` when present.
        weights: ``models/model.pt``.
        config_sha256: the config file's sha256 (part of a run's fingerprint).
        network_key: ``"network_def"`` or ``"network"``.
        has_preprocessing: whether the config defines ``preprocessing``.
        image_key: the key the preprocessing reads the image under (its first transform's first key).
        roi_size: the ``SlidingWindowInferer``'s window, or None.
    """

    folder: Path
    config: Path
    metadata: Path | None
    weights: Path
    config_sha256: str
    network_key: str
    has_preprocessing: bool
    image_key: str
    roi_size: tuple[int, ...] | None

    def model_args(self) -> dict[str, str]:
        """The arguments of :func:`bundle_network` for this bundle."""
        return {"bundle": str(self.folder), "config_sha256": self.config_sha256}


def is_bundle(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a bundle config (``configs/inference.json`` / ``.yaml`` / ``.yml``)."""
    p = Path(folder).expanduser()
    return p.is_dir() and any((p / "configs" / name).is_file() for name in CONFIG_NAMES)


def _parser(bundle: Bundle | Path, argument: str) -> Any:
    from monai.bundle import ConfigParser

    folder = bundle.folder if isinstance(bundle, Bundle) else bundle
    config = bundle.config if isinstance(bundle, Bundle) else _config_file(folder, argument)
    parser = ConfigParser()
    try:
        parser.read_config(str(config))
        metadata = folder / "configs" / "metadata.json"
        if metadata.is_file():
            parser.read_meta(str(metadata))
    except Exception as exc:
        raise UsageError(f"{argument}: {config} cannot be read: {type(exc).__name__}: {exc}", argument=argument) from exc
    parser["bundle_root"] = str(folder)  # the config's paths ("$@bundle_root + '/models/...'") point here
    return parser


def _config_file(folder: Path, argument: str) -> Path:
    if not folder.is_dir():
        raise UsageError(f"{argument}: {folder} is not a folder (a MONAI bundle is a folder with configs/ and models/)",
                         argument=argument)  # fmt: skip
    for name in CONFIG_NAMES:
        if (folder / "configs" / name).is_file():
            return folder / "configs" / name
    raise UsageError(f"{argument}: {folder} has no configs/inference.json (or .yaml): not a MONAI bundle for inference",
                     argument=argument)  # fmt: skip


def _parsed(parser: Any, key: str, argument: str, config: Path) -> Any:
    try:
        return parser.get_parsed_content(key)
    except Exception as exc:
        raise UsageError(f"{argument}: {key!r} of {config.name} cannot be built: {type(exc).__name__}: {exc}",
                         argument=argument) from exc  # fmt: skip


def _image_key(spec: Any) -> str:
    """The key of the first transform with ``keys`` in the raw preprocessing config ("image" if none)."""
    transforms = spec.get("transforms", []) if isinstance(spec, dict) else []
    for t in transforms if isinstance(transforms, list) else []:
        keys = t.get("keys") if isinstance(t, dict) else None
        if isinstance(keys, (list, tuple)) and keys:
            keys = keys[0]
        if isinstance(keys, str) and keys and not keys.startswith(("@", "$", "%")):
            return keys
    return "image"


def read_bundle(folder: str | os.PathLike, *, argument: str = "bundle", need_weights: bool = True) -> Bundle:
    """Find the config, weights, network, preprocessing and window size of a MONAI bundle.

    Args:
        folder: the bundle folder.
        argument: the argument named in errors.
        need_weights: refuse a bundle without ``models/model.pt`` (else ``weights`` is that path anyway).

    Raises:
        UsageError: no folder, no ``configs/inference.json`` / ``.yaml``, no ``network_def`` (or
            ``network``), no ``models/model.pt`` (or only ``models/model.ts``, TorchScript), or an
            inferer that cannot be built.

    Example:
        >>> read_bundle("/no/such/bundle")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        segability.errors.UsageError: bundle: /no/such/bundle is not a folder ...
    """
    path = Path(folder).expanduser().resolve()
    config = _config_file(path, argument)
    parser = _parser(path, argument)
    network_key = next((k for k in NETWORK_KEYS if parser.get(k) is not None), None)
    if network_key is None:
        raise UsageError(f"{argument}: {config.name} defines no network_def (nor network): the bundle names no network to analyse",
                         argument=argument)  # fmt: skip
    weights = path / "models" / "model.pt"
    if need_weights and not weights.is_file():
        if (path / "models" / "model.ts").is_file():
            from segability.io.models import TORCHSCRIPT_HELP

            raise UsageError(f"{argument}: {path} holds only models/model.ts, a TorchScript module. {TORCHSCRIPT_HELP}",
                             argument=argument)  # fmt: skip
        raise UsageError(f"{argument}: {path} has no models/model.pt (the network's weights)", argument=argument)
    roi = None
    if parser.get("inferer") is not None:
        from monai.inferers import SlidingWindowInferer

        inferer = _parsed(parser, "inferer", argument, config)
        if isinstance(inferer, SlidingWindowInferer):
            size = inferer.roi_size
            roi = tuple(int(s) for s in (size if isinstance(size, (list, tuple)) else [size]))
    preprocessing = parser.get("preprocessing")
    return Bundle(
        folder=path, config=config, metadata=path / "configs" / "metadata.json" if (path / "configs" / "metadata.json").is_file() else None,
        weights=weights, config_sha256=hashlib.sha256(config.read_bytes()).hexdigest(), network_key=network_key,
        has_preprocessing=preprocessing is not None, image_key=_image_key(preprocessing), roi_size=roi,
    )  # fmt: skip


def bundle_network(bundle: str | os.PathLike, config_sha256: str | None = None) -> nn.Module:
    """The bundle's network, without weights (a model factory: ``load_model`` loads ``models/model.pt``).

    Args:
        bundle: the bundle folder.
        config_sha256: the config's sha256 when the run was made; a config changed since is refused.

    Raises:
        UsageError: see :func:`read_bundle`; a config changed since ``config_sha256``; a network
            that cannot be built or is not an ``nn.Module``.
    """
    info = read_bundle(bundle, need_weights=False)
    if config_sha256 is not None and config_sha256 != info.config_sha256:
        raise UsageError(f"bundle: {info.config} changed since the run was made (sha256 {config_sha256[:8]} -> "
                         f"{info.config_sha256[:8]})", argument="bundle")  # fmt: skip
    net = _parsed(_parser(info, "bundle"), info.network_key, "bundle", info.config)
    if not isinstance(net, nn.Module):
        raise UsageError(f"bundle: {info.network_key} of {info.config.name} is a {type(net).__name__}, not a torch.nn.Module",
                         argument="bundle")  # fmt: skip
    return net.cpu()


def load_bundle(folder: str | os.PathLike, *, device: str | torch.device = "cpu", argument: str = "bundle") -> tuple[nn.Module, Bundle]:
    """The bundle's network with its weights (in eval mode, on ``device``) and the :class:`Bundle`.

    Raises:
        UsageError: see :func:`read_bundle`; weights that cannot be read or do not fit the network
            (the message lists the keys that differ).
    """
    from segability.io.models import load_model

    info = read_bundle(folder, argument=argument)
    try:
        net = bundle_network(info.folder, info.config_sha256)
        return load_model(net, info.weights, device=device), info
    except UsageError as exc:
        text = str(exc)
        for name in ("weights", "model"):
            if text.startswith(name + ":"):
                text = text[len(name) + 1 :].lstrip()
        raise UsageError(f"{argument}: {text}", argument=argument) from exc


def bundle_preprocess(folder: str | os.PathLike, *, argument: str = "preprocess") -> BundlePreprocess | None:
    """The bundle's preprocessing as a callable on ``{"image", "label"}`` items (None when it has none)."""
    info = read_bundle(folder, argument=argument)
    return BundlePreprocess(str(info.folder), info.image_key) if info.has_preprocessing else None


class BundlePreprocess:
    """A bundle's ``preprocessing`` run on each image file, as the bundle runs it.

    The transforms read the file themselves (their ``LoadImaged`` comes first), from the file name
    the image read by :func:`~segability.io.read_image` carries (``meta["filename_or_obj"]``). A
    label, read by segability on the file's grid, is resampled (nearest neighbour) onto the
    preprocessed image's grid through the two affines: MONAI's spatial transforms keep the affine
    up to date. Picklable (the transforms are built again where it is unpickled).

    Args:
        folder: the bundle folder.
        image_key: the key the bundle's transforms read the image under.
    """

    def __init__(self, folder: str, image_key: str = "image"):
        self.folder = folder
        self.image_key = image_key
        self._compose: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder, "image_key": self.image_key}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"BundlePreprocess({self.folder!r})"

    def transforms(self) -> Any:
        """The bundle's ``preprocessing`` (a MONAI ``Compose``), built once."""
        if self._compose is None:
            info = read_bundle(self.folder, argument="preprocess")
            self._compose = _parsed(_parser(info, "preprocess"), "preprocessing", "preprocess", info.config)
        return self._compose

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        image = item["image"]
        meta = getattr(image, "meta", {}) or {}
        source = meta.get("filename_or_obj")
        if not source:
            raise ValueError("the bundle's preprocessing reads the image file itself: the image must carry its file name "
                             "(read it with segability.io.read_image)")  # fmt: skip
        out = self.transforms()({self.image_key: str(source)})
        if isinstance(out, list):
            raise ValueError("the bundle's preprocessing returns several samples per image (a random crop?); "
                             "segability analyses one image per file")  # fmt: skip
        processed = out[self.image_key]
        result = {**item, "image": processed}
        if item.get("label") is not None:
            result["label"] = _onto(item["label"], processed)
        return result


def _onto(label: Any, image: Any) -> torch.Tensor:
    """``label`` (C, *S) resampled, nearest neighbour, onto the grid of ``image`` (C', *S')."""
    from segability.io.export import _affine_of, resample_grid

    n = image.ndim - 1
    src, dst = _affine_of(label, n), _affine_of(image, n)
    eye = np.eye(n + 1)
    values = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    shape = tuple(int(s) for s in image.shape[1:])
    out = np.stack([resample_grid(c, eye if src is None else src, eye if dst is None else dst, shape, 0) for c in values])
    return torch.as_tensor(out)
