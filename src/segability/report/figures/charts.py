"""The report's charts: SA per layer, unit SA, mean SA against Dice, SA over training (PNG bytes).

Charts are drawn on :class:`matplotlib.figure.Figure` objects with the Agg canvas, never through
``pyplot``: no global backend is switched, no figure is registered anywhere, and each one is
cleared after it is saved. Colours are fixed across the report
(:data:`~segability.report.figures.colors.COLORS`); colour maps are viridis/cividis, readable in
grey. Mathtext is off, so a ``$`` in a layer name is drawn as a ``$``.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from segability.report.figures.colors import COLORS, GROUP_COLORS
from segability.report.figures.labels import layer_labels, shorten

__all__ = [
    "sa_per_layer_figure",
    "unit_distribution_figure",
    "unit_heatmap_figure",
    "quality_scatter_figure",
    "history_figure",
]

SCORE_LABELS = {"sa": "SA vs label", "sa_pred": "SA vs prediction"}
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
        summary: :func:`segability.report.summaries.layer_summary` (``input`` first when present).
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
