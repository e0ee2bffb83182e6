"""What every generated image draws: simulated lesions, intensity changes and the ranges of its transform.

A lesion core is an irregular ellipse (2D) or ellipsoid (3D) drawn inside the brain mask on the
output grid; its soft border and an oedema-like halo change the image but not the label, which is
the core exactly. Then gamma, gain, offset and a little noise change the whole head. Each image has
its own random streams (:func:`_streams`), so image ``i`` of a set does not depend on ``n``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from segability.datasets.splits import AXES, SPLITS

# Lesion and appearance parameters (ranges of uniform draws unless said otherwise).
_P_EMPTY = 0.15
_N_LESIONS_P = (0.5, 0.3, 0.2)  # 1, 2 or 3 lesions
_CONTRAST = (0.14, 0.40)  # added/removed intensity at the lesion centre (white matter ~0.7)
_EDGE_SIGMA = (0.4, 1.0)  # pixels, soft border (narrower below a radius of 3 pixels)
_P_HALO = 0.3
_HALO_RATIO = (0.15, 0.3)  # halo contrast / lesion contrast
_IRREGULARITY = (0.15, 0.45)  # weight of the random field that perturbs the ellipse border
_ROTATION_DEG = 10.0
_SCALE = (0.9, 1.1)
_SHIFT_FRACTION = 0.04
_GAMMA = (0.8, 1.25)
_GAIN = (0.85, 1.15)
_OFFSET = (-0.04, 0.04)
_NOISE_STD = (0.005, 0.025)


def _rotation(rng: np.random.Generator, ndim: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((ndim, ndim)))
    return q * np.sign(np.diag(r))


def _draw_lesions(
    rng: np.random.Generator,
    brain: np.ndarray,
    polarity: int,
    count: int,
    radius_range: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Add ``count`` lesions inside ``brain`` (bool, 2D or 3D); returns (delta, core, summary).

    A lesion core is a randomly oriented ellipsoid of radius ``r`` (log-uniform in
    ``radius_range``) whose border is perturbed by a smooth random field (kept: the component
    that holds the centre, inside the brain). The image change is ``polarity * contrast`` times
    the core blurred by a small Gaussian (soft border) with a slight internal texture, plus,
    sometimes, a fainter blurred halo around the core that is not part of the label.
    """
    ndim = brain.ndim
    delta = np.zeros(brain.shape, np.float32)
    core_all = np.zeros(brain.shape, bool)
    summary = {"contrast": 0.0, "radius": 0.0, "halo": 0.0}
    if count == 0:
        return delta, core_all, summary
    depth = ndimage.distance_transform_edt(brain)
    full = np.ones((3,) * ndim, bool)
    contrasts, radii = [], []
    for _ in range(count):
        r = float(np.exp(rng.uniform(*np.log(radius_range))))
        threshold = min(0.5 * r, 0.5 * float(depth.max()))
        candidates = np.flatnonzero(depth >= threshold)
        centre = np.array(np.unravel_index(candidates[rng.integers(candidates.size)], brain.shape))
        centre_f = centre + rng.uniform(-0.5, 0.5, ndim)
        half = math.ceil(3.5 * r) + 4
        lo = np.maximum(centre - half, 0)
        hi = np.minimum(centre + half + 1, brain.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        grids = np.meshgrid(*[np.arange(a, b, dtype=np.float32) for a, b in zip(lo, hi, strict=True)], indexing="ij")
        offsets = np.stack([g - c for g, c in zip(grids, centre_f, strict=True)], axis=-1)
        axes = r * np.exp(rng.uniform(-0.35, 0.35, ndim))
        local = offsets @ _rotation(rng, ndim).T / axes
        rho2 = (local**2).sum(axis=-1)
        field = ndimage.gaussian_filter(rng.standard_normal(rho2.shape).astype(np.float32), max(0.35 * r, 0.8))
        field /= field.std() + 1e-8
        beta = rng.uniform(*_IRREGULARITY)
        brain_box = brain[box]
        core = ((1.0 - rho2 + beta * field) > 0) & brain_box
        centre_local = tuple(centre - lo)
        core[centre_local] = True  # the centre lies inside the brain (depth > 0)
        components, _ = ndimage.label(core, structure=full)
        core = components == components[centre_local]

        contrast = rng.uniform(*_CONTRAST)
        edge = rng.uniform(*_EDGE_SIGMA) * min(1.0, r / 3.0)
        profile = ndimage.gaussian_filter(core.astype(np.float32), edge) * (1.0 + 0.15 * field)
        has_halo = rng.random() < _P_HALO
        halo_ratio = rng.uniform(*_HALO_RATIO)
        halo_width = rng.uniform(0.5, 1.0) * r + 1.0
        if has_halo:
            outside = ndimage.distance_transform_edt(~core)
            halo = ndimage.gaussian_filter((outside <= halo_width).astype(np.float32), halo_width / 2)
            profile += halo_ratio * halo * brain_box
        delta[box] += polarity * contrast * profile
        core_all[box] |= core
        contrasts.append(contrast)
        radii.append(r)
        summary["halo"] = max(summary["halo"], float(has_halo))
    summary["contrast"] = float(np.mean(contrasts))
    summary["radius"] = float(np.mean(radii))
    return delta, core_all, summary


def _appearance(
    base: np.ndarray, delta: np.ndarray, rng: np.random.Generator, noise_rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, float]]:
    """Lesions in, then gamma, gain, offset and noise inside the head; background stays 0."""
    head = np.clip(base / 0.05, 0.0, 1.0)
    gamma = float(np.exp(rng.uniform(*np.log(_GAMMA))))
    gain = rng.uniform(*_GAIN)
    offset = rng.uniform(*_OFFSET)
    noise = rng.uniform(*_NOISE_STD)
    image = np.clip(base + delta * head, 0.0, None) ** gamma
    image = gain * image + offset * head
    image += noise * head * noise_rng.standard_normal(base.shape).astype(np.float32)
    params = {"gamma": gamma, "gain": gain, "offset": offset, "noise_std": noise}
    return np.clip(image, 0.0, 1.0).astype(np.float32), params


def _lesion_plan(rng: np.random.Generator) -> tuple[int, int]:
    """(number of lesions, polarity): about 15% of images have none."""
    if rng.random() < _P_EMPTY:
        return 0, 0
    count = int(rng.choice(len(_N_LESIONS_P), p=_N_LESIONS_P)) + 1
    polarity = 1 if rng.random() < 0.5 else -1
    return count, polarity


def _streams(kind: int, seed: int, split: str, axis: str, index: int) -> list[np.random.Generator]:
    sequence = np.random.SeedSequence([kind, seed, SPLITS.index(split), AXES.index(axis), index])
    return [np.random.default_rng(s) for s in sequence.spawn(4)]
