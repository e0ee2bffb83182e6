"""Structural pruning of the shipped model: what the saved MACs buy on a CPU, and where SA ranks badly.

Every figure comes from ``segability.compress`` (the shipped UNet from
``segability.models.load_reference_model``, ``mni_lesions`` data, nothing downloaded); the section
"Structural pruning (issue 17 ...)" of ``docs/results.md`` quotes it.

1. **latency**: the unpruned model and four pruned copies (SA per layer 30 % and 50 %, SA global
   50 %, random seed 0 global 50 %; pruned with ``prunable_groups``, ``group_scores``,
   ``units_for_fraction`` and ``prune_units``, not fine-tuned: the weights do not change the
   time) run a forward pass of one 128 x 128 slice each, interleaved over ``--rounds`` rounds
   (the starting model rotates every round, so all see the same load), with
   ``torch.set_num_threads(1)``. Per model: the median time, and the MACs and latency kept, both
   divided by the unpruned model's in the same repetition. ``--repetitions`` repeats the whole
   interleaved block. ``--clock cpu`` times process CPU time instead of wall time: steadier where
   other jobs share the cores.
2. **groups**: 50 % of one group's units at a time (the rest untouched), by each ranking (SA,
   L1, Taylor, random), before fine-tuning: the Dice of the output on the trainer's validation
   slices. Below it, the units the global scope at 50 % removes from each group.
3. **zeroing**: every other unit of every group removed, against the same units zeroed (a) only
   at the convolutions' outputs (``segability prune`` without ``--structural``) and (b) after
   every layer that carries them (``zeroing_plan``): the largest difference of the logits on a
   random 64 x 64 input (standard normal, seed 0).
4. **long** (``--long`` or ``--only long``, about 8 min on one core): four times the fine-tuning of the
   ``segability prune --structural`` run (4 x 50 AdamW steps on 200 training slices, seeds 0, 1,
   2) for the unpruned model and the four rankings at about half the MACs; validation Dice after.

The SA and Taylor rankings are measured on the first ``--n`` ``mni_lesions`` training slices
(seed 0), the Dice on the first ``--n`` validation slices of seed 1 (the trainer's validation set),
as ``segability prune --structural --demo`` does.

    python benchmarks/bench_compress.py --quick             # under a minute
    python benchmarks/bench_compress.py --clock cpu         # the figures of docs/results.md
    python benchmarks/bench_compress.py --only long         # the longer fine-tuning (8 min)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segability.compress import (
    FinetuneConfig,
    finetune,
    group_scores,
    model_cost,
    prunable_groups,
    prune_units,
    units_for_fraction,
    zeroing_plan,
)
from segability.datasets import mni_lesions
from segability.models import load_reference_model
from segability.prune import mask_units, output_dice

PARTS = ("latency", "groups", "zeroing", "long")
RANKINGS = ("sa", "l1", "taylor")  # and random, with its seeds
# (label, ranking, scope, fraction) of the latency comparison
LATENCY_MODELS = (
    ("SA, per layer, 30 %", "sa", "layer", 0.3),
    ("SA, global, 50 %", "sa", "global", 0.5),
    ("SA, per layer, 50 %", "sa", "layer", 0.5),
    ("random, global, 50 %", "random", "global", 0.5),
)
# the rankings at about half the MACs (0.52-0.53 kept) in the 2 x 25-step study
LONG_MODELS = (
    ("SA, global, 50 %", "sa", "global", 0.5),
    ("L1, per layer, 30 %", "l1", "layer", 0.3),
    ("random, global, 30 %", "random", "global", 0.3),
    ("Taylor, per layer, 30 %", "taylor", "layer", 0.3),
)


def _pruned(net: nn.Module, scores: dict[str, torch.Tensor], ranking: str, scope: str, fraction: float, example: torch.Tensor) -> nn.Module:
    # compress_study does not normalise random scores for the global scope; neither does this.
    chosen = units_for_fraction(scores, fraction, scope, normalize=ranking != "random")
    return prune_units(copy.deepcopy(net), chosen, example)


def _dice(net: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    return float(output_dice(net, data[0], data[1], batch_size=8).mean())


def _print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True))))
    for r in rows:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))


def latency(net, scores, example, *, rounds: int, repetitions: int, warmup: int, clock: str) -> list[dict[str, Any]]:
    """Interleaved one-thread forward passes; median per model and repetition, ratios to the unpruned."""
    models = [("unpruned", net)]
    models += [(label, _pruned(net, scores[ranking], ranking, scope, fraction, example)) for label, ranking, scope, fraction in LATENCY_MODELS]
    timer = time.process_time if clock == "cpu" else time.perf_counter
    x = example[:1].float()
    macs = {label: model_cost(m, x)[1] for label, m in models}
    params = {label: model_cost(m, x)[0] for label, m in models}
    rows = []
    with torch.inference_mode():
        for m in (m for _, m in models):
            m.eval()
        for rep in range(repetitions):
            times: dict[str, list[float]] = {label: [] for label, _ in models}
            for r in range(warmup + rounds):
                for k in range(len(models)):
                    label, m = models[(r + k) % len(models)]
                    start = timer()
                    m(x)
                    if r >= warmup:
                        times[label].append(timer() - start)
            base = statistics.median(times["unpruned"])
            for label, _ in models:
                med = statistics.median(times[label])
                rows.append({
                    "model": label, "repetition": rep, "params": params[label], "macs": macs[label],
                    "macs_kept": macs[label] / macs["unpruned"], "latency_ms": 1e3 * med, "latency_kept": med / base,
                })
    return rows


def groups_table(net, groups, scores, val, example) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Dice before fine-tuning with 50 % of one group pruned; units the global scope takes at 50 %."""
    rows = []
    for g in groups:
        for name, s in scores.items():
            ranking = name.split(":")[0]
            chosen = units_for_fraction({g.name: s[g.name]}, 0.5, "layer")
            pruned = prune_units(copy.deepcopy(net), chosen, example)
            rows.append({"group": g.name, "units": g.channels, "ranking": ranking,
                         "seed": int(name.split(":")[1]) if ":" in name else None,
                         "removed": len(chosen[g.name]), "dice_val": _dice(pruned, val)})
    taken = []
    for name, s in scores.items():
        ranking = name.split(":")[0]
        chosen = units_for_fraction(s, 0.5, "global", normalize=ranking != "random")
        for g in groups:
            taken.append({"group": g.name, "units": g.channels, "ranking": ranking,
                          "seed": int(name.split(":")[1]) if ":" in name else None, "removed": len(chosen.get(g.name, []))})
    return rows, taken


