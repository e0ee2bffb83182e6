"""Figures of the report: matplotlib charts and map thumbnails, as PNG bytes.

Charts are drawn on :class:`matplotlib.figure.Figure` objects with the Agg canvas, never through
``pyplot``: no global backend is switched, no figure is registered anywhere, and each one is
cleared after it is saved. Colours are fixed across the report (:data:`COLORS`, Okabe-Ito, safe
for colour-blind readers); colour maps are viridis/cividis, readable in grey. Mathtext is off, so a
``$`` in a layer name is drawn as a ``$``.

Thumbnails are made with NumPy and Pillow: an overlay is the MONAI ``blend_images`` rule
(:func:`blend`), so a map reads as it does in MONAI's own tools.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator
from PIL import Image

__all__ = [
    "COLORS",
    "GROUP_COLORS",
    "blend",
    "pick_slice",
    "SliceView",
    "overlay_png",
    "probability_png",
    "sa_per_layer_figure",
    "unit_distribution_figure",
    "unit_heatmap_figure",
    "quality_scatter_figure",
    "history_figure",
    "shorten",
    "short_labels",
    "layer_labels",
]

# Okabe-Ito: distinguishable with any colour vision deficiency.
COLORS = {
    "sa": "#0072B2",  # blue: SA against the label
    "sa_pred": "#E69F00",  # orange: SA against the network's prediction
    "encoder": "#56B4E9",
    "bottleneck": "#999999",
    "decoder": "#CC79A7",
    "outline": "#56B4E9",
    "point": "#0072B2",
}
GROUP_COLORS = (
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#D55E00",
    "#CC79A7",
    "#56B4E9",
    "#F0E442",
    "#000000",
)
SCORE_LABELS = {"sa": "SA vs label", "sa_pred": "SA vs prediction"}
MAP_CMAP = "cividis"  # a kept map is drawn in cividis(1.0), a light yellow
THUMB_SIDE = 192  # long side of a map thumbnail, pixels (smaller images are enlarged)
CROP_FRACTION = 0.5  # zoom in when the part around the target is at most this fraction of the image
CROP_MARGIN = 1.0  # margin on each side of the target's box, as a fraction of its long side
CROP_MIN_SIDE = 48  # pixels of the image shown around a target, at least
DPI = 110

_STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.axisbelow": True,
    "grid.color": "#e3e3e3",
    "grid.linewidth": 0.6,
    "axes.edgecolor": "#888888",
    "text.color": "#222222",
    "axes.labelcolor": "#222222",
    "xtick.color": "#444444",
    "ytick.color": "#444444",
    "text.parse_math": False,
    "svg.fonttype": "none",
    "figure.facecolor": "white",
}


def shorten(name: str, width: int = 30) -> str:
    """Cut the middle of a long name so tick labels stay readable.

    Example:
        >>> shorten("model.1.submodule.1.submodule.1.submodule.0.conv", 24)
        'model.1.sub…odule.0.conv'
    """
    if len(name) <= width:
        return name
    head = (width - 1) // 2
    tail = width - 1 - head
    return name[:head] + "…" + name[-tail:]


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    fig.clear()
    return buf.getvalue()


def _styled(fn):
    """Run a figure-building function inside the report's rc style."""

    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(_STYLE):
            return fn(*args, **kwargs)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def short_labels(names: Sequence[str], width: int = 24) -> tuple[list[str], bool]:
    """Labels of at most ``width`` characters that still tell the names apart.

    A name that fits is kept. A longer one keeps its distinguishing tail: the shortest run of
    trailing dotted parts that no other name ends with, after its first part when that fits
    (``encoder…2.convs.0.conv``). When no such tail fits (nested names such as MONAI's
    ``model.1.submodule.1.submodule.0.conv`` differ in the middle), the middle is cut and the
    second value is True: the caller must number the labels and give a key.

    Returns:
        The labels, and whether any of them lost the part that tells it apart.

    Example:
        >>> short_labels(["encoder.stages.2.convs.0.conv", "encoder.stages.3.convs.0.conv", "head"], 22)
        (['encoder…2.convs.0.conv', 'encoder…3.convs.0.conv', 'head'], False)
        >>> short_labels(["model.1.submodule.1.submodule.0.conv", "model.1.submodule.0.conv"], 22)[1]
        True
    """
    names = [str(n) for n in names]
    labels, lossy = [], False
    for i, name in enumerate(names):
        if len(name) <= width:
            labels.append(name)
            continue
        others = [m for j, m in enumerate(names) if j != i]
        parts = name.split(".")
        label = None
        for k in range(1, len(parts)):
            tail = ".".join(parts[-k:])
            if any(m == tail or m.endswith("." + tail) for m in others):
                continue
            if k < len(parts) - 1 and len(parts[0]) + 1 + len(tail) <= width:
                label = f"{parts[0]}…{tail}"
            elif len(tail) + 1 <= width:
                label = f"…{tail}"
            break
        if label is None:
            label, lossy = shorten(name, width), True
        labels.append(label)
    return labels, lossy or len(set(labels)) < len(labels)


