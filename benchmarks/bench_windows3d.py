"""Cost of sliding-window analysis of a 3D nnU-Net-style network vs its sliding-window inference.

    python benchmarks/bench_windows3d.py [--quick] [--repeats 3] [--patch 96] [--scale 1.5] [--axes 3]
                                         [--overlap 0.5] [--threads N] [--device cpu|cuda] [--out rows.json]
                                         [--memory-budget MiB]

The network is dynamic_network_architectures' ``PlainConvUNet`` as nnU-Net's 3d_fullres plans it:
6 stages, 32, 64, 128, 256, 320, 320 features, kernel 3, strides 1, 2, 2, 2, 2, 2, two
convolutions per stage (encoder and decoder), instance norm, leaky ReLU, no deep supervision,
random weights, eval mode. The volume is ``--scale`` times the patch along the first ``--axes``
axes (default 1.5 along all 3: 8 windows at overlap 0.5), so it takes several windows. The patch
must be a multiple of 32 (five stride-2 stages) and at least 64. ``--quick``: patch 64^3, the
volume 1.5x along one axis (96 x 64 x 64, 2 windows), one repeat, no labelled case.

Cases, on the same volume, alternated ``--repeats`` times after one warm-up each (medians):

- ``inference``: MONAI ``sliding_window_inference`` of the bare network (roi = the patch,
  ``--overlap``, gaussian blending, ``sw_batch_size=1``), under ``torch.no_grad``. The baseline.
- ``analysis``: ``segability.analysis.windows.analyze_windows`` on the same roi and overlap,
  ``layers`` = every encoder and decoder stage (``encoder.stages.i``, ``decoder.stages.i``: one
  output per stage, 11 layers), label-free.
- ``analysis + label``: the same with a label (``sa`` against the label as well).

Printed: seconds, the multiple of ``inference``, and the extra cost ``multiple - 1``. The issue's
target for layer SA on CPU: <= 1x extra (total <= 2x inference). Peak RSS (``ru_maxrss``) is read
after the warm-up of the baseline and again at the end, so the second minus the first is what the
analysis added to the process's peak.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
import warnings

import torch
from torch import nn

import segability


def plain_conv_unet(channels: int = 1, classes: int = 2) -> nn.Module:
    """The 3d_fullres-like PlainConvUNet: 6 stages, 32..320 features, kernel 3, strides 1,2,2,2,2,2."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    features = [min(32 * 2**i, 320) for i in range(6)]
    return PlainConvUNet(
        input_channels=channels, n_stages=6, features_per_stage=features, conv_op=nn.Conv3d, kernel_sizes=3,
        strides=[1, 2, 2, 2, 2, 2], n_conv_per_stage=2, num_classes=classes, n_conv_per_stage_decoder=2,
        conv_bias=True, norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=False,
    )  # fmt: skip


def stage_layers(model: nn.Module) -> list[str]:
    """``encoder.stages.i`` and ``decoder.stages.i``: the output of every stage."""
    return [n for n, _ in model.named_modules() if n.count(".") == 2 and n.split(".")[1] == "stages"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_rss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="patch 64^3, 1.5x along one axis, 1 repeat (default 96^3, 3 axes)")
    parser.add_argument("--patch", type=int, default=None, help="isotropic patch size (roi), a multiple of 32")
    parser.add_argument("--scale", type=float, default=1.5, help="volume size along the scaled axes, in patches")
    parser.add_argument("--axes", type=int, default=None, help="how many axes are scaled (default 3; --quick 1)")
    parser.add_argument("--overlap", type=float, default=0.5, help="window overlap (nnU-Net: 0.5)")
    parser.add_argument("--repeats", type=int, default=None, help="default 3 (--quick 1)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="write the rows as JSON")
    parser.add_argument("--memory-budget", type=int, default=512, help="MiB of layer outputs kept between the steps "
                        "(analyze_windows' memory_budget; default segability's 512): windows beyond it run again")  # fmt: skip
    args = parser.parse_args()
    from monai.inferers import sliding_window_inference

    from segability.analysis.windows import analyze_windows

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    patch = args.patch or (64 if args.quick else 96)
    if patch % 32 or patch < 64:
        parser.error("--patch must be a multiple of 32, at least 64 (five stride-2 stages, instance norm)")
    axes = args.axes or (1 if args.quick else 3)
    repeats = args.repeats or (1 if args.quick else 3)
    shape = tuple(round(patch * args.scale) if i < axes else patch for i in range(3))
    roi = (patch,) * 3
    torch.manual_seed(0)
    model = plain_conv_unet().to(device).eval()
    layers = stage_layers(model)
    volume = torch.randn(1, *shape)
    # A ball as label: analysis with a label also scores sa against it.
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, s) for s in shape], indexing="ij"))
    label = (grid.pow(2).sum(0) < 0.4).float()[None]

    def inference() -> None:
        with torch.no_grad():
            sliding_window_inference(volume[None].to(device), roi, 1, model, overlap=args.overlap, mode="gaussian")

    budget = args.memory_budget * 2**20
    cases = {
        "inference": inference,
        "analysis": lambda: analyze_windows(model, volume, roi_size=roi, overlap=args.overlap, layers=layers, device=device,
                                            memory_budget=budget),  # fmt: skip
    }
    if not args.quick:
        cases["analysis + label"] = lambda: analyze_windows(
            model, volume, label, roi_size=roi, overlap=args.overlap, layers=layers, device=device, memory_budget=budget
        )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"segability {segability.__version__}, torch {torch.__version__}, device: {name}")
    size = "x".join(map(str, shape))
    print(f"PlainConvUNet 3D, 6 stages, volume {size}, patch {patch}^3, overlap {args.overlap}, {repeats} repeat(s), "
          f"memory budget {args.memory_budget} MiB, {len(layers)} layers: {layers}")  # fmt: skip
    times: dict[str, list[float]] = {case: [] for case in cases}
    rss_base = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for case, fn in cases.items():  # warm-up
            fn()
            if case == "inference":
                rss_base = _peak_rss_mib()
        for _ in range(repeats):
            for case, fn in cases.items():
                _sync(device)
                start = time.perf_counter()
                fn()
                _sync(device)
                times[case].append(time.perf_counter() - start)
    rss_end = _peak_rss_mib()
    base = statistics.median(times["inference"])
    rows = []
    print(f"  {'case':<20}{'seconds':>10}{'x inference':>14}{'extra':>8}")
    for case, ts in times.items():
        t = statistics.median(ts)
        print(f"  {case:<20}{t:>10.2f}{t / base:>14.2f}{t / base - 1:>8.2f}", flush=True)
        rows.append({"case": case, "seconds": t, "x_inference": t / base, "all_seconds": ts, "patch": patch,
                     "volume": list(shape), "overlap": args.overlap, "device": name})  # fmt: skip
    print(f"  peak RSS: {rss_base:.0f} MiB after the baseline's warm-up, {rss_end:.0f} MiB at the end (+{rss_end - rss_base:.0f} MiB)")
    print("  target: analysis <= 2.00x inference (<= 1x extra)")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
