"""nnU-Net v2 results folders: nnU-Net's own loading, preprocessing, sliding window and export.

A results folder is what ``nnUNetv2_train`` writes: ``<Trainer>__<Plans>__<configuration>/`` with
``plans.json``, ``dataset.json`` and ``fold_<f>/<checkpoint>.pth``. :func:`load_nnunet` loads it
into nnU-Net's own :class:`nnUNetPredictor` (network built by the trainer class the checkpoint
names, weights of every fold, mirroring axes from the checkpoint); :func:`find_cases` pairs raw
files by nnU-Net's naming (``CASE_0000.nii.gz``, ``CASE_0001.nii.gz``, ... one file per channel of
``dataset.json``; labels ``CASE.nii.gz``); :meth:`NnUNetModel.preprocess` runs the plans'
preprocessor (crop to non-zero, transpose, resample, normalise), the label through the same steps;
:meth:`NnUNetModel.predict_logits` is nnU-Net's Gaussian sliding window (mirroring as the
checkpoint allows, fold ensemble); :meth:`NnUNetModel.segmentation` is nnU-Net's export to the
original geometry.

:func:`analyze_case` scores the network's own layers (``encoder.stages.0``, ...,
``decoder.stages.N``) on nnU-Net's grid, over nnU-Net's own tiles, with the ensemble's softmax as
the guide of every foreground class of ``dataset.json`` (one pass, ``class`` / ``class_name``
columns). With several folds, each fold's network is scored against the ensemble guide and its
layers are named ``fold_<f>/<layer>``; one fold keeps the plain names.

nnunetv2 is an optional dependency: installing it with its own requirements replaces a CPU torch
(dynamic-network-architectures -> timm -> torchvision); :data:`INSTALL` says how to install it.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from segability.errors import UsageError

__all__ = [
    "INSTALL",
    "NnUNetCase",
    "NnUNetModel",
    "Preprocessed",
    "load_nnunet",
    "find_cases",
    "default_layers",
    "case_of_file",
    "NnUNetInference",
    "analyze_case",
    "analyze_nnunet",
]

INSTALL = (
    "pip install 'segability[nnunet]' && pip install --no-deps nnunetv2==2.8.1 dynamic-network-architectures==0.4.4 "
    "(--no-deps: their own requirements pull timm and torchvision, which replace a CPU torch)"
)
_STAGE = re.compile(r"^(encoder|decoder)\.stages\.\d+$")


def _require_nnunet() -> None:
    try:
        import nnunetv2  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"nnunet: nnunetv2 is not installed; install it with: {INSTALL}", argument="nnunet") from exc


@dataclass(frozen=True)
class NnUNetCase:
    """One case in nnU-Net's raw naming: its channel files in channel order, and its label file."""

    case: str
    images: tuple[Path, ...]
    label: Path | None = None


@dataclass
class Preprocessed:
    """A case on nnU-Net's grid: ``data`` (C, *S) float32, ``label`` (1, *S) int (None without one),
    and nnU-Net's ``properties`` (what its export needs to go back to the original geometry)."""

    data: torch.Tensor
    label: torch.Tensor | None
    properties: dict[str, Any]


