"""A genuine, tiny nnU-Net v2 results folder, built with nnU-Net's own tools (for tests/test_nnunet.py).

The data set (``Dataset901_SegabilityTiny``): 6 training and 2 test cases, 32^3 crops of nilearn's
bundled MNI152 template at 2 mm, with two channels ("T1": the template with a random gain and
noise; "T2": an inverted contrast inside the brain) and three labels (background, grey matter 1,
white matter 2, from nilearn's tissue maps). Nothing is downloaded.

Built with nnU-Net's own pipeline, from Python: fingerprint extraction
(``DatasetFingerprintExtractor``), planning (a subclass of nnU-Net's ``ExperimentPlanner`` that only
narrows the network: 8 base features, at most 32, so a CPU trains it in seconds; the fingerprint
samples 10^5 rather than 10^8 voxels for its intensity statistics), preprocessing
(``DefaultPreprocessor``) and training with nnU-Net's own ``nnUNetTrainer`` on CPU, with one epoch of
a few iterations set on the instance (so the folder is the common ``nnUNetTrainer__nnUNetPlans__3d_fullres``
that nnU-Net's predictor loads as it is). Folds 0 and 1 are trained (for the
ensemble). nnU-Net's ``nnUNet_*`` environment variables are set only while building.

The folder is cached under pytest's cache directory, keyed by nnunetv2's version and
:data:`FIXTURE_VERSION`, and built in a temporary folder that is renamed when complete.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

FIXTURE_VERSION = "3"
DATASET = "Dataset901_SegabilityTiny"
TRAINER = "nnUNetTrainer"
CONFIGURATION = "3d_fullres"
FOLDER = f"{TRAINER}__nnUNetPlans__{CONFIGURATION}"
SIZE = 32
TEST_SHAPE = (44, 32, 32)  # test cases larger than the patch: nnU-Net predicts them in several tiles
N_TRAIN, N_TEST = 6, 2
ITERATIONS = 6  # training iterations per fold
FOLDS = (0, 1)
LABELS = {"background": 0, "gm": 1, "wm": 2}
CHANNELS = {"0": "T1", "1": "T2"}
ENV = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_n_proc_DA", "nnUNet_compile")


def _tissue() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """T1, grey and white matter probability at 2 mm (2x2x2 means of nilearn's bundled 1 mm files), affine."""
    import nibabel as nib

    from segability.datasets.template import _TEMPLATE_FILES, _template_dir

    out = []
    for key in ("t1", "gm", "wm"):
        img = nib.as_closest_canonical(nib.load(_template_dir() / _TEMPLATE_FILES[key]))
        v = np.asarray(img.dataobj, dtype=np.float32)
        v = v[: v.shape[0] // 2 * 2, : v.shape[1] // 2 * 2, : v.shape[2] // 2 * 2]
        out.append(v.reshape(v.shape[0] // 2, 2, v.shape[1] // 2, 2, v.shape[2] // 2, 2).mean((1, 3, 5)))
    affine = img.affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    t1, gm, wm = out
    return t1 / max(float(t1.max()), 1e-6), gm / 255.0, wm / 255.0, affine


def _cases(n: int, seed: int, shape: tuple[int, int, int] = (SIZE,) * 3) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``n`` cases ``(image (2, *shape) float32, label (*shape) uint8, affine)``."""
    t1, gm, wm, affine = _tissue()
    rng = np.random.default_rng(seed)
    brain = (gm + wm) > 0.5
    label = np.where(brain, np.where(gm >= wm, 1, 2), 0).astype(np.uint8)
    centre = np.array(t1.shape) // 2
    out = []
    for _ in range(n):
        start = centre - np.array(shape) // 2 + rng.integers(-12, 13, size=3)
        start = np.clip(start, 0, np.array(t1.shape) - np.array(shape))
        sl = tuple(slice(int(s), int(s) + n) for s, n in zip(start, shape, strict=True))
        gain = rng.uniform(0.8, 1.2)
        a = t1[sl] * gain + rng.normal(0, 0.03, shape)
        b = np.where(brain[sl], 1.0 - t1[sl], 0.0) * rng.uniform(0.8, 1.2) + rng.normal(0, 0.03, shape)
        shift = np.eye(4)
        shift[:3, 3] = start
        out.append((np.stack([a, b]).astype(np.float32), label[sl], affine @ shift))
    return out


def write_case(folder: Path, case: str, image: np.ndarray, affine: np.ndarray,
               label: np.ndarray | None = None, label_folder: Path | None = None) -> None:
    """Write one case with nnU-Net's raw naming: ``case_0000.nii.gz``, ... and ``case.nii.gz``."""
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    for c, channel in enumerate(image):
        nib.save(nib.Nifti1Image(channel, affine), folder / f"{case}_{c:04d}.nii.gz")
    if label is not None and label_folder is not None:
        label_folder.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(label, affine), label_folder / f"{case}.nii.gz")


def _write_raw(raw: Path) -> None:
    folder = raw / DATASET
    for i, (image, label, affine) in enumerate(_cases(N_TRAIN, seed=1)):
        write_case(folder / "imagesTr", f"tiny_{i:03d}", image, affine, label, folder / "labelsTr")
    for i, (image, label, affine) in enumerate(_cases(N_TEST, seed=2, shape=TEST_SHAPE)):
        write_case(folder / "imagesTs", f"test_{i:03d}", image, affine, label, folder / "labelsTs")
    dataset = {"channel_names": CHANNELS, "labels": LABELS, "numTraining": N_TRAIN, "file_ending": ".nii.gz",
               "name": "SegabilityTiny"}  # fmt: skip
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))


def _small_fingerprint():
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import (
        DatasetFingerprintExtractor,
    )

    class SmallFingerprint(DatasetFingerprintExtractor):
        """nnU-Net's fingerprint with 10^5 instead of 10^8 sampled foreground voxels for the intensity statistics."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.num_foreground_voxels_for_intensitystats = 1e5

    return SmallFingerprint


def _tiny_planner():
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import (
        ExperimentPlanner,
    )

    class TinyPlanner(ExperimentPlanner):
        """nnU-Net's default planner with a narrow network (a CPU trains it in seconds)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.UNet_base_num_features = 8
            self.UNet_max_features_3d = 32
            self.UNet_max_features_2d = 32

    return TinyPlanner


@contextlib.contextmanager
def _in_process_pools():
    """nnU-Net's worker pools as thread pools in this process.

    Its fingerprint extraction, preprocessing and unpacking start ``spawn`` process pools; each
    worker imports torch and nnU-Net again (tens of seconds on a loaded 2-core machine) for six
    32^3 cases. ``multiprocessing.dummy`` has the same ``Pool`` API, in threads.
    """
    import multiprocessing.dummy
    import types
    from unittest import mock

    import nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor as fe
    import nnunetv2.preprocessing.preprocessors.default_preprocessor as dp
    import nnunetv2.training.dataloading.utils as du

    shim = types.SimpleNamespace(get_context=lambda *_: multiprocessing.dummy)
    with mock.patch.object(fe, "multiprocessing", shim), mock.patch.object(dp, "multiprocessing", shim), \
            mock.patch.object(du, "multiprocessing", shim):
        yield


_T = [time.perf_counter()]


def _tick(what: str) -> None:
    if os.environ.get("SEGABILITY_FIXTURE_TIMES"):
        import sys

        print(f"{what}: {time.perf_counter() - _T[0]:.1f} s", file=sys.stderr)
    _T[0] = time.perf_counter()


def build(root: Path) -> Path:
    """Build raw data, preprocessed data and the trained results folder under ``root``.

    Returns:
        the results folder ``root/results/<dataset>/<trainer>__<plans>__<configuration>``.
    """
    import torch

    saved = {k: os.environ.get(k) for k in ENV}
    os.environ.update({"nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
                       "nnUNet_results": str(root / "results"), "nnUNet_n_proc_DA": "1", "nnUNet_compile": "f"})  # fmt: skip
    threads = torch.get_num_threads()
    try:
        _write_raw(root / "raw")
        from nnunetv2.experiment_planning.plan_and_preprocess_api import (
            extract_fingerprint_dataset,
            plan_experiment_dataset,
            preprocess_dataset,
        )
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        quiet = io.StringIO()
        with contextlib.redirect_stdout(quiet), _in_process_pools():
            _tick("raw")
            extract_fingerprint_dataset(901, _small_fingerprint(), num_processes=1, show_progress_bar=False)
            _tick("fingerprint")
            plan_experiment_dataset(901, _tiny_planner())
            _tick("plan")
            preprocess_dataset(901, configurations=(CONFIGURATION,), num_processes=(1,), show_progress_bar=False)
            _tick("preprocess")
            torch.set_num_threads(2)
            os.environ["nnUNet_n_proc_DA"] = "0"  # augmentation in this process (the planner needs >= 1)
            for fold in FOLDS:
                torch.manual_seed(fold)
                pre = root / "preprocessed" / DATASET
                plans = {**json.loads((pre / "nnUNetPlans.json").read_text()), "continue_training": False}
                dataset_json = json.loads((pre / "dataset.json").read_text())
                trainer = nnUNetTrainer(plans, CONFIGURATION, fold, dataset_json, device=torch.device("cpu"))
                trainer.num_epochs = 1  # before initialize(), which sets the learning-rate schedule
                trainer.num_iterations_per_epoch = ITERATIONS
                trainer.num_val_iterations_per_epoch = 1
                trainer.run_training()
                _tick(f"train fold {fold}")
    finally:
        torch.set_num_threads(threads)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return root / "results" / DATASET / FOLDER


def cached(cache_dir: Path) -> Path:
    """The fixture's root folder under ``cache_dir`` (built on the first call, then reused).

    Returns:
        the root: ``raw/``, ``preprocessed/``, ``results/`` and ``build_seconds.txt``.
    """
    import nnunetv2

    version = getattr(nnunetv2, "__version__", None)
    if version is None:
        from importlib.metadata import version as _v

        version = _v("nnunetv2")
    root = cache_dir / f"nnunet-{version}-v{FIXTURE_VERSION}"
    if (root / "build_seconds.txt").is_file():
        return root
    tmp = cache_dir / f"{root.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    build(tmp)
    (tmp / "build_seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
    if (root / "build_seconds.txt").is_file():  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        return root
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root


def results_folder(root: Path) -> Path:
    return root / "results" / DATASET / FOLDER


def raw_folder(root: Path) -> Path:
    return root / "raw" / DATASET


if __name__ == "__main__":  # python tests/nnunet_fixture.py DIR: build once and print the time
    import sys

    t = time.perf_counter()
    print(cached(Path(sys.argv[1])), f"{time.perf_counter() - t:.1f} s")
