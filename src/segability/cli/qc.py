"""``segability calibrate``, ``segability qc`` and ``segability evaluate-qc``: the label-free quality gate.

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
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import typer

from segability.cli import options as opt
from segability.cli.app import app
from segability.cli.console import EXIT_FAILED, exit_with, fail, literal, usage_message
from segability.errors import UsageError

QC_FILES = ("qc_comparison.csv", "qc_scores.csv", "qc_per_seed.csv")
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
    if files.model is not None:
        return files
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
    threshold: float = typer.Option(0.75, "--threshold", help="Flag images whose estimated Dice is below this."),
    use_lower: bool = typer.Option(False, "--use-lower", help="Compare the interval's lower end instead of the estimate."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted analysis in --out."),
    force: bool = typer.Option(False, "--force", help="Replace earlier results in --out (or qc.csv in --run)."),
    no_report: bool = typer.Option(False, "--no-report", help="Skip the HTML report."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """Flag the outputs a person should check, without labels, each with its status and reason.

    Without --layers, only the calibration's layers are analysed. Exit codes: 0 every image
    gated; 1 some image failed (listed, in errors.csv, and in qc.csv with status failed); 2 a
    usage error.
    """
    from rich.table import Table

    err, console = _consoles()
    if not 0 <= threshold <= 1:
        fail(err, f"--threshold must be in [0, 1], got {threshold}")
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
    from segability.estimation import Calibration
    from segability.estimation.calibration import fingerprint, state_dict_hash
    from segability.estimation.qc import gate_result

    try:
        cal = Calibration.load(calibration)
    except (ValueError, OSError) as exc:
        fail(err, f"--calibration: {exc}")
    try:
        net = _load_model(_run_source(files, run) if run is not None else files)
        with _judged():
            cal.check_fingerprint(fingerprint(state_dict_hash(net), cal.layers))
        if run is None:
            from segability.analysis import layer_names

            missing = sorted(set(cal.layers) - set(layer_names(net, files.layer_list())))
            if missing:
                raise UsageError(f"--layers leaves out layers of the calibration: {missing[:5]}")
        if force:
            qc_file.unlink(missing_ok=True)
        analysis = _analysis(files, run=run, out=folder, resume=resume, force=force, progress=not no_progress,
                             layers=list(cal.layers))  # fmt: skip
        with _judged():
            table = gate_result(analysis.result, cal, threshold=threshold, use_lower=use_lower, failed=analysis.failed)
    except (UsageError, FileExistsError) as exc:
        _stop(err, exc, argument="out")
    write_table(table, qc_file, QC)
    n_failed = _report_failures(err, analysis) + int((analysis.result.images["status"] == "failed").sum())

    flagged = table[table["flag"]]
    view = Table(title=f"Flagged: {len(flagged)} of {len(table)} images (estimated Dice < {threshold})")
    for col in ("image", "estimated_dice", "mean_sa_pred", "input_sa_pred", "status", "reason"):
        view.add_column(col)
    for row in flagged.itertuples(index=False):
        view.add_row(literal(row.image), _number(row.estimated_dice), _number(row.mean_sa_pred), _number(row.input_sa_pred),
                     row.status, literal(row.reason))  # fmt: skip
    console.print(view)
    if not no_report:
        try:
            from segability.report import build_report

            console.print(f"report: {literal(build_report(folder))}", highlight=False)
        except Exception as exc:  # noqa: BLE001 - qc.csv is written; a report problem must not hide it
            err.print(f"[yellow]note:[/yellow] the report was not built: {literal(exc)}", highlight=False)
    console.print(f"wrote {literal(qc_file)}", highlight=False)
    exit_with(0 if n_failed == 0 else EXIT_FAILED)


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
    method: str = typer.Option("auto", "--method", help="auto, isotonic or linear."),
    alpha: float = typer.Option(0.1, "--alpha", help="Miscoverage of the conformal interval."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted analysis in <stem>.run/."),
    force: bool = typer.Option(False, "--force", help="Replace the calibration file and its analysis."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """Fit the map from mean SA to Dice (and its conformal interval) on labelled images.

    The score averages every analysed layer with a defined SA (choose them with --layers).
    Exit codes: 0 every image analysed; 1 some image failed (listed, in errors.csv; the
    calibration is fitted on the others); 2 a usage error.
    """
    err, console = _consoles()
    if out.exists() and not force:
        fail(err, f"{out} exists; pass --force to replace it")
    from segability.estimation.qc import fit_calibration

    try:
        analysis = _analysis(files, run=run, out=calibration_run_folder(out), resume=resume, force=force,
                             progress=not no_progress, need_labels=True)  # fmt: skip
        with _judged():
            cal = fit_calibration(analysis.model(), analysis.result, method=method, alpha=alpha)
    except (UsageError, FileExistsError) as exc:
        _stop(err, exc, argument="out")
    n_failed = _report_failures(err, analysis)
    cal.save(out)
    console.print(
        f"{cal.method} map on {cal.n} images ({cal.choice}); interval +-{cal.radius:.3f} at {1 - alpha:.0%}; "
        f"{len(cal.layers)} layers; wrote {literal(out)} (analysis: {literal(analysis.folder)})", highlight=False,
    )  # fmt: skip
    exit_with(0 if n_failed == 0 else EXIT_FAILED)


# ---------------------------------------------------------------------------------- evaluate-qc
@app.command("evaluate-qc")
@opt.file_options
def evaluate_qc_command(
    files: opt.FileOptions,
    out: Path = typer.Option(..., "--out", help="Folder for the analysis, qc_comparison.csv, qc_scores.csv and qc_per_seed.csv."),
    run: Path | None = typer.Option(None, "--run", help=RUN_HELP + " Its images need labels."),
    seeds: str = typer.Option("0,1,2", "--seeds", help="Calibration/evaluation splits, comma-separated."),
    threshold: float = typer.Option(0.75, "--threshold", help="Failure threshold on Dice (AUROC)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted analysis in --out."),
    force: bool = typer.Option(False, "--force", help="Replace earlier results in --out."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    demo: bool = typer.Option(False, "--demo", help="The shipped reference model on the demo's clean test set and shifted suite (no --model/--images)."),
    n_shift: int = typer.Option(24, "--n-shift", help="With --demo: source slices of the shifted suite."),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help="With --demo: data cache."),
) -> None:
    """Measure the SA-based quality estimators and the baselines side by side on labelled images.

    Exit codes: 0 every image analysed; 1 some image failed (listed, in errors.csv; the comparison
    uses the others); 2 a usage error.
    """
    from rich.table import Table

    err, console = _consoles()
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        fail(err, f"--seeds must be comma-separated integers, got {seeds!r}")
    existing = [n for n in QC_FILES if (out / n).exists()]
    if existing and not force:
        fail(err, f"{out} already holds {', '.join(existing)}; pass --force to replace them or choose another --out")
    n_failed = 0
    try:
        if demo:
            ev, groups, n_images = _evaluate_demo(files, run, seed_list, threshold, n_shift, cache_dir, progress=not no_progress)
            out.mkdir(parents=True, exist_ok=True)
        else:
            analysis = _analysis(files, run=run, out=out, resume=resume, force=force, progress=not no_progress, need_labels=True)
            out.mkdir(parents=True, exist_ok=True)
            ev = _evaluate_files(analysis, files, seed_list, threshold, progress=not no_progress)
            groups, n_images = None, len(analysis.result.images)
            n_failed = _report_failures(err, analysis)
    except (UsageError, FileExistsError) as exc:
        _stop(err, exc, argument="out")
    from segability.estimation.qc import COMPARISON_COLUMNS

    ev.comparison.to_csv(out / "qc_comparison.csv", index=False)
    scores = ev.scores if groups is None else ev.scores.merge(groups, on="image", how="left")
    scores.to_csv(out / "qc_scores.csv", index=False)
    ev.per_seed.to_csv(out / "qc_per_seed.csv", index=False)
    view = Table(title=f"Quality estimators on {n_images} images, mean over {len(seed_list)} splits")
    for col in COMPARISON_COLUMNS:
        view.add_column(col)
    for row in ev.comparison.itertuples(index=False):
        view.add_row(literal(row.method), *[f"{getattr(row, c):.3f}" for c in COMPARISON_COLUMNS[1:]])
    console.print(view)
    console.print(f"wrote {literal(out / 'qc_comparison.csv')} and {literal(out / 'qc_scores.csv')}", highlight=False)
    exit_with(0 if n_failed == 0 else EXIT_FAILED)


def _evaluate_files(analysis: _Analysis, files: opt.FileOptions, seeds: list[int], threshold: float, *, progress: bool) -> Any:
    """The comparison on a file run: baselines streamed over the run's files, one image at a time."""
    import torch

    from segability.estimation.qc import compare_qc, stream_baseline_scores, windowed
    from segability.io import load_item, load_preprocess
    from segability.progress import progress_bar

    result, settings = analysis.result, analysis.result.settings
    if "file" not in result.images.columns:
        raise UsageError(f"--run: {analysis.folder} has no file column in images.parquet: the baselines need the image files "
                     "(a folder `segability analyze` wrote)")  # fmt: skip
    try:
        preprocess = load_preprocess(settings.get("preprocess"), argument="preprocess")
    except ValueError as exc:
        raise UsageError(f"--run: the run's preprocessing {settings.get('preprocess')!r} cannot be loaded again: {exc}") from exc
    device = files.device or ("cuda" if torch.cuda.is_available() else "cpu")
    net = analysis.model().to(device)
    output_key = settings.get("output_key")
    if settings.get("roi_size"):
        net = windowed(net, settings["roi_size"], overlap=float(settings.get("overlap") or 0.25),
                       sw_batch_size=int(settings.get("sw_batch_size") or 1), output_key=output_key)  # fmt: skip
        output_key = None
    rows = list(zip(result.images["image"].astype(str), result.images["file"].astype(str), strict=True))
    items = ((image, load_item(file, None, preprocess)[0]) for image, file in rows)
    with progress_bar(progress, len(rows), "baselines") as advance:
        base = stream_baseline_scores(net, items, output=settings.get("output") or "auto", target=settings.get("target"),
                                      output_key=output_key, device=device, progress=advance)  # fmt: skip
    with _judged():
        return compare_qc(result, base, seeds=seeds, threshold=threshold)