@dataclass
class NnUNetModel:
    """A loaded nnU-Net results folder (see :func:`load_nnunet`).

    Attributes:
        folder: the results folder.
        predictor: nnU-Net's ``nnUNetPredictor``, initialised with every fold's weights.
        folds: the folds loaded, in order (ints, or ``"all"``).
        checkpoint: the checkpoint file name.
        trainer, plans_name, configuration: from the checkpoint and the folder name.
    """

    folder: Path
    predictor: Any
    folds: tuple[int | str, ...]
    checkpoint: str
    trainer: str
    plans_name: str
    configuration: str
    _preprocessor: Any = field(default=None, repr=False)

    @property
    def dataset_json(self) -> dict[str, Any]:
        return self.predictor.dataset_json

    @property
    def network(self) -> nn.Module:
        return self.predictor.network

    @property
    def channels(self) -> list[str]:
        """The input channels' names, in order (``dataset.json`` ``channel_names`` or ``modality``)."""
        names = self.dataset_json.get("channel_names", self.dataset_json.get("modality", {}))
        return [str(names[k]) for k in sorted(names, key=int)]

    @property
    def file_ending(self) -> str:
        return str(self.dataset_json["file_ending"])

    @property
    def classes(self) -> dict[int, str]:
        """Foreground label value -> name, from ``dataset.json`` ``labels`` (background and ignore excluded)."""
        lm = self.predictor.label_manager
        names = {int(v): str(k) for k, v in self.dataset_json["labels"].items() if isinstance(v, int)}
        return {int(c): names.get(int(c), str(int(c))) for c in lm.foreground_labels if c != lm.ignore_label}

    @property
    def patch_size(self) -> tuple[int, ...]:
        return tuple(int(p) for p in self.predictor.configuration_manager.patch_size)

    def load_fold(self, index: int) -> nn.Module:
        """The network with the weights of the ``index``-th loaded fold (the one network, reloaded)."""
        self.network.load_state_dict(self.predictor.list_of_parameters[index])
        return self.network

    def preprocess(self, case: NnUNetCase) -> Preprocessed:
        """nnU-Net's preprocessing of the plans (crop to non-zero, transpose, resample, normalise);
        the label, when the case has one, through the same steps (voxels nnU-Net marks -1 outside
        the non-zero crop are background)."""
        p = self.predictor
        if self._preprocessor is None:
            self._preprocessor = p.configuration_manager.preprocessor_class(verbose=False)
        data, seg, props = self._preprocessor.run_case(
            [str(f) for f in case.images], None if case.label is None else str(case.label),
            p.plans_manager, p.configuration_manager, self.dataset_json,
        )  # fmt: skip
        label = None if case.label is None else torch.from_numpy(np.clip(seg, 0, None).astype(np.int64))
        return Preprocessed(torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)), label, props)

    def predict_logits(self, data: torch.Tensor) -> torch.Tensor:
        """nnU-Net's prediction on its grid: Gaussian sliding window over its tiles, mirroring as the
        checkpoint allows (and ``mirroring`` of :func:`load_nnunet`), the mean over the folds.

        Returns:
            logits (K, *S) float32 on the CPU.
        """
        return self.predictor.predict_logits_from_preprocessed_data(data).float().cpu()

    def tiles(self, spatial: Sequence[int]) -> list[tuple[slice, ...]]:
        """nnU-Net's tiles over a (padded to at least the patch size) grid of shape ``spatial``."""
        padded = tuple(max(int(s), p) for s, p in zip(spatial, self.patch_size, strict=True))
        return [tuple(s[1:]) for s in self.predictor._internal_get_sliding_window_slicers(padded)]

    def segmentation(self, logits: torch.Tensor, properties: dict[str, Any]) -> np.ndarray:
        """nnU-Net's export of ``logits`` to a label map in the original geometry (its axis order)."""
        from nnunetv2.inference.export_prediction import (
            convert_predicted_logits_to_segmentation_with_correct_shape,
        )

        p = self.predictor
        return convert_predicted_logits_to_segmentation_with_correct_shape(
            logits, p.plans_manager, p.configuration_manager, p.label_manager, properties
        )

    def to_original(self, array: np.ndarray, properties: dict[str, Any], order: int = 0) -> np.ndarray:
        """A map on nnU-Net's grid (*S) in the original geometry, in the reader's axis order: nnU-Net's
        export steps (resample to the cropped shape, put into the crop's bounding box, transpose back).

        Args:
            order: 0 for a label map (nnU-Net's segmentation resampling), 1 for a probability (linear).
        """
        from acvl_utils.cropping_and_padding.bounding_boxes import bounding_box_to_slice
        from nnunetv2.preprocessing.resampling.default_resampling import (
            resample_data_or_seg_to_shape,
        )

        pm, cm = self.predictor.plans_manager, self.predictor.configuration_manager
        target_spacing = [properties["spacing"][i] for i in pm.transpose_forward]
        shape = properties["shape_after_cropping_and_before_resampling"]
        a = np.asarray(array, dtype=np.float32)[None]
        if order == 0:
            a = resample_data_or_seg_to_shape(a, shape, cm.spacing, target_spacing, is_seg=True, order=1)
        else:
            a = resample_data_or_seg_to_shape(a, shape, cm.spacing, target_spacing, is_seg=False, order=1)
        a = np.asarray(a[0])
        full = np.zeros(properties["shape_before_cropping"], dtype=np.uint8 if order == 0 else np.float32)
        full[bounding_box_to_slice(properties["bbox_used_for_cropping"])] = a
        return full.transpose(pm.transpose_backward)

    def geometry(self, case: NnUNetCase, properties: dict[str, Any]) -> Any:
        """The case's :class:`segability.io.export.Geometry`: the channel-0 file's affine and shape (as
        nibabel reads it) and :meth:`to_original`, so exported maps overlay the input.

        Raises:
            UsageError: the plans' reader is not one whose axis order is known here (SimpleITKIO, NibabelIO).
        """
        import nibabel as nib

        from segability.io.export import Geometry

        reader = self.predictor.plans_manager.image_reader_writer_class.__name__
        if reader not in ("SimpleITKIO", "NibabelIO"):
            raise UsageError(f"export_maps: the plans read images with {reader}; maps can be exported for SimpleITKIO "
                             "and NibabelIO plans", argument="export_maps")  # fmt: skip
        img = nib.load(case.images[0])
        shape = tuple(int(n) for n in img.shape[:3])
        axes = (2, 1, 0) if reader == "SimpleITKIO" else (0, 1, 2)  # SimpleITK's arrays are z, y, x

        def to_original(array: np.ndarray, order: int) -> np.ndarray:
            return self.to_original(array, properties, order).transpose(axes)

        return Geometry(np.asarray(img.affine), shape, to_original)

    def write_segmentation(self, segmentation: np.ndarray, properties: dict[str, Any], path: str | Path) -> Path:
        """Write a label map in the original geometry with nnU-Net's reader/writer (the input's header)."""
        rw = self.predictor.plans_manager.image_reader_writer_class()
        rw.write_seg(np.asarray(segmentation), str(path), properties)
        return Path(path)


