"""``segability calibrate`` and ``segability qc`` (and, in :mod:`segability.cli.evaluate_qc`, ``evaluate-qc``): the label-free quality gate.

The three commands analyse files the way ``segability analyze`` does: through
:func:`segability.batch.analyze_files` (one image at a time, resumable, a file that cannot be read or
fails in the model recorded in ``errors.csv`` while the rest goes on), with the same options
(:mod:`segability.cli.options`). Or they take ``--run RUN_DIR``, a folder ``segability analyze``
wrote, instead of ``--images``. Either way they then read the tables with :func:`load_result`.

Where the analysis goes:

- ``qc``: into ``--out``, beside ``qc.csv`` and ``report.html``; with ``--run``, ``qc.csv`` and the
  report go into the run folder.
- ``calibrate``: into ``<calibration stem>.run/`` beside the calibration file (``calibration.json``
  -> ``calibration.run/``), kept so that ``--resume`` continues it and the report can show it.
- ``evaluate-qc``: into ``--out``, beside ``qc_comparison.csv``, ``qc_scores.csv`` and
  ``qc_per_seed.csv``. Its model-based baselines (entropy, boundary confidence, flips, MC dropout)
  read the images again, one at a time. ``--demo`` runs on the demo's in-memory data instead.

Exit codes, as for ``analyze``: 0 every image analysed, 1 some image failed (listed, in
``errors.csv``, and in ``qc.csv`` with status ``failed``), 2 a usage error.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import typer

from segability.cli import options as opt
from segability.cli.app import app
from segability.cli.console import EXIT_FAILED, exit_with, fail, literal, usage_message
from segability.errors import UsageError

QC_FILES = ("qc_comparison.csv", "qc_scores.csv", "qc_per_seed.csv")
# estimation.qc.DEFAULT_SHIFTS / DEFAULT_SEVERITIES, spelled out so that --help does not import torch
# (tests/test_cli_qc.py checks that they agree)
PROFILE_SHIFTS = "gaussian_noise,blur,bias_field,contrast"
PROFILE_SEVERITIES = "0.5,1.0"
RUN_HELP = "A folder `segability analyze` wrote: use its analysis instead of analysing --images (the model is the run's unless --model is given)."


class _Analysis:
    """The analysis a command works on: its folder, tables, failed files, and the model."""

    def __init__(self, folder: Path, errors: Any, source: opt.FileOptions):
        from segability.analysis import load_result

        self.folder = folder
        self.result = load_result(folder)
        self.errors = errors  # file, error (and stage, traceback) per failed file
        self.source = source  # the options the model comes from

    @property
    def failed(self) -> dict[str, str]:
        """Failed files by image id (the file name, as the batch run names images)."""
        return {Path(str(f)).name: str(e) for f, e in zip(self.errors["file"], self.errors["error"], strict=True)}

    def model(self) -> Any:
        return _load_model(self.source)


def _load_model(source: opt.FileOptions) -> Any:
    """The model the options name, on the CPU (raises ``UsageError`` for a bad spec or weights)."""
    from segability.io import load_model

    if source.nnunet is not None:  # the network of the first fold (what a calibration's fingerprint covers)
        from segability.integrations.nnunet import load_nnunet

        return load_nnunet(source.nnunet, opt.split_list(source.fold) or None, source.checkpoint).network
    if source.model is None:
        raise UsageError("--model and --images are required (or --run RUN_DIR, a folder `segability analyze` wrote)")
    args = source.model_args()
    try:
        return load_model(source.model, source.weights, trust_pickle=source.trust_pickle, device="cpu", model_args=args)
    except UsageError:
        raise
    except (ValueError, ImportError, FileNotFoundError) as exc:
        raise UsageError(str(exc), argument=getattr(exc, "argument", None) or "model") from exc


def _run_source(files: opt.FileOptions, run: Path) -> opt.FileOptions:
    """The options of a finished run: its model (unless ``--model`` is given) from settings.json."""
    import dataclasses
    import json

    settings_file = run / "settings.json"
    settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
    if files.model is not None or files.nnunet is not None:
        return files
    if isinstance(settings.get("nnunet"), dict):  # a run of `analyze --nnunet`: its results folder, folds, checkpoint
        nn = settings["nnunet"]
        return dataclasses.replace(files, nnunet=Path(nn["folder"]), fold=[str(f) for f in nn["folds"]],
                                   checkpoint=nn["checkpoint"])  # fmt: skip
    if not settings.get("model"):
        raise UsageError(f"--run: {run} does not say which model made it (no settings.json); give --model")
    args = [f"{k}={v!r}" for k, v in (settings.get("model_args") or {}).items()]
    return dataclasses.replace(files, model=str(settings["model"]), weights=settings.get("weights") or files.weights,
                               model_arg=args or None)  # fmt: skip


def _analysis(
    files: opt.FileOptions,
    *,
    run: Path | None,
    out: Path,
    resume: bool,
    force: bool,
    progress: bool,
    need_labels: bool = False,
    layers: list[str] | None = None,
) -> _Analysis:
    """Analyse ``--images`` into ``out`` (or read ``--run``); usage errors raise, per-file errors are kept.

    Args:
        layers: the layers to analyse when ``--layers`` is not given (the calibration's, for qc).
    """
    import pandas as pd

    if files.classes and files.nnunet is not None:
        raise UsageError("the quality gate of an nnU-Net model estimates one class's Dice: give --target (a multi-class "
                         "run's per-class SA is in `segability analyze --nnunet`)", argument="classes")  # fmt: skip
    if run is not None:
        given = files.given(opt.ANALYSIS_FIELDS)
        if given:
            raise UsageError(f"--run reads a finished analysis: leave out {', '.join(given)} (the run fixed them)")
        if not run.is_dir():
            raise UsageError(f"--run {run} is not a folder")
        from segability.analysis.results import ERRORS, read_table

        errors_file = run / ERRORS.file
        errors = read_table(errors_file, ERRORS) if errors_file.is_file() else pd.DataFrame({"file": [], "error": []})
        return _Analysis(run, errors, _run_source(files, run))
    if files.nnunet is not None:
        return _nnunet_analysis(files, out=out, resume=resume, force=force, progress=progress, need_labels=need_labels,
                                layers=layers)  # fmt: skip
    if files.model is None or files.images is None:
        raise UsageError("--model and --images are required (or --run RUN_DIR, a folder `segability analyze` wrote)")
    if need_labels:
        _check_labels(files)
    from segability.batch import analyze_files

    kwargs = files.analyze_files_kwargs()
    if layers is not None and kwargs["layers"] == "auto":
        kwargs["layers"] = layers
    summary = analyze_files(**kwargs, out=out, resume=resume, force=force, report=False, progress=progress)
    return _Analysis(out, summary.errors, files)


def _nnunet_analysis(files: opt.FileOptions, *, out: Path, resume: bool, force: bool, progress: bool, need_labels: bool,
                     layers: list[str] | None) -> _Analysis:  # fmt: skip
    """``--nnunet``: nnU-Net's pipeline into ``out``, one class (``--target``; the only foreground label by default)."""
    import dataclasses

    from segability.cli.analyze import run_nnunet
    from segability.integrations.nnunet import find_cases, load_nnunet

    if resume:
        raise UsageError("--resume is not available with --nnunet (the run takes one pass); use --force", argument="resume")
    model = load_nnunet(files.nnunet, opt.split_list(files.fold) or None, files.checkpoint)
    target = files.target
    if target is None:
        if len(model.classes) != 1:
            raise UsageError(f"target: the quality gate scores one class; give --target (dataset.json labels: {model.classes})",
                             argument="target")  # fmt: skip
        target = next(iter(model.classes))
    if need_labels:
        if files.images is None:
            raise UsageError("images is required: give the nnU-Net raw folder of the cases (imagesTs)", argument="images")
        if files.labels is None:
            raise UsageError("--labels is required: calibrate and evaluate-qc measure true Dice against label files")
        unlabelled = [c.case for c in find_cases(files.images, files.labels, model.channels, model.file_ending) if c.label is None]
        if unlabelled:
            raise UsageError(f"{len(unlabelled)} case(s) have no label in --labels ({', '.join(unlabelled[:5])}); every case needs one here")
    if layers is not None and files.layers is None:  # a calibration's layers, without the fold prefix of an ensemble
        files = dataclasses.replace(files, layers=list(dict.fromkeys(n.split("/", 1)[-1] for n in layers)))
    files = dataclasses.replace(files, target=target)
    _, errors = run_nnunet(files, out, progress=progress, force=force)
    return _Analysis(out, errors, files)


def _check_labels(files: opt.FileOptions) -> None:
    """Every image needs a label (true Dice): checked before anything runs."""
    from segability.io import find_images, pair_labels

    if files.labels is None:
        raise UsageError("--labels is required: calibrate and evaluate-qc measure true Dice against label files")
    try:
        pairing = pair_labels(find_images(files.images, argument="images"), files.labels, label_suffix=files.label_suffix,
                              argument="labels")  # fmt: skip
    except UsageError:
        raise
    except ValueError as exc:
        raise UsageError(str(exc), argument="images") from exc
    if pairing.unpaired_images:
        names = [p.name for p in pairing.unpaired_images][:5]
        raise UsageError(f"{len(pairing.unpaired_images)} image(s) have no label in --labels ({', '.join(names)}); every image needs one here")


def _report_failures(err: Any, analysis: _Analysis) -> int:
    """List the failed files (at most 10) and return how many there are."""
    errors = analysis.errors
    for row in errors.head(10).itertuples(index=False):
        err.print(f"[red]failed:[/red] {literal(row.file)}: {literal(row.error)}", highlight=False)
    if len(errors) > 10:
        err.print(f"... and {len(errors) - 10} more (see {literal(analysis.folder / 'errors.csv')})", highlight=False)
    return len(errors)


def _stop(err: Any, exc: UsageError | FileExistsError, argument: str | None = None) -> NoReturn:
    """Exit 2 with the message in command-line words (any other error goes to the app's handler: exit 1)."""
    fail(err, usage_message(exc, argument=argument))


@contextlib.contextmanager
def _judged() -> Iterator[None]:
    """A ``ValueError`` of the estimation is about what the user gave (too few labelled images, a
    calibration of another model, a run without the calibration's layers): a usage error."""
    try:
        yield
    except UsageError:
        raise
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def _consoles() -> tuple[Any, Any]:
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True), Console(soft_wrap=True)


