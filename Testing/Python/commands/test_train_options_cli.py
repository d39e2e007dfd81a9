"""`unet3d-segmenter train` refuses impossible options and contradicting data in one line, before any work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from UNet3DSegmenterLib.commands.cli import main
from UNet3DSegmenterLib.io import write_volume
from UNet3DSegmenterLib.phantom import write_phantom_dataset
from UNet3DSegmenterLib.volume import Volume

QUICK = ["--depth", "2", "--base-width", "2", "--patch-size", "16", "16", "16", "--epochs", "1",
         "--iterations-per-epoch", "1", "--batch-size", "1", "--workers", "0", "--val-fraction", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("phantoms"), cases=2, shape=(16, 20, 20), seed=0)


def refused(capsys, *args) -> str:
    """Run the real command line in this process; return its one line of error."""
    status = main(["train", *map(str, args)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and lines and lines[-1].startswith("error: "), lines
    assert not any("Traceback" in line for line in lines)
    return lines[-1]


@pytest.mark.parametrize("options, message", [
    (["--spacing", "0", "0", "0"], "--spacing must be three positive sizes"),
    (["--spacing", "nan", "1", "1"], "--spacing must be three positive sizes"),
    (["--seed", "-1"], "seed must be a whole number in 0.."),
    (["--weight-decay", "-1"], "weight decay must be zero or more"),
    (["--workers", "-1"], "workers must be 0 or more"),
    (["--max-patch-voxels", "0"], "max patch voxels must be at least 1"),
    (["--lr", "inf"], "learning rate must be positive"),
    (["--dropout", "1"], "dropout must be in [0, 1)"),
    (["--patience", "0"], "patience must be at least 1"),
    (["--resize", "100000", "100000", "100000"], "resize needs three sizes of 1 to 4096"),
    (["--patch-size", "4096", "4096", "4096"], "patch size must be three sizes of 1 to 1024"),
    (["--window", "nan", "inf"], "window must be LOW HIGH"),
    (["--class-weights", "1", "1", "nan"], "class weights must be zero or more"),
    (["--input-spacing", "nan", "1", "1"], "input spacing must be positive"),
])
def test_impossible_option_is_refused_before_any_work(phantoms, tmp_path, capsys, options, message):
    assert message in refused(capsys, "--data", phantoms, "--output", tmp_path / "run", *options)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag", ["--output", "--cache-dir"])
def test_a_folder_option_that_is_a_file_is_refused(phantoms, tmp_path, capsys, flag):
    (tmp_path / "notes.txt").write_text("mine")
    options = [flag, tmp_path / "notes.txt"] + (["--output", tmp_path / "run"] if flag != "--output" else [])
    line = refused(capsys, "--data", phantoms, *options)
    assert "notes.txt is a file" in line and (tmp_path / "notes.txt").read_text() == "mine"


def test_an_unwritable_cache_folder_is_one_line(phantoms, tmp_path, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "sub").write_text("a file where the cache wants a folder")
    line = refused(capsys, "--data", phantoms, "--output", tmp_path / "run", "--cache-dir", cache / "sub" / "deeper",
                   *QUICK)
    assert "cannot keep prepared cases in" in line


@pytest.mark.parametrize("version", ["2", 2.5, None, True, 99])
def test_run_json_with_an_odd_format_is_refused(phantoms, tmp_path, capsys, version):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"format": version, "data": str(phantoms), "output": str(tmp_path / "run")}))
    line = refused(capsys, "--config", config)
    assert "run.json" in line and ("format" in line)


def test_images_with_different_channels_are_refused_naming_the_case(phantoms, tmp_path, capsys):
    data = tmp_path / "data"
    for name, channels in (("a", 1), ("b", 2)):
        shape = (channels, 16, 20, 20) if channels > 1 else (16, 20, 20)
        write_volume(Volume(np.random.default_rng(0).normal(size=shape).astype(np.float32)),
                     data / "images" / f"{name}.nii.gz")
        labels = np.zeros((16, 20, 20), np.uint8)
        labels[4:10, 5:12, 5:12] = 1
        write_volume(Volume(labels), data / "labels" / f"{name}.nii.gz")
    line = refused(capsys, "--data", data, "--output", tmp_path / "run", *QUICK)
    assert "case b" in line and "2 channel(s)" in line and "b.nii.gz" in line


def test_resume_refuses_options_that_contradict_the_run(phantoms, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    leftover = run / ".last.pt.0123abcd.partial"  # what a run killed while saving leaves
    leftover.write_bytes(b"half a checkpoint")
    assert main(["train", "--data", str(phantoms), "--output", str(run), *QUICK]) == 0
    assert not leftover.exists()
    before = (run / "last.pt").read_bytes()
    capsys.readouterr()
    line = refused(capsys, "--data", phantoms, "--output", run, *QUICK, "--resume", "--epochs", "2", "--arch", "vnet")
    assert "--arch vnet" in line and "unet3d" in line
    line = refused(capsys, "--data", phantoms, "--output", run, *QUICK[2:], "--base-width", "8", "--resume",
                   "--epochs", "2")
    assert "--base-width 8" in line
    assert (run / "last.pt").read_bytes() == before


def test_fine_tuning_into_the_folder_of_its_own_checkpoint_is_refused(phantoms, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(phantoms), "--output", str(run), *QUICK]) == 0
    capsys.readouterr()
    before = (run / "last.pt").read_bytes()
    line = refused(capsys, "--data", phantoms, "--output", run, *QUICK, "--init", run / "last.pt")
    assert "already holds a model" in line and (run / "last.pt").read_bytes() == before
    line = refused(capsys, "--data", phantoms, "--output", run, *QUICK, "--init", run / "last.pt", "--overwrite")
    assert "last.pt" in line and (run / "last.pt").read_bytes() == before
