"""What a folder of files can do to segability: special files (FIFOs, links to /dev/zero, folders
named like files), headers that promise more than the file holds, names that look like Rich markup
or hold escape sequences, literal paths with glob characters, and files that are no weights at all.

Each must end as a clear per-file error (or be shown literally), quickly: the tests that could hang
carry a timeout.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import segability
from data_factories import write_model_file
from segability.cli.app import app
from segability.cli.console import literal, printable
from segability.io import (
    ImageFileError,
    check_image_file,
    find_images,
    load_item,
    load_model,
    pair_labels,
    read_image,
)

runner = CliRunner()
SHAPE = (1, 64, 64)

UNET_SOURCE = textwrap.dedent(
    '''
    import torch
    from monai.networks.nets import UNet
    from torch import nn


    def unet(channels=8):
        torch.manual_seed(0)
        return UNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(channels, 16), strides=(2,), num_res_units=1)


    def odd_names():
        """Layer names that look like markup and hold an escape sequence."""
        net = nn.Sequential()
        net.add_module("[b]", nn.Conv2d(1, 2, 3, padding=1))
        net.add_module("[red]gone", nn.Conv2d(2, 2, 1))
        net.add_module("esc\\x1b[31m", nn.Conv2d(2, 1, 1))
        return net
    '''
)


@pytest.fixture(scope="module")
def nets(tmp_path_factory) -> Path:
    return write_model_file(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def unets(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("unets") / "unets.py"
    path.write_text(UNET_SOURCE)
    return path


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def good_image(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    np.save(path, rng.uniform(0, 1, SHAPE).astype(np.float32))
    return path


def nifti_promising(path: Path, shape: tuple[int, int, int], gz: bool = False) -> Path:
    """A NIfTI file of 4x4x4 voxels whose header claims ``shape`` (float32)."""
    raw = bytearray(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)).to_bytes())
    struct.pack_into("<4h", raw, 40, 3, *shape)  # dim[0..3] of the NIfTI-1 header
    if gz:
        import gzip

        path.write_bytes(gzip.compress(bytes(raw)))
    else:
        path.write_bytes(bytes(raw))
    return path


def make_bad_files(folder: Path) -> dict[str, str]:
    """Bad files in ``folder``: name -> the message (regex) reading each must give."""
    folder.mkdir(parents=True, exist_ok=True)
    os.mkfifo(folder / "x.npy")
    (folder / "z.npy").symlink_to("/dev/zero")
    (folder / "elsewhere").mkdir()
    (folder / "d.npy").symlink_to(folder / "elsewhere", target_is_directory=True)
    whole = good_image(folder / "whole.npy").read_bytes()
    (folder / "whole.npy").unlink()
    (folder / "t.npy").write_bytes(whole[:1000])  # header intact, 872 of 16384 data bytes
    nifti_promising(folder / "n.nii", (400, 400, 40))  # 25.6 MB promised, 352 + 256 bytes held
    nifti_promising(folder / "g.nii.gz", (30000, 30000, 30000), gz=True)  # 98 TiB promised
    return {
        "x.npy": r"x\.npy is a FIFO \(named pipe\), not a regular file",
        "z.npy": r"z\.npy is a character device \(a link to /dev/zero\), not a regular file",
        "d.npy": r"d\.npy is a directory \(a link to .*elsewhere\), not a regular file",
        "t.npy": r"t\.npy is truncated: its header promises shape \(1, 64, 64\) of float32, 16384 bytes, but the file holds 872 bytes",
        "n.nii": r"n\.nii is truncated: its header promises shape \(400, 400, 40\) of float32, 24.4 MiB, but the file holds 256 bytes",
        "g.nii.gz": r"g\.nii\.gz: its header promises shape \(30000, 30000, 30000\) of float32, .* GiB of voxel data, more than the limit of 4 GiB",
    }


# ------------------------------------------------------------------------------ special files
@pytest.mark.timeout(60)
def test_special_and_truncated_files_are_refused_before_reading(tmp_path, monkeypatch):
    bad = make_bad_files(tmp_path / "scans")
    for name, message in bad.items():
        path = tmp_path / "scans" / name
        with pytest.raises(ImageFileError, match=message):
            read_image(path)
        with pytest.raises(ImageFileError, match=message):
            load_item(good_image(tmp_path / "ok.npy"), path)  # as a label too
    # The message names the path as given, so a batch run's errors.csv tells the files apart.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"^scans/z\.npy is a character device \(a link to /dev/zero\), not a regular file$"):
        read_image("scans/z.npy")


@pytest.mark.timeout(60)
def test_a_socket_and_a_dangling_link_are_refused(tmp_path):
    (tmp_path / "gone.npy").symlink_to(tmp_path / "nowhere.npy")
    with pytest.raises(ImageFileError, match=r"gone\.npy is a link to .*nowhere\.npy, which does not exist"):
        read_image(tmp_path / "gone.npy")
    path = tmp_path / "s.npy"
    if len(str(path)) > 100:  # AF_UNIX addresses are limited to 108 bytes
        pytest.skip("temporary folder too deep for a socket address")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        with pytest.raises(ImageFileError, match=r"s\.npy is a socket, not a regular file"):
            check_image_file(path)


def test_a_folder_with_a_fifo_is_not_listed_by_opening_it(tmp_path):
    # Without a suffix a file is probed for the DICOM preamble; a FIFO must not be opened for that.
    good_image(tmp_path / "a.npy")
    os.mkfifo(tmp_path / "pipe")
    assert [p.name for p in find_images(tmp_path)] == ["a.npy"]
    assert find_images(tmp_path / "pipe") == [tmp_path / "pipe"]  # named alone: listed, refused at reading
    with pytest.raises(ImageFileError, match="pipe is a FIFO"):
        read_image(tmp_path / "pipe")


@pytest.mark.timeout(120)
def test_cli_records_special_files_per_file_and_analyses_the_rest(nets, tmp_path):
    scans = tmp_path / "scans"
    bad = make_bad_files(scans)
    good_image(scans / "good.npy")
    out = tmp_path / "run"
    result = run("analyze", "--model", f"{nets}:tiny_net", "--images", scans, "--out", out, "--no-report", "--no-progress")
    assert result.exit_code == 1, result.output
    assert f"1 of {len(bad) + 1} images analysed, {len(bad)} failed" in result.stdout
    errors = pd.read_csv(out / "errors.csv")
    assert sorted(Path(f).name for f in errors["file"]) == sorted(bad)
    assert (errors["stage"] == "read").all()
    for file, error in zip(errors["file"], errors["error"], strict=True):
        assert error.startswith("ImageFileError: ")
        assert re.search(bad[Path(file).name], error), error
    res = segability.load_result(out)
    assert list(res.images["image"]) == ["good.npy"]
    assert set(res.layers["image"]) == {"good.npy"} and res.layers["sa_pred"].notna().all()


# ----------------------------------------------------------------------------------- headers
@pytest.mark.parametrize(
    ("name", "write", "message"),
    [
        ("obj.npy", lambda p: np.save(p, np.array([{"a": 1}], dtype=object)), r"holds Python objects \(dtype object\)"),
        ("text.npy", lambda p: p.write_text("no numpy here"), r"text\.npy is not a NumPy array file"),
        ("empty.npy", lambda p: p.write_bytes(b""), r"empty\.npy is not a NumPy array file"),
        ("zip.npz", lambda p: p.write_text("no zip"), r"zip\.npz is not an \.npz \(zip\) file"),
    ],
)
def test_npy_headers_are_checked(tmp_path, name, write, message):
    write(tmp_path / name)
    with pytest.raises(ImageFileError, match=message):
        read_image(tmp_path / name)


def test_max_bytes_bounds_what_a_header_may_promise(tmp_path):
    path = good_image(tmp_path / "a.npy")
    assert tuple(read_image(path, max_bytes=16384).shape) == SHAPE  # exactly the data: allowed
    with pytest.raises(ImageFileError, match=r"16384 bytes of voxel data, more than the limit of 16383 bytes"):
        read_image(path, max_bytes=16383)
    small = nifti_promising(tmp_path / "n.nii.gz", (4, 4, 4), gz=True)
    assert tuple(read_image(small, max_bytes=None).shape) == (1, 4, 4, 4)


def test_a_reader_that_fails_does_not_hand_the_file_on(tmp_path, monkeypatch):
    # MONAI's LoadImage tries every registered reader in turn; the one the suffix names must be the only one.
    from monai.data import ITKReader, NibabelReader, NrrdReader, NumpyReader, PydicomReader

    tried = []

    def refuse(self, data, **kwargs):
        tried.append(type(self).__name__)
        raise RuntimeError("not this reader")

    for cls in (ITKReader, NibabelReader, NrrdReader, NumpyReader, PydicomReader):
        monkeypatch.setattr(cls, "read", refuse)
    path = tmp_path / "c.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ValueError, match=r"c\.png cannot be read by PILReader: "):
        read_image(path)
    assert tried == []


# ------------------------------------------------------------------------------------ names
def test_printable_and_literal_show_text_as_it_is():
    assert printable("a\x1b[31mb\nc\td\x7f\x9b\u202e") == "a\\x1b[31mb\\x0ac\\x09d\\x7f\\x9b\\u202e"
    assert printable("ünïcode [ok]") == "ünïcode [ok]"
    from rich.console import Console

    console = Console(width=200, record=True, force_terminal=False)
    for text in ("[/b]", "[red]broken.npy", "x\\", "[bold]a[/bold] \x1b[2J"):
        console.print(f"{literal(text)}!")
    assert console.export_text().splitlines() == ["[/b]!", "[red]broken.npy!", "x\\!", "[bold]a[/bold] \\x1b[2J!"]


@pytest.mark.timeout(120)
def test_cli_shows_markup_and_escapes_in_names_literally(nets, tmp_path):
    # "/" cannot be in a name: "[/b]" spans a folder and its child, as in "scans [/b] ...".
    scans = tmp_path / "scans [" / "b] \x1b[31mred"
    scans.mkdir(parents=True)
    good_image(scans / "a[i].npy")
    good_image(scans / "esc\x1b[31m.npy", seed=1)
    (scans / "[red]broken.npy").write_text("not an array")
    out = tmp_path / "out [" / "b]"
    result = run("analyze", "--model", f"{nets}:tiny_net", "--images", scans, "--out", out, "--no-report", "--no-progress")
    assert result.exit_code == 1, result.output  # one file failed; no MarkupError
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "\x1b" not in result.stdout and "\x1b" not in result.stderr
    broken = printable(scans / "[red]broken.npy")
    assert f"failed: {broken}: reading failed: ImageFileError: {broken} is not a NumPy array file" in result.stderr
    assert "2 of 3 images analysed, 1 failed" in result.stdout
    assert f"Results: {printable(out)}" in result.stdout
    assert "[/b]" in str(scans) and "[/b]" in result.stdout
    assert sorted(segability.load_result(out).images["image"]) == ["a[i].npy", "esc\x1b[31m.npy"]
    # A usage error whose message holds the name is shown literally too.
    again = run("analyze", "--model", f"{nets}:tiny_net", "--images", scans, "--out", out, "--no-report", "--no-progress")
    assert again.exit_code == 2 and f"{printable(out)} already holds results" in again.stderr


def test_layers_command_shows_odd_layer_names_literally(unets):
    result = run("layers", "--model", f"{unets}:odd_names")
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stdout
    for name in ("[b]", "[red]gone", "esc\\x1b[31m"):
        assert name in result.stdout


def test_help_texts_keep_their_brackets():
    analyze = run("analyze", "--help")
    assert analyze.exit_code == 0
    assert "pip install 'segability[ray]'" in " ".join(analyze.stdout.split())
    prune = run("prune", "--help")
    assert "[default: --images]" in " ".join(prune.stdout.split())


# ---------------------------------------------------------------------------- literal paths
def test_existing_paths_with_glob_characters_are_taken_literally(tmp_path):
    scans, labels = tmp_path / "scans[1]", tmp_path / "labels[1]"
    scans.mkdir()
    labels.mkdir()
    good_image(scans / "a.npy")
    good_image(labels / "a.npy")
    (tmp_path / "scans1").mkdir()  # what the pattern scans[1] would match
    good_image(tmp_path / "scans1" / "other.npy")
    assert find_images(str(scans)) == [scans / "a.npy"]
    assert find_images(str(scans / "a.npy")) == [scans / "a.npy"]
    assert find_images(str(scans / "*.npy")) == [scans / "a.npy"]  # a pattern inside a literal folder
    assert [p.name for p in find_images(str(tmp_path / "scans[0-9]" / "*.npy"))] == ["other.npy"]  # no such folder: a pattern
    pairing = pair_labels(find_images(str(scans)), str(labels))
    assert pairing.pairs == [(scans / "a.npy", labels / "a.npy")]


@pytest.mark.timeout(120)
def test_cli_analyses_a_folder_named_like_a_pattern(nets, tmp_path):
    scans, labels = tmp_path / "scans[1]", tmp_path / "labels[1]"
    scans.mkdir()
    labels.mkdir()
    good_image(scans / "a.npy")
    np.save(labels / "a.npy", (np.load(scans / "a.npy") > 0.5).astype(np.float32))
    out = tmp_path / "run"
    result = run("analyze", "--model", f"{nets}:tiny_net", "--images", scans, "--labels", labels,
                 "--out", out, "--no-report", "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "1 of 1 images analysed, 0 failed" in result.stdout
    assert segability.load_result(out).images["label_file"].tolist() == [str(labels / "a.npy")]


# ---------------------------------------------------------------------------------- weights
def test_a_text_file_is_not_weights(unets, tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("these are my notes\n")
    with pytest.raises(ValueError, match=r"weights: .*notes\.pt is not a PyTorch weights file \(it starts with b'these are my not") as info:
        load_model(f"{unets}:unet", path)
    assert "--trust-pickle" not in str(info.value)
    result = run("layers", "--model", f"{unets}:unet", "--weights", path)
    assert result.exit_code == 2 and "is not a PyTorch weights file" in result.stderr and "--trust-pickle" not in result.stderr
    assert "--weights: " in result.stderr  # the CLI names the flag
    (tmp_path / "zero.pt").symlink_to("/dev/zero")
    with pytest.raises(ValueError, match=r"weights: .*zero\.pt is a character device \(a link to /dev/zero\), not a regular file"):
        load_model(f"{unets}:unet", tmp_path / "zero.pt")


def test_one_mismatched_key_is_named_with_both_shapes(unets, tmp_path):
    state = load_model(f"{unets}:unet").state_dict()
    key = "model.0.conv.unit0.conv.weight"
    assert tuple(state[key].shape) == (8, 1, 3, 3)
    state[key] = torch.zeros(5, 1, 3, 3)
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(ValueError) as info:
        load_model(f"{unets}:unet", tmp_path / "w.pt")
    message = str(info.value)
    assert f"1 key with another shape: {key}: (5, 1, 3, 3) in the file, (8, 1, 3, 3) in the model;" in message
    assert "missing" not in message and "does not have" not in message


def test_missing_and_unexpected_keys_are_listed_apart(unets, tmp_path):
    state = {f"module.{k}": v for k, v in load_model(f"{unets}:unet").state_dict().items()}
    gone = [k for k in state if k.endswith(".bias")]
    for k in gone:
        del state[k]
    state["module.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(ValueError) as info:
        load_model(f"{unets}:unet", tmp_path / "w.pt")
    message = str(info.value)
    shown = ", ".join(k[len("module.") :] for k in gone[:5])
    assert f"{len(gone)} keys of the model missing from the file: {shown} and {len(gone) - 5} more;" in message
    assert "1 key in the file that the model does not have: extra.weight;" in message
    assert "other shape" not in message
