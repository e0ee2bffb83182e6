"""``segability evaluate-qc``: every label-free quality method against true Dice, on labelled files.

Analyses the files as ``calibrate`` and ``qc`` do (:mod:`segability.cli.qc`: the same options,
``--run``, ``errors.csv``) into ``--out``, beside ``qc_comparison.csv``, ``qc_scores.csv`` and
``qc_per_seed.csv``. Its model-based baselines (entropy, boundary confidence, flips, MC dropout,
deep ensembles with ``--ensemble-weights``) read the images again, one at a time. ``--demo`` runs on
the demo's in-memory data instead.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import typer

from segability.cli import options as opt
from segability.cli.app import app
from segability.cli.console import EXIT_FAILED, exit_with, fail, literal
from segability.cli.qc import (
    QC_FILES,
    RUN_HELP,
    _Analysis,
    _analysis,
    _consoles,
    _judged,
    _report_failures,
    _run_preprocess,
    _stop,
)
from segability.errors import UsageError


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
    ensemble_weights: list[Path] | None = typer.Option(
        None, "--ensemble-weights", metavar="FILE", help="Weights of another member of a deep ensemble: the same architecture as the "
        "model, other weights (repeat the flag). Adds ensemble_dice (mean pairwise Dice of the members' predictions; "
        "the model is member 0, its outputs are the ones ranked) and ensemble_entropy to the comparison."),
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
            ev, groups, n_images = _evaluate_demo(files, run, seed_list, threshold, n_shift, cache_dir, progress=not no_progress,
                                                  ensemble_weights=ensemble_weights or [])  # fmt: skip
            out.mkdir(parents=True, exist_ok=True)
        else:
            analysis = _analysis(files, run=run, out=out, resume=resume, force=force, progress=not no_progress, need_labels=True)
            out.mkdir(parents=True, exist_ok=True)
            ev = _evaluate_files(analysis, files, seed_list, threshold, progress=not no_progress,
                                 ensemble_weights=ensemble_weights or [])  # fmt: skip
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


def _ensemble(net: Any, weights: list[Path], trust_pickle: bool) -> list[Any]:
    """The deployed model and one copy per ``--ensemble-weights`` file (``UsageError`` naming the file)."""
    from segability.estimation.baselines import ensemble_members
    from segability.io.models import load_state_dict

    states = [load_state_dict(w, trust_pickle=trust_pickle, argument="ensemble_weights") for w in weights]
    return ensemble_members(net, states, names=[str(w) for w in weights])


def _ensemble_scores(members: list[Any], items: Any, settings: dict[str, Any], output_key: str | None, n: int,
                     *, progress: bool) -> Any:  # fmt: skip
    """``ensemble_dice`` / ``ensemble_entropy`` per image (one forward pass per member)."""
    import pandas as pd

    from segability.analysis import model_probabilities
    from segability.capture import eval_mode
    from segability.estimation.baselines import stream_ensemble_scores
    from segability.progress import progress_bar

    tgt = settings.get("target")
    predicts = [lambda x, m=m: model_probabilities(m(x), settings.get("output") or "auto", 1 if tgt is None else tgt, output_key)[0]
                for m in members]  # fmt: skip
    with progress_bar(progress, n, "ensemble") as advance, contextlib.ExitStack() as stack:
        for m in members:
            stack.enter_context(eval_mode(m))
        return pd.DataFrame(stream_ensemble_scores(predicts, items, progress=advance))


def _evaluate_files(analysis: _Analysis, files: opt.FileOptions, seeds: list[int], threshold: float, *, progress: bool,
                    ensemble_weights: list[Path]) -> Any:  # fmt: skip
    """The comparison on a file run: baselines streamed over the run's files, one image at a time."""
    import torch

    from segability.estimation.qc import compare_qc, stream_baseline_scores, windowed
    from segability.io import load_item
    from segability.progress import progress_bar

    result, settings = analysis.result, analysis.result.settings
    if settings.get("nnunet"):
        return _evaluate_nnunet(analysis, seeds, threshold, progress=progress, ensemble_weights=ensemble_weights)
    preprocess = _run_preprocess(analysis, "the baselines")
    device = files.device or ("cuda" if torch.cuda.is_available() else "cpu")
    net = analysis.model()
    members = [m.to(device) for m in _ensemble(net, ensemble_weights, files.trust_pickle)] if ensemble_weights else []
    net = net.to(device)
    output_key = settings.get("output_key")
    if settings.get("roi_size"):
        members = [windowed(m, settings["roi_size"], overlap=float(settings.get("overlap") or 0.25),
                            sw_batch_size=int(settings.get("sw_batch_size") or 1), output_key=output_key) for m in members]  # fmt: skip
        net = windowed(net, settings["roi_size"], overlap=float(settings.get("overlap") or 0.25),
                       sw_batch_size=int(settings.get("sw_batch_size") or 1), output_key=output_key)  # fmt: skip
        output_key = None
    rows = list(zip(result.images["image"].astype(str), result.images["file"].astype(str), strict=True))
    items = ((image, load_item(file, None, preprocess)[0]) for image, file in rows)
    with progress_bar(progress, len(rows), "baselines") as advance:
        base = stream_baseline_scores(net, items, output=settings.get("output") or "auto", target=settings.get("target"),
                                      output_key=output_key, device=device, progress=advance)  # fmt: skip
    if members:
        items = ((image, load_item(file, None, preprocess)[0].to(device).float()) for image, file in rows)
        base = base.merge(_ensemble_scores(members, items, settings, output_key, len(rows), progress=progress), on="image")
    with _judged():
        return compare_qc(result, base, seeds=seeds, threshold=threshold)