def _folder_parts(folder: Path) -> tuple[str, str, str]:
    parts = folder.name.split("__")
    if len(parts) != 3:
        raise UsageError(
            f"nnunet: {folder} is not an nnU-Net results folder: its name must be <Trainer>__<Plans>__<configuration> "
            "(e.g. nnUNetTrainer__nnUNetPlans__3d_fullres); give that folder, not the dataset folder above it",
            argument="nnunet",
        )
    return parts[0], parts[1], parts[2]


def _present_folds(folder: Path, checkpoint: str) -> dict[str, list[str]]:
    """fold -> checkpoint files present, for every ``fold_*`` sub-folder."""
    return {d.name[len("fold_"):]: sorted(f.name for f in d.glob("*.pth"))
            for d in sorted(folder.glob("fold_*")) if d.is_dir()}  # fmt: skip


def _fold_key(f: int | str) -> int | str:
    if isinstance(f, str) and f != "all":
        if not f.isdigit():
            raise UsageError(f"fold must be an integer or 'all', got {f!r}", argument="fold")
        return int(f)
    return f


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise UsageError(f"nnunet: {path.parent} has no {path.name}: not a complete nnU-Net results folder "
                         f"(nnUNetv2_train writes {what} there)", argument="nnunet")  # fmt: skip
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"nnunet: {path} is not valid JSON ({exc}); restore it from the training run", argument="nnunet") from exc
    if not isinstance(value, dict):
        raise UsageError(f"nnunet: {path} must hold a JSON object", argument="nnunet")
    return value


def _trainer_class(name: str) -> type:
    """The trainer class ``name``: nnU-Net's own search, else the same search over nnU-Net's trainer
    modules that skips the ones that cannot be imported (those needing timm, not installed with a CPU
    torch), then ``nnUNet_extTrainer``."""
    import importlib
    import pkgutil

    import nnunetv2.training.nnUNetTrainer as pkg

    try:
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

        found = recursive_find_trainer_class_by_name(name)
        if found is not None:
            return found
    except ImportError:
        pass
    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".", onerror=lambda _: None):
        try:
            module = importlib.import_module(info.name)
        except ImportError:
            continue
        if isinstance(getattr(module, name, None), type):
            return getattr(module, name)
    raise UsageError(
        f"nnunet: the checkpoint's trainer class {name!r} is neither in nnunetv2 nor importable; if it is your own "
        "trainer, set nnUNet_extTrainer to the folder of its .py file", argument="nnunet",
    )  # fmt: skip


