"""``segability prune``: does SA rank units better than weight norms? Zero the lowest-ranked units
and watch the output Dice, or (``--structural``) remove them for real, fine-tune, and measure the cost.

Writes ``OUT/prune.csv`` (ranking, fraction, seed, dice, pruned_units) and ``OUT/prune.png``, and
prints the comparison table. With ``--structural`` (the ``compress`` extra): ``OUT/prune.csv``
(ranking, scope, fraction, seed, pruned_units, params, macs, macs_kept, latency_ms, Dice before and
after fine-tuning on each evaluation set, model), ``OUT/prune_pareto.png`` and every fine-tuned model
in ``OUT/models/`` (reload with ``segability.compress:load_pruned``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from segability.cli.app import app

OUTPUTS = ("prune.csv", "prune.png")
STRUCTURAL_OUTPUTS = ("prune.csv", "prune_pareto.png", "models")


def _floats(text: str, argument: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{argument} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise ValueError(f"{argument} must name at least one value, got {text!r}")
    return values


def _names(text: str, argument: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise ValueError(f"{argument} must name at least one value, got {text!r}")
    return values


def _load_folder(images, labels, label_suffix, preprocess, argument):
    """Images and labels of a folder / pattern as lists of tensors (every image needs a label)."""
    from segability.io import find_images, load_item, pair_labels

    paths = find_images(images, argument=argument)
    pairing = pair_labels(paths, labels, label_suffix=label_suffix, argument=argument.replace("images", "labels"))
    if pairing.unpaired_images:
        names = [p.name for p in pairing.unpaired_images][:10]
        raise ValueError(f"{argument}: pruning measures Dice against labels, but {len(pairing.unpaired_images)} image(s) have none: {names}")
    xs, ys = [], []
    for image, label in pairing.pairs:
        x, y = load_item(image, label, preprocess)
        xs.append(x)
        ys.append(y)
    return xs, ys


@app.command("prune")
def prune_command(
    out: Annotated[Path, typer.Option("--out", "-o", file_okay=False, help="Folder for prune.csv and prune.png.")] = Path("runs/prune"),
    demo: Annotated[bool, typer.Option("--demo", help="The shipped reference model on mni_lesions: rank on 'train' images, evaluate on 'val'.")] = False,
    model: Annotated[str | None, typer.Option("--model", help="Model factory 'file.py:factory' or 'package.module:factory'.")] = None,
    weights: Annotated[Path | None, typer.Option("--weights", exists=True, dir_okay=False, help="State-dict file of the model.")] = None,
    model_arg: Annotated[list[str] | None, typer.Option("--model-arg", help="key=value argument of the factory; repeat for several.")] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="Allow loading pickled objects (trusted files only).")] = False,
    images: Annotated[str | None, typer.Option("--images", help="Evaluation images: a folder, a glob pattern or a file.")] = None,
    labels: Annotated[str | None, typer.Option("--labels", help="Their labels (paired by file name).")] = None,
    label_suffix: Annotated[str, typer.Option("--label-suffix", help="Text after the image stem in label names, e.g. _seg.")] = "",
    rank_images: Annotated[str | None, typer.Option("--rank-images", help="Images the SA ranking is measured on [default: --images].")] = None,
    rank_labels: Annotated[str | None, typer.Option("--rank-labels", help="Labels of --rank-images.")] = None,
    preprocess: Annotated[str | None, typer.Option("--preprocess", help="Preprocessing: a JSON/YAML config or file.py:fn.")] = None,
    fraction: Annotated[str | None, typer.Option("--fraction", help="Fractions of units to prune, comma-separated [default: 0,0.1,0.2,0.3,0.5; --structural: 0.25,0.5,0.75].")] = None,
    rankings: Annotated[str | None, typer.Option("--rankings", help="Rankings to compare: sa, l1, random (--structural: also taylor) [default: all].")] = None,
    seeds: Annotated[str | None, typer.Option("--seeds", help="Seeds of the random ranking (--structural: and of fine-tuning) [default: 0,1,2; --structural: 0].")] = None,
    scope: Annotated[str | None, typer.Option("--scope", help="'layer': the fraction of every layer; 'global': of the whole network (--structural: both may be given, comma-separated) [default: layer; --structural: layer,global].")] = None,
    structural: Annotated[bool, typer.Option("--structural", help="Remove the units for real (torch-pruning), fine-tune, and measure params, MACs and CPU latency.")] = False,
    finetune_epochs: Annotated[int, typer.Option("--finetune-epochs", min=0, help="--structural: fine-tuning epochs, the same for every ranking (0: none).")] = 2,
    finetune_steps: Annotated[int, typer.Option("--finetune-steps", min=1, help="--structural: steps per fine-tuning epoch (batches of 16 random 64-pixel crops).")] = 25,
    n_train: Annotated[int, typer.Option("--n-train", min=1, help="--structural --demo: mni_lesions 'train' images to fine-tune on (the first --n rank).")] = 200,
    shift_n: Annotated[int, typer.Option("--shift-n", min=0, help="--structural --demo: validation images put through every shift of the shifted suite at severities 0.5 and 1 (0: no shifted set).")] = 8,
    layers: Annotated[str | None, typer.Option("--layers", help="Layers that may be pruned (names or glob patterns, comma-separated) [default: every convolution but the output ones].")] = None,
    n: Annotated[int, typer.Option("--n", min=1, help="--demo: images in each of the ranking and evaluation sets.")] = 64,
    size: Annotated[int, typer.Option("--size", min=16, help="--demo: image side in pixels.")] = 128,
    cache_dir: Annotated[Path | None, typer.Option("--cache-dir", help="--demo: where generated data is cached.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")] = 8,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1, ...")] = "cpu",
    force: Annotated[bool, typer.Option("--force", help="Replace the outputs already in --out.")] = False,
) -> None:
    """Zero the lowest-ranked units (by SA, L1 norm or at random) and measure the output Dice; with
    --structural, remove them, fine-tune and measure params, MACs, latency and Dice."""
    from rich.console import Console
    from rich.table import Table

    from segability.cli.console import literal
    from segability.prune import RANKINGS, plot_prune_curve, prune_curve

    console = Console()
    if structural:
        _structural(
            console, out=out, demo=demo, model=model, weights=weights, model_arg=model_arg, trust_pickle=trust_pickle,
            images=images, labels=labels, label_suffix=label_suffix, rank_images=rank_images, rank_labels=rank_labels,
            preprocess=preprocess, fraction=fraction or "0.25,0.5,0.75", rankings=rankings, seeds=seeds or "0",
            scope=scope or "layer,global", layers=layers, finetune_epochs=finetune_epochs, finetune_steps=finetune_steps,
            n=n, n_train=n_train, shift_n=shift_n, size=size, cache_dir=cache_dir, batch_size=batch_size, device=device,
            force=force,
        )
        return
    scope = scope or "layer"
    try:
        existing = [name for name in OUTPUTS if (out / name).exists()]
        if existing and not force:
            raise FileExistsError(f"{out} already holds {', '.join(existing)}; pass --force to replace them")
        fractions = _floats(fraction or "0,0.1,0.2,0.3,0.5", "--fraction")
        ranking_list = _names(rankings or ",".join(RANKINGS), "--rankings")
        unknown = [r for r in ranking_list if r not in RANKINGS]
        if unknown:
            raise ValueError(f"--rankings must be among {', '.join(RANKINGS)}, got {unknown}")
        seed_list = [int(s) for s in _floats(seeds or "0,1,2", "--seeds")]
        if scope not in ("layer", "global"):
            raise ValueError(f"--scope must be 'layer' or 'global', got {scope!r}")
        layer_spec = "auto" if layers is None else _names(layers, "--layers")
        if demo:
            if model is not None or images is not None:
                raise ValueError("--demo uses the shipped model and data: leave out --model and --images")
            from segability.datasets import mni_lesions
            from segability.models import load_reference_model

            with console.status("Loading the reference model and mni_lesions data…"):
                net = load_reference_model(device=device)
                rank = mni_lesions(n, "train", size=size, cache_dir=cache_dir)
                evaluation = mni_lesions(n, "val", size=size, cache_dir=cache_dir)
                x, y = evaluation.as_tensors()
                rx, ry = rank.as_tensors()
            title = f"Reference UNet, mni_lesions val (n={n}); SA ranked on train (n={n})"
        else:
            if model is None or images is None or labels is None:
                raise ValueError("give --model, --images and --labels (or --demo)")
            from segability.io import load_model, load_preprocess, parse_model_args

            net = load_model(model, weights, trust_pickle=trust_pickle, device=device, model_args=parse_model_args(model_arg))
            pre = load_preprocess(preprocess)
            with console.status("Reading images…"):
                x, y = _load_folder(images, labels, label_suffix, pre, "--images")
                rx = ry = None
                if rank_images is not None:
                    if rank_labels is None:
                        raise ValueError("--rank-images needs --rank-labels")
                    rx, ry = _load_folder(rank_images, rank_labels, label_suffix, pre, "--rank-images")
            title = f"{type(net).__name__} on {images} (n={len(x)})"
        table = prune_curve(
            net, x, y, fractions=fractions, rankings=ranking_list, seeds=seed_list, scope=scope,
            layers=layer_spec, rank_images=rx, rank_labels=ry, batch_size=batch_size, progress=True,
        )
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "prune.csv", index=False)
        plot_prune_curve(table, out / "prune.png", title=title)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        console.print(f"[red]error:[/red] {literal(exc)}")
        raise typer.Exit(2) from None

    summary = Table(title=f"Output Dice after zeroing the lowest-ranked units ({scope} scope)")
    summary.add_column("fraction", justify="right")
    present = [r for r in RANKINGS if r in set(table["ranking"])]
    for r in present:
        summary.add_column(r if r != "random" else f"random (min-max, {len(seed_list)} seeds)", justify="right")
    for f, part in table.groupby("fraction", sort=True):
        cells = [f"{f:.2f}"]
        for r in present:
            d = part.loc[part["ranking"] == r, "dice"]
            cells.append(f"{d.mean():.3f}" if len(d) == 1 else f"{d.mean():.3f} ({d.min():.3f}-{d.max():.3f})")
        summary.add_row(*cells)
    console.print(summary)
    console.print(f"Wrote {literal(out / 'prune.csv')} and {literal(out / 'prune.png')}")


def _stack(xs, ys, argument: str):
    import torch

    if len({tuple(x.shape) for x in xs}) > 1:
        raise ValueError(f"{argument}: fine-tuning needs images of one size, got {sorted({tuple(x.shape) for x in xs})}")
    y = torch.stack([torch.as_tensor(v) for v in ys])
    return torch.stack([torch.as_tensor(v) for v in xs]).float(), (y if y.ndim == 4 else y[:, None]).float()


def _structural(console, *, out, demo, model, weights, model_arg, trust_pickle, images, labels, label_suffix, rank_images,
                rank_labels, preprocess, fraction, rankings, seeds, scope, layers, finetune_epochs, finetune_steps, n,
                n_train, shift_n, size, cache_dir, batch_size, device, force) -> None:
    """``segability prune --structural``: remove, fine-tune, measure; see the module docstring."""
    from rich.progress import Progress
    from rich.table import Table

    from segability.cli.console import literal

    try:
        from segability.compress import (
            RANKINGS,
            FinetuneConfig,
            StudyConfig,
            compress_study,
            plot_pareto,
            prunable_groups,
        )

        existing = [name for name in STRUCTURAL_OUTPUTS if (out / name).exists()]
        if existing and not force:
            raise FileExistsError(f"{out} already holds {', '.join(existing)}; pass --force to replace them")
        ranking_list = _names(rankings or ",".join(RANKINGS), "--rankings")
        unknown = [r for r in ranking_list if r not in RANKINGS]
        if unknown:
            raise ValueError(f"--rankings must be among {', '.join(RANKINGS)}, got {unknown}")
        scopes = _names(scope, "--scope")
        if any(s not in ("layer", "global") for s in scopes):
            raise ValueError(f"--scope must be 'layer', 'global' or both, got {scope!r}")
        config = StudyConfig(
            fractions=tuple(_floats(fraction, "--fraction")), rankings=tuple(ranking_list), scopes=tuple(scopes),
            seeds=tuple(int(s) for s in _floats(seeds, "--seeds")), batch_size=batch_size,
            finetune=FinetuneConfig(epochs=finetune_epochs, steps_per_epoch=finetune_steps),
        )
        evaluate = {}
        if demo:
            if model is not None or images is not None:
                raise ValueError("--demo uses the shipped model and data: leave out --model and --images")
            from segability.datasets import SHIFTS, mni_lesions, shifted_suite
            from segability.models import REFERENCE_ARCH, load_reference_model, reference_card

            with console.status("Loading the reference model and mni_lesions data…"):
                net = load_reference_model(device=device)
                card = reference_card().get("architecture", {})
                factory = "segability.models:reference_unet"
                factory_args = {**REFERENCE_ARCH, **{k: tuple(v) if isinstance(v, list) else v for k, v in card.items()}}
                train = mni_lesions(n_train, "train", size=size, cache_dir=cache_dir).as_tensors()
                rank = mni_lesions(n, "train", size=size, cache_dir=cache_dir).as_tensors()
                val = mni_lesions(n, "val", size=size, seed=1, cache_dir=cache_dir)  # the trainer's validation set
                evaluate["val"] = val.as_tensors()
                if shift_n > 0:
                    suite = shifted_suite(val.subset(slice(0, min(shift_n, n))), SHIFTS, (0.5, 1.0))
                    evaluate["shift"] = suite.as_tensors()
            title = f"Reference UNet on mni_lesions val (n={n}), fine-tuned on train (n={n_train})"
        else:
            if model is None or images is None or labels is None:
                raise ValueError("give --model, --images and --labels (or --demo)")
            from segability.io import load_model, load_preprocess, parse_model_args

            factory, factory_args = model, parse_model_args(model_arg)
            net = load_model(model, weights, trust_pickle=trust_pickle, device=device, model_args=factory_args)
            pre = load_preprocess(preprocess)
            with console.status("Reading images…"):
                evaluate["val"] = _load_folder(images, labels, label_suffix, pre, "--images")
                if rank_images is None:
                    if finetune_epochs > 0:
                        raise ValueError("--structural fine-tunes on --rank-images / --rank-labels: give them, or --finetune-epochs 0")
                    rank = train = evaluate["val"]
                else:
                    if rank_labels is None:
                        raise ValueError("--rank-images needs --rank-labels")
                    rank = _load_folder(rank_images, rank_labels, label_suffix, pre, "--rank-images")
                    train = _stack(*rank, "--rank-images") if finetune_epochs > 0 else rank
            title = f"{type(net).__name__} on {images} (n={len(evaluate['val'][0])})"
        example = evaluate["val"][0][:1] if not isinstance(evaluate["val"][0], list) else evaluate["val"][0][0][None]
        groups = prunable_groups(net, example, "auto" if layers is None else _names(layers, "--layers"))
        per_ranking = len(config.scopes) * len(config.fractions)
        total = len(config.seeds) * (1 + per_ranking * len(config.rankings))
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("pruning and fine-tuning", total=total)
            table = compress_study(
                net, train, evaluate, config, rank=rank, example=example, groups=groups, out_dir=out / "models",
                factory=factory, factory_args=factory_args, on_row=lambda row: bar.advance(task),
            )
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "prune.csv", index=False)
        plot_pareto(table, out / "prune_pareto.png", title=title)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as exc:
        console.print(f"[red]error:[/red] {literal(exc)}")
        raise typer.Exit(2) from None

    summary = Table(title=f"Structural pruning, fine-tuned {finetune_epochs} x {finetune_steps} steps (mean over seeds)")
    dice_columns = [c for c in table.columns if c.startswith("dice_")]
    for column in ["ranking", "scope", "fraction", "MACs kept", "latency ms", *dice_columns]:
        summary.add_column(column.replace("dice_", "Dice ").replace("_", " "), justify="left" if column in ("ranking", "scope") else "right")
    stats = table.groupby(["ranking", "scope", "fraction"], sort=False)
    for (ranking, scope_name, f), part in stats:
        cells = [ranking, scope_name, f"{f:.2f}", f"{part['macs_kept'].mean():.2f}", f"{part['latency_ms'].median():.1f}"]
        cells += [f"{part[c].mean():.3f}" for c in dice_columns]
        summary.add_row(*cells)
    console.print(summary)
    console.print(f"Wrote {literal(out / 'prune.csv')}, {literal(out / 'prune_pareto.png')} and {len(table)} models in {literal(out / 'models')}")
