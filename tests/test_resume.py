"""Resuming a batch run: the fingerprint refuses another run (naming each change), a kill in the
merge is finished by ``resume``, an all-failed run still writes its tables, stale files go."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import segability
from data_factories import make_png_folder, write_model_file
from segability.analysis import results
from segability.analysis.results import ERRORS, IMAGES, LAYERS, UNITS, read_table
from segability.batch import analyze_files, shards
from segability.batch.fingerprint import changes
from segability.cli.app import app
from segability.errors import UsageError
from segability.io import load_model

PNG_SCALE = {"intensity": {"range": [0, 255]}}


class Killed(BaseException):
    """What a kill looks like from inside: nothing after it runs, no ``except Exception`` sees it."""


@pytest.fixture(scope="module")
def nets(tmp_path_factory) -> Path:
    return write_model_file(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def pngs(tmp_path_factory) -> tuple[Path, Path]:
    return make_png_folder(tmp_path_factory.mktemp("png"), n=4)


def kill_after(monkeypatch, owner, name: str, calls: int) -> list[str]:
    """Make ``owner.name`` raise :class:`Killed` on its call number ``calls + 1``; returns what ran."""
    real = getattr(owner, name)
    seen: list[str] = []

    def wrapper(*args, **kwargs):
        if len(seen) == calls:
            raise Killed
        seen.append(str(args[-2] if len(args) > 1 else args[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return seen


def all_tables(run: Path) -> dict[str, pd.DataFrame]:
    out = {schema.file: read_table(run / schema.file, schema) for schema in (LAYERS, IMAGES, UNITS, ERRORS)}
    maps = segability.load_result(run).maps
    out["maps"] = pd.DataFrame([{"image": i, "key": k, "sum": float(np.sum(v))} for i, e in maps.items()
                                for k, v in e["layers"].items()])  # fmt: skip
    return out


# -------------------------------------------------------------------------------- fingerprint
def test_adding_labels_on_resume_is_refused(nets, pngs, tmp_path):
    """Issue 13 #1: a label-free run resumed with labels used to give dice NaN everywhere."""
    out = tmp_path / "x"
    analyze_files(f"{nets}:tiny_net", pngs[0], out=out, preprocess=PNG_SCALE, report=False)
    with pytest.raises(UsageError) as info:
        analyze_files(f"{nets}:tiny_net", pngs[0], pngs[1], out=out, preprocess=PNG_SCALE, resume=True, report=False)
    assert info.value.argument == "resume"
    message = str(info.value)
    assert f"labels: None -> {str(pngs[1].resolve())!r}" in message
    assert "label_files: 5 image(s) paired with another label" in message
    assert "force=True" in message
    assert read_table(out / "images.parquet", IMAGES)["dice"].isna().all()  # the earlier tables are untouched

    cli = CliRunner().invoke(app, ["analyze", "--model", f"{nets}:tiny_net", "--images", str(pngs[0]), "--labels",
                                   str(pngs[1]), "--out", str(out), "--no-report", "--no-progress", "--resume"])  # fmt: skip
    assert cli.exit_code == 2, cli.output
    assert "error: --resume: the run in" in cli.stderr and "labels: None ->" in cli.stderr
    assert "give --force to start over" in cli.stderr and "Traceback" not in cli.stderr


def test_a_changed_weights_file_is_refused_after_a_kill(nets, pngs, tmp_path, monkeypatch):
    """Issue 13 #1: killed midway, resumed with other weights, the table used to mix two models."""
    weights = tmp_path / "w.pt"
    torch.save(load_model(f"{nets}:tiny_net").state_dict(), weights)
    out = tmp_path / "run"
    kwargs = dict(weights=weights, preprocess=PNG_SCALE, report=False)
    written = kill_after(monkeypatch, shards.ShardStore, "write", 2)
    with pytest.raises(Killed):
        analyze_files(f"{nets}:tiny_net", pngs[0], pngs[1], out=out, **kwargs)
    monkeypatch.undo()
    assert len(written) == 2 and not (out / "layers.parquet").exists()

    before = segability.batch.fingerprint.file_sha256(weights)
    torch.save(load_model(f"{nets}:tiny_net", model_args={"seed": 1}).state_dict(), weights)
    after = segability.batch.fingerprint.file_sha256(weights)
    with pytest.raises(UsageError, match=rf"weights: content changed \(sha256 {before[:8]} -> {after[:8]}\)"):
        analyze_files(f"{nets}:tiny_net", pngs[0], pngs[1], out=out, resume=True, **kwargs)
    assert len(list((out / "shards").glob("*.images.parquet"))) + len(list((out / "shards").glob("*.error.json"))) == 2

    # The same bytes under another name are the same weights: the run resumes.
    torch.save(load_model(f"{nets}:tiny_net").state_dict(), weights)
    moved = tmp_path / "elsewhere.pt"
    shutil.move(weights, moved)
    summary = analyze_files(f"{nets}:tiny_net", pngs[0], pngs[1], out=out, resume=True, **{**kwargs, "weights": moved})
    assert (summary.n_resumed, summary.n_ok, summary.n_failed) == (1, 4, 1)  # broken.png (first) is retried


