"""``segability qc``, ``segability calibrate`` and ``segability evaluate-qc``: the label-free quality gate.

Model and image loading are those of ``segability analyze`` (:mod:`segability.io`).
"""

from __future__ import annotations

from pathlib import Path

import typer

from segability.cli.app import app
from segability.cli.console import fail as _fail
from segability.cli.console import literal
from segability.progress import progress_bar

MODEL_HELP = "Model factory: path/to/file.py:factory or package.module:factory."
WEIGHTS_HELP = "State dict file, read with weights_only=True."


def _plain(t):
    return t.as_tensor() if hasattr(t, "as_tensor") else t


def _out_dir(console, out: Path, names: tuple[str, ...], force: bool) -> None:
    existing = [n for n in names if (out / n).exists()]
    if existing and not force:
        _fail(console, f"{out} already holds {', '.join(existing)}; pass --force to replace them or choose another --out")
    out.mkdir(parents=True, exist_ok=True)


def _load(console, model: str, weights: Path | None, images: str, labels: str | None, target: int | None, need_labels: bool, same_size: bool, model_arg: list[str] | None = None):
    """Model, image tensors, label tensors (or None) and ids; usage errors exit with code 2."""
    import torch

    from segability.io.images import find_images, pair_labels, read_image
    from segability.io.models import load_model, parse_model_args

    try:
        net = load_model(model, weights, model_args=parse_model_args(model_arg))
        paths = find_images(images, argument="--images")
        if labels is None and need_labels:
            _fail(console, "--labels is required: evaluate-qc and calibrate measure true Dice against label files")
        pairing = pair_labels(paths, labels) if labels is not None else None
    except (ValueError, FileNotFoundError, ImportError) as exc:
        _fail(console, str(exc))
    if pairing is not None:
        note = pairing.describe()
        if note:
            for line in note.splitlines():
                console.print(literal(line), style="yellow", highlight=False)
        if need_labels and pairing.unpaired_images:
            _fail(console, f"{len(pairing.unpaired_images)} image(s) have no label in --labels; every image needs one here")
        pairs = pairing.pairs
    else:
        pairs = [(p, None) for p in paths]
    xs, ys, ids = [], [], []
    for image_path, label_path in pairs:
        try:
            xs.append(_plain(read_image(image_path)))
            if label_path is not None:
                ys.append(_plain(read_image(label_path)))
        except Exception as exc:  # noqa: BLE001 - the file is named in the message
            _fail(console, f"cannot read {image_path.name}: {exc}")
        ids.append(image_path.name)
    if same_size:
        shapes = {tuple(x.shape) for x in xs}
        if len(shapes) > 1:
            _fail(console, f"images of different shapes {sorted(shapes)[:3]}: evaluate-qc needs one size (resample them first)")
        xs = torch.stack(xs)
        ys = torch.stack(ys) if ys else None
    return net, xs, (ys if len(ys) else None), ids