def _evaluate_nnunet(analysis: _Analysis, seeds: list[int], threshold: float, *, progress: bool,
                    ensemble_weights: list[Path]) -> Any:  # fmt: skip
    """The comparison on an ``--nnunet`` run: the baselines on nnU-Net's prediction (its preprocessing,
    sliding window, mirroring and folds), one case at a time."""
    from segability.estimation.qc import compare_qc, stream_baseline_scores
    from segability.integrations.nnunet import NnUNetInference, case_of_file, load_nnunet
    from segability.progress import progress_bar

    if ensemble_weights:
        raise UsageError("--ensemble-weights: an nnU-Net run's ensemble is its folds (--fold)", argument="ensemble_weights")
    src, result = analysis.source, analysis.result
    model = load_nnunet(src.nnunet, opt.split_list(src.fold) or None, src.checkpoint, device=src.device or "cpu")
    rows = list(zip(result.images["image"].astype(str), result.images["file"].astype(str), strict=True))
    items = ((image, model.preprocess(case_of_file(model, file)).data) for image, file in rows)
    with progress_bar(progress, len(rows), "baselines") as advance:
        base = stream_baseline_scores(NnUNetInference(model), items, output="softmax", target=result.settings.get("target"),
                                      device="cpu", progress=advance)  # fmt: skip
    with _judged():
        return compare_qc(result, base, seeds=seeds, threshold=threshold)


def _evaluate_demo(files: opt.FileOptions, run: Path | None, seeds: list[int], threshold: float, n_shift: int,
                   cache_dir: Path | None, *, progress: bool, ensemble_weights: list[Path]) -> tuple[Any, Any, int]:  # fmt: skip
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
    if ensemble_weights:  # the comparison of evaluate_qc, with the ensemble's scores among the baselines
        from segability.analysis import analyze
        from segability.estimation.qc import baseline_scores, compare_qc

        members = _ensemble(net, ensemble_weights, files.trust_pickle)
        with progress_bar(progress, len(xs)) as advance:
            result = analyze(net, xs, ys, ids=ids, batch_size=16, device=files.device, progress=advance)
        base = baseline_scores(net, xs, ids=ids, device=files.device)
        dev = next(net.parameters()).device
        members = [m.to(dev) for m in members]
        items = zip(ids, (x.to(dev) for x in xs), strict=True)
        base = base.merge(_ensemble_scores(members, items, {}, None, len(ids), progress=progress), on="image")
        with _judged():
            ev = compare_qc(result, base, sources=dict(zip(ids, sources, strict=True)), seeds=seeds, threshold=threshold)
        return ev, groups, len(ids)
    with progress_bar(progress, len(xs)) as advance, _judged():
        ev = evaluate_qc(net, xs, ys, ids=ids, sources=sources, seeds=seeds, threshold=threshold, device=files.device,
                         progress=advance)  # fmt: skip
    return ev, groups, len(ids)
