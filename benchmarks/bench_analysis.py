"""End-to-end cost of the analysis: all layers (and all units) of a model vs its plain forward pass.

    python benchmarks/bench_analysis.py [--device cpu|cuda] [--quick] [--repeats 3]

For each model, on the same batch: the median time of the plain forward pass (eval, no_grad), of
`segability.analyze` over every convolution + the input (label-free, and with labels), and with
`units=True`. Prints each as a multiple of the forward pass. The issue's target: analysing every
layer of the demo model costs at most as much again as its forward pass (total <= 2x inference).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch

import segability
from segability.analysis import analyze


def _median_time(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _models(quick: bool):
    from monai.networks.nets import UNet

    from segability.models import REFERENCE_ARCH, load_reference_model

    try:
        demo = load_reference_model()
        name = "demo reference UNet (trained)"
    except FileNotFoundError:
        demo = UNet(**REFERENCE_ARCH)
        name = "demo reference UNet (untrained: no checkpoint)"
    yield name, demo, (16, 1, 128, 128)
    unet3d = UNet(3, 1, 1, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=1)
    yield "MONAI UNet 3D (16-128 ch)", unet3d, ((1, 1, 64, 64, 64) if quick else (1, 1, 96, 96, 96))


def _cases(model, x, y) -> dict:
    b = x.shape[0]

    def forward():
        with torch.no_grad():
            model(x)

    return {
        "forward": forward,
        "analyze (label-free)": lambda: analyze(model, x, batch_size=b),
        "analyze (with labels)": lambda: analyze(model, x, y, batch_size=b),
        "analyze + units": lambda: analyze(model, x, y, batch_size=b, units=True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the rows as JSON")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"segability {segability.__version__}, torch {torch.__version__}, device: {name}")
    rows = []
    for label, model, shape in _models(args.quick):
        model = model.to(device).eval()
        x = torch.rand(*shape, device=device)
        with torch.no_grad():
            y = (torch.sigmoid(model(x)) > 0.5).float()
        y = torch.where(y.sum() > 0, y, (x > 0.7).float())

        cases = _cases(model, x, y)
        times = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for case, fn in cases.items():
                times[case] = _median_time(fn, args.repeats, device)
        n_layers = len(analyze(model, x[:1]).layers["layer"].unique())
        print(f"\n{label}: batch {tuple(shape)}, {n_layers} layers (incl. input)")
        print(f"  {'case':<24}{'seconds':>10}{'x forward':>12}")
        for case, t in times.items():
            ratio = t / times["forward"]
            print(f"  {case:<24}{t:>10.3f}{ratio:>12.2f}")
            rows.append({"model": label, "shape": list(shape), "case": case, "seconds": t, "x_forward": ratio, "device": name})
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