def _number(v: Any) -> str:
    return "" if v is None or v != v else f"{float(v):.3f}"


# ------------------------------------------------------------------------------------------- qc
@app.command("qc")
@opt.file_options
def qc_command(
    files: opt.FileOptions,
    calibration: Path | None = typer.Option(None, "--calibration", help="calibration.json from `segability calibrate` (same model; checked)."),
    out: Path | None = typer.Option(None, "--out", help="Folder for the analysis, qc.csv and report.html (with --run: the run folder)."),
    run: Path | None = typer.Option(None, "--run", help=RUN_HELP),
    threshold: float | None = typer.Option(None, "--threshold", help="Flag images whose estimated Dice is below this (mean-SA calibration: default 0.75)."),
    review_fraction: float | None = typer.Option(None, "--review-fraction", help="Profile calibration: flag this share of the images, the least trusted "
                                                 "(ceil(fraction x n); default 0.2 when --threshold is not given)."),
    use_lower: bool = typer.Option(False, "--use-lower", help="Mean-SA calibration: compare the interval's lower end instead of the estimate."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted analysis in --out."),
    force: bool = typer.Option(False, "--force", help="Replace earlier results in --out (or qc.csv in --run)."),
    no_report: bool = typer.Option(False, "--no-report", help="Skip the HTML report."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """Flag the outputs a person should check, without labels, each with its status and reason.

    With a mean-SA calibration: every image whose estimated Dice is below --threshold. With a
    profile calibration (`calibrate --estimator profile`): the --review-fraction least trusted
    images (out of range first, then the lowest lower bound) and/or those below --threshold; the
    status says why (image_quality, model, shift). Without --layers, only the calibration's layers
    are analysed. Exit codes: 0 every image gated; 1 some image failed (listed, in errors.csv, and
    in qc.csv with status failed); 2 a usage error.
    """
    from rich.table import Table

    err, console = _consoles()
    if threshold is not None and not 0 <= threshold <= 1:
        fail(err, f"--threshold must be in [0, 1], got {threshold}")
    if review_fraction is not None and not 0 <= review_fraction <= 1:
        fail(err, f"--review-fraction must be in [0, 1], got {review_fraction}")
    if calibration is None:
        fail(err, "--calibration is required to turn mean SA into an estimated Dice: make one with "
             "`segability calibrate --model ... --images DIR --labels DIR` on labelled images of the same kind")  # fmt: skip
    if not calibration.is_file():
        fail(err, f"--calibration {calibration} does not exist")
    if run is None and out is None:
        fail(err, "--out is required (or --run RUN_DIR, to gate a finished analysis)")
    if run is not None and out is not None and out.resolve() != run.resolve():
        fail(err, "--run: qc.csv and the report go into the run folder; leave out --out")
    folder = run if run is not None else out
    qc_file = folder / "qc.csv"
    if qc_file.exists() and not (force or resume):
        fail(err, f"{folder} already holds qc.csv; pass --force to replace it or choose another --out")

    from segability.analysis.results import QC, write_table
    from segability.estimation.calibration import fingerprint, state_dict_hash
    from segability.estimation.per_class import ClassCalibrations, gate_classes
    from segability.estimation.qc import (
        ProfileCalibration,
        gate_result,
        load_calibration,
    )

    try:
        cal = load_calibration(calibration)
    except (ValueError, OSError) as exc:
        fail(err, f"--calibration: {exc}")
    profile = isinstance(cal, ProfileCalibration)
    per_class = isinstance(cal, ClassCalibrations)
    if per_class:  # the analysis scores the calibration's classes
        given = opt.split_list(files.classes)
        if given and sorted(map(str, given)) != sorted(map(str, cal.classes)):
            fail(err, f"--classes {','.join(given)}: the calibration is for the classes {sorted(cal.classes)}")
        if run is None:
            files = dataclasses.replace(files, classes=[",".join(map(str, cal.classes))], target=None)
    elif files.classes:
        fail(err, "--classes needs a calibration made with --classes (one per class); this one estimates one class's Dice")
    if profile and use_lower:
        fail(err, "--use-lower applies to a mean-SA calibration; a profile calibration gates by --review-fraction or --threshold")
    if not profile and review_fraction is not None:
        fail(err, "--review-fraction needs a profile calibration (`segability calibrate --estimator profile`); "
             "a mean-SA calibration gates by --threshold")  # fmt: skip
    if profile and review_fraction is None and threshold is None:
        review_fraction = 0.2
    if not profile and threshold is None:
        threshold = 0.75
    try:
        net = _load_model(_run_source(files, run) if run is not None else files)
        with _judged():
            if profile or per_class:
                cal.check_model(net)
            else:
                cal.check_fingerprint(fingerprint(state_dict_hash(net), cal.layers))
        if run is None and files.nnunet is None:
            from segability.analysis import layer_names

            missing = sorted(set(cal.layers) - set(layer_names(net, files.layer_list())))
            if missing:
                raise UsageError(f"--layers leaves out layers of the calibration: {missing[:5]}")
        if force:
            qc_file.unlink(missing_ok=True)
        analysis = _analysis(files, run=run, out=folder, resume=resume, force=force, progress=not no_progress,
                             layers=list(cal.layers))  # fmt: skip
        with _judged():
            if profile:
                table = _profile_gate(analysis, cal, net, review_fraction, threshold, progress=not no_progress)
            elif per_class:
                table = gate_classes(analysis.result, cal, threshold=threshold, use_lower=use_lower, failed=analysis.failed)
            else:
                table = gate_result(analysis.result, cal, threshold=threshold, use_lower=use_lower, failed=analysis.failed)
    except (UsageError, FileExistsError) as exc:
        _stop(err, exc, argument="out")
    write_table(table, qc_file, QC)
    n_failed = _report_failures(err, analysis) + int((analysis.result.images["status"] == "failed").sum())

    flagged = table[table["flag"]]
    rule = [f"the {review_fraction:.0%} least trusted"] if profile and review_fraction is not None else []
    rule += [f"estimated Dice < {threshold}"] if threshold is not None else []
    what = "outputs (image and class)" if per_class else "images"
    view = Table(title=f"Flagged: {len(flagged)} of {len(table)} {what} ({' or '.join(rule)})")
    for col in ("image", *(["class"] if per_class else []), "estimated_dice", "mean_sa_pred", "input_sa_pred", "status", "reason"):
        view.add_column(col)
    for row in flagged.to_dict("records"):
        klass = [literal(f"{row['class']} ({row['class_name']})")] if per_class else []
        view.add_row(literal(row["image"]), *klass, _number(row["estimated_dice"]), _number(row["mean_sa_pred"]),
                     _number(row["input_sa_pred"]), row["status"], literal(row["reason"]))  # fmt: skip
    console.print(view)
    if not no_report:
        try:
            from segability.report import build_report

            console.print(f"report: {literal(build_report(folder))}", highlight=False)
        except Exception as exc:  # noqa: BLE001 - qc.csv is written; a report problem must not hide it
            err.print(f"[yellow]note:[/yellow] the report was not built: {literal(exc)}", highlight=False)
    console.print(f"wrote {literal(qc_file)}", highlight=False)
    exit_with(0 if n_failed == 0 else EXIT_FAILED)



def _run_preprocess(analysis: _Analysis, who: str) -> Any:
    """The preprocessing of a file run, loaded again to read its images one at a time."""
    from segability.io import load_preprocess

    if "file" not in analysis.result.images.columns:
        raise UsageError(f"--run: {analysis.folder} has no file column in images.parquet: {who} needs the image "
                         "files (a folder `segability analyze` wrote)")  # fmt: skip
    setting = analysis.result.settings.get("preprocess")
    try:
        return load_preprocess(setting, argument="preprocess")
    except ValueError as exc:
        raise UsageError(f"--run: the run's preprocessing {setting!r} cannot be loaded again: {exc}") from exc

def _image_items(analysis: _Analysis, *, labels: bool = False, skip: set[str] | None = None) -> Iterator[tuple[Any, ...]]:
    """``(image id, image)`` (with ``labels``: ``(id, image, label)``) of a file run, read one at a
    time with the run's preprocessing, in the order of images.parquet."""
    from segability.io import load_item

    result = analysis.result
    preprocess = _run_preprocess(analysis, "this step")
    label_files = result.images["label_file"] if labels and "label_file" in result.images else [None] * len(result.images)
    for image, file, label_file in zip(result.images["image"].astype(str), result.images["file"].astype(str), label_files,
                                       strict=True):  # fmt: skip
        if skip and image in skip:
            continue
        label_file = None if label_file is None or label_file != label_file or not str(label_file) else str(label_file)
        x, y = load_item(file, label_file, preprocess)
        yield (image, x, y) if labels else (image, x)


def _profile_settings(analysis: _Analysis) -> dict[str, Any]:
    """The analysis options the profile needs again (the readout, the mask); refuses what it cannot redo."""
    settings = analysis.result.settings
    if settings.get("nnunet"):
        raise UsageError("the profile estimator runs the model on segability's own reading of the images; a run through "
                         "nnU-Net's pipeline (--nnunet) takes a mean-SA calibration (--estimator mean-sa)")  # fmt: skip
    if settings.get("roi_size"):
        raise UsageError("the profile estimator needs whole-image forward passes: a run with --roi-size (sliding windows) "
                         "takes a mean-SA calibration (--estimator mean-sa)")  # fmt: skip
    if settings.get("output_key"):
        raise UsageError("the profile estimator reads a tensor output: a run with --output-key takes a mean-SA calibration")
    keys = ("output", "target", "guide", "mask", "empty")
    return {k: settings[k] for k in keys if settings.get(k) is not None}


def _profile_gate(analysis: _Analysis, cal: Any, net: Any, review_fraction: float | None, threshold: float | None,
                  *, progress: bool) -> Any:  # fmt: skip
    """The profile calibration's gate on a file run: profiles streamed over the run's files."""
    from segability.estimation.profile_gate import profile_gate
    from segability.progress import progress_bar

    _profile_settings(analysis)
    result = analysis.result
    missing = set(cal.layers) - set(result.layers["layer"].astype(str))
    if missing:
        raise UsageError(f"the calibration uses layers the analysis did not produce: {sorted(missing)[:5]}")
    images = result.images.assign(image=result.images["image"].astype(str))
    broken = images[images["status"] == "failed"]
    failed = {**analysis.failed, **dict(zip(broken["image"], broken["reason"].astype(str), strict=True))}
    n = len(images) - len(broken)
    with progress_bar(progress, n, "SA profile") as advance:
        table = cal.profile(net, _image_items(analysis, skip=set(broken["image"])), result, progress=advance)
    return profile_gate(table, cal, result=result, review_fraction=review_fraction, threshold=threshold, failed=failed)


# ------------------------------------------------------------------------------------ calibrate
def calibration_run_folder(calibration: Path) -> Path:
    """Where ``calibrate`` puts its analysis: ``<stem>.run/`` beside the calibration file.

    Example:
        >>> calibration_run_folder(Path("cal/calibration.json")).as_posix()
        'cal/calibration.run'
    """
    folder = calibration.with_name(f"{calibration.stem}.run")
    return folder if folder != calibration else calibration.with_name(f"{calibration.name}.run")


@app.command("calibrate")
@opt.file_options
def calibrate_command(
    files: opt.FileOptions,
    out: Path = typer.Option(Path("calibration.json"), "--out", help="Calibration file to write; the analysis goes to <stem>.run/ beside it."),
    run: Path | None = typer.Option(None, "--run", help=RUN_HELP + " Its images need labels."),
    estimator: str = typer.Option("mean-sa", "--estimator", help="mean-sa (mean SA and input SA mapped to Dice) or profile "
                                  "(the SA-profile estimator, fitted on the images plus synthetic shifts of them)."),
    method: str = typer.Option("auto", "--method", help="mean-sa: auto, isotonic or linear."),
    shifts: str = typer.Option(PROFILE_SHIFTS, "--shifts", help="profile: shift families to augment the images with, comma-separated."),
    severities: str = typer.Option(PROFILE_SEVERITIES, "--severities", help="profile: shift severities in [0, 1], comma-separated."),
    references: int = typer.Option(16, "--references", help="profile: labelled images kept for reverse SA (0: none)."),
    alpha: float = typer.Option(0.1, "--alpha", help="Miscoverage of the conformal interval."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted analysis in <stem>.run/."),
    force: bool = typer.Option(False, "--force", help="Replace the calibration file and its analysis."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """Fit a label-free Dice estimator (and its conformal interval) on labelled images.

    --estimator mean-sa (default): mean SA over every analysed layer with a defined SA (choose
    them with --layers) and the input's SA, mapped to Dice. --estimator profile: the SA-profile
    estimator (per-layer SA, body-masked SA, reverse SA against --references labelled images),
    fitted on the images plus each of --shifts at each of --severities; the reference cache goes
    beside the file (<stem>.references.npz). Exit codes: 0 every image analysed; 1 some image
    failed (listed, in errors.csv; the calibration is fitted on the others); 2 a usage error.
    """
    err, console = _consoles()
    if estimator not in ("mean-sa", "profile"):
        fail(err, f"--estimator must be mean-sa or profile, got {estimator!r}")
    if out.exists() and not force:
        fail(err, f"{out} exists; pass --force to replace it")
    from segability.estimation.qc import fit_calibration

    try:
        shift_list = [s.strip() for s in shifts.split(",") if s.strip()]
        level_list = [float(s) for s in severities.split(",") if s.strip()]
    except ValueError:
        fail(err, f"--severities must be comma-separated numbers in [0, 1], got {severities!r}")
    if estimator == "profile" and not all(0 <= v <= 1 for v in level_list):
        fail(err, f"--severities must be in [0, 1], got {severities!r}")
    try:
        analysis = _analysis(files, run=run, out=calibration_run_folder(out), resume=resume, force=force,
                             progress=not no_progress, need_labels=True)  # fmt: skip
        with _judged():
            if estimator == "profile":
                if files.classes:
                    raise UsageError("--estimator profile estimates one class's Dice: give --target, or use the "
                                     "mean-SA estimator for every class at once", argument="classes")  # fmt: skip
                cal = _fit_profile(analysis, shift_list, level_list, references, alpha, progress=not no_progress)
            elif "class" in analysis.result.layers.columns:
                from segability.estimation.per_class import fit_class_calibrations

                cal = fit_class_calibrations(analysis.model(), analysis.result, method=method, alpha=alpha)
            else:
                cal = fit_calibration(analysis.model(), analysis.result, method=method, alpha=alpha)
    except (UsageError, FileExistsError) as exc:
        _stop(err, exc, argument="out")
    n_failed = _report_failures(err, analysis)
    cal.save(out)
    if hasattr(cal, "names"):  # one calibration per class
        for c, one in cal.classes.items():
            console.print(f"class {c} ({literal(cal.names[c])}): {one.method} map on {one.n} images; interval "
                          f"+-{one.radius:.3f} at {1 - alpha:.0%}; {len(one.layers)} layers", highlight=False)  # fmt: skip
        console.print(f"wrote {literal(out)} (analysis: {literal(analysis.folder)})", highlight=False)
        exit_with(0 if n_failed == 0 else EXIT_FAILED)
    if estimator == "profile":
        est = cal.estimator
        refs = f"{len(cal.references)} references ({literal(_references_name(out))})" if cal.references is not None else "no references"
        console.print(
            f"profile estimator ({est.choice}) on {est.n} images ({est.n_groups} labelled, {len(shift_list)} shifts x "
            f"{len(level_list)} severities); grouped-CV MAE {est.cv[est.choice]['mae']:.3f}, Spearman "
            f"{est.cv[est.choice]['spearman']:.3f}; interval +-{est.radius:.3f} at {1 - alpha:.0%}; {len(cal.layers)} layers; "
            f"{refs}; wrote {literal(out)} (analysis: {literal(analysis.folder)})", highlight=False,
        )  # fmt: skip
        exit_with(0 if n_failed == 0 else EXIT_FAILED)
    console.print(
        f"{cal.method} map on {cal.n} images ({cal.choice}); interval +-{cal.radius:.3f} at {1 - alpha:.0%}; "
        f"{len(cal.layers)} layers; wrote {literal(out)} (analysis: {literal(analysis.folder)})", highlight=False,
    )  # fmt: skip
    exit_with(0 if n_failed == 0 else EXIT_FAILED)


def _references_name(out: Path) -> str:
    from segability.estimation.profile_gate import references_path

    return references_path(out).name


def _fit_profile(analysis: _Analysis, shifts: list[str], severities: list[float], references: int, alpha: float,
                 *, progress: bool) -> Any:  # fmt: skip
    """The profile estimator on a labelled file run: images and labels read again, one at a time."""
    from segability.estimation.profile_gate import fit_profile_calibration
    from segability.progress import progress_bar

    kwargs = _profile_settings(analysis)
    net = analysis.model()
    images = analysis.result.images
    ok = images[images["status"].astype(str) != "failed"]
    n = len(ok) * (1 + len(shifts) * len(severities))
    with progress_bar(progress, n, "SA profiles (with shifts)") as advance:
        return fit_profile_calibration(net, _image_items(analysis, labels=True, skip=set(images["image"].astype(str)) - set(ok["image"].astype(str))),
                                       analysis.result, shifts=shifts, severities=severities, n_references=references,
                                       alpha=alpha, progress=advance, **kwargs)  # fmt: skip


# ---------------------------------------------------------------------------------- evaluate-qc