def load_nnunet(
    folder: str | Path,
    folds: Sequence[int | str] | int | str | None = None,
    checkpoint: str = "checkpoint_final.pth",
    *,
    device: str | torch.device = "cpu",
    mirroring: bool = True,
    tile_step_size: float = 0.5,
    trust_pickle: bool = False,
) -> NnUNetModel:
    """Load an nnU-Net v2 results folder with nnU-Net's own predictor.

    Does what ``nnUNetPredictor.initialize_from_trained_model_folder`` does (checkpoints read on the
    CPU, the network built by the checkpoint's trainer class from the plans without deep
    supervision, every fold's weights, the mirroring axes the training allowed), after checking
    every file so that a wrong folder, fold or checkpoint is a usage error that says what to fix; the
    trainer class is found also when nnU-Net's search trips over a trainer module needing timm.

    Args:
        folder: the ``<Trainer>__<Plans>__<configuration>`` folder.
        folds: fold numbers (or ``"all"``); None: every ``fold_<n>`` holding ``checkpoint``, as nnU-Net does.
        checkpoint: the checkpoint file in each fold folder.
        device: where the network runs.
        mirroring: test-time mirroring along the axes the checkpoint allows (nnU-Net's default).
        tile_step_size: nnU-Net's sliding-window step, as a fraction of the patch size.
        trust_pickle: unpickle checkpoints that hold more than tensors, NumPy scalars and plain
            Python values (nnU-Net's own loader always unpickles; only for folders you trust).

    Raises:
        UsageError: nnunetv2 missing; no such folder; not a results folder (name, ``plans.json``,
            ``dataset.json``); a fold or checkpoint not there (the present ones listed); checkpoints
            of another configuration or trainer than the folder's; a region-based or 2D model.
    """
    _require_nnunet()
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from segability.io.models import _torch_load

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UsageError(f"nnunet: no such folder: {root}", argument="nnunet")
    trainer, plans_name, configuration = _folder_parts(root)
    dataset_json = _read_json(root / "dataset.json", "dataset.json")
    plans = _read_json(root / "plans.json", "plans.json")
    for key in ("labels", "file_ending"):
        if key not in dataset_json:
            raise UsageError(f"nnunet: {root / 'dataset.json'} has no {key!r}: not an nnU-Net v2 dataset.json", argument="nnunet")
    if configuration not in plans.get("configurations", {}):
        raise UsageError(f"nnunet: plans.json of {root} has no configuration {configuration!r} (it has "
                         f"{sorted(plans.get('configurations', {}))})", argument="nnunet")  # fmt: skip
    present = _present_folds(root, checkpoint)
    if folds is None:
        chosen: list[int | str] = [_fold_key(f) for f, files in present.items() if checkpoint in files and f != "all"]
        chosen.sort(key=lambda f: (isinstance(f, str), f if isinstance(f, int) else 0))
        if not chosen:
            have = {f: files for f, files in present.items()} or "no fold_* folders"
            raise UsageError(f"checkpoint: no fold of {root} holds {checkpoint} (present: {have}); "
                             "give --checkpoint with one of the files present", argument="checkpoint")  # fmt: skip
    else:
        chosen = [_fold_key(f) for f in ([folds] if isinstance(folds, (int, str)) else list(folds))]
        if not chosen:
            raise UsageError("fold: give at least one fold", argument="fold")
    checkpoints = []
    for f in chosen:
        if str(f) not in present:
            raise UsageError(f"fold: {root} has no fold_{f} (folds present: {sorted(present) or 'none'})", argument="fold")
        path = root / f"fold_{f}" / checkpoint
        if not path.is_file():
            raise UsageError(f"checkpoint: {path} does not exist (checkpoints in fold_{f}: {present[str(f)] or 'none'})",
                             argument="checkpoint")  # fmt: skip
        ckpt = _torch_load(path, "checkpoint", trust_pickle)  # tensors and NumPy scalars only, unless trusted
        if not isinstance(ckpt, dict) or not {"network_weights", "init_args", "trainer_name"} <= set(ckpt):
            raise UsageError(f"checkpoint: {path} is not an nnU-Net v2 checkpoint (it needs network_weights, init_args, "
                             "trainer_name)", argument="checkpoint")  # fmt: skip
        ckpt_config = ckpt["init_args"].get("configuration")
        if ckpt_config != configuration or ckpt["trainer_name"] != trainer:
            raise UsageError(
                f"checkpoint: {path} was trained as {ckpt['trainer_name']} / {ckpt_config}, but the folder is "
                f"{trainer} / {configuration}; put each checkpoint in the results folder of its own trainer and "
                "configuration", argument="checkpoint",
            )  # fmt: skip
        checkpoints.append(ckpt)

    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(configuration)
    label_manager = plans_manager.get_label_manager(dataset_json)
    if label_manager.has_regions:
        raise UsageError("nnunet: region-based nnU-Net models (dataset.json 'regions_class_order') are not supported yet",
                         argument="nnunet")  # fmt: skip
    if configuration_manager.previous_stage_name is not None:
        raise UsageError(f"nnunet: {configuration} is a cascade stage (it takes the segmentation of "
                         f"{configuration_manager.previous_stage_name}); analyse a 3d_fullres or 3d_lowres folder",
                         argument="nnunet")  # fmt: skip
    if len(configuration_manager.patch_size) != 3:
        raise UsageError(f"nnunet: the {configuration} configuration is 2D (slice by slice); analyse a 3D configuration "
                         "(3d_fullres, 3d_lowres)", argument="nnunet")  # fmt: skip
    trainer_class = _trainer_class(trainer)
    n_in = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    network = trainer_class.build_network_architecture(
        plans_manager, configuration_manager, n_in, label_manager.num_segmentation_heads, enable_deep_supervision=False,
    )  # fmt: skip
    _no_deep_supervision(network)
    params = [c["network_weights"] for c in checkpoints]
    network.load_state_dict(params[0])
    dev = torch.device(device)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints that the CPU cannot keep everything on the device
        predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=mirroring,
                                    perform_everything_on_device=dev.type == "cuda", device=dev, verbose=False,
                                    verbose_preprocessing=False, allow_tqdm=False)  # fmt: skip
    predictor.manual_initialization(network, plans_manager, configuration_manager, params, dataset_json, trainer,
                                    checkpoints[0].get("inference_allowed_mirroring_axes"))  # fmt: skip
    network.to(dev).eval()
    return NnUNetModel(root, predictor, tuple(chosen), checkpoint, trainer, plans_name, configuration)


