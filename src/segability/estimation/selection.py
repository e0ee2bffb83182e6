"""Which layers' SA to average, and the mean SA per image.

The label-free quality score of an image is the mean, over a set of layers, of the SA of each layer
against the network's own binarised prediction (``sa_pred`` in the ``layers`` table). The paper
averages all analysed layers; :func:`select_layers` also offers the decoder layers and, given a
labelled calibration set, the layers whose ``sa_pred`` best follows the true Dice.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
from scipy import stats

__all__ = [
    "INPUT_LAYER",
    "Role",
    "mean_sa",
    "defined_layers",
    "select_layers",
    "decoder_layers",
    "layer_roles",
    "layer_spearman",
]

INPUT_LAYER = "input"

SelectHow = Literal["all", "decoder", "calibrated"]

Role = Literal["encoder", "decoder", "bottleneck"]

# Words of a layer name (split at dots, underscores and case changes, trailing digits dropped,
# lower-cased) that say which path it is on: "encoder.3", "down_1", "decoderBlock3", "UpSample1",
# "upcat_2", "up_layers.0", "deconv", "decode_head", "bottleneck".
_ROLE_WORDS: dict[str, Role] = {
    **dict.fromkeys(
        ("encoder", "encoders", "encode", "enc", "down", "downs", "downsample", "downsampling",
         "contract", "contracting", "contraction"),
        "encoder",
    ),
    **dict.fromkeys(
        ("decoder", "decoders", "decode", "dec", "up", "ups", "upsample", "upsampling", "upcat",
         "upconv", "deconv", "expand", "expanding", "expansion", "expansive"),
        "decoder",
    ),
    **dict.fromkeys(("bottleneck", "bottom", "bridge"), "bottleneck"),
}  # fmt: skip
_WORD_SPLIT = re.compile(r"[^0-9a-zA-Z]+|(?<=[a-z])(?=[A-Z])")
# MONAI UNet: nested ``SkipConnection(Sequential(down, inner, up))`` named ``model.<i>`` at the top
# and ``submodule.<i>`` below; the last such index tells the path (0 down, 2 up, 1 the innermost
# skip connection, whose ``submodule`` is the bottom block).
_MONAI_UNET_STEP = re.compile(r"(?:^|\.)(?:model|submodule)\.(\d+)(?=\.|$)")
_MONAI_UNET_ROLE: dict[str, Role] = {"0": "encoder", "1": "bottleneck", "2": "decoder"}


def _require_columns(table: pd.DataFrame, columns: Sequence[str], name: str) -> None:
    if not isinstance(table, pd.DataFrame):
        raise ValueError(f"{name} must be a pandas DataFrame, got {type(table).__name__}")
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(
            f"{name} must have the column(s) {missing}; it has {list(table.columns)}"
        )


def _layer_order(layers: pd.DataFrame) -> list[str]:
    """Layer names in forward order (by ``depth`` when present, else first appearance)."""
    names = layers["layer"].astype(str)
    if "depth" in layers.columns:
        depth = pd.to_numeric(layers["depth"], errors="coerce")
        order = depth.groupby(names, sort=False).min().sort_values(kind="stable")
        return [str(n) for n in order.index]
    return list(dict.fromkeys(names))


def _check_known(requested: Sequence[str], known: Sequence[str], name: str) -> None:
    for layer in requested:
        if layer not in known:
            close = difflib.get_close_matches(layer, known, n=3)
            hint = f"; close matches: {close}" if close else ""
            raise ValueError(f"{name}: unknown layer {layer!r}{hint} (known: {len(known)} layers)")


def mean_sa(
    layers: pd.DataFrame, layers_used: Sequence[str] | None = None, column: str = "sa_pred"
) -> pd.Series:
    """Mean SA per image over a set of layers.

    The rule of :func:`segability.analysis.results.layer_means`, the one definition of
    ``mean_sa`` / ``mean_sa_pred``: undefined (NaN) scores are skipped, and an image with no
    defined score in any used layer gets NaN. A layer the model never calls in eval mode (a deep
    supervision head) is undefined for every image and so changes no mean; an empty prediction
    leaves every layer undefined, so its image is NaN and never looks like a good one. With
    ``layers_used=None`` and ``column`` ``"sa"`` / ``"sa_pred"`` the result equals that function's
    ``mean_sa`` / ``mean_sa_pred``.

    Args:
        layers: the ``layers`` table of an analysis run (columns ``image``, ``layer``, ``column``).
        layers_used: layer names to average; ``None`` means every layer except ``"input"``. Name
            ``"input"`` explicitly to include the raw image.
        column: ``"sa_pred"`` (against the prediction, label-free) or ``"sa"`` (against the label).

    Returns:
        Float Series indexed by image id (first-appearance order), named ``mean_<column>``.

    Raises:
        ValueError: missing columns, an unknown layer name (with close matches), or no layer.

    Example:
        >>> import pandas as pd
        >>> t = pd.DataFrame({"image": ["a", "a", "a"], "layer": ["input", "c1", "c2"],
        ...                   "sa_pred": [0.2, 0.6, 0.8]})
        >>> mean_sa(t).round(3).to_dict()
        {'a': 0.7}
        >>> t.loc[2, "sa_pred"] = float("nan")  # c2 undefined: skipped
        >>> mean_sa(t).round(3).to_dict()
        {'a': 0.6}
    """
    _require_columns(layers, ["image", "layer", column], "layers")
    known = _layer_order(layers)
    if layers_used is None:
        used = [n for n in known if n != INPUT_LAYER]
    else:
        if isinstance(layers_used, str):
            raise ValueError(f"layers_used must be a sequence of layer names, got the string {layers_used!r}")
        used = list(dict.fromkeys(str(n) for n in layers_used))
        _check_known(used, known, "layers_used")
    if not used:
        raise ValueError("layers_used: no layer to average (the table holds only the input layer)")
    rows = layers[layers["layer"].astype(str).isin(used)]
    values = pd.to_numeric(rows[column], errors="coerce").astype(float)
    images = rows["image"].astype(str)
    out = values.groupby(images, sort=False).mean()  # skips NaN; all-NaN gives NaN (as layer_means)
    # Images that have no row in the used layers still get an (undefined) entry.
    all_images = list(dict.fromkeys(layers["image"].astype(str)))
    out = out.reindex(all_images)
    out.index.name = "image"
    out.name = f"mean_{column}"
    return out


def defined_layers(layers: pd.DataFrame, column: str = "sa_pred") -> list[str]:
    """The layers besides ``"input"`` whose ``column`` is defined for at least one image, in forward order.

    A layer that is never defined (a head the model does not call in eval mode, an output that
    cannot be read as features) adds nothing to any mean; a calibration leaves it out of its layer set.

    Example:
        >>> import pandas as pd
        >>> t = pd.DataFrame({"image": ["a"] * 3, "layer": ["input", "c1", "aux"],
        ...                   "sa_pred": [0.2, 0.6, float("nan")]})
        >>> defined_layers(t)
        ['c1']
    """
    _require_columns(layers, ["image", "layer", column], "layers")
    values = pd.to_numeric(layers[column], errors="coerce").astype(float)
    defined = set(layers.loc[np.isfinite(values.to_numpy()), "layer"].astype(str))
    return [n for n in _layer_order(layers) if n != INPUT_LAYER and n in defined]


def _layer_names(layers: pd.DataFrame | Sequence[str], name: str = "layers") -> list[str]:
    """Layer names in forward order from a layers table, or the given names as strings."""
    if isinstance(layers, pd.DataFrame):
        _require_columns(layers, ["layer"], name)
        return _layer_order(layers)
    if isinstance(layers, str):
        raise ValueError(f"{name} must be a layers table or a sequence of layer names, got a string")
    return list(dict.fromkeys(str(n) for n in layers))


def _role_by_words(name: str) -> Role | None:
    words = (w.rstrip("0123456789").lower() for w in _WORD_SPLIT.split(name))
    roles = {_ROLE_WORDS[w] for w in words if w in _ROLE_WORDS}
    return roles.pop() if len(roles) == 1 else None  # words of two paths ("encoder.up"): unknown


def layer_roles(layers: pd.DataFrame | Sequence[str]) -> dict[str, Role | None]:
    """Which path of an encoder-decoder network each layer is on, when its name tells.

    The one rule for layer roles in segability (:func:`decoder_layers`, the report's shading and
    its table use it). The first of two rules that gives any layer a role decides for all:

    1. the words of the name (split at dots, underscores, other non-alphanumerics and case
       changes; trailing digits dropped): ``encoder``/``enc``/``down``/``downsample``/
       ``contracting``... mark the encoder, ``decoder``/``dec``/``up``/``upcat``/``upsample``/
       ``deconv``/``expanding``... the decoder, ``bottleneck``/``bottom``/``bridge`` the
       bottleneck. A name with words of two roles (``encoder.up``) gets ``None``;
    2. MONAI ``UNet`` names, when every name has ``model.<i>``/``submodule.<i>`` steps: the last
       step's index is 0 in a down block (encoder), 2 in an up block (decoder) and 1 inside the
       innermost skip connection, the bottom block (bottleneck).

    Otherwise, and always for the ``"input"`` pseudo-layer, the role is ``None``: the names do
    not tell.

    Args:
        layers: a ``layers`` table (names in forward order from ``depth``) or layer names.

    Returns:
        ``{name: "encoder" | "decoder" | "bottleneck" | None}`` in forward order.

    Raises:
        ValueError: ``layers`` is a string, or a table without a ``layer`` column.

    Example:
        >>> layer_roles(["down_1.conv", "bottleneck", "upcat_4", "head"])
        {'down_1.conv': 'encoder', 'bottleneck': 'bottleneck', 'upcat_4': 'decoder', 'head': None}
        >>> layer_roles(["input", "model.0.conv", "model.1.submodule.conv", "model.2.conv"])
        {'input': None, 'model.0.conv': 'encoder', 'model.1.submodule.conv': 'bottleneck', 'model.2.conv': 'decoder'}
        >>> layer_roles(["block1", "block2"])
        {'block1': None, 'block2': None}
    """
    names = _layer_names(layers)
    hidden = [n for n in names if n != INPUT_LAYER]
    roles: dict[str, Role | None] = {n: _role_by_words(n) for n in hidden}
    if not any(roles.values()):
        steps = [_MONAI_UNET_STEP.findall(n) for n in hidden]
        if steps and all(steps):
            roles = {n: _MONAI_UNET_ROLE.get(s[-1]) for n, s in zip(hidden, steps, strict=True)}
    return {n: None if n == INPUT_LAYER else roles[n] for n in names}


def decoder_layers(layers: pd.DataFrame | Sequence[str]) -> list[str]:
    """The decoder (expanding path) layers: those :func:`layer_roles` calls ``"decoder"``.

    When no layer's role is ``"decoder"`` (the names do not tell), the second half of the forward
    (``depth``) order stands in: the last ``n // 2`` layers (at least one), so the middle layer of
    an odd count, usually the bottleneck, is left out.

    Args:
        layers: the ``layers`` table (forward order from ``depth``) or layer names in forward order.
            The ``"input"`` layer is never a decoder layer.

    Returns:
        Decoder layer names in forward order.

    Raises:
        ValueError: no layer besides the input, or ``layers`` is a string.

    Example:
        >>> decoder_layers(["enc1", "enc2", "bottleneck", "decoder2", "decoder1"])
        ['decoder2', 'decoder1']
        >>> decoder_layers(["model.0.conv", "model.1.submodule.0.conv", "model.1.submodule.2.conv",
        ...                 "model.2.conv"])
        ['model.1.submodule.2.conv', 'model.2.conv']
        >>> decoder_layers(["b1", "b2", "b3", "b4", "b5"])
        ['b4', 'b5']
    """
    roles = layer_roles(layers)
    names = [n for n in roles if n != INPUT_LAYER]
    if not names:
        raise ValueError("layers: no layer besides the input")
    decoder = [n for n in names if roles[n] == "decoder"]
    if decoder:
        return decoder
    half = max(1, len(names) // 2)
    return names[-half:]


def _per_layer_table(layers: pd.DataFrame, column: str) -> pd.DataFrame:
    """Wide table: one row per image, one column per layer (input excluded)."""
    rows = layers[layers["layer"].astype(str) != INPUT_LAYER]
    wide = rows.assign(
        image=rows["image"].astype(str),
        layer=rows["layer"].astype(str),
        _v=pd.to_numeric(rows[column], errors="coerce").astype(float),
    ).pivot_table(index="image", columns="layer", values="_v", aggfunc="mean", dropna=False)
    order = [n for n in _layer_order(layers) if n in wide.columns]
    return wide[order]


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return math.nan
    return float(stats.spearmanr(x[ok], y[ok])[0])


def layer_spearman(layers: pd.DataFrame, dice: pd.Series, column: str = "sa_pred") -> pd.Series:
    """Spearman correlation between each layer's score and the true Dice, over images.

    Args:
        layers: the ``layers`` table.
        dice: true Dice per image, indexed by image id.
        column: the score column (``"sa_pred"`` by default).

    Returns:
        Series indexed by layer (forward order, input excluded); NaN where fewer than 3 images have
        both values or either is constant.

    Example:
        >>> import pandas as pd
        >>> t = pd.DataFrame({"image": list("abc") * 2, "layer": ["l1"] * 3 + ["l2"] * 3,
        ...                   "sa_pred": [0.1, 0.5, 0.9, 0.9, 0.5, 0.1]})
        >>> layer_spearman(t, pd.Series([0.2, 0.4, 0.8], index=list("abc"))).to_dict()
        {'l1': 1.0, 'l2': -1.0}
    """
    _require_columns(layers, ["image", "layer", column], "layers")
    wide = _per_layer_table(layers, column)
    truth = _dice_series(dice).reindex(wide.index).to_numpy(float)
    return pd.Series(
        {layer: _spearman(wide[layer].to_numpy(float), truth) for layer in wide.columns},
        dtype=float,
        name="spearman",
    )


def _dice_series(dice: pd.Series) -> pd.Series:
    if not isinstance(dice, pd.Series):
        raise ValueError(f"dice must be a pandas Series indexed by image id, got {type(dice).__name__}")
    out = pd.to_numeric(dice, errors="coerce").astype(float)
    out.index = out.index.astype(str)
    return out


def _rank_layers(wide: pd.DataFrame, truth: np.ndarray) -> list[str]:
    rho = {layer: _spearman(wide[layer].to_numpy(float), truth) for layer in wide.columns}
    # Best first; undefined correlations last; ties keep forward order (sort is stable).
    return sorted(wide.columns, key=lambda n: -rho[n] if math.isfinite(rho[n]) else math.inf)


def select_layers(
    layers: pd.DataFrame,
    dice: pd.Series | None = None,
    how: SelectHow = "all",
    k: int | None = None,
    *,
    column: str = "sa_pred",
    folds: int = 5,
    seed: int = 0,
) -> list[str]:
    """Choose the layers whose mean SA estimates output quality.

    - ``"all"``: every analysed layer except the input, as in the paper.
    - ``"decoder"``: the decoder layers (:func:`layer_roles`; else the second half of the forward
      order, see :func:`decoder_layers`).
    - ``"calibrated"``: on a labelled calibration set, the layers whose ``column`` best follows the
      true Dice (Spearman over images), best first. With ``k`` the top ``k``; without, ``k`` is
      chosen by ``folds``-fold cross-validation over images: for each fold the layers are ranked on
      the other folds, and the Spearman correlation between the mean over the top ``k`` and the Dice
      is measured on the fold; the ``k`` with the best mean wins (ties: the smaller ``k``).

    Args:
        layers: the ``layers`` table of an analysis run.
        dice: true Dice per image (indexed by image id); needed for ``"calibrated"`` only.
        how: ``"all"``, ``"decoder"`` or ``"calibrated"``.
        k: keep at most the first ``k`` layers (for ``"calibrated"``: the top ``k``).
        column: the score column ranked by ``"calibrated"``.
        folds: cross-validation folds when ``k`` is None (at most one fold per 3 images).
        seed: seed of the fold split.

    Returns:
        Layer names: forward order for ``"all"`` / ``"decoder"``, best first for ``"calibrated"``.

    Raises:
        ValueError: bad ``how``/``k``, missing ``dice`` for ``"calibrated"``, or too few images.

    Example:
        >>> import pandas as pd
        >>> t = pd.DataFrame({"image": ["a"] * 3, "layer": ["input", "enc", "up1"],
        ...                   "depth": [0, 1, 2], "sa_pred": [0.5, 0.6, 0.7]})
        >>> select_layers(t), select_layers(t, how="decoder")
        (['enc', 'up1'], ['up1'])
    """
    _require_columns(layers, ["image", "layer", column], "layers")
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
        raise ValueError(f"k must be a positive integer or None, got {k!r}")
    if how == "all":
        chosen = [n for n in _layer_order(layers) if n != INPUT_LAYER]
        if not chosen:
            raise ValueError("layers: no layer besides the input")
        return chosen[:k] if k else chosen
    if how == "decoder":
        chosen = decoder_layers(layers)
        return chosen[:k] if k else chosen
    if how != "calibrated":
        raise ValueError(f'how must be "all", "decoder" or "calibrated", got {how!r}')
    if dice is None:
        raise ValueError('dice: how="calibrated" needs the true Dice per image of a labelled calibration set')

    wide = _per_layer_table(layers, column)
    truth_all = _dice_series(dice).reindex(wide.index)
    keep = truth_all.notna().to_numpy()
    wide, truth = wide[keep], truth_all.to_numpy(float)[keep]
    if len(wide) < 3:
        raise ValueError(f"dice: need at least 3 images with a known Dice and SA, got {len(wide)}")
    if wide.shape[1] == 0:
        raise ValueError("layers: no layer besides the input")
    ranking = _rank_layers(wide, truth)
    if k is not None:
        return ranking[:k]

    n_folds = min(int(folds), len(wide) // 3)
    if n_folds < 2:
        raise ValueError(
            f"dice: choosing k by cross-validation needs at least 6 labelled images, got {len(wide)}; pass k"
        )
    fold_of = np.random.default_rng(seed).permutation(len(wide)) % n_folds
    n_layers = wide.shape[1]
    scores = np.zeros((n_folds, n_layers))
    for f in range(n_folds):
        train, test = fold_of != f, fold_of == f
        order = _rank_layers(wide[train], truth[train])
        values = wide[test][order].to_numpy(float)  # (n_test, n_layers), best first
        cum = np.cumsum(values, axis=1) / np.arange(1, n_layers + 1)
        scores[f] = [_spearman(cum[:, j], truth[test]) for j in range(n_layers)]
    finite = np.isfinite(scores)
    counts = finite.sum(axis=0)
    mean = np.where(counts > 0, np.where(finite, scores, 0.0).sum(axis=0) / np.maximum(counts, 1), -np.inf)
    if not np.isfinite(mean).any():
        return ranking[:1]
    best_k = int(np.argmax(mean)) + 1  # argmax returns the first (smallest k) on ties
    return ranking[:best_k]
