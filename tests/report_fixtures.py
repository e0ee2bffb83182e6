"""Synthetic result folders for the report tests, written as ``SAResult.save`` would (see
docs/architecture.md, "The result folder"), with pandas/pyarrow/NumPy only.

Each image is a bright blob on a noisy background; its label is the blob, its prediction a
probability map that is worse on the "shifted" images. Each layer's feature segmentation map is
the reference, coarsened and with some pixels flipped, and its SA is the Dice of that map
computed here, so the numbers in the tables agree with the kept maps.

Example:
    >>> root = write_result(tmp_path / "run", n_images=3, n_layers=8)  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

MALICIOUS_IMAGE = "<script>alert(1)</script>.nii.gz"
MALICIOUS_LAYER = "model.<img src=x onerror=alert(2)>.conv"
MALICIOUS_SETTING = "<b onmouseover=alert(3)>UNet</b>"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two binary arrays; NaN when both are empty."""
    a, b = a.astype(bool), b.astype(bool)
    s = a.sum() + b.sum()
    return float(2 * (a & b).sum() / s) if s else float("nan")


def layer_names(n: int, style: str) -> list[str]:
    """``n`` layer names: MONAI UNet-like ("unet": roles from the structure), with role words
    ("encdec"), or "plain" (``block0``...: the names do not tell a role)."""
    if style == "unet":
        half = (n + 1) // 2
        names = []
        for i in range(n):
            level = i if i < half else n - 1 - i
            stem = "model." + "1.submodule." * level
            names.append(
                stem + ("0.conv" if i < half - 1 else "conv" if i == half - 1 else "2.conv")
            )
        # make them unique and ordered, as named_modules() would give them
        return [f"{nm}.{i}" if names.count(nm) > 1 else nm for i, nm in enumerate(names)]
    if style == "encdec":
        enc = (n - 1) // 2
        dec = n - 1 - enc
        return (
            [f"encoder.{i}" if i % 2 == 0 else f"down_{i}" for i in range(enc)]
            + ["bottleneck"]
            + [f"decoder.{i}" if i % 2 == 0 else f"upcat_{i}" for i in range(dec)]
        )
    if style == "plain":
        return [f"block{i}" for i in range(n)]
    raise ValueError(f"style must be 'unet', 'encdec' or 'plain', got {style!r}")


def _blob(shape: Sequence[int], rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij")
    centre = [rng.uniform(0.35, 0.65) * s for s in shape]
    radii = [rng.uniform(0.14, 0.24) * scale * s for s in shape]
    r2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii, strict=True))
    return r2


def _coarse(mask: np.ndarray, factor: int) -> np.ndarray:
    if factor <= 1:
        return mask
    sl = tuple(slice(None, None, factor) for _ in mask.shape)
    small = mask[sl]
    for d in range(mask.ndim):
        small = np.repeat(small, factor, axis=d)
    return small[tuple(slice(0, s) for s in mask.shape)]