def _no_deep_supervision(network: nn.Module) -> None:
    """Deep supervision off (the network returns one output, not one per decoder stage), as nnU-Net's predictor has it."""
    decoder = getattr(network, "decoder", None)
    if decoder is not None and hasattr(decoder, "deep_supervision"):
        decoder.deep_supervision = False


def find_cases(
    images: str | Path, labels: str | Path | None, channels: Sequence[str], file_ending: str
) -> list[NnUNetCase]:
    """Pair the files of an nnU-Net raw folder: ``CASE_0000<ending>``, ... one per channel; labels ``CASE<ending>``.

    Args:
        images: folder of images (``imagesTs``) or one channel-0 file.
        labels: folder of labels (``labelsTs``) or None; cases without a label file are analysed without one.
        channels: the channels' names (their number fixes the files per case).
        file_ending: ``dataset.json`` ``file_ending`` (``.nii.gz``).

    Raises:
        UsageError: no such folder; no ``*_0000<ending>`` file; a case missing a channel file (named).

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> for n in ("a_0000.nii.gz", "a_0001.nii.gz"): _ = (d / n).write_bytes(b"")
        >>> [c.case for c in find_cases(d, None, ["T1", "T2"], ".nii.gz")]
        ['a']
    """
    src = Path(images).expanduser()
    ending = file_ending
    pattern = re.compile(rf"^(?P<case>.+)_(?P<ch>\d{{4}}){re.escape(ending)}$")
    if src.is_file():
        m = pattern.match(src.name)
        if m is None or int(m["ch"]) != 0:
            raise UsageError(f"images: {src.name} is not named as nnU-Net's channel 0 (CASE_0000{ending})", argument="images")
        folder, only = src.parent, m["case"]
    elif src.is_dir():
        folder, only = src, None
    else:
        raise UsageError(f"images: no such file or folder: {src}", argument="images")
    found: dict[str, set[int]] = {}
    for f in folder.iterdir():
        m = pattern.match(f.name)
        if m is not None and f.is_file() and (only is None or m["case"] == only):
            found.setdefault(m["case"], set()).add(int(m["ch"]))
    if not found:
        raise UsageError(f"images: no nnU-Net image file (CASE_0000{ending}) in {folder}", argument="images")
    lab = None if labels is None else Path(labels).expanduser()
    if lab is not None and not lab.is_dir():
        raise UsageError(f"labels: no such folder: {lab}", argument="labels")
    cases = []
    for case in sorted(found):
        missing = [f"{case}_{c:04d}{ending}" for c in range(len(channels)) if c not in found[case]]
        if missing:
            raise UsageError(
                f"images: case {case} lacks {', '.join(missing)} in {folder} (dataset.json has {len(channels)} channels: "
                f"{', '.join(channels)}; channel k is CASE_{{k:04d}}{ending})", argument="images",
            )  # fmt: skip
        files = tuple(folder / f"{case}_{c:04d}{ending}" for c in range(len(channels)))
        label = None if lab is None else lab / f"{case}{ending}"
        cases.append(NnUNetCase(case, files, label if label is not None and label.is_file() else None))
    return cases


def case_of_file(model: NnUNetModel, file: str | Path, label: str | Path | None = None) -> NnUNetCase:
    """The case whose channel-0 file is ``file`` (``CASE_0000<ending>``), with its other channel files.

    Raises:
        UsageError: a file not named as nnU-Net's channel 0, or a missing channel file.
    """
    path = Path(file)
    suffix = f"_0000{model.file_ending}"
    if not path.name.endswith(suffix):
        raise UsageError(f"images: {path.name} is not named as nnU-Net's channel 0 (CASE{suffix})", argument="images")
    case = path.name[: -len(suffix)]
    found = find_cases(path, None, model.channels, model.file_ending)
    return NnUNetCase(case, found[0].images, None if label is None else Path(label))