def zeroing(net, groups) -> dict[str, float]:
    """Largest |logit difference| between the pruned network and two hook-zeroed ones."""
    x = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    units = {g.name: list(range(1, g.channels, 2)) for g in groups}
    convs = {layer: units[g.name] for g in groups for layer in g.layers}
    with torch.no_grad():
        pruned = prune_units(copy.deepcopy(net), units, x)(x)
        with mask_units(net, convs):
            conv_only = net(x)
        with mask_units(net, zeroing_plan(net, units, x)):
            every_layer = net(x)
    return {"max_abs_diff_conv_only": float((pruned - conv_only).abs().max()),
            "max_abs_diff_every_layer": float((pruned - every_layer).abs().max())}


def long_finetune(net, groups, rank, train, val, example, seeds, steps: tuple[int, int]) -> list[dict[str, Any]]:
    """Fine-tune the unpruned model and the four half-MACs models for ``steps`` (epochs, steps) per seed."""
    config = FinetuneConfig(epochs=steps[0], steps_per_epoch=steps[1])
    fixed = {r: group_scores(net, groups, r, *rank, batch_size=8) for r in ("sa", "l1", "taylor")}
    base_macs = model_cost(net, example)[1]
    rows = []
    for seed in seeds:
        candidates = [("none (unpruned)", copy.deepcopy(net))]
        for label, ranking, scope, fraction in LONG_MODELS:
            scores = fixed[ranking] if ranking in fixed else group_scores(net, groups, ranking, seed=seed)
            candidates.append((label, _pruned(net, scores, ranking, scope, fraction, example)))
        for label, model in candidates:
            started = time.perf_counter()
            finetune(model, *train, config, seed=seed)
            macs = model_cost(model, example)[1]
            rows.append({"model": label, "seed": seed, "macs": macs, "macs_kept": macs / base_macs,
                         "dice_val_after": _dice(model, val), "seconds": time.perf_counter() - started})
            print(f"  long: {label:24s} seed {seed}  Dice {rows[-1]['dice_val_after']:.3f}  ({rows[-1]['seconds']:.0f} s)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 ranking and validation slices, 60 rounds, 1 repetition, random seed 0")
    parser.add_argument("--long", action="store_true", help="also the 4 x 50-step fine-tuning check (about 10 min)")
    parser.add_argument("--only", choices=PARTS, action="append", help="run only this part (repeatable)")
    parser.add_argument("--n", type=int, default=None, help="ranking and validation slices [64; --quick 16]")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved latency rounds [200; --quick 60]")
    parser.add_argument("--repetitions", type=int, default=None, help="interleaved latency blocks [2; --quick 1]")
    parser.add_argument("--warmup", type=int, default=5, help="latency rounds not counted")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="latency clock: wall or process CPU time")
    parser.add_argument("--random-seeds", default=None, help="seeds of the random ranking in the group table [0,1,2; --quick 0]")
    parser.add_argument("--cache-dir", default=None, help="where generated data is cached")
    parser.add_argument("--out", type=Path, default=None, help="write every row as JSON")
    args = parser.parse_args()

    parts = tuple(args.only) if args.only else ("latency", "groups", "zeroing", *(("long",) if args.long else ()))
    n = args.n or (16 if args.quick else 64)
    rounds = args.rounds or (60 if args.quick else 200)
    repetitions = args.repetitions or (1 if args.quick else 2)
    random_seeds = [int(s) for s in (args.random_seeds or ("0" if args.quick else "0,1,2")).split(",")]
    torch.set_num_threads(1)
    import torch_pruning

    started = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, torch-pruning {torch_pruning.__version__}, {platform.processor() or platform.machine()}, "
          f"1 thread, load average {load:.1f}; parts {', '.join(parts)}; n = {n}")
    net = load_reference_model().eval()
    rank = mni_lesions(n, "train", size=128, cache_dir=args.cache_dir).as_tensors()
    val = mni_lesions(n, "val", size=128, seed=1, cache_dir=args.cache_dir).as_tensors()
    example = val[0][:1]
    groups = prunable_groups(net, example)
    print(f"{len(groups)} groups of {', '.join(str(g.channels) for g in groups)} units; unpruned validation Dice {_dice(net, val):.3f}")
    report: dict[str, Any] = {"config": {"parts": parts, "n": n, "rounds": rounds, "repetitions": repetitions, "warmup": args.warmup,
                                         "clock": args.clock, "random_seeds": random_seeds, "torch": torch.__version__,
                                         "torch_pruning": torch_pruning.__version__, "load_average": load}}
    scores: dict[str, dict[str, torch.Tensor]] = {}
    if "latency" in parts or "groups" in parts:
        scores = {r: group_scores(net, groups, r, *rank, batch_size=8) for r in RANKINGS}
        scores.update({f"random:{s}": group_scores(net, groups, "random", seed=s) for s in random_seeds})

    if "latency" in parts:
        rows = latency(net, {"sa": scores["sa"], "random": group_scores(net, groups, "random", seed=0)}, example,
                       rounds=rounds, repetitions=repetitions, warmup=args.warmup, clock=args.clock)
        report["latency"] = rows
        table = []
        for label in dict.fromkeys(r["model"] for r in rows):
            mine = [r for r in rows if r["model"] == label]
            table.append([label, f"{mine[0]['params']:,}", f"{mine[0]['macs'] / 1e6:.1f}", f"{mine[0]['macs_kept']:.2f}",
                          " / ".join(f"{r['latency_ms']:.1f}" for r in mine), " / ".join(f"{r['latency_kept']:.2f}" for r in mine)])
        _print_table(f"Latency, one 128 x 128 slice, 1 thread, {args.clock} clock: median of {rounds} interleaved rounds "
                     f"(one column entry per repetition); kept = pruned / unpruned in the same run",
                     ["model", "params", "MACs (M)", "MACs kept", "latency ms", "latency kept"], table)

    if "groups" in parts:
        rows, taken = groups_table(net, groups, scores, val, example)
        report["groups"], report["global_units"] = rows, taken
        table = []
        for g in groups:
            mine = [r for r in rows if r["group"] == g.name]
            cells = [g.name, str(g.channels)] + [f"{next(r['dice_val'] for r in mine if r['ranking'] == k):.3f}" for k in RANKINGS]
            cells.append(" / ".join(f"{r['dice_val']:.3f}" for r in mine if r["ranking"] == "random"))
            table.append(cells)
        _print_table(f"Validation Dice (n = {n}) with 50 % of one group pruned, before fine-tuning",
                     ["group (root)", "units", "SA", "L1", "Taylor", f"random (seeds {','.join(map(str, random_seeds))})"], table)
        table = []
        for g in groups:
            mine = [r for r in taken if r["group"] == g.name]
            cells = [g.name, str(g.channels)] + [str(next(r["removed"] for r in mine if r["ranking"] == k)) for k in RANKINGS]
            cells.append(" / ".join(str(r["removed"]) for r in mine if r["ranking"] == "random"))
            table.append(cells)
        _print_table("Units removed from each group by the global scope at 50 % (SA, L1, Taylor scores L2-normalised per group)",
                     ["group (root)", "units", "SA", "L1", "Taylor", "random"], table)

    if "zeroing" in parts:
        report["zeroing"] = found = zeroing(net, groups)
        print("\nEvery other unit of every group removed vs zeroed, random 64 x 64 input: largest |logit difference| "
              f"{found['max_abs_diff_conv_only']:.3g} zeroing only the convolutions, "
              f"{found['max_abs_diff_every_layer']:.2g} zeroing after every layer (zeroing_plan)")

    if "long" in parts:
        train = mni_lesions(200, "train", size=128, cache_dir=args.cache_dir).as_tensors()
        rows = long_finetune(net, groups, rank, train, val, example, (0, 1, 2), (4, 50))
        report["long"] = rows
        table = []
        for label in dict.fromkeys(r["model"] for r in rows):
            d = [r["dice_val_after"] for r in rows if r["model"] == label]
            macs = dict.fromkeys(f"{r['macs'] / 1e6:.1f}" for r in rows if r["model"] == label)  # by seed
            table.append([label, " / ".join(macs), f"{statistics.mean(d):.3f} +- {statistics.stdev(d):.3f} ({min(d):.3f}-{max(d):.3f})"])
        _print_table(f"Validation Dice (n = {n}) after 4 x 50 fine-tuning steps (200 training slices; mean +- sample std, min-max over seeds 0, 1, 2)",
                     ["model", "MACs (M)", "Dice val after"], table)

    print(f"\n{time.perf_counter() - started:.0f} s")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