def write_result(
    root: str | Path,
    *,
    n_images: int = 3,
    n_layers: int = 8,
    names: str = "unet",
    spatial: Sequence[int] = (48, 48),
    labels: bool = True,
    units: int = 6,
    best_units: int = 3,
    keep_maps: int = 3,
    qc: bool = True,
    history: bool = True,
    timing: bool = True,
    settings: bool = True,
    groups: bool = True,
    malicious: bool = False,
    findings: Sequence[str | dict] | None = None,
    empty_prediction: bool = False,
    empty_first: bool = False,
    lesion_scale: float = 1.0,
    errors: Sequence[tuple[str, str]] | None = None,
    seed: int = 0,
) -> Path:
    """Write a synthetic result folder and return its path.

    Args:
        root: folder to create.
        n_images, n_layers: sizes of the run (plus the ``input`` pseudo-layer).
        names: layer naming style, "unet", "encdec" or "plain".
        spatial: image size (2 or 3 dims).
        labels: with labels (``sa``, ``dice`` defined) or without (NaN).
        units: units per layer in units.parquet (0: no units.parquet).
        best_units: unit maps kept per layer and kept image.
        keep_maps: kept images in maps.npz (0: no maps.npz).
        qc, history, timing, settings: write these optional files.
        groups: add ``group``/``severity`` metadata columns to images.parquet.
        malicious: use HTML-like image id, layer name and settings value.
        findings: write findings.json with these statements (strings or {"text", "images"}).
        empty_prediction: the last image's prediction is empty (its ``sa_pred`` undefined).
        empty_first: the first image has no target: empty label and empty prediction.
        lesion_scale: scale of the blob's radii (0.2: a small lesion).
        errors: write errors.csv with these (file, error) rows.
        seed: random seed.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    spatial = tuple(spatial)
    layers = layer_names(n_layers, names)
    if malicious:
        layers[min(2, n_layers - 1)] = MALICIOUS_LAYER
    ids = [f"case_{i:03d}" for i in range(n_images)]
    if malicious:
        ids[0] = MALICIOUS_IMAGE
    half = (n_layers + 1) // 2
    level = [i if i < half else n_layers - 1 - i for i in range(n_layers)]
    channels = [16 * 2 ** min(lv, 3) for lv in level]
    # deep layers coarse, later layers cleaner: a plausible SA curve
    noise = [0.08 - 0.07 * i / max(1, n_layers - 1) for i in range(n_layers)]

    layer_rows, image_rows, unit_rows, arrays = [], [], [], {}
    for i, image_id in enumerate(ids):
        shifted = groups and i % 3 == 2
        r2 = _blob(spatial, rng, lesion_scale)
        if empty_first and i == 0:
            r2 = np.full(spatial, 4.0)  # no target anywhere
        target = r2 <= 1.0
        image = (0.2 + 0.6 * target + rng.normal(0, 0.12 if not shifted else 0.3, spatial)).astype(
            np.float32
        )[None]
        quality = rng.uniform(0.55, 0.75) if shifted else rng.uniform(0.85, 0.97)
        logit = (
            (1.0 - r2) * 6 * quality
            + rng.normal(0, 1.6 * (1 - quality), spatial)
            - (1 - quality) * 3
        )
        prediction = (1 / (1 + np.exp(-np.clip(logit, -60, 60)))).astype(np.float32)
        if (empty_prediction and i == n_images - 1) or (empty_first and i == 0):
            prediction = np.zeros_like(prediction)
        pred_mask = prediction >= 0.5
        label = target.astype(np.uint8) if labels else None
        reference = target if labels else pred_mask

        def scores(m: np.ndarray, target=target, pred_mask=pred_mask) -> tuple[float, float]:
            return (
                dice(m, target) if labels else float("nan"),
                dice(m, pred_mask) if pred_mask.any() else float("nan"),
            )

        input_map = image[0] > np.median(image[0]) + 0.3
        sa_in, sa_pred_in = scores(input_map)
        reason = "" if pred_mask.any() else "empty prediction: no target prototype"
        layer_rows.append(
            dict(
                image=image_id,
                layer="input",
                depth=0,
                channels=1,
                shape="x".join(map(str, (1, *spatial))),
                sa=sa_in,
                sa_pred=sa_pred_in,
                reason=reason,
            )
        )
        k = i if i < keep_maps else None
        if k is not None:
            arrays[f"{k}:image"] = image
            if label is not None:
                arrays[f"{k}:label"] = label
            arrays[f"{k}:prediction"] = prediction
        per_layer_sa, per_layer_sa_pred = [], []
        for j, name in enumerate(layers):
            factor = 2 ** min(level[j], 3)
            m = _coarse(reference, factor) ^ (rng.random(spatial) < noise[j])
            sa, sa_pred = scores(m)
            per_layer_sa.append(sa)
            per_layer_sa_pred.append(sa_pred)
            shape = "x".join(map(str, (channels[j], *(max(1, s // factor) for s in spatial))))
            layer_rows.append(
                dict(
                    image=image_id,
                    layer=name,
                    depth=j + 1,
                    channels=channels[j],
                    shape=shape,
                    sa=sa,
                    sa_pred=sa_pred,
                    reason=reason,
                )
            )
            if k is not None:
                arrays[f"{k}:layer:{name}"] = m.astype(np.uint8)
            unit_maps = []
            for u in range(min(units, channels[j])):
                um = _coarse(reference, factor) ^ (rng.random(spatial) < rng.uniform(0.02, 0.3))
                usa, usa_pred = scores(um)
                unit_rows.append(dict(image=image_id, layer=name, unit=u, sa=usa, sa_pred=usa_pred))
                unit_maps.append((usa if labels else usa_pred, u, um))
            if k is not None:
                for _, u, um in sorted(unit_maps, key=lambda t: -np.nan_to_num(t[0], nan=-1))[
                    :best_units
                ]:
                    arrays[f"{k}:unit:{name}:{u}"] = um.astype(np.uint8)
        row = dict(
            image=image_id,
            dice=dice(pred_mask, target) if labels else float("nan"),
            mean_sa=float(np.mean(per_layer_sa)) if labels else float("nan"),
            mean_sa_pred=float(np.mean(per_layer_sa_pred)),
            input_sa=sa_in,
            input_sa_pred=sa_pred_in,
            reason=reason,
        )
        if groups:
            row["group"] = "shifted" if shifted else "clean"
            row["severity"] = int(shifted) * (1 + i % 3)
        image_rows.append(row)

    pd.DataFrame(layer_rows).to_parquet(root / "layers.parquet", index=False)
    images_df = pd.DataFrame(image_rows)
    images_df.to_parquet(root / "images.parquet", index=False)
    if units:
        pd.DataFrame(unit_rows).to_parquet(root / "units.parquet", index=False)
    if keep_maps:
        arrays["image_ids"] = np.array(ids[:keep_maps])
        np.savez_compressed(root / "maps.npz", **arrays)
    if settings:
        (root / "settings.json").write_text(
            json.dumps(
                {
                    "model": MALICIOUS_SETTING
                    if malicious
                    else "monai.networks.nets.UNet(spatial_dims=2, channels=(16, 32, 64, 128))",
                    "layers": layers,
                    "guide": "prediction",
                    "output": "sigmoid",
                    "target": 1,
                    "units": bool(units),
                    "spatial_dims": len(spatial),
                    "version": "0.1.0",
                    "date": "2025-01-01T12:00:00",
                    "data": "synthetic blobs",
                }
            )
        )
    if qc:
        est = np.clip(images_df["mean_sa_pred"].to_numpy(float) * 1.05, 0, 1)
        threshold = float(np.nanquantile(est, 0.3))  # a gate that flags the worst third
        flag = ~(est >= threshold)
        pd.DataFrame(
            {
                "image": images_df["image"],
                "estimated_dice": est,
                "flag": flag,
                "reason": [
                    f"estimated Dice {e:.2f} < {threshold:.2f}" if f else ""
                    for e, f in zip(est, flag, strict=True)
                ],
            }
        ).to_csv(root / "qc.csv", index=False)
    if history:
        final = (
            pd.DataFrame(layer_rows)
            .groupby("layer", sort=False)["sa" if labels else "sa_pred"]
            .mean()
        )
        pd.DataFrame(
            [
                dict(epoch=e, layer=name, sa=float(final[name]) * (1 - np.exp(-e / 2)))
                for e in range(1, 6)
                for name in layers
            ]
        ).to_csv(root / "history.csv", index=False)
    if timing:
        (root / "timing.json").write_text(
            json.dumps({"total_s": 12.5, "per_image_s": 12.5 / n_images})
        )
    if findings is not None:
        (root / "findings.json").write_text(json.dumps(list(findings)))
    if errors is not None:
        pd.DataFrame(list(errors), columns=["file", "error"]).to_csv(
            root / "errors.csv", index=False
        )
    return root