class NnUNetInference(nn.Module):
    """nnU-Net's prediction as a module: preprocessed images (B, C, *S) -> logits (B, K, *S), each
    through :meth:`NnUNetModel.predict_logits` (Gaussian sliding window, mirroring, folds). For the
    label-free baselines (entropy, confidence, flips) that call a model on an image.

    The network is a sub-module, so ``modules()`` sees its layers (nnU-Net's have no dropout).
    """

    def __init__(self, model: NnUNetModel):
        super().__init__()
        self.network = model.network
        self._model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self._model.predict_logits(xi.float().cpu()) for xi in x]).to(x.device)


def default_layers(network: nn.Module) -> list[str]:
    """Every encoder and decoder stage output (``encoder.stages.<i>``, ``decoder.stages.<i>``), in order:
    the stages of :func:`segability.capture.default_layers` (the one rule for ``layers="auto"``)."""
    from segability.capture import default_layers as auto

    names = [n for n in auto(network) if _STAGE.match(n)]
    if not names:
        raise UsageError("layers: the network has no encoder.stages.* / decoder.stages.* modules; choose layers by "
                         "name (segability layers --nnunet ...)", argument="layers")  # fmt: skip
    return names


def analyze_case(
    model: NnUNetModel,
    case: NnUNetCase,
    *,
    layers: Sequence[str] | str | None = None,
    classes: Sequence[int] | None = None,
    target: int | None = None,
    guide: str = "prediction",
    units: bool = False,
    keep_maps: bool = False,
    empty: str = "one",
    memory_budget: int = 512 * 2**20,
) -> tuple[Any, Preprocessed, torch.Tensor]:
    """SA of the network's layers on one case, on nnU-Net's grid and over nnU-Net's own tiles.

    The case goes through nnU-Net's preprocessing; the guide is the softmax of nnU-Net's prediction
    (Gaussian sliding window, mirroring, the mean logits of every loaded fold); every tile of nnU-Net's
    sliding window is scored (:class:`segability.analysis.windows.WindowRun` with these logits and
    tiles), one pass for every class. With several folds each fold's network is scored against the
    ensemble guide and its rows are named ``fold_<f>/<layer>`` (the ``input`` row once); with one
    fold the layer names are the network's own.

    Args:
        model: from :func:`load_nnunet`.
        case: from :func:`find_cases`.
        layers: layer names or patterns; None: :func:`default_layers` (every encoder and decoder stage).
        classes: label values to score; None: every foreground label of ``dataset.json``. The
            tables get ``class`` and ``class_name`` columns.
        target: score this one label value instead, with the tables of a binary task (no class
            columns; what the quality gate reads).
        guide, units, keep_maps, empty, memory_budget: as in :func:`segability.analyze`.

    Returns:
        ``(result, preprocessed, logits)``: the :class:`segability.SAResult` of the case (image id
        the case name), the preprocessed case and nnU-Net's logits (K, *S) on its grid.
    """
    from segability.analysis.config import AnalysisConfig, Capture, Readout, Scoring, Windows
    from segability.analysis.windows import WindowRun

    pre = model.preprocess(case)
    logits = model.predict_logits(pre.data)
    names = default_layers(model.network) if layers is None or layers == "auto" else layers
    known = model.classes
    if target is not None and classes is not None:
        raise UsageError("give target (one class) or classes (several), not both", argument="classes")
    chosen = tuple(known) if classes is None and target is None else tuple(int(c) for c in classes or [target])
    bad = [c for c in chosen if c not in known]
    if bad:
        raise UsageError(f"{'target' if target is not None else 'classes'}: {bad} are not foreground labels of "
                         f"dataset.json (labels: {known})", argument="target" if target is not None else "classes")  # fmt: skip
    readout = (Readout(output="softmax", target=int(target)) if target is not None else
               Readout(output="softmax", classes=chosen, class_names={c: known[c] for c in chosen}))  # fmt: skip
    config = AnalysisConfig(
        readout=readout,
        scoring=Scoring(guide=guide, units=units, empty=empty, keep_maps=int(keep_maps)),  # type: ignore[arg-type]
        capture=Capture(layers=names, memory_budget=memory_budget),
        windows=Windows(roi_size=model.patch_size, overlap=min(max(1.0 - model.predictor.tile_step_size, 0.0), 0.99)),
    )  # fmt: skip
    tiles = model.tiles(tuple(pre.data.shape[1:]))
    results = []
    for i, fold in enumerate(model.folds):
        net = model.load_fold(i)
        res = WindowRun(net, config, device=model.predictor.device).run(
            pre.data, pre.label, case.case, logits=logits.unsqueeze(0), tiles=tiles
        )
        results.append((fold, res))
    result = results[0][1] if len(results) == 1 else _merge_folds(results)
    result.settings.update(_nnunet_settings(model), layers=list(result.layers["layer"].drop_duplicates()))
    return result, pre, logits


