"""Which images to label next: least trusted first, spread over what the model sees.

Each image has an SA profile: its ``sa_pred`` in every hidden layer (``layers.parquet``), each
layer standardised over the run's images (mean 0, standard deviation 1; an undefined score counts
as the layer's mean). Its distrust is ``1 - estimated Dice`` (``qc.csv``; without it
``1 - mean_sa_pred``), clipped to [0, 1]; an image without an estimate is distrusted fully.

The choice is a greedy k-centre weighted by distrust: the first image is the least trusted; each
next one maximises ``distance to the nearest image already chosen x distrust``. Twenty near-identical
failures share one profile, so after the first of them the others' distance, hence their score, is
about zero, and the budget goes to failures of other kinds. Images already labelled (``dice`` not
NaN) and images whose current review decision is ``accept`` are not candidates; images with no
defined ``sa_pred`` in any layer (failed ones) have no profile and are left out.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from segability.analysis.results import IMAGES, INPUT, LAYERS, QC, read_table
from segability.errors import UsageError
from segability.review.store import DB_FILE, ReviewStore

__all__ = ["greedy_k_centre", "sa_profiles", "select_for_labelling", "copy_chosen"]


def sa_profiles(layers: pd.DataFrame) -> pd.DataFrame:
    """Per image (rows) the standardised ``sa_pred`` of every hidden layer (columns, forward order).

    Images with no defined ``sa_pred`` are dropped; a missing score is the layer's mean (0).

    Example:
        >>> layers = pd.DataFrame({"image": ["a", "a", "b", "b"], "layer": ["x", "y"] * 2,
        ...                        "depth": [1, 2] * 2, "sa_pred": [0.2, 0.8, 0.4, 0.8]})
        >>> sa_profiles(layers).round(3).to_dict("list")
        {'x': [-1.0, 1.0], 'y': [0.0, 0.0]}
    """
    hidden = layers[layers["layer"] != INPUT]
    order = hidden.groupby("layer")["depth"].min().sort_values(kind="stable").index
    wide = hidden.pivot_table(index="image", columns="layer", values="sa_pred", aggfunc="mean", dropna=False)
    wide = wide.reindex(columns=order).dropna(how="all")
    mean, std = wide.mean(), wide.std(ddof=0)
    std = std.where(std > 0, 1.0).fillna(1.0)
    return ((wide - mean) / std).fillna(0.0)


def greedy_k_centre(profiles: np.ndarray, distrust: np.ndarray, budget: int) -> tuple[list[int], list[float]]:
    """Distrust-weighted greedy k-centre: indices chosen in order, and each one's distance to the
    nearest earlier choice (``inf`` for the first).

    The first choice is the largest distrust; then the largest ``min distance to the chosen x
    distrust``. Ties go to the lower index.

    Args:
        profiles: (n, L) points.
        distrust: (n,) weights in [0, 1].
        budget: how many to choose (at most n).

    Example:
        >>> p = np.array([[0.0], [0.1], [5.0]]); w = np.array([1.0, 0.9, 0.5])
        >>> greedy_k_centre(p, w, 2)[0]
        [0, 2]
    """
    profiles = np.asarray(profiles, dtype=float)
    distrust = np.asarray(distrust, dtype=float)
    n = len(distrust)
    budget = min(int(budget), n)
    chosen: list[int] = []
    distances: list[float] = []
    if budget <= 0:
        return chosen, distances
    nearest = np.full(n, np.inf)
    available = np.ones(n, dtype=bool)
    for _ in range(budget):
        score = np.where(np.isinf(nearest), distrust, nearest * distrust) if not chosen else nearest * distrust
        score = np.where(available, score, -np.inf)
        k = int(np.argmax(score))
        chosen.append(k)
        distances.append(float(nearest[k]))
        available[k] = False
        nearest = np.minimum(nearest, np.linalg.norm(profiles - profiles[k], axis=1))
    return chosen, distances


def select_for_labelling(run_dir: str | os.PathLike, budget: int) -> pd.DataFrame:
    """The ``budget`` images of a run whose labels would help most (see the module's text).

    Args:
        run_dir: a run folder (``layers.parquet``, ``images.parquet``; ``qc.csv`` and
            ``review.sqlite`` when present).
        budget: how many images to choose (fewer when fewer are candidates).

    Returns:
        One row per chosen image, in the order chosen: ``rank``, ``image``, ``distrust``,
        ``estimated_dice`` (NaN without qc.csv), ``mean_sa_pred``, ``distance`` (to the nearest
        earlier choice, in standardised SA units; empty for the first), ``score``
        (``distance x distrust``), and ``file`` when the run has it.

    Raises:
        UsageError: ``budget`` below 1.
        FileNotFoundError: ``run_dir`` is not a run folder.
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
        raise UsageError(f"budget must be an integer >= 1, got {budget!r}", argument="budget")
    run_dir = Path(run_dir)
    for required in (LAYERS.file, IMAGES.file):
        if not (run_dir / required).is_file():
            raise FileNotFoundError(f"{run_dir} is not a segability run folder: {required} is missing")
    images = read_table(run_dir / IMAGES.file, IMAGES).set_index("image")
    profiles = sa_profiles(read_table(run_dir / LAYERS.file, LAYERS))
    if (run_dir / QC.file).is_file():
        estimate = read_table(run_dir / QC.file, QC).set_index("image")["estimated_dice"]
        estimate = estimate.reindex(images.index)
    else:
        estimate = pd.Series(np.nan, index=images.index)
    trust = estimate if (run_dir / QC.file).is_file() else images["mean_sa_pred"]
    distrust = (1.0 - trust.astype(float)).clip(0.0, 1.0).fillna(1.0)

    accepted: set[str] = set()
    if (run_dir / DB_FILE).is_file():
        accepted = {i for i, d in ReviewStore(run_dir).current().items() if d.decision == "accept"}
    labelled = set(images.index[images["dice"].notna()])
    candidates = [i for i in profiles.index if i in images.index and i not in labelled and i not in accepted]
    points = profiles.loc[candidates].to_numpy(float)
    weights = distrust.reindex(candidates).to_numpy(float)
    chosen, distances = greedy_k_centre(points, weights, budget)
    picked = [candidates[k] for k in chosen]
    out = pd.DataFrame({
        "rank": np.arange(1, len(picked) + 1),
        "image": picked,
        "distrust": weights[chosen] if chosen else [],
        "estimated_dice": estimate.reindex(picked).to_numpy(float),
        "mean_sa_pred": images["mean_sa_pred"].reindex(picked).to_numpy(float),
        "distance": [d if np.isfinite(d) else np.nan for d in distances],
    })  # fmt: skip
    out["score"] = np.where(out["distance"].isna(), np.nan, out["distance"] * out["distrust"])
    if "file" in images.columns:
        out["file"] = images["file"].reindex(picked).to_numpy()
    return out


def copy_chosen(files: list[str], destination: str | os.PathLike) -> list[Path]:
    """Copy the chosen images' files into ``destination`` (created when missing), never overwriting.

    A file already there with the same bytes is left as it is (a second round may choose it
    again); a different file of the same name, or two chosen files of one name, stop the copy
    before anything is copied.

    Returns:
        The paths in ``destination``, in the order of ``files``.

    Raises:
        UsageError: a file is missing or a name clashes (``argument="copy_to"``).
    """
    destination = Path(destination)
    sources = [Path(f) for f in files]
    missing = [str(s) for s in sources if not s.is_file()]
    if missing:
        raise UsageError(f"copy_to: the chosen image files {missing} are not there to copy", argument="copy_to")
    names = [s.name for s in sources]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UsageError(f"copy_to: several chosen files are named {twice}; copy them by hand", argument="copy_to")
    targets = [destination / n for n in names]
    clash = [str(t) for s, t in zip(sources, targets, strict=True) if t.exists() and t.read_bytes() != s.read_bytes()]
    if clash:
        raise UsageError(f"copy_to: {clash} exist with other contents; nothing was copied", argument="copy_to")
    destination.mkdir(parents=True, exist_ok=True)
    for source, target in zip(sources, targets, strict=True):
        if target.exists():
            continue
        with open(source, "rb") as src, open(target, "xb") as dst:  # "x": never replaces a file
            shutil.copyfileobj(src, dst)
        shutil.copystat(source, target)
    return targets