@app.command("qc")
def qc_command(
    model: str = typer.Option(..., "--model", help=MODEL_HELP),
    weights: Path | None = typer.Option(None, "--weights", help=WEIGHTS_HELP),
    model_arg: list[str] | None = typer.Option(None, "--model-arg", help="key=value keyword argument of the factory (repeatable)."),
    images: str = typer.Option(..., "--images", help="Folder or glob of unlabelled images."),
    calibration: Path | None = typer.Option(None, "--calibration", help="calibration.json from `segability calibrate` (same model and layers; checked)."),
    out: Path = typer.Option(..., "--out", help="Folder for qc.csv, the analysis tables and report.html."),
    threshold: float = typer.Option(0.75, "--threshold", help="Flag images whose estimated Dice is below this."),
    use_lower: bool = typer.Option(False, "--use-lower", help="Compare the interval's lower end instead of the estimate."),
    force: bool = typer.Option(False, "--force", help="Replace earlier results in --out."),
    no_report: bool = typer.Option(False, "--no-report"),
) -> None:
    """Flag the outputs a person should check, without labels, each with its reason."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not 0 <= threshold <= 1:
        _fail(console, f"--threshold must be in [0, 1], got {threshold}")
    if calibration is not None and not calibration.exists():
        _fail(console, f"--calibration {calibration} does not exist")
    from segability.analysis import RESULT_FILES

    _out_dir(console, out, ("qc.csv", *RESULT_FILES), force)
    net, xs, _, ids = _load(console, model, weights, images, None, None, need_labels=False, same_size=False, model_arg=model_arg)
    from segability.estimation import Calibration
    from segability.estimation.qc import qc

    if calibration is None:
        _fail(console, "--calibration is required to turn mean SA into an estimated Dice: make one with "
              "`segability calibrate --model ... --images DIR --labels DIR` on labelled images of the same kind")
    try:
        cal = Calibration.load(calibration)
        with progress_bar(True, len(xs)) as advance:
            table, result = qc(net, list(xs), calibration=cal, threshold=threshold, use_lower=use_lower, ids=ids, progress=advance)
    except ValueError as exc:
        _fail(console, str(exc))
    result.save(out, overwrite=True)
    table.to_csv(out / "qc.csv", index=False)
    flagged = table[table["flag"]]
    view = Table(title=f"Flagged: {len(flagged)} of {len(table)} images (estimated Dice < {threshold})")
    for col in ("image", "estimated_dice", "mean_sa_pred", "input_sa", "reason"):
        view.add_column(col)
    for row in flagged.itertuples(index=False):
        view.add_row(literal(row.image), f"{row.estimated_dice:.3f}", f"{row.mean_sa_pred:.3f}", f"{row.input_sa:.3f}", literal(row.reason))
    console.print(view)
    if not no_report:
        from segability.report import build_report

        console.print(f"report: {literal(build_report(out))}", highlight=False)
    console.print(f"wrote {literal(out / 'qc.csv')}", highlight=False)


@app.command("calibrate")
def calibrate_command(
    model: str = typer.Option(..., "--model", help=MODEL_HELP),
    weights: Path | None = typer.Option(None, "--weights", help=WEIGHTS_HELP),
    model_arg: list[str] | None = typer.Option(None, "--model-arg", help="key=value keyword argument of the factory (repeatable)."),
    images: str = typer.Option(..., "--images", help="Folder or glob of labelled calibration images."),
    labels: str = typer.Option(..., "--labels", help="Folder of labels paired with --images by file name."),
    out: Path = typer.Option(Path("calibration.json"), "--out", help="Calibration file to write."),
    method: str = typer.Option("auto", "--method", help="auto, isotonic or linear."),
    alpha: float = typer.Option(0.1, "--alpha", help="Miscoverage of the conformal interval."),
    target: int | None = typer.Option(None, "--target"),
    force: bool = typer.Option(False, "--force"),
) -> None:
    """Fit the map from mean SA to Dice (and its conformal interval) on labelled images."""
    from rich.console import Console

    console = Console()
    if out.exists() and not force:
        _fail(console, f"{out} exists; pass --force to replace it")
    net, xs, ys, ids = _load(console, model, weights, images, labels, target, need_labels=True, same_size=False, model_arg=model_arg)
    from segability.analysis import analyze
    from segability.estimation.qc import fit_calibration

    try:
        with progress_bar(True, len(xs)) as advance:
            result = analyze(net, list(zip(xs, ys, strict=True)), ids=ids, target=target, progress=advance)
        cal = fit_calibration(net, result, method=method, alpha=alpha)
    except ValueError as exc:
        _fail(console, str(exc))
    cal.save(out)
    console.print(f"{cal.method} map on {cal.n} images ({cal.choice}); interval +-{cal.radius:.3f} at {1 - alpha:.0%}; wrote {literal(out)}", highlight=False)


@app.command("evaluate-qc")
def evaluate_qc_command(
    model: str | None = typer.Option(None, "--model", help=MODEL_HELP),
    weights: Path | None = typer.Option(None, "--weights", help=WEIGHTS_HELP),
    model_arg: list[str] | None = typer.Option(None, "--model-arg", help="key=value keyword argument of the factory (repeatable)."),
    images: str | None = typer.Option(None, "--images", help="Folder or glob of labelled images (one size)."),
    labels: str | None = typer.Option(None, "--labels", help="Folder of labels paired with --images by file name."),
    out: Path = typer.Option(..., "--out", help="Folder for qc_comparison.csv and qc_scores.csv."),
    seeds: str = typer.Option("0,1,2", "--seeds", help="Calibration/evaluation splits, comma-separated."),
    threshold: float = typer.Option(0.75, "--threshold", help="Failure threshold on Dice (AUROC)."),
    target: int | None = typer.Option(None, "--target"),
    force: bool = typer.Option(False, "--force"),
    demo: bool = typer.Option(False, "--demo", help="The shipped reference model on the demo's clean test set and shifted suite (no --model/--images)."),
    n_shift: int = typer.Option(24, "--n-shift", help="With --demo: source slices of the shifted suite."),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help="With --demo: data cache."),
) -> None:
    """Measure the SA-based quality estimators and the baselines side by side on labelled images."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        _fail(console, f"--seeds must be comma-separated integers, got {seeds!r}")
    _out_dir(console, out, ("qc_comparison.csv", "qc_scores.csv"), force)
    sources = None
    if demo:
        if model is not None or images is not None:
            _fail(console, "--demo uses the shipped model and data: leave out --model and --images")
        import pandas as pd
        import torch

        from segability.demo import DemoConfig, demo_data
        from segability.models import load_reference_model

        net = load_reference_model()
        clean, suite = demo_data(DemoConfig(n_shift=n_shift), cache_dir)
        (cx, cy), (sx, sy) = clean.as_tensors(), suite.as_tensors()
        xs, ys = torch.cat([cx, sx]), torch.cat([cy, sy])
        ids = [*clean.ids, *suite.ids]
        sources = [i.split("|")[0] for i in ids]
        groups = pd.DataFrame({"image": ids, "group": ["clean"] * len(clean) + list(suite.meta["shift"].astype(str)),
                               "severity": [0.0] * len(clean) + list(suite.meta["severity"].astype(float))})
    else:
        if model is None or images is None:
            _fail(console, "--model and --images are required (or --demo)")
        net, xs, ys, ids = _load(console, model, weights, images, labels, target, need_labels=True, same_size=True, model_arg=model_arg)
        groups = None
    from segability.estimation.qc import COMPARISON_COLUMNS, evaluate_qc

    try:
        with progress_bar(True, len(xs)) as advance:
            ev = evaluate_qc(net, xs, ys, ids=ids, sources=sources, seeds=seed_list, threshold=threshold, target=target, progress=advance)
    except ValueError as exc:
        _fail(console, str(exc))
    ev.comparison.to_csv(out / "qc_comparison.csv", index=False)
    scores = ev.scores if groups is None else ev.scores.merge(groups, on="image", how="left")
    scores.to_csv(out / "qc_scores.csv", index=False)
    ev.per_seed.to_csv(out / "qc_per_seed.csv", index=False)
    view = Table(title=f"Quality estimators on {len(ids)} images, mean over {len(seed_list)} splits")
    for col in COMPARISON_COLUMNS:
        view.add_column(col)
    for row in ev.comparison.itertuples(index=False):
        view.add_row(literal(row.method), *[f"{getattr(row, c):.3f}" for c in COMPARISON_COLUMNS[1:]])
    console.print(view)
    console.print(f"wrote {literal(out / 'qc_comparison.csv')} and {literal(out / 'qc_scores.csv')}", highlight=False)
