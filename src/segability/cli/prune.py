"""``segability prune``: does SA rank units better than weight norms? Zero the lowest-ranked units
and watch the output Dice.

Writes ``OUT/prune.csv`` (ranking, fraction, seed, dice, pruned_units) and ``OUT/prune.png``, and
prints the comparison table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from segability.cli.app import app

OUTPUTS = ("prune.csv", "prune.png")


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
    fraction: Annotated[str, typer.Option("--fraction", help="Fractions of units to zero, comma-separated.")] = "0,0.1,0.2,0.3,0.5",
    rankings: Annotated[str, typer.Option("--rankings", help="Rankings to compare: sa, l1, random.")] = "sa,l1,random",
    seeds: Annotated[str, typer.Option("--seeds", help="Seeds of the random ranking.")] = "0,1,2",
    scope: Annotated[str, typer.Option("--scope", help="'layer': the fraction of every layer; 'global': of the whole network.")] = "layer",
    layers: Annotated[str | None, typer.Option("--layers", help="Layers that may be pruned (names or glob patterns, comma-separated) [default: every convolution but the output ones].")] = None,
    n: Annotated[int, typer.Option("--n", min=1, help="--demo: images in each of the ranking and evaluation sets.")] = 64,
    size: Annotated[int, typer.Option("--size", min=16, help="--demo: image side in pixels.")] = 128,
    cache_dir: Annotated[Path | None, typer.Option("--cache-dir", help="--demo: where generated data is cached.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")] = 8,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1, ...")] = "cpu",
    force: Annotated[bool, typer.Option("--force", help="Replace prune.csv / prune.png in --out.")] = False,
) -> None:
    """Zero the lowest-ranked units (by SA, L1 norm or at random) and measure the output Dice."""
    from rich.console import Console
    from rich.table import Table

    from segability.cli.console import literal
    from segability.prune import RANKINGS, plot_prune_curve, prune_curve

    console = Console()
    try:
        existing = [name for name in OUTPUTS if (out / name).exists()]
        if existing and not force:
            raise FileExistsError(f"{out} already holds {', '.join(existing)}; pass --force to replace them")
        fractions = _floats(fraction, "--fraction")
        ranking_list = _names(rankings, "--rankings")
        unknown = [r for r in ranking_list if r not in RANKINGS]
        if unknown:
            raise ValueError(f"--rankings must be among {', '.join(RANKINGS)}, got {unknown}")
        seed_list = [int(s) for s in _floats(seeds, "--seeds")]
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
