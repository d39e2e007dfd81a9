"""The trainer end to end on tiny phantoms: it learns, repeats itself, resumes, survives a kill, runs DDP."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from UNet3DSegmenterLib.checkpoint import load_checkpoint
from UNet3DSegmenterLib.commands.cli import main
from UNet3DSegmenterLib.datalist import load_datalist
from UNet3DSegmenterLib.inference.predictor import Predictor
from UNet3DSegmenterLib.io import read_volume, write_dicom_series
from UNet3DSegmenterLib.phantom import write_phantom_dataset
from UNet3DSegmenterLib.training.planning import plan_patch_size, plan_training
from UNet3DSegmenterLib.training.trainer import TrainingConfig, train

REPOSITORY = Path(__file__).resolve().parents[4]
# One thread per process: the tests share a small machine, and idle OpenMP threads spinning on a busy
# core slow tiny convolutions down a hundredfold.
SUBPROCESS_ENV = {**os.environ, "PYTHONPATH": str(REPOSITORY), "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("phantoms"), cases=5, shape=(24, 32, 32), seed=0)


def tiny(data: Path, output: Path, **changes) -> TrainingConfig:
    settings = dict(data=data, output=output, depth=3, base_width=4, patch_size=(16, 32, 32), epochs=2,
                    iterations_per_epoch=3, batch_size=2, workers=0, val_fraction=0.4, seed=0)
    return TrainingConfig(**{**settings, **changes})


def iteration_losses(config: TrainingConfig, cancel=None) -> tuple[list[float], object]:
    events = []
    result = train(config, progress=events.append, cancel=cancel)
    return [event["loss"] for event in events if event["event"] == "iteration"], result


def test_short_training_lowers_the_loss_and_writes_every_output(phantoms, tmp_path):
    result = train(tiny(phantoms, tmp_path / "run", epochs=4, iterations_per_epoch=4, lr=3e-3))
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0]
    assert result.stopped == "completed" and result.epochs_completed == 4 and 0 <= result.best_dice <= 1
    for name in ("best.pt", "last.pt", "log.csv", "curves.png", "split.json", "validation_report.json"):
        assert (tmp_path / "run" / name).is_file(), name
    with open(tmp_path / "run" / "log.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [row["epoch"] for row in rows] == ["1", "2", "3", "4"]
    assert {"train_loss", "val_loss", "dice_organ", "dice_lesion", "mean_dice", "lr", "seconds"} <= set(rows[0])
    checkpoint = load_checkpoint(result.best_checkpoint)
    assert [label.name for label in checkpoint.labels] == ["background", "organ", "lesion"]
    assert checkpoint.patch_size == (16, 32, 32) and checkpoint.preprocessing.spacing == (1.0, 1.0, 2.0)
    assert checkpoint.training["best_epoch"] == result.best_epoch
    training_names = json.loads((tmp_path / "run" / "split.json").read_text())["train"]
    fingerprint = checkpoint.fingerprint  # from the training cases: 32 x 32 x 24 voxels of 1 x 1 x 2 mm
    assert fingerprint is not None and fingerprint.cases == len(training_names)
    assert fingerprint.extent_median == fingerprint.extent_max == (32.0, 32.0, 48.0)
    assert fingerprint.spacing_min == fingerprint.spacing_max == (1.0, 1.0, 2.0)
    report = json.loads((tmp_path / "run" / "validation_report.json").read_text())
    assert sorted(report["cases"]) == json.loads((tmp_path / "run" / "split.json").read_text())["validation"]
    image = read_volume(phantoms / "images" / "phantom_000.nii.gz")
    assert Predictor(result.best_checkpoint, device="cpu").predict(image).labelmap.shape == image.shape


def test_same_seed_gives_same_first_epoch_losses_with_or_without_loader_workers(phantoms, tmp_path):
    first, _ = iteration_losses(tiny(phantoms, tmp_path / "a", epochs=1, workers=0))
    second, _ = iteration_losses(tiny(phantoms, tmp_path / "b", epochs=1, workers=1))
    other_seed, _ = iteration_losses(tiny(phantoms, tmp_path / "c", epochs=1, seed=1))
    assert first == second
    assert first != other_seed


@pytest.mark.parametrize("stop_after", [3, 4], ids=["at-epoch-end", "mid-epoch"])
def test_resume_after_stopping_equals_an_uninterrupted_run(phantoms, tmp_path, stop_after):
    config = tiny(phantoms, tmp_path / "whole", epochs=3, val_fraction=0.2)
    whole_losses, whole = iteration_losses(config)
    calls = []
    broken = replace(config, output=tmp_path / "broken")
    first_losses, stopped = iteration_losses(broken, cancel=lambda: calls.append(1) or len(calls) >= stop_after)
    assert stopped.stopped == "cancelled" and load_checkpoint(stopped.last_checkpoint)
    rest_losses, resumed = iteration_losses(replace(broken, resume=True))
    assert first_losses + rest_losses == whole_losses
    assert [row["train_loss"] for row in resumed.history] == [row["train_loss"] for row in whole.history]
    expected = torch.load(whole.output / "last.state.pt", weights_only=True)["model"]
    actual = torch.load(resumed.output / "last.state.pt", weights_only=True)["model"]
    assert all(torch.equal(expected[key], actual[key]) for key in expected)


def cli_arguments(data: Path, output: Path, epochs: int = 2) -> list[str]:
    return ["train", "--data", str(data), "--output", str(output), "--depth", "3", "--base-width", "4",
            "--patch-size", "16", "32", "32", "--epochs", str(epochs), "--iterations-per-epoch", "3",
            "--workers", "0", "--val-fraction", "0.4", "--progress-json"]


def test_killed_run_leaves_a_loadable_checkpoint_that_resumes(phantoms, tmp_path, watch_progress):
    output = tmp_path / "run"

    def kill_in_the_second_epoch(process, event) -> bool:
        if event["event"] == "iteration" and event["epoch"] == 2:
            process.send_signal(signal.SIGKILL)
            return True
        return False

    command = [sys.executable, "-m", "UNet3DSegmenterLib", *cli_arguments(phantoms, output, 3)]
    process, events, stderr = watch_progress(command, SUBPROCESS_ENV, kill_in_the_second_epoch)
    assert process.returncode == -signal.SIGKILL, stderr
    iteration = next(event for event in events if event["event"] == "iteration")
    assert set(iteration) == {"event", "epoch", "epochs", "iteration", "iterations", "loss", "eta"}
    epoch = next(event for event in events if event["event"] == "epoch")
    assert set(epoch) == {"event", "epoch", "epochs", "train_loss", "dice", "mean_dice", "lr", "seconds", "eta"}
    assert set(epoch["dice"]) == {"organ", "lesion"}
    assert load_checkpoint(output / "last.pt").training["epochs"] in (1, 2)  # 2 if epoch 2 ended before the kill
    resumed = train(tiny(phantoms, output, epochs=3, resume=True))
    assert resumed.stopped == "completed" and [row["epoch"] for row in resumed.history] == [1, 2, 3]
    assert load_checkpoint(output / "last.pt").training["epochs"] == 3


def test_two_gloo_processes_train_with_ddp_and_only_rank_zero_writes(phantoms, tmp_path):
    output = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "UNet3DSegmenterLib", *cli_arguments(phantoms, output)]
    finished = subprocess.run(command, capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=500)
    assert finished.returncode == 0, finished.stderr[-3000:]
    events = [json.loads(line) for line in finished.stdout.splitlines() if line.startswith("{")]
    assert [event["event"] for event in events].count("done") == 1
    assert [event["epoch"] for event in events if event["event"] == "epoch"] == [1, 2]
    checkpoint = load_checkpoint(output / "best.pt")
    assert checkpoint.training["world_size"] == 2
    assert sorted(path.name for path in output.iterdir() if not path.name.startswith(".")) == [
        "best.pt", "curves.png", "last.pt", "last.state.pt", "log.csv", "run.json", "split.json",
            "validation_report.json"]


def test_training_stops_once_every_class_reaches_the_dice_threshold(phantoms, tmp_path):
    result = train(tiny(phantoms, tmp_path / "run", epochs=5, dice_threshold=0.0))
    assert result.stopped == "dice_threshold" and result.epochs_completed == 1


def test_training_stops_when_dice_stops_improving(phantoms, tmp_path):
    frozen = tiny(phantoms, tmp_path / "run", epochs=5, lr=1e-12, patience=1, augment=False)
    result = train(frozen)
    assert result.stopped == "patience" and result.epochs_completed == 2 and result.best_epoch == 1


def test_defaults_come_from_the_data(tmp_path):
    data = write_phantom_dataset(tmp_path / "ct", cases=3, shape=(18, 30, 46), spacing=(0.8, 0.8, 2.5),
                                 modality="CT", seed=2)
    datalist = load_datalist(data)
    plan = plan_training(TrainingConfig(data=data, output=tmp_path / "run", depth=3), datalist, datalist.cases)
    assert plan.preprocessing.spacing == (0.8, 0.8, 2.5)
    assert plan.patch_size == (20, 32, 48)  # the case shape rounded up to multiples of 4
    assert plan.preprocessing.normalization == "ct"
    low, high = plan.preprocessing.clip
    assert -200 < low < high < 1000 and low < plan.preprocessing.mean < high
    # too large: the axis covering most of its median size shrinks first (here z)
    assert plan_patch_size((300, 512, 512), 16, max_size=128, max_voxels=96**3) == (64, 112, 112)


def test_trains_on_dicom_series_and_npy_arrays(phantoms, tmp_path):
    """The liver pipeline's layout (DICOM series folders) and NumPy arrays, in one folder pair."""
    data = tmp_path / "data"
    for index in range(4):
        name = f"phantom_{index:03d}"
        image, labels = (read_volume(phantoms / kind / f"{name}.nii.gz") for kind in ("images", "labels"))
        if index < 2:
            write_dicom_series(image, data / "images" / name, modality="MR")
            write_dicom_series(labels, data / "labels" / name)
        else:
            for kind, volume in (("images", image), ("labels", labels)):
                (data / kind).mkdir(parents=True, exist_ok=True)
                np.save(data / kind / f"{name}.npy", volume.array)
    assert main([*cli_arguments(data, tmp_path / "run", epochs=1), "--input-spacing", "1", "1", "2"]) == 0
    # 1 mm for the arrays would have made the median z spacing 1.5 mm
    assert load_checkpoint(tmp_path / "run" / "best.pt").preprocessing.spacing == (1.0, 1.0, 2.0)
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert sorted(split["train"] + split["validation"]) == [f"phantom_{index:03d}" for index in range(4)]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["input_spacing"] == [1.0, 1.0, 2.0]


