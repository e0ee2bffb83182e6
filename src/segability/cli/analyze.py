"""``segability analyze`` (folders of image files, resumable, local or Ray) and ``segability layers``.

Thin shells over :func:`segability.batch.analyze_files` and :func:`segability.list_layers`. Exit
codes: 0 every image analysed, 1 some image failed (listed in ``errors.csv``), 2 a usage error
(bad arguments, files or model; existing results without ``--resume`` / ``--force``).
"""

from __future__ import annotations

import errno
import traceback
from pathlib import Path
from typing import Any, NoReturn

import typer

from segability.cli.app import app
from segability.cli.console import EXIT_FAILED, exit_with, fail, literal, usage_message
from segability.cli.options import FileOptions, file_options
from segability.errors import UsageError, as_usage_error

# The stage of a failed image (errors.csv), in words.
EXPORT_CASES = 20  # images whose maps --export-maps keeps when --keep-maps is not given
STAGES = {"read": "reading failed", "model": "the model failed", "analysis": "analysis failed",
          "not_run": "not analysed"}  # fmt: skip





@app.command("analyze")
@file_options
def analyze_command(
    files: FileOptions,
    out: Path = typer.Option(..., "--out", help="Run folder (results are never overwritten without --force)."),
    units: bool = typer.Option(False, "--units", help="Also score every unit (channel) of every layer."),
    guide: str = typer.Option("prediction", "--guide", help="Prototypes from the network's 'prediction' (label-free) or the 'label'."),
    keep_maps: int = typer.Option(0, "--keep-maps", help="Keep the feature segmentation maps of the first N images (for the report)."),
    export_maps: str = typer.Option("none", "--export-maps", help="nifti: also write the kept maps in each input's own space, "
                                    "OUT/maps/<case>/*.nii.gz (prediction, probability, one map per layer, units/ for best units), "
                                    "resampled back from the preprocessing onto the input file's grid with its affine, to open as "
                                    f"overlays in 3D Slicer or ITK-SNAP. Keeps the first {EXPORT_CASES} images' maps unless "
                                    "--keep-maps N says how many."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run: skip images already done, retry failed ones."),
    force: bool = typer.Option(False, "--force", help="Delete the results of an earlier run in --out first."),
    no_report: bool = typer.Option(False, "--no-report", help="Skip the HTML report."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    debug: bool = typer.Option(False, "--debug", help="On an unexpected error, print its traceback."),
) -> None:
    """Analyse every image file of a folder: SA per image and layer, written per image as it finishes.

    Exit codes: 0 every image analysed; 1 some image failed (listed, and in errors.csv) or the run
    itself failed; 2 a usage error (bad arguments, files or model; results in --out without
    --resume / --force; --resume over a run with other inputs or settings).
    """
    from rich.console import Console

    err = Console(stderr=True, soft_wrap=True)
    console = Console(soft_wrap=True)
    if files.nnunet is not None:
        try:
            keep_maps = _export_keep(export_maps, keep_maps, out, resume or force, err)
        except UsageError as exc:
            fail(err, usage_message(exc))
        except FileExistsError as exc:
            fail(err, usage_message(exc, argument="out"))
        return _analyze_nnunet(files, out, err, console, units=units, guide=guide, keep_maps=keep_maps, resume=resume,
                               force=force, report=not no_report, progress=not no_progress, debug=debug,
                               export_maps=export_maps == "nifti")  # fmt: skip
    try:
        from segability.batch import analyze_files

        for name in ("model", "images"):
            if getattr(files, name) is None:
                raise UsageError(f"{name} is required: give the {name} to analyse", argument=name)
        kwargs = files.analyze_files_kwargs()
        keep_maps = _export_keep(export_maps, keep_maps, out, resume or force, err)
        summary = analyze_files(
            kwargs.pop("model"), kwargs.pop("images"), kwargs.pop("labels"), out=out, units=units, guide=guide,
            keep_maps=keep_maps, resume=resume, force=force, report=not no_report, progress=not no_progress, **kwargs,
        )  # fmt: skip
    except UsageError as exc:
        fail(err, usage_message(exc))
    except FileExistsError as exc:  # --out holds an earlier run
        fail(err, usage_message(exc, argument="out"))
    except Exception as exc:  # the run itself failed (a Ray worker died, the disk is full): not a usage error
        unexpected(err, exc, debug)
    if summary.unpaired_images:
        err.print(f"[yellow]note:[/yellow] {len(summary.unpaired_images)} image(s) without a label (analysed without one): "
                  f"{literal([Path(p).name for p in summary.unpaired_images][:10])}", highlight=False)  # fmt: skip
    if summary.unpaired_labels:
        err.print(f"[yellow]note:[/yellow] {len(summary.unpaired_labels)} label(s) without an image (ignored): "
                  f"{literal([Path(p).name for p in summary.unpaired_labels][:10])}", highlight=False)  # fmt: skip
    for row in summary.errors.head(10).itertuples(index=False):
        err.print(f"[red]failed:[/red] {literal(row.file)}: {STAGES.get(row.stage, row.stage)}: {literal(row.error)}", highlight=False)
    if summary.n_failed > 10:
        err.print(f"... and {summary.n_failed - 10} more (see {literal(summary.paths['errors'])})", highlight=False)
    resumed = f", {summary.n_resumed} from an earlier run" if summary.n_resumed else ""
    console.print(
        f"{summary.n_ok} of {summary.n_images} images analysed{resumed}, {summary.n_failed} failed, "
        f"in {summary.seconds:.1f} s. Results: {literal(summary.out)}", highlight=False,
    )  # fmt: skip
    if "report" in summary.paths:
        console.print(f"Report: {literal(summary.paths['report'])}", highlight=False)
    elif summary.report_error:
        err.print(f"[yellow]note:[/yellow] the report was not built: {literal(usage_message(summary.report_error))}", highlight=False)
    exported = _export(export_maps, out, kwargs["preprocess"], force, resume, console, err, debug)
    if summary.n_failed or not exported:
        exit_with(EXIT_FAILED)


def _export_keep(export_maps: str, keep_maps: int, out: Path, replace: bool, err: Any) -> int:
    """``--keep-maps`` as ``--export-maps`` needs it; earlier exports in ``out/maps`` need --force / --resume."""
    from segability.io.export import EXPORT_FORMATS, INDEX_FILE

    if export_maps not in EXPORT_FORMATS:
        raise UsageError(f"export_maps must be one of {', '.join(EXPORT_FORMATS)}, got {export_maps!r}", argument="export_maps")
    if export_maps == "none":
        return keep_maps
    earlier = sorted((out / "maps").glob(f"*/{INDEX_FILE}")) if (out / "maps").is_dir() else []
    if earlier and not replace:
        raise FileExistsError(f"out: {out / 'maps'} holds maps of an earlier export ({earlier[0].parent.name}, ...); pass "
                              "force=True to replace them")  # fmt: skip
    if keep_maps == 0:
        err.print(f"[yellow]note:[/yellow] --export-maps keeps the maps of the first {EXPORT_CASES} images (--keep-maps N for another number)",
                  highlight=False)  # fmt: skip
        return EXPORT_CASES
    return keep_maps


def _export(export_maps: str, out: Path, preprocess: Any, force: bool, resume: bool, console: Any, err: Any, debug: bool) -> bool:
    """Write the kept maps in each input's own space; False when some image could not be exported."""
    if export_maps == "none":
        return True
    from segability.io.export import clear_exports, export_run

    try:
        if force:
            clear_exports(out / "maps")
        done = export_run(out, preprocess=preprocess, overwrite=force or resume)
    except FileExistsError as exc:
        fail(err, usage_message(exc, argument="out"))
    except Exception as exc:  # the analysis is written; an export that fails is a failure of the run
        unexpected(err, exc, debug)
    if done.unknown_geometry:
        err.print(f"[yellow]note:[/yellow] {len(done.unknown_geometry)} image(s) come from files without a geometry (PNG, NumPy): "
                  "their maps have an identity affine", highlight=False)  # fmt: skip
    for image, why in list(done.skipped.items())[:10]:
        err.print(f"[red]not exported:[/red] {literal(image)}: {literal(why)}", highlight=False)
    console.print(f"Maps of {len(done.folders)} image(s) in their own space: {literal(out / 'maps')}", highlight=False)
    return not done.skipped


def run_nnunet(files: FileOptions, out: Path, *, progress: bool, **kwargs: Any) -> tuple[Any, Any]:
    """``segability.integrations.nnunet.analyze_nnunet`` for the ``--nnunet`` options, with a progress bar.

    Raises:
        UsageError: a bad option, folder or file (see :func:`segability.cli.options.nnunet_kwargs`).
    """
    import torch

    from segability.cli.options import nnunet_kwargs
    from segability.integrations.nnunet import analyze_nnunet, find_cases, load_nnunet
    from segability.progress import progress_bar

    args = nnunet_kwargs(files)
    device = args["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_nnunet(args["folder"], args["folds"], args["checkpoint"], device=device)
    n = len(find_cases(args["images"], args["labels"], model.channels, model.file_ending))
    for name in ("folder", "folds", "checkpoint", "device"):
        args.pop(name)
    with progress_bar(progress, n, "analysing (nnU-Net)", failures=True) as advance:
        return analyze_nnunet(model, **args, out=out, progress=advance, **kwargs)


def _analyze_nnunet(files: FileOptions, out: Path, err: Any, console: Any, *, resume: bool, report: bool, debug: bool,
                    **kwargs: Any) -> None:  # fmt: skip
    """``segability analyze --nnunet``: the run, its summary, the report; exit 1 when a case failed."""
    try:
        if resume:
            raise UsageError("--resume is not available with --nnunet (the run takes one pass); use --force", argument="resume")
        result, errors = run_nnunet(files, out, **kwargs)
    except UsageError as exc:
        fail(err, usage_message(exc))
    except FileExistsError as exc:
        fail(err, usage_message(exc, argument="out"))
    except Exception as exc:
        unexpected(err, exc, debug)
    for row in errors.head(10).itertuples(index=False):
        err.print(f"[red]failed:[/red] {literal(row.file)}: {literal(row.error)}", highlight=False)
    n_ok = int(result.images["image"].nunique()) if len(result.images) else 0
    console.print(f"{n_ok} of {n_ok + len(errors)} cases analysed, {len(errors)} failed. Results: {literal(out)}; "
                  f"nnU-Net's segmentations: {literal(out / 'predictions')}", highlight=False)  # fmt: skip
    if report and n_ok:
        from segability.batch.run import _report

        paths, report_error = _report(out, {})
        if "report" in paths:
            console.print(f"Report: {literal(paths['report'])}", highlight=False)
        elif report_error:
            err.print(f"[yellow]note:[/yellow] the report was not built: {literal(report_error)}", highlight=False)
    if len(errors):
        exit_with(EXIT_FAILED)


def unexpected(err: Any, exc: Exception, debug: bool) -> NoReturn:
    """Exit 1 on an error that is no usage error: one line, or with ``--debug`` the traceback."""
    if debug:
        err.print(literal("".join(traceback.format_exception(exc))), highlight=False)
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        message = exc.strerror or str(exc)  # results.write_atomic says which file and what to do
    else:
        message = f"{type(exc).__name__}: {usage_message(exc)}"
    hint = "" if debug else " (run with --debug for the traceback)"
    fail(err, f"{message}{hint}", code=EXIT_FAILED)


@app.command("layers")
def layers_command(
    model: str | None = typer.Option(None, "--model", help="Model factory: path/to/file.py:factory or package.module:factory."),
    nnunet: Path | None = typer.Option(None, "--nnunet", help="nnU-Net v2 results folder instead of --model: its network's layers."),
    bundle: Path | None = typer.Option(None, "--bundle", help="MONAI bundle folder instead of --model: its network_def's layers."),
    fold: list[str] | None = typer.Option(None, "--fold", help="nnU-Net fold whose weights to load (default: the first present)."),
    checkpoint: str = typer.Option("checkpoint_final.pth", "--checkpoint", help="nnU-Net checkpoint file in the fold folder."),
    weights: Path | None = typer.Option(None, "--weights", help="State dict file (read with weights_only=True)."),
    model_arg: list[str] | None = typer.Option(None, "--model-arg", help="key=value keyword argument of the factory (repeatable)."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow unpickling whole models (only for files you trust)."),
    example_shape: str | None = typer.Option(None, "--example-shape", help="Input shape, e.g. 1,1,128,128: run the model once and show each layer's output shape, in call order."),
    device: str = typer.Option("cpu", "--device", help="Device for the example forward pass."),
    debug: bool = typer.Option(False, "--debug", help="On an unexpected error, print its traceback."),
) -> None:
    """List a model's layers (names to give --layers), with output shapes for an example input."""
    from rich.console import Console
    from rich.table import Table

    err = Console(stderr=True, soft_wrap=True)
    try:
        import torch

        from segability import list_layers
        from segability.io import load_model, parse_model_args, parse_shape

        if sum(v is not None for v in (model, nnunet, bundle)) != 1:
            raise UsageError("give one of --model, --nnunet or --bundle", argument="model")
        if bundle is not None:
            from segability.io.bundle import load_bundle

            net, _ = load_bundle(bundle, device=device)
        elif nnunet is not None:
            from segability.cli.options import split_list
            from segability.integrations.nnunet import default_layers, load_nnunet

            net = load_nnunet(nnunet, (split_list(fold) or None), checkpoint, device=device).network
            if example_shape is None:  # the stages segability scores by default, first
                err.print(f"default layers (every encoder and decoder stage): {', '.join(default_layers(net))}", highlight=False)
        else:
            with as_usage_error("model_args"):
                args = parse_model_args(model_arg, argument="model_args")
            with as_usage_error("model"):
                net = load_model(model, weights, trust_pickle=trust_pickle, device=device, model_args=args)
        with as_usage_error("example_shape"):
            example = None if example_shape is None else torch.zeros(parse_shape(example_shape, argument="example_shape"), device=device)
        try:
            infos = list_layers(net, example)
        except RuntimeError as exc:
            raise UsageError(f"example_shape {example_shape}: the model cannot run on it: {exc}", argument="example_shape") from exc
    except UsageError as exc:
        fail(err, usage_message(exc))
    except Exception as exc:  # not a usage error: one line, or the traceback with --debug
        unexpected(err, exc, debug)
    table = Table(title=literal(f"{type(net).__name__}: {len(infos)} layers" + ("" if example is None else " (call order)")))
    for col in ("layer", "type", "output shape", "parameters"):
        table.add_column(col, justify="right" if col == "parameters" else "left")
    for info in infos:
        shape = "" if info.shape is None else "x".join(str(s) for s in info.shape)
        table.add_row(literal(info.name), literal(info.type), shape, f"{info.parameters:,}")
    Console(width=200).print(table)