def _evaluate_demo(files: opt.FileOptions, run: Path | None, seeds: list[int], threshold: float, n_shift: int,
                   cache_dir: Path | None, *, progress: bool) -> tuple[Any, Any, int]:  # fmt: skip
    """The comparison on the demo's in-memory data (no files)."""
    import pandas as pd
    import torch

    from segability.demo import DemoConfig, demo_data
    from segability.estimation.qc import evaluate_qc
    from segability.models import load_reference_model
    from segability.progress import progress_bar

    if files.model is not None or files.images is not None or run is not None:
        raise UsageError("--demo uses the shipped model and data: leave out --model, --images and --run")
    net = load_reference_model()
    clean, suite = demo_data(DemoConfig(n_shift=n_shift), cache_dir)
    (cx, cy), (sx, sy) = clean.as_tensors(), suite.as_tensors()
    xs, ys = torch.cat([cx, sx]), torch.cat([cy, sy])
    ids = [*clean.ids, *suite.ids]
    sources = [i.split("|")[0] for i in ids]
    groups = pd.DataFrame({"image": ids, "group": ["clean"] * len(clean) + list(suite.meta["shift"].astype(str)),
                           "severity": [0.0] * len(clean) + list(suite.meta["severity"].astype(float))})  # fmt: skip
    with progress_bar(progress, len(xs)) as advance, _judged():
        ev = evaluate_qc(net, xs, ys, ids=ids, sources=sources, seeds=seeds, threshold=threshold, device=files.device,
                         progress=advance)  # fmt: skip
    return ev, groups, len(ids)
