"""Test data written on the fly: model factory files, image folders (NIfTI, PNG, NumPy, NRRD, DICOM).

Images show one bright blob on a darker, noisy background; the label is the blob. The factory
file's networks are built so their prediction is (close to) the blob: channel 0 of every layer
carries the intensity, the last layer thresholds it. Everything is seeded, so two loads of the
same factory give the same network and two calls give the same files.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

MODEL_SOURCE = textwrap.dedent(
    '''
    """Model factories for the segability io / batch / CLI tests."""
    import time

    import torch
    from torch import nn

    _CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


    class Sleepy(nn.Module):
        """Waits before each forward pass (to make a batch run slow enough to interrupt)."""

        def __init__(self, seconds):
            super().__init__()
            self.seconds = seconds

        def forward(self, x):
            if self.seconds:
                time.sleep(self.seconds)
            return x


    def _net(spatial_dims, in_channels, kernel, hidden, scale, seed, sleep, inplace=False):
        torch.manual_seed(seed)
        conv = _CONV[spatial_dims]
        pad = kernel // 2
        first = conv(in_channels, hidden, kernel, padding=pad)
        second = conv(hidden, hidden, kernel, padding=pad)
        last = conv(hidden, 1, 1)
        with torch.no_grad():
            centre = (kernel // 2,) * spatial_dims
            for layer in (first, second):
                layer.weight[0].zero_()
                layer.weight[(0, 0, *centre)] = 1.0
                layer.bias[0] = 0.0
            last.weight.zero_()
            last.weight[(0, 0) + (0,) * spatial_dims] = 10.0 / scale
            last.bias.fill_(-5.0)
        return nn.Sequential(Sleepy(sleep), first, nn.ReLU(inplace), second, nn.ReLU(inplace), last)


    def tiny_net(spatial_dims=2, in_channels=1, scale=1.0, seed=0, sleep=0.0):
        """3x3 convolutions; the output is 10 * (x / scale - 0.5) on channel 0 of the input."""
        return _net(spatial_dims, in_channels, 3, 4, scale, seed, sleep)


    def pointwise_net(spatial_dims=3, in_channels=1, scale=1.0, seed=0, inplace=False):
        """1x1 convolutions only: every output voxel sees only its own input voxel."""
        return _net(spatial_dims, in_channels, 1, 6, scale, seed, 0.0, inplace)


    def scripted_net():
        return torch.jit.script(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 1, 1)))


    def not_a_model():
        return 3


    def fails_on_big(limit=40):
        """Raises in forward for inputs larger than ``limit`` pixels per side (a model failure)."""

        class Picky(nn.Module):
            def __init__(self):
                super().__init__()
                self.net = tiny_net()

            def forward(self, x):
                if max(x.shape[2:]) > limit:
                    raise RuntimeError(f"input {tuple(x.shape)} is too big for this model")
                return self.net(x)

        return Picky()


    def double_preprocess(item):
        """A preprocessing callable: doubles the image intensities."""
        return {**item, "image": item["image"] * 2}
    '''
)


def write_model_file(folder: Path, name: str = "nets.py") -> Path:
    """Write the factory file into ``folder``; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(MODEL_SOURCE)
    return path


def blob(shape: tuple[int, ...], seed: int, radius: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(image float32 in [0, 1], label uint8 0/1)``: a bright ball on a noisy background."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")
    centre = [rng.uniform(0.35 * s, 0.65 * s) for s in shape]
    r = radius if radius is not None else 0.25 * min(shape)
    dist = np.sqrt(sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True)))
    label = (dist <= r).astype(np.uint8)
    image = np.where(label, rng.uniform(0.65, 0.95, shape), rng.uniform(0.0, 0.35, shape))
    # A few bright background pixels, so prediction and label differ a little.
    image[rng.random(shape) < 0.01] = 0.8
    return image.astype(np.float32), label


def make_png_folder(root: Path, n: int = 4, size: int = 32, corrupt: bool = True, orphan: bool = True) -> tuple[Path, Path]:
    """``root/images/case{i}.png`` (uint8, blob ~ 200) and ``root/labels/case{i}.png`` (0/1).

    With ``corrupt``: ``images/broken.png`` (not a PNG) with a valid label, so it is paired and
    fails only at reading. With ``orphan``: ``labels/orphan.png`` has no image.
    """
    from PIL import Image

    images, labels = root / "images", root / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img, lab = blob((size, size + 4), seed=i)
        Image.fromarray((img * 255).round().astype(np.uint8)).save(images / f"case{i}.png")
        Image.fromarray(lab).save(labels / f"case{i}.png")
    if corrupt:
        (images / "broken.png").write_bytes(b"this is not a png file at all")
        Image.fromarray(np.zeros((size, size + 4), np.uint8)).save(labels / "broken.png")
    if orphan:
        Image.fromarray(np.zeros((size, size + 4), np.uint8)).save(labels / "orphan.png")
    (images / "notes.txt").write_text("not an image; ignored")
    return images, labels


def make_nifti_folder(
    root: Path, n: int = 3, shape: tuple[int, int, int] = (20, 18, 16), corrupt: bool = True, orphan: bool = True
) -> tuple[Path, Path]:
    """``root/images/vol{i}.nii.gz`` and ``root/labels/vol{i}.nii.gz``; a corrupt ``broken.nii.gz``
    and an unpaired ``labels/orphan.nii.gz`` when asked."""
    import nibabel as nib

    images, labels = root / "images", root / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    affine = np.diag([1.5, 1.0, 2.0, 1.0])
    for i in range(n):
        img, lab = blob(shape, seed=10 + i)
        nib.save(nib.Nifti1Image(img, affine), images / f"vol{i}.nii.gz")
        nib.save(nib.Nifti1Image(lab, affine), labels / f"vol{i}.nii.gz")
    if corrupt:
        (images / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
        nib.save(nib.Nifti1Image(np.zeros(shape, np.uint8), affine), labels / "broken.nii.gz")
    if orphan:
        nib.save(nib.Nifti1Image(np.zeros(shape, np.uint8), affine), labels / "orphan.nii.gz")
    return images, labels


def write_dicom_series(folder: Path, volume: np.ndarray, spacing: tuple[float, float, float] = (1.0, 1.0, 2.5)) -> Path:
    """Write ``volume`` (rows, cols, slices) as a DICOM series, one uint16 file per slice."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    data = volume.astype(np.uint16)
    for k in range(data.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"slice{k:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality = "CT"
        ds.PatientID = "test"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(k * spacing[2])]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [float(spacing[0]), float(spacing[1])]
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = data.shape[0], data.shape[1]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 0
        ds.PixelData = np.ascontiguousarray(data[:, :, k]).tobytes()
        pydicom.dcmwrite(folder / f"slice{k:03d}.dcm", ds, enforce_file_format=True)
    return folder