def test_every_input_of_the_result_is_in_the_fingerprint(nets, pngs, tmp_path):
    out = tmp_path / "run"
    model_file = tmp_path / "nets.py"
    shutil.copy(nets, model_file)
    config = tmp_path / "scale.json"
    config.write_text(json.dumps(PNG_SCALE))
    analyze_files(f"{model_file}:tiny_net", pngs[0], pngs[1], out=out, preprocess=config, report=False)

    def refused(**kwargs) -> str:
        given = {"model": f"{model_file}:tiny_net", "images": pngs[0], "labels": pngs[1], "preprocess": config, **kwargs}
        with pytest.raises(UsageError) as info:
            analyze_files(given.pop("model"), given.pop("images"), given.pop("labels"), out=out, resume=True, report=False, **given)
        return str(info.value)

    model_file.write_text(model_file.read_text() + "\n# edited\n")
    assert "model_file: content changed (sha256 " in refused()
    shutil.copy(nets, model_file)
    config.write_text(json.dumps({"intensity": {"range": [0, 200]}}))
    assert "preprocess_file: content changed (sha256 " in refused()
    config.write_text(json.dumps(PNG_SCALE))
    assert "label_suffix: '' -> '_seg'" in refused(label_suffix="_seg")
    assert "model_args: {} -> {'seed': 1}" in refused(model_args={"seed": 1})
    assert "target: None -> 1" in refused(target=1)
    few = sorted(pngs[0].glob("case*.png"))[:2]
    assert "images: 3 removed ['broken.png', 'case2.png', 'case3.png']" in refused(images=few)
    # Nothing changed: the run resumes and everything is done already.
    summary = analyze_files(f"{model_file}:tiny_net", pngs[0], pngs[1], out=out, preprocess=config, resume=True, report=False)
    assert summary.n_resumed == 4


def test_changes_name_each_item():
    old = {"labels": None, "weights": {"file": "/a/w.pt", "sha256": "1234abcd" * 8}, "images": ["a", "b"], "units": True}
    new = {"labels": "lab", "weights": {"file": "/b/w.pt", "sha256": "5678ef01" * 8}, "images": ["a", "c"], "units": True}
    assert changes(old, new) == [
        "labels: None -> 'lab'",
        "weights: content changed (sha256 1234abcd -> 5678ef01)",
        "images: 1 added ['c'], 1 removed ['b']",
    ]
    moved = {**old, "weights": {"file": "/elsewhere/w.pt", "sha256": "1234abcd" * 8}}
    assert changes(old, moved) == []
    assert changes({"units": True}, {"units": True, "mask": None}) == ["mask: not recorded -> None"]


def test_resume_over_results_without_a_run_record_is_refused(nets, pngs, tmp_path):
    out = tmp_path / "run"
    analyze_files(f"{nets}:tiny_net", pngs[0], out=out, preprocess=PNG_SCALE, report=False)
    (out / "shards" / "run.json").unlink()
    with pytest.raises(UsageError, match=r"resume: .* no record of the run that made them \(shards/run.json\)"):
        analyze_files(f"{nets}:tiny_net", pngs[0], out=out, preprocess=PNG_SCALE, resume=True, report=False)


# ------------------------------------------------------------------------------------- merge
@pytest.mark.parametrize("files_written", [0, 2, 4])
def test_a_kill_in_the_merge_is_finished_by_resume(nets, pngs, tmp_path, monkeypatch, files_written):
    kwargs = dict(preprocess=PNG_SCALE, units=True, keep_maps=2, report=False)
    full = tmp_path / "full"
    analyze_files(f"{nets}:tiny_net", pngs[0], pngs[1], out=full, **kwargs)

    out = tmp_path / "killed"
    written = kill_after(monkeypatch, results, "write_atomic", files_written)  # the merge's writes only
    with pytest.raises(Killed):
        analyze_files(f"{nets}:tiny_net", pngs[0], pngs[1], out=out, **kwargs)
    monkeypatch.undo()
    assert [Path(p).name for p in written] == ["layers.parquet", "images.parquet", "units.parquet", "settings.json"][:files_written]
    assert not (out / "errors.csv").exists()

    summary = analyze_files(f"{nets}:tiny_net", pngs[0], pngs[1], out=out, resume=True, **kwargs)
    assert (summary.n_resumed, summary.n_ok, summary.n_failed) == (4, 4, 1)
    a, b = all_tables(full), all_tables(out)
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], obj=name)
    assert json.loads((out / "settings.json").read_text())["n_failed"] == 1


# ------------------------------------------------------------------------------ all failed
def test_an_all_failed_run_writes_typed_empty_tables_and_its_errors(nets, tmp_path, monkeypatch):
    import segability.report as report

    folder = tmp_path / "broken"
    folder.mkdir()
    for name in ("a.npy", "b.npy"):
        (folder / name).write_text("not an array")

    def no_report(result_dir):
        raise ValueError("nothing to draw")

    monkeypatch.setattr(report, "build_report", no_report)
    out = tmp_path / "run"
    summary = analyze_files(f"{nets}:tiny_net", folder, out=out)
    assert (summary.n_ok, summary.n_failed) == (0, 2)
    assert summary.report_error == "ValueError: nothing to draw"
    for schema in (LAYERS, IMAGES):
        table = read_table(out / schema.file, schema)
        assert table.empty and list(table.columns[: len(schema.names)]) == schema.names
    assert {"file", "label_file"} <= set(read_table(out / "images.parquet", IMAGES).columns)
    errors = read_table(out / "errors.csv", ERRORS)
    assert list(errors["stage"]) == ["read", "read"] and errors["error"].str.contains("not a NumPy array file").all()
    assert segability.load_result(out).layers.empty