def _merge_folds(results: list[tuple[int | str, Any]]) -> Any:
    """One case's results of several folds as one: layer rows prefixed ``fold_<f>/``, ``input`` once."""
    from segability.analysis.results import (
        IMAGES,
        INPUT,
        LAYERS,
        UNITS,
        SAResult,
        layer_means,
        typed,
    )

    frames, unit_frames, maps = [], [], {}
    for i, (fold, res) in enumerate(results):
        lay = res.layers.copy()
        hidden = lay["layer"] != INPUT
        if i > 0:
            lay = lay[hidden]
            hidden = lay["layer"] != INPUT
        lay.loc[hidden, "layer"] = f"fold_{fold}/" + lay.loc[hidden, "layer"].astype(str)
        frames.append(lay)
        if res.units is not None:
            u = res.units.copy()
            u["layer"] = f"fold_{fold}/" + u["layer"].astype(str)
            unit_frames.append(u)
        for image, entry in res.maps.items():
            merged = maps.setdefault(image, {**entry, "layers": {}, "classes": {}})
            for part, into in [(entry, merged), *((p, merged["classes"].setdefault(c, {**p, "layers": {}}))
                                                 for c, p in (entry.get("classes") or {}).items())]:  # fmt: skip
                for name, m in (part.get("layers") or {}).items():
                    into["layers"][name if name == INPUT else f"fold_{fold}/{name}"] = m
            if not merged["classes"]:
                merged.pop("classes")
    layers = typed(pd.concat(frames, ignore_index=True), LAYERS)
    first = results[0][1]
    keys = [k for k in ("image", "class") if k in first.images.columns]
    images = first.images.drop(columns=["mean_sa", "mean_sa_pred", "input_sa", "input_sa_pred"], errors="ignore")
    images = images.join(layer_means(layers), on=keys)
    units = typed(pd.concat(unit_frames, ignore_index=True), UNITS) if unit_frames else None
    return SAResult(layers=layers, images=typed(images, IMAGES), units=units, maps=maps, settings=dict(first.settings))


def _nnunet_settings(model: NnUNetModel) -> dict[str, Any]:
    p = model.predictor
    return {
        "model": f"nnU-Net {model.trainer}__{model.plans_name}__{model.configuration}",
        "nnunet": {"folder": str(model.folder), "folds": [f if isinstance(f, str) else int(f) for f in model.folds],
                   "checkpoint": model.checkpoint, "trainer": model.trainer, "plans": model.plans_name,
                   "configuration": model.configuration, "patch_size": list(model.patch_size),
                   "tile_step_size": float(p.tile_step_size), "mirroring": bool(p.use_mirroring),
                   "mirror_axes": None if p.allowed_mirroring_axes is None else list(p.allowed_mirroring_axes)},
    }  # fmt: skip


