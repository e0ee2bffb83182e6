"""Speed and peak memory of segability's ProtoSeg against the direct full-resolution method.

Run ``python benchmarks/bench_protoseg.py [--device cpu|cuda] [--quick] [--out results.json]``.

For every case (2D: 64/128/256 channels at 1/8 of 256^2, batch 2; 3D: 32/64/128 channels at 1/4
and 1/8 of 96^3 and 128^3, batch 1) it times three operations, each fast vs direct
(``benchmarks/direct.py``), in the same run:

- ``protoseg``: ``segability.core.functional.protoseg`` vs ``direct_protoseg`` (probabilities).
- ``layer SA``: ``score_layer`` vs ``direct_layer_sa`` (Dice of the layer's map, 2 references).
- ``unit SA``: ``score_layer(units=True)`` (layer *and* every unit, chunked) vs ``direct_unit_sa``
  (Python loop over units). The fast side does strictly more work here, so the ratio is a floor.

Time: median of ``--repeats`` runs after warm-up, ``torch.set_num_threads`` fixed and printed.
Peak extra memory: bytes the call allocates beyond what was allocated before it (its output and
temporaries, not its inputs). On CUDA that is ``torch.cuda.max_memory_allocated`` minus the bytes
allocated before; on CPU it is replayed from torch's profiler (``profile_memory=True``): every
allocation and free of torch's CPU allocator is an event with a byte count, and the peak of their
running sum is the same quantity ``max_memory_allocated`` reports on CUDA. It counts tensors, not
library scratch buffers (BLAS/oneDNN workspaces) or allocator caching, and it is not disturbed by
other processes, unlike sampling the RSS. "vs K ch" is the fast peak divided by the bytes of one
resized channel per class, ``B * K * prod(S) * itemsize`` with K = 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from direct import direct_layer_sa, direct_protoseg, direct_unit_sa  # noqa: E402

from segability.core.functional import protoseg
from segability.core.reduction import score_layer  # noqa: E402

CLASSES = 2  # a one-channel guide gives a background and a target class
TARGETS = {  # minimum speed-up of the fast path over the direct method
    ("protoseg", 2): 50.0,
    ("protoseg", 3): 20.0,
    ("unit SA", 2): 20.0,
    ("unit SA", 3): 20.0,
}
# Bytes the direct whole-layer method holds at its peak, in units of the resized features
# (resized features, one difference to a prototype, its square), measured by this script.
DIRECT_PEAK_FACTOR = 3.2
FAST_PER_REPEAT = 3  # fast calls timed per repeat (they take milliseconds)


@dataclass
class Case:
    """One benchmark input: ``channels`` feature maps of size ``features`` for a guide of size ``guide``."""

    dims: int
    guide: tuple[int, ...]
    features: tuple[int, ...]
    channels: int
    batch: int

    @property
    def label(self) -> str:
        g = "x".join(map(str, self.guide))
        f = "x".join(map(str, self.features))
        return f"{self.dims}D {g} <- {f}, C={self.channels}, B={self.batch}"

    def resized_bytes(self, itemsize: int) -> int:
        """Bytes of all channels resized to the guide (what the direct method materialises)."""
        return self.batch * self.channels * math.prod(self.guide) * itemsize

    def class_bytes(self, itemsize: int) -> int:
        """Bytes of one resized channel per class: the memory yardstick of the fast path."""
        return self.batch * CLASSES * math.prod(self.guide) * itemsize


@dataclass
class Row:
    """One measured operation on one case."""

    case: str
    dims: int
    op: str
    fast_ms: float
    direct_ms: float | None
    speedup: float | None
    target: float | None
    fast_peak_bytes: int
    direct_peak_bytes: int | None
    fast_peak_vs_class_channels: float
    fast_temp_vs_class_channels: float
    note: str = ""
    fast_runs_ms: list[float] = field(default_factory=list)
    direct_runs_ms: list[float] = field(default_factory=list)


def cases() -> list[Case]:
    """The benchmark grid of the issue "Fast enough to run on every scan"."""
    out = [Case(2, (256, 256), (32, 32), c, 2) for c in (64, 128, 256)]
    for side in (96, 128):
        for frac in (4, 8):
            for c in (32, 64, 128):
                out.append(Case(3, (side,) * 3, (side // frac,) * 3, c, 1))
    return out


def make_inputs(case: Case, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Features (B, C, *s), a smooth guide (B, 1, *S) in [0, 1] and two references (B, 2, *S)."""
    gen = torch.Generator().manual_seed(seed)
    mode = {2: "bilinear", 3: "trilinear"}[case.dims]
    coarse = torch.randn(case.batch, 1, *[4] * case.dims, generator=gen)
    field_ = F.interpolate(coarse, size=case.guide, mode=mode, align_corners=False)
    guide = torch.sigmoid(4.0 * field_)
    low = F.interpolate(field_, size=case.features, mode=mode, align_corners=False)
    weights = torch.randn(1, case.channels, *[1] * case.dims, generator=gen)
    features = weights * low + torch.randn(case.batch, case.channels, *case.features, generator=gen)
    refs = torch.cat([guide > 0.5, field_ > 0.2], dim=1)
    to = {"device": device, "dtype": dtype}
    return features.to(**to), guide.to(**to), refs.to(**to)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = time.perf_counter