def test_fine_tuning_keeps_weights_and_gets_a_new_output_layer_for_new_labels(phantoms, tmp_path):
    source = train(tiny(phantoms, tmp_path / "source", epochs=1, iterations_per_epoch=1)).best_checkpoint
    pretrained = load_checkpoint(source).state_dict
    one_class = write_phantom_dataset(tmp_path / "one_class", cases=3, shape=(24, 32, 32), classes=1)
    for data, same_head in ((phantoms, True), (one_class, False)):
        config = tiny(data, tmp_path / "tuned", init=source)
        datalist = load_datalist(data)
        model = plan_training(config, datalist, datalist.cases).build_model(seed=5)
        for key, value in model.state_dict().items():
            if key.startswith("head."):
                assert torch.equal(value, pretrained[key]) == same_head
            else:
                assert torch.equal(value, pretrained[key]), key
    assert model.head.out_channels == 2


def test_user_mistakes_end_in_one_line_errors(phantoms, tmp_path, capsys):
    arguments = cli_arguments(phantoms, tmp_path / "run")
    arguments[arguments.index("--patch-size") + 1: arguments.index("--patch-size") + 4] = ["15", "32", "32"]
    assert main(arguments) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: patch size (15, 32, 32) must be three multiples of 4") and "\n" not in error
    assert main(["train", "--data", str(tmp_path / "missing"), "--output", str(tmp_path / "run")]) == 2
    assert "training data not found" in capsys.readouterr().err
    assert main(["train", "--data", str(phantoms), "--output", str(tmp_path / "new"), "--resume"]) == 2
    assert "cannot resume" in capsys.readouterr().err