def analyze_nnunet(
    folder: str | Path | NnUNetModel,
    images: str | Path,
    labels: str | Path | None = None,
    *,
    out: str | Path,
    folds: Sequence[int | str] | None = None,
    checkpoint: str = "checkpoint_final.pth",
    device: str | None = None,
    layers: Sequence[str] | str | None = None,
    classes: Sequence[int] | None = None,
    target: int | None = None,
    guide: str = "prediction",
    units: bool = False,
    keep_maps: int = 0,
    export_maps: bool = False,
    force: bool = False,
    mirroring: bool = True,
    progress: Callable[..., None] | None = None,
) -> tuple[Any, pd.DataFrame]:
    """Analyse every case of an nnU-Net raw folder with a results folder; write the result folder ``out``.

    Cases are found by nnU-Net's naming (:func:`find_cases`) and analysed by :func:`analyze_case`.
    ``out`` gets the usual tables (``layers.parquet`` with ``class`` / ``class_name`` columns,
    ``images.parquet`` with ``file`` and ``label_file``, ``settings.json`` with an ``nnunet`` entry,
    ``maps.npz`` for the first ``keep_maps`` cases), ``errors.csv`` for cases that failed, and
    ``predictions/<case><ending>``: nnU-Net's segmentation exported to each input's geometry.

    Args:
        folder: the results folder (or a model :func:`load_nnunet` loaded; then ``folds``,
            ``checkpoint``, ``device`` and ``mirroring`` are its own).
        images, labels: nnU-Net raw folders (``imagesTs``, ``labelsTs``); see :func:`find_cases`.
        out: the result folder.
        folds, checkpoint, device, mirroring: see :func:`load_nnunet`.
        layers, classes, target, guide, units: see :func:`analyze_case`.
        keep_maps: keep the maps of the first ``keep_maps`` cases (``maps.npz``).
        export_maps: also write the kept maps as NIfTI files in each input's geometry
            (``out/maps/<case>/``, :func:`segability.io.export.export_maps` with :meth:`NnUNetModel.geometry`).
        force: replace earlier results in ``out``.
        progress: called with ``(1, failed=0 or 1)`` after each case.

    Returns:
        ``(result, errors)``: the :class:`segability.SAResult` written and the failures (``results.ERRORS``).

    Raises:
        UsageError: see :func:`load_nnunet` and :func:`find_cases`; ``guide="label"`` without labels.
        FileExistsError: ``out`` holds results and ``force`` is False.
    """
    import datetime as _dt
    import traceback

    from segability import __version__
    from segability.analysis.results import (
        ERRORS,
        IMAGES,
        LAYERS,
        RESULT_FILES,
        UNITS,
        SAResult,
        empty_table,
        typed,
        write_table,
    )  # fmt: skip

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(folder, NnUNetModel):
        model = folder
    else:
        model = load_nnunet(folder, folds, checkpoint, device=device, mirroring=mirroring)
    cases = find_cases(images, labels, model.channels, model.file_ending)
    if guide == "label" and not any(c.label is not None for c in cases):
        raise UsageError('guide "label" needs labels: give the labels folder (labelsTs)', argument="labels")
    folder_out = Path(out)
    existing = [f for f in (*RESULT_FILES, "errors.csv") if (folder_out / f).exists()]
    if existing and not force:
        raise FileExistsError(f"{folder_out} already holds results ({', '.join(existing)}); use --force to replace them")
    predictions = folder_out / "predictions"
    predictions.mkdir(parents=True, exist_ok=True)
    done, errors, settings, geometry, files = [], [], {}, {}, {}
    for k, case in enumerate(cases):
        try:
            res, pre, logits = analyze_case(model, case, layers=layers, classes=classes, target=target, guide=guide,
                                            units=units, keep_maps=k < keep_maps)  # fmt: skip
            seg = model.segmentation(logits, pre.properties)
            model.write_segmentation(seg, pre.properties, predictions / f"{case.case}{model.file_ending}")
            if export_maps and k < keep_maps:
                geometry[case.case], files[case.case] = model.geometry(case, pre.properties), str(case.images[0])
            res.images["file"] = str(case.images[0])
            res.images["label_file"] = None if case.label is None else str(case.label)
            done.append(res)
            settings = res.settings
        except UsageError:
            raise
        except Exception as exc:  # one case failing does not stop the others
            errors.append({"file": str(case.images[0]), "stage": "analysis", "error": f"{type(exc).__name__}: {exc}",
                           "traceback": traceback.format_exc()})  # fmt: skip
        if progress is not None:
            progress(1, failed=int(len(errors) > 0 and errors[-1]["file"] == str(case.images[0])))
    maps = {}
    for r in done:
        maps.update(r.maps)
    units_frames = [r.units for r in done if r.units is not None]
    result = SAResult(
        layers=typed(pd.concat([r.layers for r in done], ignore_index=True), LAYERS) if done else empty_table(LAYERS),
        images=typed(pd.concat([r.images for r in done], ignore_index=True), IMAGES) if done else empty_table(IMAGES),
        units=(typed(pd.concat(units_frames, ignore_index=True), UNITS) if units_frames else empty_table(UNITS)) if units else None,
        maps=maps,
        settings={**settings, **_nnunet_settings(model), "n_images": len(done), "device": str(device),
                  "version": __version__, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  "data": str(images)},
    )  # fmt: skip
    if (folder_out / "errors.csv").exists():
        (folder_out / "errors.csv").unlink()
    result.save(folder_out, overwrite=force or not existing)
    if export_maps and geometry:
        from segability.io.export import export_maps as write_maps

        write_maps(result, folder_out / "maps", geometry, overwrite=force, files=files)
    errors_df = typed(pd.DataFrame(errors), ERRORS) if errors else empty_table(ERRORS)
    if errors:
        write_table(errors_df, folder_out / "errors.csv", ERRORS)
    return result, errors_df
