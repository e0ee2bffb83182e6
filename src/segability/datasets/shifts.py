"""Named image shifts (acquisition artefacts and intensity changes) with a severity in [0, 1].

Severity 0 is the identity and distortion grows with severity; severity 1 is strong enough that a
segmentation network trained on clean images degrades clearly, so a suite of shifted images spreads
output quality from excellent to poor. Spatial sizes (blur width) are relative to a 128-pixel image,
so a severity means the same anatomical blur at any image size; intensities assume images scaled to
about [0, 1] as :func:`segability.datasets.mni_lesions` makes them.

| name | severity 1 | how |
|---|---|---|
| ``gaussian_noise`` | additive N(0, 0.2) | MONAI ``RandGaussianNoise`` |
| ``rician_noise`` | Rician noise, sigma 0.15 | MONAI ``RandRicianNoise`` |
| ``blur`` | Gaussian, sigma 3.5 px at size 128 | MONAI ``GaussianSmooth`` |
| ``bias_field`` | exp(degree-3 Legendre field), coefficients in +-0.35 | MONAI ``RandBiasField`` |
| ``ghosting`` | every p-th k-space line (p 2..4) removed, centre kept | FFT |
| ``gamma`` | gamma 3 | MONAI ``AdjustContrast`` |
| ``contrast`` | contrast around the mean scaled by 0.15 | linear |
| ``downsample`` | 4x down (area) then back up (linear) | ``torch.nn.functional.interpolate`` |
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from segability.datasets.lesion_data import LesionData

__all__ = ["SHIFTS", "apply_shift", "shifted_suite"]

SHIFTS: tuple[str, ...] = (
    "gaussian_noise",
    "rician_noise",
    "blur",
    "bias_field",
    "ghosting",
    "gamma",
    "contrast",
    "downsample",
)

_NOISE_STD = 0.2
_RICIAN_STD = 0.15  # its background bias (sigma * sqrt(pi / 2)) is a shift of its own
_BLUR_SIGMA = 3.5  # pixels at a 128-pixel side
_BIAS_COEFF = 0.35
_GHOST_RESTORE = 0.02  # fraction of k-space lines around the centre left untouched
_GAMMA = 3.0
_CONTRAST_LOSS = 0.85
_DOWNSAMPLE = 4.0


def _to_numpy(x: object) -> np.ndarray:
    from monai.utils import convert_to_numpy

    return np.asarray(convert_to_numpy(x), dtype=np.float32)


def _check_severity(severity: object, name: str = "severity") -> float:
    if isinstance(severity, bool) or not isinstance(severity, int | float | np.integer | np.floating):
        raise ValueError(f"{name} must be a number in [0, 1], got {type(severity).__name__}")
    value = float(severity)
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {severity}")
    return value


def _check_name(name: object) -> str:
    if name not in SHIFTS:
        raise ValueError(f"shift name must be one of {', '.join(SHIFTS)}; got {name!r}")
    return str(name)


def _ghosting(image: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    """Remove a fraction ``severity`` of every p-th phase-encoding line: p - 1 ghosts at N / p."""
    spatial = image.ndim - 1
    axis = 1 + int(rng.integers(spatial))
    period = int(rng.integers(2, 5))
    n = image.shape[axis]
    spectrum = np.fft.fftn(image, axes=tuple(range(1, image.ndim)))
    frequency = np.fft.fftfreq(n) * n  # integer line index, 0 = centre of k-space
    lines = (np.arange(n) % period == 0) & (np.abs(frequency) > max(1, round(_GHOST_RESTORE * n)))
    factor = np.where(lines, 1.0 - severity, 1.0)
    shape = [1] * image.ndim
    shape[axis] = n
    spectrum *= factor.reshape(shape)
    return np.abs(np.fft.ifftn(spectrum, axes=tuple(range(1, image.ndim)))).astype(np.float32)


def _downsample(image: np.ndarray, severity: float) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    spatial = image.shape[1:]
    factor = 1.0 + (_DOWNSAMPLE - 1.0) * severity
    low = [max(2, round(s / factor)) for s in spatial]
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(spatial)]
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    x = F.interpolate(x, size=low, mode="area")
    x = F.interpolate(x, size=list(spatial), mode=mode, align_corners=False)
    return x[0].numpy()


def apply_shift(image: np.ndarray, name: str, severity: float, seed: int = 0) -> np.ndarray:
    """Apply the shift ``name`` at ``severity`` to one image.

    Args:
        image: array (C, *S) with 2 or 3 spatial dims, intensities about [0, 1].
        name: one of :data:`SHIFTS`.
        severity: in [0, 1]; 0 returns an unchanged copy.
        seed: fixes the random parts (noise, bias field, ghost direction); with the same seed the
            random pattern is the same at every severity, only its strength changes.

    Returns:
        A new float32 array of the same shape.

    Raises:
        ValueError: for an unknown ``name``, a ``severity`` outside [0, 1] or an ``image`` that is
            not (C, *S) with 2 or 3 spatial dims.

    Example:
        >>> x = np.zeros((1, 32, 32), np.float32); x[:, 8:24, 8:24] = 0.7
        >>> y = apply_shift(x, "blur", 0.5)
        >>> y.shape, bool(abs(y.sum() - x.sum()) < 1e-2 * x.sum())
        ((1, 32, 32), True)
    """
    name = _check_name(name)
    severity = _check_severity(severity)
    image = np.asarray(image)
    if image.ndim not in (3, 4) or not np.issubdtype(image.dtype, np.number):
        raise ValueError(f"image must be a numeric array (C, *spatial) with 2 or 3 spatial dims, got shape {image.shape}")
    image = image.astype(np.float32, copy=True)
    if severity == 0.0:
        return image
    seed = int(seed)
    spatial = image.shape[1:]

    if name in ("gaussian_noise", "rician_noise"):
        from monai.transforms import RandGaussianNoise, RandRicianNoise

        std = _NOISE_STD * severity
        if name == "gaussian_noise":
            noise = RandGaussianNoise(prob=1.0, mean=0.0, std=std, sample_std=False)
        else:
            noise = RandRicianNoise(prob=1.0, mean=0.0, std=_RICIAN_STD * severity, sample_std=False)
        noise.set_random_state(seed)
        return _to_numpy(noise(image))
    if name == "blur":
        from monai.transforms import GaussianSmooth

        sigma = _BLUR_SIGMA * severity * max(spatial) / 128.0
        return _to_numpy(GaussianSmooth(sigma=sigma)(image))
    if name == "bias_field":
        from monai.transforms import RandBiasField

        coeff = _BIAS_COEFF * severity
        bias = RandBiasField(degree=3, coeff_range=(-coeff, coeff), prob=1.0)
        bias.set_random_state(seed)
        return _to_numpy(bias(image))
    if name == "ghosting":
        return _ghosting(image, severity, np.random.default_rng(seed))
    if name == "gamma":
        from monai.transforms import AdjustContrast

        return _to_numpy(AdjustContrast(gamma=1.0 + (_GAMMA - 1.0) * severity)(image))
    if name == "contrast":
        mean = image.mean(axis=tuple(range(1, image.ndim)), keepdims=True)
        return (mean + (image - mean) * (1.0 - _CONTRAST_LOSS * severity)).astype(np.float32)
    return _downsample(image, severity)


def shifted_suite(
    data: LesionData,
    shifts: Sequence[str] = SHIFTS,
    severities: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    seed: int = 0,
) -> LesionData:
    """Every image under every shift at every severity (labels and brain masks unchanged).

    Images are ordered image-major, then shift, then severity. The random pattern of a shift is
    fixed per (image, shift), so within one image and shift only the strength varies.

    Args:
        data: the clean images.
        shifts: names from :data:`SHIFTS`.
        severities: values in [0, 1].
        seed: base seed of the random parts.

    Returns:
        A :class:`LesionData` of ``len(data) * len(shifts) * len(severities)`` images with ids
        ``"<id>|<shift>@<severity:.2f>"``; meta is the source row plus ``source_id``, ``shift``
        and ``severity``.

    Raises:
        ValueError: for an unknown shift, a severity outside [0, 1], empty or repeated lists.

    Example:
        >>> from segability.datasets import mni_lesions
        >>> suite = shifted_suite(mni_lesions(2, size=32, cache_dir=False), ["blur"], [0.0, 1.0])
        >>> suite.ids[1].endswith("|blur@1.00"), len(suite)
        (True, 4)
    """
    if not isinstance(data, LesionData):
        raise ValueError(f"data must be a LesionData, got {type(data).__name__}")
    shifts = [_check_name(s) for s in ([shifts] if isinstance(shifts, str) else shifts)]
    levels = [_check_severity(s, "severities") for s in severities]
    if not shifts or not levels:
        raise ValueError("shifts and severities must not be empty")
    if len(set(shifts)) != len(shifts) or len({f"{s:.2f}" for s in levels}) != len(levels):
        raise ValueError("shifts and severities must not repeat (severities are compared to 2 decimals)")

    per_image = len(shifts) * len(levels)
    total = len(data) * per_image
    images = np.empty((total, *data.images.shape[1:]), np.float32)
    ids: list[str] = []
    rows = []
    records = data.meta.to_dict("records")
    for i in range(len(data)):
        for j, name in enumerate(shifts):
            shift_seed = int(np.random.SeedSequence([seed, i, SHIFTS.index(name)]).generate_state(1)[0])
            for k, level in enumerate(levels):
                images[i * per_image + j * len(levels) + k] = apply_shift(data.images[i], name, level, shift_seed)
                ids.append(f"{data.ids[i]}|{name}@{level:.2f}")
                rows.append({**records[i], "id": ids[-1], "source_id": data.ids[i], "shift": name, "severity": level})
    return LesionData(
        images=images,
        labels=np.repeat(data.labels, per_image, axis=0),
        brain=np.repeat(data.brain, per_image, axis=0),
        ids=ids,
        meta=pd.DataFrame(rows),
    )
