"""The command-line options every file-analysing command shares, in one place.

``segability calibrate``, ``qc`` and ``evaluate-qc`` (and, later, ``analyze``) take the same flags
for the model (``--model``, ``--weights``, ``--model-arg``, ``--trust-pickle``, or ``--bundle``), the files
(``--images``, ``--labels``, ``--label-suffix``, ``--preprocess``), what to analyse (``--layers``,
``--target``, ``--output``, ``--output-key``, ``--mask``), large volumes (``--roi-size``,
``--overlap``, ``--sw-batch-size``) and where to run (``--engine``, ``--ray-address``,
``--workers``, ``--gpus-per-worker``, ``--device``). :func:`file_options` adds them to a command
and hands it one :class:`FileOptions`; :meth:`FileOptions.analyze_files_kwargs` turns that into
the arguments of :func:`segability.batch.analyze_files`. Each option's type, flag and help text are
written once, here (:data:`SHARED`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from segability.cli.console import flag
from segability.errors import UsageError, as_usage_error

__all__ = ["FileOptions", "SHARED", "ANALYSIS_FIELDS", "file_options", "split_list"]

MODEL_HELP = (
    "Model factory: path/to/file.py:factory or package.module:factory (or a whole pickled model file, "
    "with --trust-pickle)."
)


def _option(kind: Any, *decls: str, help: str) -> Any:  # noqa: A002 - typer's keyword
    return Annotated[kind, typer.Option(*decls, help=help)]


# name -> (annotation with its typer.Option, default). Order = order in --help.
SHARED: dict[str, tuple[Any, Any]] = {
    "model": (_option(str | None, "--model", help=MODEL_HELP), None),
    "bundle": (_option(Path | None, "--bundle", help="A MONAI bundle folder instead of --model/--weights: its network_def, "
                       "models/model.pt, its preprocessing (unless --preprocess) and its sliding-window roi_size (unless "
                       "--roi-size), from configs/inference.json or .yaml. Its config's $-expressions run: only bundles you trust."), None),
    "weights": (_option(Path | None, "--weights", help="State dict file (torch.save(model.state_dict())), read with "
                        "weights_only=True; a checkpoint with a 'state_dict' or 'model' entry works too."), None),
    "model_arg": (_option(list[str] | None, "--model-arg", help="key=value keyword argument of the factory (repeatable); "
                          "values are read as JSON/Python literals."), None),
    "trust_pickle": (_option(bool, "--trust-pickle", help="Allow unpickling whole models. Unpickling can execute "
                             "arbitrary code: only for files you trust."), False),
    "images": (_option(str | None, "--images", help="Folder of images, glob pattern ('scans/**/*.nii.gz') or one file. "
                       "DICOM series: one sub-folder each."), None),
    "labels": (_option(str | None, "--labels", help="Folder (or glob) of labels, paired with images by file name stem."), None),
    "label_suffix": (_option(str, "--label-suffix", help="Text after the image stem in label names, e.g. '_seg'."), ""),
    "layers": (_option(list[str] | None, "--layers", help="Layer names or glob patterns (repeatable or comma-separated); "
                       "default each stage of the network (nnU-Net stages, ViT blocks, Swin stages; every convolution of a plain conv net). See `segability layers`."), None),
    "preprocess": (_option(str | None, "--preprocess", help="Preprocessing: a JSON/YAML config (orientation, spacing, "
                           "intensity, size) or file.py:fn."), None),
    "target": (_option(int | None, "--target", help="Target class of a K-channel output or a multi-class label (default 1)."), None),
    "classes": (_option(list[str] | None, "--classes", help="Score several classes in one pass (repeatable or "
                        "comma-separated class indices, or 'all': every foreground class); tables get class and "
                        "class_name columns. Default: the one --target (nnU-Net: every foreground label)."), None),
    "class_names": (_option(list[str] | None, "--class-names", help="Class names, index=name (repeatable or "
                            "comma-separated), e.g. 1=liver,2=tumour (nnU-Net: from dataset.json)."), None),
    "output": (_option(str, "--output", help="How to read the model output: auto, sigmoid, softmax or probabilities."), "auto"),
    "output_key": (_option(str | None, "--output-key", help="Key of the output when the model returns a dict."), None),
    "mask": (_option(str | None, "--mask", help="'nonzero': only pixels where the image is non-zero shape the prototypes."), None),
    "roi_size": (_option(str | None, "--roi-size", help="Sliding-window size for large volumes, e.g. 96,96,96 "
                         "(scores accumulated over windows)."), None),
    "overlap": (_option(float, "--overlap", help="Sliding-window overlap in [0, 1)."), 0.25),
    "sw_batch_size": (_option(int, "--sw-batch-size", help="Windows per forward pass."), 1),
    "memory_budget": (_option(int, "--memory-budget", help="MiB of layer outputs kept between the steps (per batch; "
                              "with --roi-size, over a volume's windows): beyond it a batch or window runs again. "
                              "Changes speed and memory, not the numbers."), 512),
    "engine": (_option(str, "--engine", help="local (this process) or ray (Ray Data actors; pip install 'segability[ray]')."), "local"),
    "ray_address": (_option(str | None, "--ray-address", help="Address of an existing Ray cluster (default: a local Ray "
                            "for this run)."), None),
    "workers": (_option(int | None, "--workers", help="Ray actors (default: every CPU, or every GPU / --gpus-per-worker)."), None),
    "gpus_per_worker": (_option(float, "--gpus-per-worker", help="GPUs per Ray actor; > 0 runs the actors on CUDA."), 0.0),
    "device": (_option(str | None, "--device", help="Device (default cuda when available, else cpu)."), None),
    "nnunet": (_option(Path | None, "--nnunet", help="nnU-Net v2 results folder (<Trainer>__<Plans>__<configuration>) instead "
                       "of --model: nnU-Net's own preprocessing, sliding window and folds; --images is an nnU-Net raw "
                       "folder (CASE_0000.nii.gz, ...). Needs nnunetv2 (see README)."), None),
    "fold": (_option(list[str] | None, "--fold", help="nnU-Net folds (repeatable; 'all' is the fold_all model); default "
                     "every fold holding --checkpoint, as nnU-Net does."), None),
    "checkpoint": (_option(str, "--checkpoint", help="nnU-Net checkpoint file in each fold folder."), "checkpoint_final.pth"),
}  # fmt: skip

# What the analysis computes (as opposed to how and where it runs): fixed by a finished run.
ANALYSIS_FIELDS = ("images", "labels", "label_suffix", "layers", "preprocess", "target", "classes", "class_names", "output",
                   "output_key", "mask", "roi_size", "overlap", "nnunet", "fold", "checkpoint")  # fmt: skip


@dataclass(frozen=True)
class FileOptions:
    """The shared options of one command call, as given (strings, as typed on the command line)."""

    model: str | None = None
    bundle: Path | None = None
    weights: Path | None = None
    model_arg: list[str] | None = None
    trust_pickle: bool = False
    images: str | None = None
    labels: str | None = None
    label_suffix: str = ""
    layers: list[str] | None = None
    preprocess: str | None = None
    target: int | None = None
    classes: list[str] | None = None
    class_names: list[str] | None = None
    output: str = "auto"
    output_key: str | None = None
    mask: str | None = None
    roi_size: str | None = None
    overlap: float = 0.25
    sw_batch_size: int = 1
    memory_budget: int = 512
    engine: str = "local"
    ray_address: str | None = None
    workers: int | None = None
    gpus_per_worker: float = 0.0
    device: str | None = None
    nnunet: Path | None = None
    fold: list[str] | None = None
    checkpoint: str = "checkpoint_final.pth"

    def given(self, names: tuple[str, ...] = ANALYSIS_FIELDS) -> list[str]:
        """The flags among ``names`` whose value differs from the default."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return [flag(n) for n in names if getattr(self, n) not in (defaults[n], [])]

    def class_list(self) -> tuple[int, ...] | str | None:
        """``--classes`` as class indices, ``"all"`` or None.

        Raises:
            UsageError: an item that is not an integer (argument ``classes``).
        """
        items = split_list(self.classes)
        if not items:
            return None
        if items == ["all"]:
            return "all"
        try:
            return tuple(int(v) for v in items)
        except ValueError:
            raise UsageError(f"classes must be 'all' or class indices like 1,2, got {','.join(items)!r}", argument="classes") from None

    def class_name_map(self) -> dict[int, str] | None:
        """``--class-names`` as ``{index: name}`` or None.

        Raises:
            UsageError: an item that is not ``index=name`` (argument ``class_names``).
        """
        items = split_list(self.class_names)
        if not items:
            return None
        names: dict[int, str] = {}
        for item in items:
            index, sep, name = item.partition("=")
            if not sep or not index.strip().isdigit() or not name.strip():
                raise UsageError(f"class_names items must be index=name like 1=liver, got {item!r}", argument="class_names")
            names[int(index)] = name.strip()
        return names

    def layer_list(self) -> list[str] | str:
        """``--layers`` as a list of names / patterns, or ``"auto"``."""
        return split_list(self.layers) or "auto"

    def model_args(self) -> dict[str, Any]:
        """``--model-arg`` parsed.

        Raises:
            UsageError: a malformed item (argument ``model_args``).
        """
        from segability.io import parse_model_args

        with as_usage_error("model_args"):
            return parse_model_args(self.model_arg, argument="model_args")

    def with_bundle(self) -> FileOptions:
        """With ``--bundle``: the model, its arguments and weights from the MONAI bundle, checked now
        (network built, weights loaded) so a bad bundle is a usage error before any work starts.

        Raises:
            UsageError: ``--model``, ``--weights`` or ``--model-arg`` given too, or a bad bundle
                (argument ``bundle``).
        """
        if self.bundle is None:
            return self
        from segability.io.bundle import BUNDLE_FACTORY, load_bundle

        clash = [flag(n) for n in ("model", "weights", "model_arg", "nnunet") if getattr(self, n)]
        if clash:
            raise UsageError(f"bundle brings the network and its weights: leave out {', '.join(clash)}", argument="bundle")
        _, info = load_bundle(self.bundle)
        return dataclasses.replace(self, model=BUNDLE_FACTORY, weights=info.weights,
                                   model_arg=[f"{k}={v!r}" for k, v in info.model_args().items()])  # fmt: skip

    def bundle_defaults(self) -> dict[str, Any]:
        """What ``--bundle`` gives where ``--preprocess`` / ``--roi-size`` are not given."""
        if self.bundle is None:
            return {}
        from segability.io.bundle import read_bundle

        info = read_bundle(self.bundle)
        return {"preprocess": str(info.folder) if info.has_preprocessing else None, "roi_size": info.roi_size}

    def roi(self) -> tuple[int, ...] | None:
        """``--roi-size`` parsed.

        Raises:
            UsageError: not 1-3 integers (argument ``roi_size``).
        """
        from segability.io import parse_shape

        if self.roi_size is None:
            return None
        with as_usage_error("roi_size"):
            return parse_shape(self.roi_size, argument="roi_size")

    def analyze_files_kwargs(self) -> dict[str, Any]:
        """The arguments of :func:`segability.batch.analyze_files` (``model``, ``images``, ``labels``
        and the keyword arguments) these options give.

        Raises:
            UsageError: a malformed ``model_args`` or ``roi_size``.
        """
        bundle = self.bundle_defaults()
        return {
            "model": self.model, "images": self.images, "labels": self.labels, "weights": self.weights,
            "model_args": self.model_args(), "trust_pickle": self.trust_pickle, "layers": self.layer_list(),
            "output": self.output, "target": self.target, "mask": self.mask, "output_key": self.output_key,
            "classes": self.class_list(), "class_names": self.class_name_map(),
            "preprocess": self.preprocess or bundle.get("preprocess"), "label_suffix": self.label_suffix,
            "roi_size": self.roi() or bundle.get("roi_size"),
            "overlap": self.overlap, "sw_batch_size": self.sw_batch_size, "memory_budget": self.memory_budget * 2**20,
            "engine": self.engine,
            "ray_address": self.ray_address, "workers": self.workers, "gpus_per_worker": self.gpus_per_worker,
            "device": self.device,
        }  # fmt: skip