def test_a_short_run_on_real_hippocampus_cases(shared_dataset, tmp_path):
    folder = shared_dataset("msd_hippocampus")
    names = ["hippocampus_001", "hippocampus_003", "hippocampus_004", "hippocampus_006"]  # 003 has float labels
    listing = tmp_path / "cases.json"
    listing.write_text(json.dumps([{"image": str(folder / "images" / f"{name}.nii.gz"),
                                    "label": str(folder / "labels" / f"{name}.nii.gz")} for name in names]))
    config = TrainingConfig(data=listing, output=tmp_path / "run", depth=3, base_width=4, epochs=1,
                            iterations_per_epoch=2, workers=0, val_fraction=0.25,
                            label_names={1: "anterior", 2: "posterior"})
    result = train(config)
    checkpoint = load_checkpoint(result.best_checkpoint)
    assert [label.name for label in checkpoint.labels] == ["background", "anterior", "posterior"]
    assert all(size % 4 == 0 for size in checkpoint.patch_size)
    assert checkpoint.preprocessing.normalization == "zscore" and checkpoint.preprocessing.spacing == (1.0, 1.0, 1.0)
    assert np.isfinite(result.best_dice)


def test_resize_window_resnet18unet_and_dice_focal_from_the_command_line(phantoms, tmp_path, capsys):
    output = tmp_path / "run"
    arguments = ["train", "--data", str(phantoms), "--output", str(output), "--arch", "resnet18unet",
                 "--base-width", "4", "--resize", "16", "24", "24", "--window", "0", "400", "--loss", "dice_focal",
                 "--class-weights", "0.5", "1", "2", "--epochs", "2", "--iterations-per-epoch", "2",
                 "--workers", "0", "--val-fraction", "0.4", "--progress-json"]
    assert main(arguments) == 0, capsys.readouterr().err
    checkpoint = load_checkpoint(output / "best.pt")
    assert checkpoint.architecture == "resnet18unet" and checkpoint.architecture_args["depth"] == 4
    preprocessing = checkpoint.preprocessing
    assert preprocessing.size == (16, 24, 24) and preprocessing.spacing is None
    assert preprocessing.normalization == "window" and preprocessing.clip == (0.0, 400.0)
    assert checkpoint.patch_size == (16, 24, 24)  # the resized grid, already a multiple of 8
    assert checkpoint.training["loss"] == "dice_focal" and checkpoint.training["class_weights"] == [0.5, 1, 2]
    run = json.loads((output / "run.json").read_text())
    assert run["resize"] == [16, 24, 24] and run["window"] == [0, 400]
    # the labelmap comes back on each input's own grid, not the resized one
    image = read_volume(phantoms / "images" / "phantom_000.nii.gz")
    assert Predictor(output / "best.pt", device="cpu").predict(image).labelmap.same_grid(image)


