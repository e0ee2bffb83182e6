"""``segability demo`` and ``segability train``."""

from __future__ import annotations

from pathlib import Path

import typer

from segability.cli.app import app
from segability.cli.console import EXIT_USAGE, fail, literal, printable


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Run folder (never overwritten without --force)."),
    force: bool = typer.Option(False, "--force", help="Replace the results of an earlier run in --out."),
    quick: bool = typer.Option(False, "--quick", help="A reduced run (a few images, three shifts)."),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help="Where generated data is cached."),
    no_report: bool = typer.Option(False, "--no-report", help="Skip the HTML report."),
) -> None:
    """Open the shipped reference UNet layer by layer on the embedded MNI152 lesion data."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from segability.demo import DemoConfig, run_demo

    console = Console()
    cfg = DemoConfig.quick() if quick else DemoConfig()
    try:
        summary = run_demo(out, force=force, config=cfg, cache_dir=cache_dir, console=console, report=not no_report)
    except FileExistsError as exc:
        fail(console, exc)
    table = Table(title="SA per layer (clean test set, forward order)")
    for col in ("depth", "layer", "mean SA", "IQR"):
        table.add_column(col, justify="right" if col != "layer" else "left")
    for row in summary.layer_sa.itertuples(index=False):
        table.add_row(str(row.depth), row.layer, f"{row.mean:.3f}", f"{row.q25:.2f}-{row.q75:.2f}")
    console.print(table)
    for note in summary.findings:
        console.print(f"- {note}")
    console.print(
        f"Label-free mean SA vs true Dice: Spearman [bold]{summary.spearman:.3f}[/bold], "
        f"Pearson [bold]{summary.pearson:.3f}[/bold]; the gate flags {summary.flagged} of {summary.n_gate} images."
    )
    console.print(f"Finished in {summary.timing.get('total', 0):.1f} s. Run folder: {literal(summary.out)}")
    if summary.report is not None:
        console.print(Text.assemble("Report: ", (printable(summary.report), "bold")))


@app.command()
def train(
    task: str = typer.Option("mni-lesions", "--task", help="The task to train (only 'mni-lesions')."),
    out: Path = typer.Option(Path("runs/train"), "--out", help="Where the checkpoint, card and history go."),
    epochs: int | None = typer.Option(None, "--epochs", help="Epochs (default: those of the shipped model)."),
    seed: int = typer.Option(0, "--seed"),
    n_train: int | None = typer.Option(None, "--n-train", help="Training slices."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing checkpoint in --out."),
    cache_dir: Path | None = typer.Option(None, "--cache-dir"),
    threads: int | None = typer.Option(None, "--threads", help="torch threads (1 is fastest on a busy machine)."),
) -> None:
    """Train the reference model (what is shipped in the package) and record SA per layer per epoch."""
    from rich.console import Console

    from segability.train import TrainConfig, train_reference

    console = Console()
    if task != "mni-lesions":
        fail(console, f"unknown task {task!r}; the only task is 'mni-lesions'", EXIT_USAGE)
    if (out / "reference_unet.pt").exists() and not force:
        fail(console, f"{out / 'reference_unet.pt'} exists; pass --force to overwrite it", EXIT_USAGE)
    cfg = TrainConfig(seed=seed, threads=threads)
    if epochs is not None:
        cfg.epochs = epochs
    if n_train is not None:
        cfg.n_train = n_train

    def on_epoch(epoch: int, m: dict) -> None:
        console.log(f"epoch {epoch}/{cfg.epochs}: loss {m['loss']:.4f}, validation Dice {m['val_dice']:.4f} ({m['seconds']:.0f} s)")

    # the card records the command without this machine's paths
    command = f"segability train --task {task} --seed {seed} --epochs {cfg.epochs} --n-train {cfg.n_train}"
    if threads:
        command += f" --threads {threads}"
    result = train_reference(cfg, out_dir=out, cache_dir=cache_dir, on_epoch=on_epoch, command=command)
    card = result.card
    console.print(
        f"validation Dice {card['validation_dice']}, {card['training_seconds']} s; wrote {literal(out / 'reference_unet.pt')} "
        f"(sha256 {card['sha256'][:12]}...), card and history.csv"
    )