def _once(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = _clock()
    fn()
    sync(device)
    return 1000.0 * (_clock() - start)


def time_pair(
    fast: Callable[[], object],
    direct: Callable[[], object] | None,
    device: torch.device,
    *,
    warmup: int,
    repeats: int,
) -> tuple[list[float], list[float]]:
    """Times (ms, on the chosen clock) of the fast and the direct call, interleaved, after warm-up.

    Each repeat times the fast call ``FAST_PER_REPEAT`` times and the direct call once, so both see
    the same load from other processes and the ratio stays meaningful on a shared machine.
    """
    for _ in range(warmup):
        fast()
        if direct is not None:
            direct()
    fast_runs: list[float] = []
    direct_runs: list[float] = []
    for _ in range(repeats):
        fast_runs += [_once(fast, device) for _ in range(FAST_PER_REPEAT)]
        if direct is not None:
            direct_runs.append(_once(direct, device))
    return fast_runs, direct_runs


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    # Kineto prints start/stop lines on fd 2 from C++; keep the table readable.
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _nbytes(result: object) -> int:
    if isinstance(result, torch.Tensor):
        return result.numel() * result.element_size()
    if isinstance(result, (tuple, list)):
        return sum(_nbytes(r) for r in result)
    return 0


def peak_bytes(fn: Callable[[], object], device: torch.device) -> tuple[int, int]:
    """Peak bytes allocated by ``fn`` beyond what was allocated before the call, and its output's bytes.

    See the module docstring for how the peak is measured on CPU and on CUDA.
    """
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = _nbytes(fn())
        sync(device)
        return int(torch.cuda.max_memory_allocated(device) - before), out
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = _nbytes(fn())
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        if event.device_type() == torch.autograd.DeviceType.CPU:
            current += event.nbytes()
            peak = max(peak, current)
    return int(peak), out


def available_bytes(device: torch.device) -> int:
    """Memory the direct method may use: free device memory, or MemAvailable of the host."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return 1024 * int(line.split()[1])
    return 2**62


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} logical CPUs)"
    return platform.processor() or platform.machine()


def run_case(
    case: Case, device: torch.device, dtype: torch.dtype, *, warmup: int, repeats: int, quick: bool
) -> list[Row]:
    """Time and measure the three operations of one case (the direct side where it is run)."""
    features, guide, refs = make_inputs(case, device, dtype)
    itemsize = features.element_size()
    ops: list[tuple[str, Callable[[], object], Callable[[], object]]] = [
        ("protoseg", lambda: protoseg(features, guide), lambda: direct_protoseg(features, guide)),
        ("layer SA", lambda: score_layer(features, guide, refs), lambda: direct_layer_sa(features, guide, refs)),
        (
            "unit SA",
            lambda: score_layer(features, guide, refs, units=True),
            lambda: direct_unit_sa(features, guide, refs),
        ),
    ]
    rows = []
    for op, fast, direct in ops:
        direct_reason = skip_direct(case, op, device, itemsize, quick)
        fast_runs, direct_runs = time_pair(
            fast, None if direct_reason else direct, device, warmup=warmup, repeats=repeats
        )
        fast_peak, fast_out = peak_bytes(fast, device)
        direct_peak = None if direct_reason else peak_bytes(direct, device)[0]
        fast_ms = statistics.median(fast_runs)
        direct_ms = statistics.median(direct_runs) if direct_runs else None
        rows.append(
            Row(
                case=case.label,
                dims=case.dims,
                op=op,
                fast_ms=fast_ms,
                direct_ms=direct_ms,
                speedup=direct_ms / fast_ms if direct_ms is not None else None,
                target=TARGETS.get((op, case.dims)),
                fast_peak_bytes=fast_peak,
                direct_peak_bytes=direct_peak,
                fast_peak_vs_class_channels=fast_peak / case.class_bytes(itemsize),
                fast_temp_vs_class_channels=(fast_peak - fast_out) / case.class_bytes(itemsize),
                note=direct_reason,
                fast_runs_ms=[round(t, 3) for t in fast_runs],
                direct_runs_ms=[round(t, 3) for t in direct_runs],
            )
        )
    return rows


def skip_direct(case: Case, op: str, device: torch.device, itemsize: int, quick: bool) -> str:
    """Why the direct method is not run for this operation on this case ("" to run it)."""
    if quick and case.dims == 3 and case.guide[0] >= 128:
        return "direct skipped (--quick drops the 128^3 cases)"
    if op == "unit SA":  # the loop holds one resized channel at a time
        return ""
    need = DIRECT_PEAK_FACTOR * case.resized_bytes(itemsize)
    free = available_bytes(device)
    if need > 0.7 * free:
        return f"direct skipped (needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB available)"
    return ""


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def print_table(rows: list[Row], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for name, justify in [
        ("case", "left"),
        ("op", "left"),
        ("fast ms", "right"),
        ("direct ms", "right"),
        ("speed-up", "right"),
        ("target", "right"),
        ("fast peak MiB", "right"),
        ("direct peak MiB", "right"),
        ("fast peak / K ch", "right"),
        ("fast temp / K ch", "right"),
    ]:
        table.add_column(name, justify=justify)
    previous = None
    for r in rows:
        if r.speedup is None:
            speed = "-"
        else:
            ok = r.target is None or r.speedup >= r.target
            speed = f"[{'green' if ok else 'red'}]{r.speedup:,.1f}x[/]"
        target = f">= {r.target:g}x" if r.target is not None else ""
        table.add_row(
            r.case if r.case != previous else "",
            r.op,
            f"{r.fast_ms:,.2f}",
            "-" if r.direct_ms is None else f"{r.direct_ms:,.1f}",
            speed,
            target,
            _mib(r.fast_peak_bytes),
            _mib(r.direct_peak_bytes),
            f"{r.fast_peak_vs_class_channels:.2f}",
            f"{r.fast_temp_vs_class_channels:.2f}",
        )
        previous = r.case
    console = Console()
    if not console.is_terminal:
        console = Console(width=180)
    console.print(table)
    for note in sorted({r.note for r in rows if r.note}):
        print(f"note: {note}: " + ", ".join(sorted({r.case for r in rows if r.note == note})))


def summary(rows: list[Row]) -> list[str]:
    """One line per target: the smallest measured value against it."""
    lines = []
    for (op, dims), target in TARGETS.items():
        got = [r.speedup for r in rows if r.op == op and r.dims == dims and r.speedup is not None]
        if got:
            verdict = "met" if min(got) >= target else "MISSED"
            lines.append(f"{op} {dims}D: speed-up {min(got):.1f}x .. {max(got):.1f}x, target >= {target:g}x: {verdict}")
    for op in ("protoseg", "layer SA"):
        mem = [r.fast_temp_vs_class_channels for r in rows if r.op == op]
        if mem:
            verdict = "met" if max(mem) < 1.0 else "MISSED"
            lines.append(
                f"{op} peak extra memory beyond its output: {min(mem):.2f} .. {max(mem):.2f} x one resized "
                f"channel per class, target < 1: {verdict}"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer repeats; no direct run on the 128^3 cases")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all logical CPUs)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 5, quick 3)")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall time, or the process's CPU time (robust to other load with --threads 1; CPU only)",
    )
    parser.add_argument("--only", choices=["2d", "3d"], default=None, help="run only the 2D or the 3D cases")
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.clock == "cpu" and args.device == "cuda":
        parser.error("--clock cpu measures host CPU time; use --clock wall with --device cuda")
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    global _clock
    _clock = CLOCKS[args.clock]
    device = torch.device(args.device)
    dtype = torch.float32
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    repeats = args.repeats or (3 if args.quick else 5)
    warmup = 1

    meta = {
        "command": "python " + " ".join([sys.argv[0], *(sys.argv[1:] if argv is None else argv)]),
        "device": str(device),
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "clock": args.clock,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "dtype": str(dtype),
        "repeats": repeats,
        "warmup": warmup,
        "quick": args.quick,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "memory": "cuda max_memory_allocated" if device.type == "cuda" else "torch profiler allocator events",
    }
    print(f"device: {meta['device_name']} [{device}], torch {torch.__version__}, threads {meta['threads']}")
    print(
        f"float32, {args.clock} clock, median of {repeats} direct runs and {repeats * FAST_PER_REPEAT} fast runs, "
        f"interleaved, after {warmup} warm-up"
    )

    rows: list[Row] = []
    grid = [c for c in cases() if args.only is None or f"{c.dims}d" == args.only]
    with torch.no_grad():
        for i, case in enumerate(grid, 1):
            print(f"[{i}/{len(grid)}] {case.label}", flush=True)
            rows += run_case(case, device, dtype, warmup=warmup, repeats=repeats, quick=args.quick)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    print_table(rows, f"segability ProtoSeg vs direct — {meta['device_name']}, {meta['threads']} threads")
    lines = summary(rows)
    for line in lines:
        print(line)
    if args.out is not None:
        args.out.write_text(json.dumps({"meta": meta, "summary": lines, "rows": [asdict(r) for r in rows]}, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