def layer_labels(names: Sequence[str], order: Sequence[str], width: int = 24) -> list[str]:
    """Short layer labels; numbered by forward position (the table's ``depth``) when shortening
    loses what tells two names apart, so the layer table is the key.

    Example:
        >>> layer_labels(["a.b.c.d.e.f.1.conv", "a.b.c.x.e.f.1.conv"], ["input", "a.b.c.d.e.f.1.conv", "a.b.c.x.e.f.1.conv"], 12)
        ['1 a.b.c…1.conv', '2 a.b.c…1.conv']
        >>> layer_labels(["enc.block.1.conv", "enc.block.2.conv"], ["enc.block.1.conv", "enc.block.2.conv"], 12)
        ['enc…1.conv', 'enc…2.conv']
    """
    short, lossy = short_labels(names, width)
    if not lossy:
        return short
    pos = {n: i for i, n in enumerate(order)}
    return [f"{pos[n]} {s}" if n in pos else s for n, s in zip(names, short, strict=True)]


def labels_numbered(names: Sequence[str], width: int = 24) -> bool:
    """Whether :func:`layer_labels` numbers these names (their short labels lose information)."""
    return short_labels(names, width)[1]


def _legend_outside(ax, **kwargs) -> None:
    """A legend right of the axes, never over the data."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, **kwargs)


def _layer_axis(ax, names: Sequence[str], order: Sequence[str]) -> None:
    ax.set_xticks(np.arange(len(names)))
    ax.set_xticklabels(layer_labels(names, order), rotation=45, ha="right", rotation_mode="anchor")
    ax.set_xlim(-0.6, len(names) - 0.4)


def _runs(values: Sequence[object]) -> list[tuple[object, int, int]]:
    """Contiguous runs of equal values: (value, first index, last index)."""
    runs: list[tuple[object, int, int]] = []
    for i, v in enumerate(values):
        if runs and runs[-1][0] == v:
            runs[-1] = (v, runs[-1][1], i)
        else:
            runs.append((v, i, i))
    return runs


def shaded_roles(roles: Mapping[str, str | None], names: Sequence[str]) -> bool:
    """Whether the SA-per-layer chart shades roles: at least two roles occur among ``names``."""
    return len({roles.get(n) for n in names if n != "input"} - {None}) >= 2


@_styled
def sa_per_layer_figure(
    summary: pd.DataFrame,
    roles: Mapping[str, str | None],
    scores: Sequence[str],
    title: str | None = None,
) -> bytes:
    """SA per layer in forward order: mean line and interquartile band per score (PNG)."""
    return _png(sa_per_layer_chart(summary, roles, scores, title))


@_styled
def sa_per_layer_chart(
    summary: pd.DataFrame,
    roles: Mapping[str, str | None],
    scores: Sequence[str],
    title: str | None = None,
) -> Figure:
    """SA per layer in forward order: mean line and interquartile band per score.

    Args:
        summary: :func:`segability.report.data.layer_summary` (``input`` first when present).
        roles: layer -> "encoder"/"bottleneck"/"decoder"/None; shaded when two roles occur.
        scores: which of "sa", "sa_pred" to draw.
        title: a title over the axes (which images the means are over).
    """
    names = summary["layer"].tolist()
    x = np.arange(len(names))
    fig = _figure(max(9.6, 0.36 * len(names) + 3.6), 4.4)
    ax = fig.add_subplot()
    if shaded_roles(roles, names):
        for role, a, b in _runs([roles.get(n) for n in names]):
            if role is None:
                continue
            ax.axvspan(a - 0.5, b + 0.5, color=COLORS[str(role)], alpha=0.13, lw=0)
            ax.text(
                (a + b) / 2,
                1.035,
                str(role),
                ha="center",
                va="bottom",
                fontsize=8,
                color="#444444",
                transform=ax.get_xaxis_transform(),
            )
    is_input = np.array([n == "input" for n in names])
    for score in scores:
        mean = summary[f"{score}_mean"].to_numpy(float)
        q1 = summary[f"{score}_q1"].to_numpy(float)
        q3 = summary[f"{score}_q3"].to_numpy(float)
        color = COLORS[score]
        ax.fill_between(x, q1, q3, color=color, alpha=0.18, lw=0)
        ax.plot(
            x,
            mean,
            color=color,
            lw=1.8,
            marker="o",
            ms=4,
            label=f"{SCORE_LABELS[score]} (mean, IQR band)",
        )
        if is_input.any():
            ax.plot(
                x[is_input],
                mean[is_input],
                ls="none",
                marker="s",
                ms=8,
                mfc="white",
                mec=color,
                mew=1.6,
                zorder=3,
            )
    if is_input.any():
        ax.plot(
            [], [], ls="none", marker="s", ms=7, mfc="white", mec="#444444", label="input image"
        )
        ax.axvline(0.5, color="#999999", lw=0.8, ls=":")
    _layer_axis(ax, names, names)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("SA (Dice)")
    ax.set_xlabel("layer, in forward order")
    if title:
        ax.set_title(title, loc="left", pad=16)
    _legend_outside(ax, frameon=False)
    return fig


@_styled
def unit_distribution_figure(means: pd.DataFrame, order: Sequence[str], score: str) -> bytes:
    """Box plot of unit SA (mean over images) per layer, with each unit as a dot."""
    names = [n for n in order if n in set(means["layer"])]
    data = [means.loc[means["layer"] == n, score].dropna().to_numpy(float) for n in names]
    fig = _figure(max(8.4, 0.36 * len(names) + 2.4), 3.8)
    ax = fig.add_subplot()
    x = np.arange(len(names))
    rng = np.random.default_rng(0)
    for i, d in enumerate(data):
        if d.size:
            ax.scatter(
                i + rng.uniform(-0.2, 0.2, d.size),
                d,
                s=9,
                color=COLORS[score],
                alpha=0.6,
                lw=0,
                zorder=3,
            )
    keep = [i for i, d in enumerate(data) if d.size]
    if keep:
        ax.boxplot(
            [data[i] for i in keep],
            positions=x[keep],
            widths=0.55,
            showfliers=False,
            patch_artist=True,
            medianprops={"color": "#222222", "lw": 1.4},
            boxprops={"facecolor": "none", "edgecolor": "#444444"},
            whiskerprops={"color": "#444444"},
            capprops={"color": "#444444"},
        )
    _layer_axis(ax, names, order)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel(f"unit {SCORE_LABELS[score]}")
    ax.set_xlabel("layer, in forward order")
    return _png(fig)


def unit_matrix(
    means: pd.DataFrame, order: Sequence[str], score: str
) -> tuple[list[str], np.ndarray]:
    """Layer x unit-rank matrix of unit SA, best unit first, NaN-padded to the widest layer.

    Example:
        >>> m = pd.DataFrame({"layer": ["a", "a", "b"], "unit": [0, 1, 0], "sa": [0.2, 0.9, 0.5]})
        >>> unit_matrix(m, ["a", "b"], "sa")[1]
        array([[0.9, 0.2],
               [0.5, nan]])
    """
    names = [n for n in order if n in set(means["layer"])]
    rows = [np.sort(means.loc[means["layer"] == n, score].to_numpy(float))[::-1] for n in names]
    width = max((r.size for r in rows), default=0)
    mat = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        # np.sort puts NaN last; reversed they come first: move them back to the end
        r = np.concatenate([r[np.isfinite(r)], r[~np.isfinite(r)]])
        mat[i, : r.size] = r
    return names, mat


@_styled
def unit_heatmap_figure(means: pd.DataFrame, order: Sequence[str], score: str) -> bytes:
    """Heat map: one row per layer, its units sorted by SA (best left); grey where a layer has fewer units."""
    names, mat = unit_matrix(means, order, score)
    fig = _figure(8.4, max(2.4, 0.24 * len(names) + 1.2))
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#eeeeee")
    im = ax.imshow(
        np.ma.masked_invalid(mat), aspect="auto", cmap=cmap, vmin=0, vmax=1, interpolation="nearest"
    )
    ax.set_yticks(np.arange(len(names)))
    ax.set_yticklabels(layer_labels(names, order, 30))
    ax.grid(False)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{int(v) + 1}"))  # rank 1 = best
    ax.set_xlabel("unit rank within the layer (1 = best)")
    ax.set_ylabel("layer, in forward order")
    cb = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.01)
    cb.set_label(f"unit {SCORE_LABELS[score]}")
    return _png(fig)


@_styled
def quality_scatter_figure(
    table: pd.DataFrame, x: str, y: str, group: str | None, xlabel: str, ylabel: str
) -> bytes:
    """Scatter of a label-free estimate against the true Dice, coloured by group when given (PNG)."""
    return _png(quality_scatter_chart(table, x, y, group, xlabel, ylabel))


@_styled
def quality_scatter_chart(
    table: pd.DataFrame, x: str, y: str, group: str | None, xlabel: str, ylabel: str
) -> Figure:
    """Scatter of a label-free estimate against the true Dice, coloured by group when given."""
    fig = _figure(7.2, 4.4)
    ax = fig.add_subplot()
    data = table[np.isfinite(table[x].astype(float)) & np.isfinite(table[y].astype(float))]
    if group is not None:
        groups = list(dict.fromkeys(data[group].astype(str)))
        for i, g in enumerate(groups):
            sub = data[data[group].astype(str) == g]
            ax.scatter(
                sub[x],
                sub[y],
                s=22,
                color=GROUP_COLORS[i % len(GROUP_COLORS)],
                label=shorten(g, 24),
                alpha=0.85,
                lw=0.4,
                edgecolor="white",
            )
        if len(groups) > 1:
            _legend_outside(ax, title=shorten(group, 20), frameon=False)
    else:
        ax.scatter(
            data[x], data[y], s=22, color=COLORS["point"], alpha=0.85, lw=0.4, edgecolor="white"
        )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    for lim, col in ((ax.set_xlim, x), (ax.set_ylim, y)):
        v = data[col].to_numpy(float)
        if v.size:
            pad = max(0.03, 0.08 * float(np.ptp(v)))
            lim(max(-0.02, v.min() - pad), min(1.02, v.max() + pad))
    return fig


@_styled
def history_figure(history: pd.DataFrame, order: Sequence[str]) -> bytes:
    """SA over training epochs, one line per layer, coloured by forward order (viridis; PNG)."""
    return _png(history_chart(history, order))


@_styled
def history_chart(history: pd.DataFrame, order: Sequence[str]) -> Figure:
    """SA over training epochs, one line per layer, coloured by forward order (viridis)."""
    h = history.groupby(["layer", "epoch"], sort=False)["sa"].mean().reset_index()
    known = [n for n in order if n in set(h["layer"])]
    names = known + [n for n in dict.fromkeys(h["layer"]) if n not in known]
    cmap = matplotlib.colormaps["viridis"]
    fig = _figure(8.4, 4.0)
    ax = fig.add_subplot()
    for i, (name, label) in enumerate(zip(names, layer_labels(names, order, 26), strict=True)):
        sub = h[h["layer"] == name].sort_values("epoch")
        color = cmap(i / max(1, len(names) - 1) * 0.92)
        ax.plot(
            sub["epoch"],
            sub["sa"],
            color=color,
            lw=1.5,
            marker="o",
            ms=2.5,
            label=label,
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("SA")
    ax.set_ylim(0, 1.02)
    _legend_outside(
        ax, title="layer (forward order)", frameon=False, ncols=1 if len(names) <= 16 else 2
    )
    return fig


# ----------------------------------------------------------------------------- thumbnails


def _rescale(a: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(a)), float(np.max(a))
    return (a - lo) / (hi - lo) if hi > lo else a - lo


def blend(
    image: np.ndarray,
    label: np.ndarray,
    alpha: float | np.ndarray = 0.5,
    cmap: str = MAP_CMAP,
    rescale_arrays: bool = True,
    transparent_background: bool = True,
) -> np.ndarray:
    """Blend an image (C=1 or 3, *S) and a label (1, *S) as MONAI's ``blend_images`` does.

    The label is coloured by ``cmap`` and weighted by ``alpha``; with ``transparent_background``
    the label's zeros leave the image as it is.

    Args:
        image: (1 or 3, *S) array.
        label: (1, *S) array.
        alpha: weight of the label colour (scalar or array shaped like ``label``).
        cmap: matplotlib colour map name for the label.
        rescale_arrays: rescale both arrays to [0, 1] first (min-max).
        transparent_background: label zeros get weight 0.

    Returns:
        (3, *S) RGB array.

    Raises:
        ValueError: shapes that do not fit together.

    Example:
        >>> img = np.array([[[0.0, 1.0]]])
        >>> lab = np.array([[[0.0, 1.0]]])
        >>> blend(img, lab, alpha=1.0, cmap="gray")[:, 0]
        array([[0., 1.],
               [0., 1.],
               [0., 1.]])
    """
    image = np.asarray(image, dtype=float)
    label = np.asarray(label, dtype=float)
    if label.shape[0] != 1:
        raise ValueError(f"label must have 1 channel, got shape {label.shape}")
    if image.shape[0] not in (1, 3):
        raise ValueError(f"image must have 1 or 3 channels, got shape {image.shape}")
    if image.shape[1:] != label.shape[1:]:
        raise ValueError(f"image {image.shape} and label {label.shape} differ in spatial size")
    if rescale_arrays:
        image, label = _rescale(image), _rescale(label)
    if image.shape[0] == 1:
        image = np.repeat(image, 3, axis=0)
    rgb = np.moveaxis(matplotlib.colormaps[cmap](label[0]), -1, 0)[:3]
    w = np.array(alpha, dtype=float) * np.ones_like(label)
    if transparent_background:
        w[label == 0] = 0
    return (1 - w) * image + w * rgb


def pick_slice(reference: np.ndarray | None, depth: int, slice_index: int | None = None) -> int:
    """The slice along the last axis to show for a 3D image.

    Args:
        reference: (*S) target mask (label, or prediction >= 0.5), or None.
        depth: number of slices along the last axis.
        slice_index: forced slice; None picks the slice with the largest target area (the
            middle one when the target is empty or unknown).

    Raises:
        ValueError: ``slice_index`` outside ``[0, depth)``.

    Example:
        >>> ref = np.zeros((4, 4, 3)); ref[:2, :2, 2] = 1; ref[0, 0, 1] = 1
        >>> pick_slice(ref, 3)
        2
    """
    if slice_index is not None:
        if not 0 <= slice_index < depth:
            raise ValueError(f"slice_index must be in [0, {depth}), got {slice_index}")
        return int(slice_index)
    if reference is not None:
        area = (np.asarray(reference) > 0).reshape(-1, depth).sum(axis=0)
        if area.max() > 0:
            return int(np.argmax(area))
    return depth // 2


def _resize_nearest(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if a.shape == tuple(shape):
        return a
    idx = [
        np.minimum((np.arange(n) + 0.5) * a.shape[d] / n, a.shape[d] - 1).astype(int)
        for d, n in enumerate(shape)
    ]
    return a[np.ix_(*idx)]


def _boundary(mask: np.ndarray) -> np.ndarray:
    m = np.pad(mask.astype(bool), 1)
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask.astype(bool) & ~inner


GREY_LEVELS = 64  # the image is shown in 64 grey levels: overlays then fit a lossless PNG palette


def _display_shape(shape: tuple[int, int], side: int) -> tuple[int, int]:
    """Scale to ``side`` pixels on the long side (shrinking or enlarging)."""
    scale = side / max(shape)
    return (max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale)))


def focus_box(
    mask: np.ndarray,
    fraction: float = CROP_FRACTION,
    margin: float = CROP_MARGIN,
    min_side: int = CROP_MIN_SIDE,
) -> tuple[int, int, int, int] | None:
    """The part of a 2D image to show around a small target: ``(row0, row1, col0, col1)``, ends
    exclusive; None when the target is empty or the part would span more than ``fraction`` of the
    image's long side (then the whole image is shown).

    The part is a square around the target's bounding box: the box's long side plus ``margin``
    times it on either side, at least ``min_side`` pixels, shifted to lie inside the image.

    Example:
        >>> m = np.zeros((128, 100), bool); m[40:50, 30:36] = True
        >>> focus_box(m)
        (21, 69, 9, 57)
        >>> focus_box(np.ones((10, 10), bool)) is None
        True
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return None
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    long = max(r1 - r0, c1 - c0)
    side = max(min_side, round(long * (1 + 2 * margin)))
    if side > fraction * max(mask.shape):
        return None
    box = []
    for lo, hi, size in ((r0, r1, mask.shape[0]), (c0, c1, mask.shape[1])):
        n = min(side, size)
        start = min(max(0, (lo + hi - n) // 2), size - n)
        box += [int(start), int(start + n)]
    return tuple(box)  # type: ignore[return-value]


@dataclass
class SliceView:
    """Shows the maps of one kept image as 2D arrays at thumbnail resolution.

    For a 3D image (three spatial dims) every map is cut at the same slice along its last axis
    (scaled when a map has another size); 2D images are shown whole. With ``crop``, a small target
    (``focus``: label or prediction; see :func:`focus_box`) is shown cropped to its box with a
    margin (``box``). The shown part is scaled to ``side`` pixels on its long side: shrunk by area
    averaging (the image; maps by nearest neighbour) or enlarged by nearest neighbour (pixel
    blocks, nothing smoothed).

    Args:
        image: (C, *S) image; channel 0 is shown.
        reference: (*S) target mask used for the outline and to pick the slice, or None.
        slice_index: forced slice for 3D images.
        side: long side of the thumbnails, pixels.
        focus: (*S) mask of what must be seen (label or prediction), used to crop; default
            ``reference``.
        crop: crop to a small target.

    Example:
        >>> view = SliceView(np.zeros((1, 256, 200)), side=128)
        >>> view.shape
        (128, 100)
        >>> SliceView(np.zeros((1, 100, 80)), side=192).shape
        (192, 154)
    """

    image: np.ndarray
    reference: np.ndarray | None = None
    slice_index: int | None = None
    side: int = THUMB_SIDE
    focus: np.ndarray | None = None
    crop: bool = False

    def __post_init__(self) -> None:
        img = np.asarray(self.image, dtype=float)
        if img.ndim not in (3, 4):
            raise ValueError(f"image must be (C, H, W) or (C, H, W, D), got shape {img.shape}")
        self.spatial = img.shape[1:]
        self.is_3d = img.ndim == 4
        self.depth = self.spatial[-1] if self.is_3d else 1
        self.index = pick_slice(self.reference, self.depth, self.slice_index) if self.is_3d else 0
        full = self._slice(img[0])
        self.box: tuple[int, int, int, int] | None = None
        focus = self.focus if self.focus is not None else self.reference
        if self.crop and focus is not None:
            self.box = focus_box(self._full(np.asarray(focus) > 0))
        finite = np.isfinite(full)
        lo, hi = np.percentile(full[finite], [0.5, 99.5]) if finite.any() else (0.0, 0.0)
        base = self._crop(
            np.clip((np.where(finite, full, lo) - lo) / (hi - lo), 0, 1)
            if hi > lo
            else np.zeros_like(full)
        )
        self.shape = _display_shape(base.shape, self.side)
        if base.shape[0] > self.shape[0]:  # area-like shrink of the image itself
            pil = Image.fromarray(base.astype(np.float32), "F").resize(
                self.shape[::-1], Image.Resampling.BOX
            )
            base = np.asarray(pil, dtype=float)
        else:
            base = _resize_nearest(base, self.shape)
        self.base = np.round(np.clip(base, 0, 1) * (GREY_LEVELS - 1)) / (GREY_LEVELS - 1)
        self.outline = None
        if self.reference is not None:
            self.outline = _boundary(self.cut(np.asarray(self.reference) > 0))

    def _slice(self, a: np.ndarray) -> np.ndarray:
        a = np.asarray(a)
        while a.ndim > len(self.spatial) and a.shape[0] == 1:  # a (1, *S) map: drop the channel
            a = a[0]
        if a.ndim == 3:
            k = min(a.shape[-1] - 1, int((self.index + 0.5) * a.shape[-1] / self.depth))
            a = a[..., k]
        if a.ndim != 2:
            raise ValueError(f"a map must have the image's spatial dims, got shape {a.shape}")
        return a

    def _full(self, a: np.ndarray) -> np.ndarray:
        """The slice of a (*S') array at the image's in-plane size."""
        return _resize_nearest(self._slice(a), tuple(self.spatial[:2]))

    def _crop(self, a: np.ndarray) -> np.ndarray:
        if self.box is None:
            return a
        r0, r1, c0, c1 = self.box
        return a[r0:r1, c0:c1]

    def cut(self, a: np.ndarray) -> np.ndarray:
        """The 2D view of a (*S') array, cropped and resized (nearest) to the thumbnail's shape."""
        a = self._slice(a)
        if self.box is not None:
            a = self._crop(_resize_nearest(a, tuple(self.spatial[:2])))
        return _resize_nearest(a, self.shape)

    def crop_note(self) -> str | None:
        """Words for a caption when the view is cropped, else None."""
        if self.box is None:
            return None
        r0, r1, c0, c1 = self.box
        h, w = self.spatial[:2]
        return (
            f"zoomed to the label/prediction box with margin: rows {r0}–{r1 - 1}, "
            f"columns {c0}–{c1 - 1} of {h}×{w}"
        )


def _to_png(rgb: np.ndarray) -> bytes:
    """(3, H, W) float RGB in [0, 1] -> PNG bytes; a palette PNG, lossless when <= 256 colours."""
    arr = (np.clip(np.moveaxis(rgb, 0, -1), 0, 1) * 255 + 0.5).astype(np.uint8)
    packed = (
        (arr[..., 0].astype(np.uint32) << 16) | (arr[..., 1].astype(np.uint32) << 8) | arr[..., 2]
    )
    colours, index = np.unique(packed, return_inverse=True)
    if colours.size <= 256:
        img = Image.fromarray(index.reshape(packed.shape).astype(np.uint8), "P")
        palette = np.stack([(colours >> 16) & 255, (colours >> 8) & 255, colours & 255], axis=-1)
        img.putpalette(palette.astype(np.uint8).reshape(-1).tolist())
    else:  # a continuous overlay (probabilities): 256 colours are plenty for a thumbnail
        img = Image.fromarray(arr, "RGB").quantize(256, method=Image.Quantize.FASTOCTREE)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _with_outline(rgb: np.ndarray, outline: np.ndarray | None) -> np.ndarray:
    if outline is None:
        return rgb
    color = np.array(matplotlib.colors.to_rgb(COLORS["outline"]))[:, None]
    rgb = rgb.copy()
    rgb[:, outline] = color
    return rgb


def overlay_png(view: SliceView, mask: np.ndarray | None, outline: bool = True) -> bytes:
    """The image with a binary map filled in (cividis yellow) and the reference outlined.

    Args:
        view: the image's :class:`SliceView`.
        mask: (*S') binary map, or None for the image alone.
        outline: draw the reference's boundary.
    """
    base = view.base[None]
    if mask is None:
        rgb = np.repeat(base, 3, axis=0)
    else:
        m = (view.cut(mask) > 0).astype(float)[None]
        rgb = blend(base, m, alpha=0.5, cmap=MAP_CMAP, rescale_arrays=False)
    return _to_png(_with_outline(rgb, view.outline if outline else None))


def probability_png(view: SliceView, probability: np.ndarray) -> bytes:
    """The image with a probability map in viridis, weighted by the probability (0 transparent)."""
    p = np.clip(view.cut(probability).astype(float), 0, 1)[None]
    rgb = blend(view.base[None], p, alpha=0.7 * p, cmap="viridis", rescale_arrays=False)
    return _to_png(rgb)