def nnunet_kwargs(files: FileOptions) -> dict[str, Any]:
    """The arguments of :func:`segability.integrations.nnunet.analyze_nnunet` (``folder``, ``images``,
    ``labels``, ``folds``, ``checkpoint``, ``device``, ``layers``, ``target``) that ``--nnunet`` options give.

    Raises:
        UsageError: ``--model`` with ``--nnunet``, no ``--images``, or a flag that nnU-Net's own
            pipeline replaces (preprocessing, windows, output reading, Ray).
    """
    if files.model is not None:
        raise UsageError("give --model or --nnunet, not both", argument="nnunet")
    if files.images is None:
        raise UsageError("images is required: give the nnU-Net raw folder of the cases (imagesTs)", argument="images")
    replaced = files.given(("weights", "model_arg", "trust_pickle", "label_suffix", "preprocess", "output", "output_key",
                            "mask", "roi_size", "overlap", "sw_batch_size", "memory_budget", "engine", "ray_address", "workers",
                            "gpus_per_worker"))  # fmt: skip
    if replaced:
        raise UsageError(f"--nnunet runs nnU-Net's own preprocessing, sliding window and output in this process: "
                         f"leave out {', '.join(replaced)}", argument="nnunet")  # fmt: skip
    return {"folder": files.nnunet, "images": files.images, "labels": files.labels, "folds": split_list(files.fold) or None,
            "checkpoint": files.checkpoint, "device": files.device, "layers": split_list(files.layers) or None,
            "target": files.target, "classes": None if files.class_list() == "all" else files.class_list()}  # fmt: skip


def split_list(values: list[str] | None) -> list[str]:
    """Repeatable, comma-separated values as one list: ``["a,b", "c"]`` -> ``["a", "b", "c"]``.

    Example:
        >>> split_list(["enc.*, dec.1", "head"])
        ['enc.*', 'dec.1', 'head']
    """
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]




def file_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give a typer command every :data:`SHARED` option; it receives them as ``files: FileOptions``.

    The command's own parameters come first in ``--help``, then the shared ones.

    Example:
        >>> app = typer.Typer()
        >>> @app.command()
        ... @file_options
        ... def run(files: FileOptions, out: Path = typer.Option(..., "--out")) -> None:
        ...     print(files.model, out)
    """
    signature = inspect.signature(command, eval_str=True)
    own = [p for p in signature.parameters.values() if p.name != "files"]
    clash = [p.name for p in own if p.name in SHARED]
    if clash:
        raise TypeError(f"{command.__name__} defines shared options itself: {clash}")
    shared = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
        for name, (annotation, default) in SHARED.items()
    ]
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        files = FileOptions(**{name: kwargs.pop(name) for name in SHARED}).with_bundle()
        return command(files=files, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=[*own, *shared])  # type: ignore[attr-defined]
    return wrapper