def test_log_and_validation_report_carry_iou_and_voxel_accuracy(phantoms, tmp_path):
    result = train(tiny(phantoms, tmp_path / "run", epochs=1))
    with open(tmp_path / "run" / "log.csv", newline="") as stream:
        row = next(csv.DictReader(stream))
    scores = {name: float(row[name]) for name in ("iou_organ", "iou_lesion", "mean_iou", "accuracy", "mean_dice")}
    assert all(0 <= value <= 1 for value in scores.values())
    assert scores["mean_iou"] == pytest.approx((scores["iou_organ"] + scores["iou_lesion"]) / 2, abs=1e-5)
    assert scores["mean_iou"] <= scores["mean_dice"] + 1e-6  # IoU never exceeds Dice
    report = json.loads((tmp_path / "run" / "validation_report.json").read_text())
    assert sorted(report["accuracy"]) == sorted(report["cases"]) and 0 < report["mean_accuracy"] <= 1
    means = [report["mean"][label]["iou"] for label in report["mean"]]
    assert report["mean_foreground_iou"] == pytest.approx(sum(means) / len(means))
    assert result.history[0]["accuracy"] == pytest.approx(scores["accuracy"], abs=1e-5)


@pytest.mark.parametrize("options, message", [
    (["--arch", "resnet18unet", "--depth", "3"], "--arch resnet18unet: resnet18unet has ResNet-18's four stages"),
    (["--resize", "16", "24", "24", "--spacing", "1", "1", "2"], "give --resize or --spacing, not both"),
    (["--window", "400", "0"], "window must be LOW HIGH with LOW below HIGH"),
    (["--window", "0", "400", "--normalization", "zscore"], "leave out --normalization zscore"),
    (["--normalization", "window"], "the window normalisation needs --window LOW HIGH"),
    (["--class-weights", "1", "-1", "1"], "class weights must be zero or more"),
    (["--class-weights", "1", "1"], "2 class weights for 3 classes"),
])
def test_preprocessing_loss_and_network_mistakes_end_in_one_line_errors(phantoms, tmp_path, capsys, options, message):
    assert main(["train", "--data", str(phantoms), "--output", str(tmp_path / "run"), *options]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and message in error and "\n" not in error
    assert not (tmp_path / "run").exists()
