"""``segability analyze`` and ``segability layers``: exit codes, messages, a killed run resumed, the report guard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import segability
from data_factories import make_png_folder, write_model_file
from segability.cli.app import app
from segability.io import load_model

runner = CliRunner()


@pytest.fixture(scope="module")
def nets(tmp_path_factory) -> Path:
    return write_model_file(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    images, labels = make_png_folder(root / "with_broken", n=4)
    clean, clean_labels = make_png_folder(root / "clean", n=2, corrupt=False, orphan=False)
    config = root / "scale.json"
    config.write_text(json.dumps({"intensity": {"range": [0, 255]}}))
    return {"images": images, "labels": labels, "clean": clean, "clean_labels": clean_labels, "config": config}


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def analyze_args(nets, data, out, *extra, images="images", labels="labels"):
    return ["analyze", "--model", f"{nets}:tiny_net", "--images", data[images], "--labels", data[labels],
            "--out", out, "--preprocess", data["config"], "--no-report", "--no-progress", *extra]  # fmt: skip


def test_exit_0_when_every_image_succeeds(nets, data, tmp_path):
    result = run(*analyze_args(nets, data, tmp_path / "ok", "--layers", "1,5", "--units",
                               images="clean", labels="clean_labels"))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "2 of 2 images analysed, 0 failed" in result.stdout
    res = segability.load_result(tmp_path / "ok")
    assert list(res.layers["layer"].unique()) == ["input", "1", "5"]
    assert len(res.units) == 2 * (1 + 4 + 1)  # two images x (input 1 + layer "1" 4 + layer "5" 1 units)
    assert pd.read_csv(tmp_path / "ok" / "errors.csv").empty


def test_exit_1_when_some_image_fails(nets, data, tmp_path):
    result = run(*analyze_args(nets, data, tmp_path / "some"))
    assert result.exit_code == 1, result.output
    assert "4 of 5 images analysed, 1 failed" in result.stdout
    assert "broken.png" in result.stderr and "cannot be read by PILReader" in result.stderr
    assert "label(s) without an image (ignored): ['orphan.png']" in result.stderr
    errors = pd.read_csv(tmp_path / "some" / "errors.csv")
    assert [Path(f).name for f in errors["file"]] == ["broken.png"]


def test_usage_errors_exit_2(nets, data, tmp_path):
    missing = run("analyze", "--images", data["images"], "--out", tmp_path / "x")
    assert missing.exit_code == 2 and "--model" in missing.output
    args = analyze_args(nets, data, tmp_path / "x")
    args[2] = "nowhere.py:net"
    bad_spec = run(*args)
    assert bad_spec.exit_code == 2 and "--model: file 'nowhere.py' not found" in bad_spec.stderr
    bad_roi = run(*analyze_args(nets, data, tmp_path / "x", "--roi-size", "64,zero"))
    assert bad_roi.exit_code == 2 and "--roi-size must be comma-separated positive integers" in bad_roi.stderr
    bad_engine = run(*analyze_args(nets, data, tmp_path / "x", "--engine", "spark"))
    assert bad_engine.exit_code == 2 and '--engine must be "local" or "ray"' in bad_engine.stderr
    assert not (tmp_path / "x").exists()


def test_force_is_needed_to_overwrite(nets, data, tmp_path):
    out = tmp_path / "run"
    args = analyze_args(nets, data, out, images="clean", labels="clean_labels")
    assert run(*args).exit_code == 0
    before = (out / "layers.parquet").read_bytes()
    again = run(*args)
    assert again.exit_code == 2 and "already holds results" in again.stderr and "--force" in again.stderr
    assert (out / "layers.parquet").read_bytes() == before
    bad = list(args)
    bad[2] = f"{nets}:no_such_factory"
    assert run(*bad, "--force").exit_code == 2  # a usage error deletes nothing
    assert (out / "layers.parquet").read_bytes() == before and any((out / "shards").iterdir())
    assert run(*args, "--force").exit_code == 0
    assert run(*args, "--resume").exit_code == 0  # everything done: nothing to redo, tables rebuilt
    assert "2 from an earlier run" in run(*args, "--resume").stdout


def test_pickled_model_needs_trust_pickle(nets, data, tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(load_model(f"{nets}:tiny_net"), path)
    args = analyze_args(nets, data, tmp_path / "p", images="clean", labels="clean_labels")
    args[2] = path
    refused = run(*args)
    assert refused.exit_code == 2
    assert "arbitrary code" in refused.stderr and "--trust-pickle" in refused.stderr
    assert not (tmp_path / "p").exists()
    trusted = run(*args, "--trust-pickle")
    assert trusted.exit_code == 0, trusted.output


def test_torchscript_gets_a_clear_message(nets, data, tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1))), path)
    args = analyze_args(nets, data, tmp_path / "t", images="clean", labels="clean_labels")
    args[2] = path
    result = run(*args)
    assert result.exit_code == 2
    assert "TorchScript" in result.stderr and "forward hooks" in result.stderr


def test_layers_command(nets):
    result = run("layers", "--model", f"{nets}:tiny_net", "--example-shape", "1,1,16,12")
    assert result.exit_code == 0, result.output
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in result.stdout.splitlines() if line.startswith("│")]
    assert [r[0] for r in rows] == ["0", "1", "2", "3", "4", "5"]  # call order
    assert rows[1] == ["1", "Conv2d", "4x16x12", str(4 * 9 + 4)]  # Conv2d(1, 4, 3): 36 weights, 4 biases
    assert rows[5] == ["5", "Conv2d", "1x16x12", "5"]
    plain = run("layers", "--model", f"{nets}:tiny_net", "--model-arg", "spatial_dims=3")
    assert plain.exit_code == 0 and "Conv3d" in plain.stdout
    bad = run("layers", "--model", f"{nets}:tiny_net", "--example-shape", "1,3,16,16")
    assert bad.exit_code == 2 and "--example-shape 1,3,16,16: the model cannot run on it" in bad.stderr


def test_report_is_built_when_available_and_never_breaks_the_run(nets, data, tmp_path, monkeypatch):
    import segability.report as report

    args = [a for a in analyze_args(nets, data, tmp_path / "r", images="clean", labels="clean_labels") if a != "--no-report"]
    calls = []

    def fake(result_dir):
        calls.append(Path(result_dir))
        (Path(result_dir) / "report.html").write_text("<html></html>")
        return Path(result_dir) / "report.html"

    monkeypatch.setattr(report, "build_report", fake)
    ok = run(*args)
    assert ok.exit_code == 0 and calls == [tmp_path / "r"] and "Report:" in ok.stdout

    def broken(result_dir):
        raise ValueError("no figures today")

    monkeypatch.setattr(report, "build_report", broken)
    noted = run(*args, "--force")
    assert noted.exit_code == 0 and "the report was not built: ValueError: no figures today" in noted.stderr

    monkeypatch.setitem(sys.modules, "segability.report", None)  # not importable
    without = run(*args, "--force")
    assert without.exit_code == 0 and "Report" not in without.stdout and "report" not in without.stderr


def test_killed_run_resumes_to_the_tables_of_a_full_run(nets, data, tmp_path):
    out = tmp_path / "killed"
    args = analyze_args(nets, data, out, "--model-arg", "sleep=0.4", "--units")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "segability.cli.app", *map(str, args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    shards = out / "shards"
    deadline = time.monotonic() + 180
    try:
        while len(list(shards.glob("*.images.parquet"))) < 2:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no shard appeared in time"
            time.sleep(0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = sorted(shards.glob("*.images.parquet"))
    assert 2 <= len(done) < 4 and not (out / "layers.parquet").exists()
    for path in shards.iterdir():  # every shard under its final name is complete
        if path.name.endswith(".parquet"):
            pd.read_parquet(path)
        elif path.name.endswith(".json"):
            json.loads(path.read_text())
        else:
            assert path.name.endswith(".tmp"), path.name

    resumed = run(*args, "--resume")
    assert resumed.exit_code == 1, resumed.output
    assert f"{len(done)} from an earlier run" in resumed.stdout
    full = run(*analyze_args(nets, data, tmp_path / "full", "--model-arg", "sleep=0.4", "--units"))
    assert full.exit_code == 1
    a, b = segability.load_result(out), segability.load_result(tmp_path / "full")
    for name in ("layers", "images", "units"):
        pd.testing.assert_frame_equal(getattr(a, name), getattr(b, name), check_exact=False, atol=1e-6, rtol=0, obj=name)
    assert pd.read_csv(out / "errors.csv").equals(pd.read_csv(tmp_path / "full" / "errors.csv"))


# ------------------------------------------------------------------------ up-front checks, exits
def test_target_is_checked_before_the_run(nets, data, tmp_path):
    out = tmp_path / "t"
    negative = run(*analyze_args(nets, data, out, "--target", "-1", images="clean", labels="clean_labels"))
    assert negative.exit_code == 2 and "error: --target must be an integer >= 0" in negative.stderr
    # 0/1 labels hold no voxel of 5: every Dice would be 0, so the run is refused (issue 13 #8).
    absent = run(*analyze_args(nets, data, out, "--target", "5", images="clean", labels="clean_labels"))
    assert absent.exit_code == 2, absent.output
    assert "error: --target 5 is a value of none of the first labels (case0.png holds [0, 1];" in absent.stderr
    assert not out.exists()
    assert run(*analyze_args(nets, data, out, "--target", "1", images="clean", labels="clean_labels")).exit_code == 0


def test_keep_maps_must_be_a_number(nets, data, tmp_path):
    result = run(*analyze_args(nets, data, tmp_path / "k", "--keep-maps", "a"))
    assert result.exit_code == 2 and "--keep-maps" in result.output
    assert not (tmp_path / "k").exists()


def test_force_without_report_leaves_no_stale_report(nets, data, tmp_path, monkeypatch):
    import segability.report as report

    out = tmp_path / "r"
    monkeypatch.setattr(report, "build_report", lambda d: (Path(d) / "report.html").write_text("old") and Path(d) / "report.html")
    with_report = [a for a in analyze_args(nets, data, out, images="clean", labels="clean_labels") if a != "--no-report"]
    assert run(*with_report).exit_code == 0 and (out / "report.html").exists()
    assert run(*analyze_args(nets, data, out, "--force", images="clean", labels="clean_labels")).exit_code == 0
    assert not (out / "report.html").exists() and (out / "layers.parquet").exists()


def test_a_full_disk_is_one_clear_line(nets, data, tmp_path, monkeypatch):
    real = os.replace

    def full(src, dst):
        if str(dst).endswith(".parquet"):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", full)
    result = run(*analyze_args(nets, data, tmp_path / "d", images="clean", labels="clean_labels"))
    assert result.exit_code == 1, result.output
    assert "error: no space left on the device to write" in result.stderr and "free some space" in result.stderr
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1


def test_unexpected_errors_exit_1_with_the_traceback_under_debug(nets, data, tmp_path, monkeypatch):
    import segability.batch.run as batch_run

    def broken(*args, **kwargs):
        raise KeyError("lost shard")

    monkeypatch.setattr(batch_run, "merge", broken)
    args = analyze_args(nets, data, tmp_path / "u", images="clean", labels="clean_labels")
    plain = run(*args)
    assert plain.exit_code == 1, plain.output
    assert plain.stderr.strip() == "error: KeyError: 'lost shard' (run with --debug for the traceback)"
    debug = run(*args, "--resume", "--debug")
    assert debug.exit_code == 1 and "Traceback (most recent call last)" in debug.stderr and "in broken" in debug.stderr


def test_errors_csv_has_stage_and_traceback(nets, data, tmp_path):
    result = run(*analyze_args(nets, data, tmp_path / "e"))
    assert result.exit_code == 1
    errors = pd.read_csv(tmp_path / "e" / "errors.csv", keep_default_na=False)
    assert list(errors.columns) == ["file", "stage", "error", "traceback"]
    assert errors["stage"].item() == "read" and errors["error"].item().startswith("ValueError: broken.png cannot be read")
    assert "reading failed: ValueError: broken.png cannot be read" in result.stderr


@pytest.mark.parametrize(
    ("argument", "message", "shown"),
    [
        ("target", "target must be an integer >= 0 or None, got -1", "--target must be an integer >= 0 or None, got -1"),
        ("label_suffix", "label_suffix must be a string", "--label-suffix must be a string"),
        ("images", "images: scans does not exist", "--images: scans does not exist"),
        ("model_args", "model_args must be key=value", "--model-arg must be key=value"),
        ("workers", "workers: give engine='ray' for several", "--workers: give --engine 'ray' for several"),
        ("resume", "resume=True and force=True exclude each other", "--resume and --force exclude each other"),
        ("labels", "labels must be given with guide='label'", "--labels must be given with --guide 'label'"),
        (None, "a message about images and targets", "a message about images and targets"),
        ("--model", "--model: file 'x.py' not found", "--model: file 'x.py' not found"),
    ],
)
def test_usage_message_names_flags(argument, message, shown):
    from segability.cli.console import usage_message
    from segability.errors import UsageError

    assert usage_message(UsageError(message, argument=argument)) == shown


def test_memory_budget_changes_no_number(nets, data, tmp_path):
    base = analyze_args(nets, data, tmp_path / "a", images="clean", labels="clean_labels")
    assert run(*base).exit_code == 0
    none_kept = analyze_args(nets, data, tmp_path / "b", "--memory-budget", "0", images="clean", labels="clean_labels")
    result = run(*none_kept)
    assert result.exit_code == 0, result.output
    a, b = segability.load_result(tmp_path / "a"), segability.load_result(tmp_path / "b")
    pd.testing.assert_frame_equal(a.layers, b.layers, check_exact=False, atol=1e-6, rtol=0)
    bad = run(*analyze_args(nets, data, tmp_path / "c", "--memory-budget", "-1", images="clean", labels="clean_labels"))
    assert bad.exit_code == 2 and "--memory-budget" in bad.output
