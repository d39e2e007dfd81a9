"""The Train job (UNet3DSegmenterLib.slicer.training): configuration, curves, the real trainer, Stop, fine-tuning."""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest
import torch

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")

from child_processes import alive, write_launcher  # noqa: E402
from slicer_harness import SEGMENT_COLORS, phantom_pair, scene_state  # noqa: E402

from UNet3DSegmenterLib import TrainingConfig, load_checkpoint  # noqa: E402
from UNet3DSegmenterLib.slicer import selftest  # noqa: E402

TINY_TRAINING = dict(epochs=2, patchSize=(16, 24, 24), batchSize=1, device="cpu", depth=2, base_width=4,
                     iterations_per_epoch=1, val_fraction=0.5, augment=False, workers=0, seed=0)


# --- configuration and curves ---------------------------------------------------------------------


def test_training_curves_fill_a_table_plotted_by_a_chart(slicer_scene, logic):
    table, chart = logic.createTrainingCurves(["organ", "lesion"])
    logic.addTrainingEpoch(table, {"event": "epoch", "epoch": 1, "train_loss": 1.5, "lr": 0.001})
    logic.addTrainingEpoch(table, {"event": "epoch", "epoch": 2, "train_loss": 0.75, "mean_dice": 0.5,
                                   "dice": {"organ": 0.8, "lesion": 0.2}})
    assert table.GetNumberOfRows() == 2
    columns = ["epoch", "train loss", "mean Dice", "Dice organ", "Dice lesion"]
    values = {name: slicer.util.arrayFromTableColumn(table, name) for name in columns}
    np.testing.assert_array_equal(values["epoch"], [1, 2])
    np.testing.assert_array_equal(values["train loss"], [1.5, 0.75])
    assert math.isnan(values["Dice organ"][0]) and values["Dice organ"][1] == pytest.approx(0.8)
    assert values["Dice lesion"][1] == pytest.approx(0.2)
    series = [chart.GetNthPlotSeriesNode(index) for index in range(chart.GetNumberOfPlotSeriesNodes())]
    assert sorted(node.GetYColumnName() for node in series) == sorted(columns[1:])
    assert all(node.GetTableNode() is table and node.GetXColumnName() == "epoch" for node in series)
    assert table.GetNodeReference("UNet3DSegmenter.Chart") is chart


def test_the_panels_run_is_a_training_configuration_the_command_line_runs_again(slicer_scene, logic, tmp_path):
    from UNet3DSegmenterLib.slicer import training

    pairs = [phantom_pair(logic, seed=seed)[:2] for seed in (7, 8)]
    job = training.prepare(pairs, tmp_path / "run", "vnet", 3, 32, 4, 0.01, "cpu", iterations_per_epoch=5)
    path = job.config.save(tmp_path / "run" / "run.json")
    config = TrainingConfig.load(path)
    assert (config.architecture, config.epochs, config.patch_size, config.batch_size, config.lr) == (
        "vnet", 3, (32, 32, 32), 4, 0.01)
    assert (config.device, config.iterations_per_epoch, config.data) == ("cpu", 5, tmp_path / "run" / "data")
    assert config.label_names == {1: "organ", 2: "lesion"}
    assert config.label_colors[1] == pytest.approx(SEGMENT_COLORS["organ"])
    from UNet3DSegmenterLib.commands.cli import build_parser
    from UNet3DSegmenterLib.training.config import config_from_arguments

    parsed = build_parser().parse_args(["train", "--config", str(path), "--progress-json"])
    assert config_from_arguments(parsed) == config


@pytest.mark.parametrize("options, message", [
    ({"architecture": "transformer"}, "architecture"), ({"device": "tpu"}, "device"),
    ({"epochs": 0}, "epochs"), ({"iterations_pr_epoch": 5}, "iterations_pr_epoch"), ({"lr": 0.1}, "'lr'")])
def test_bad_training_options_are_one_line_and_write_nothing(slicer_scene, logic, tmp_path, options, message):
    pairs = [phantom_pair(logic, seed=7)[:2]]
    before = scene_state(slicer_scene.scene)
    with pytest.raises(ValueError, match=message) as raised:
        logic.trainInBackground(pairs, tmp_path / "run", **options)
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "run").exists() and scene_state(slicer_scene.scene) == before


# --- the real trainer -----------------------------------------------------------------------------


def _check_checkpoint(path):
    checkpoint = load_checkpoint(path)
    assert [label.name for label in checkpoint.foreground_labels] == ["organ", "lesion"]
    for label in checkpoint.foreground_labels:
        assert label.color == pytest.approx(SEGMENT_COLORS[label.name])


def test_train_waits_for_the_trainer_and_returns_a_checkpoint_with_the_segment_names(slicer_scene, logic, tmp_path):
    pairs = [phantom_pair(logic, seed=seed)[:2] for seed in (7, 8)]
    events = []
    best = logic.train(pairs, tmp_path / "run", progress=events.append, **TINY_TRAINING)
    assert best == tmp_path / "run" / "best.pt" and best.is_file()
    _check_checkpoint(best)
    kinds = [event["event"] for event in events]
    assert kinds.count("epoch") == 2 and kinds[-1] == "done"
    tables = slicer.util.getNodesByClass("vtkMRMLTableNode")
    assert len(tables) == 1 and tables[0].GetNumberOfRows() == 2
    segmentation = logic.segment(pairs[0][0], best, device="cpu")  # the model segments in the scene at once
    assert logic.segmentNames(segmentation) == ["organ", "lesion"]


def test_train_in_background_runs_the_saved_configuration_and_streams_epochs(slicer_scene, logic, tmp_path):
    pairs = [phantom_pair(logic, seed=seed)[:2] for seed in (7, 8)]
    events, finished, errors = [], [], []
    process = logic.trainInBackground(pairs, tmp_path / "run", onProgress=events.append, onFinished=finished.append,
                                      onError=errors.append, **TINY_TRAINING)
    assert "--config" in process.arguments and str(tmp_path / "run" / "run.json") in process.arguments
    assert process.tableNode.GetNumberOfRows() == 0 and process.chartNode is not None
    modified = (tmp_path / "run" / "data" / "dataset.json").stat().st_mtime_ns
    assert process.wait(timeout=300), errors
    assert errors == [] and finished == [tmp_path / "run" / "best.pt"]
    kinds = [event["event"] for event in events]
    assert "iteration" in kinds and kinds.count("epoch") == 2 and kinds[-1] == "done"
    assert process.tableNode.GetNumberOfRows() == 2
    assert not math.isnan(slicer.util.arrayFromTableColumn(process.tableNode, "Dice organ")[-1])
    _check_checkpoint(finished[0])  # colours came with the configuration: no checkpoint is saved again
    assert (tmp_path / "run" / "data" / "dataset.json").stat().st_mtime_ns == modified


@pytest.mark.skipif(os.name == "nt", reason="the launcher stand-in is a POSIX script")
def test_stop_through_slicers_launcher_saves_and_reports_how_far_it_got(slicer_scene, logic, tmp_path):
    """In Slicer the engine runs behind the PythonSlicer launcher, which passes no signal on: Stop must
    still let the trainer end its iteration and write last.pt, log.csv and the curves."""
    logic.pythonExecutable = str(write_launcher(tmp_path))
    pairs = [phantom_pair(logic, seed=seed)[:2] for seed in (7, 8)]
    stopped, finished, errors = [], [], []
    process = None

    def stopAtTheFirstIteration(event):
        if event["event"] == "iteration":
            process.cancel()

    process = logic.trainInBackground(pairs, tmp_path / "run", onProgress=stopAtTheFirstIteration,
                                      onFinished=finished.append, onError=errors.append,
                                      onCancelled=lambda: stopped.append(True), **dict(TINY_TRAINING, epochs=50))
    assert not process.wait(timeout=300)
    assert stopped == [True] and finished == [] and errors == []
    assert process.returncode == 0, "the trainer was killed instead of stopping"
    result = process.job.result
    assert result is not None and result["stopped"] == "cancelled"
    run = tmp_path / "run"
    state = torch.load(run / "last.state.pt", weights_only=True)
    assert state["epoch"] * TINY_TRAINING["iterations_per_epoch"] + state["iteration"] >= 1, "saved before it trained"
    assert load_checkpoint(run / "last.pt").foreground_labels
    with open(run / "log.csv", newline="") as stream:
        assert next(csv.reader(stream))[0] == "epoch"
    assert (run / "curves.png").is_file() and not (run / "STOP").exists()
    assert not alive(process.pid)


def test_fine_tuning_on_a_corrected_result_fixes_a_case_the_model_got_wrong(slicer_scene, logic, checkpoint_path,
                                                                             tmp_path):
    """Segment, correct in Segment Editor, fine-tune: the loop closed in the scene, without a server."""
    image, truth = selftest.addPhantom(seed=5, name="inverted")
    slicer.util.updateVolumeFromArray(image, -slicer.util.arrayFromVolume(image))  # a contrast it never saw
    result = logic.segment(image, checkpoint_path, device="cpu")
    before = selftest.dice(logic.labelmapFromSegmentation(result, image, ["organ", "lesion"]), truth.array, 1)
    assert before < 0.5, f"the tiny model already segments the inverted phantom (organ Dice {before:.2f})"

    segments = result.GetSegmentation()
    for value, name in ((1, "organ"), (2, "lesion")):  # the corrections a user paints in Segment Editor
        slicer.util.updateSegmentBinaryLabelmapFromArray((truth.array == value).astype(np.uint8), result,
                                                         segments.GetSegmentIdBySegmentName(name), image)
    pairs = logic.segmentedPairs()
    assert pairs == [(image, result)]

    tuned = logic.train(pairs, tmp_path / "tuned", initCheckpoint=checkpoint_path, epochs=3, patchSize=(16, 24, 24),
                        batchSize=1, learningRate=0.01, device="cpu", iterations_per_epoch=10, augment=False,
                        workers=0, seed=0)
    record = load_checkpoint(tuned)
    assert record.training["init"] == str(checkpoint_path) and record.architecture_args["base_width"] == 4
    assert [label.name for label in record.foreground_labels] == ["organ", "lesion"]
    again = logic.segment(image, tuned, device="cpu")
    after = selftest.dice(logic.labelmapFromSegmentation(again, image, ["organ", "lesion"]), truth.array, 1)
    assert after > before + 0.4, f"organ Dice {before:.2f} before fine-tuning, {after:.2f} after"
    assert json.loads((tmp_path / "tuned" / "run.json").read_text())["init"] == str(checkpoint_path)


# --- never losing a model -------------------------------------------------------------------------


def test_a_second_run_into_a_folder_with_a_model_is_refused_before_anything_is_written(slicer_scene, logic,
                                                                                        tmp_path):
    pairs = [phantom_pair(logic, seed=seed)[:2] for seed in (7, 8)]
    best = logic.train(pairs, tmp_path / "run", **TINY_TRAINING)
    before = {path: path.read_bytes() for path in (tmp_path / "run").rglob("*") if path.is_file()}
    for start in (logic.train, logic.trainInBackground):
        with pytest.raises(ValueError, match="already holds a model \\(best.pt\\)") as raised:
            start(pairs, tmp_path / "run", **TINY_TRAINING)
        assert "\n" not in str(raised.value)
    assert {path: path.read_bytes() for path in (tmp_path / "run").rglob("*") if path.is_file()} == before
    with pytest.raises(ValueError, match="lies in the output folder"):
        logic.train(pairs, tmp_path / "run", initCheckpoint=best, overwrite=True, **TINY_TRAINING)
    assert best.read_bytes() == before[best]


def test_a_stopped_run_resumes_with_train_and_resume(slicer_scene, logic, tmp_path):
    pairs = [phantom_pair(logic, seed=seed)[:2] for seed in (7, 8)]
    stopped = logic.train(pairs, tmp_path / "run", cancel=lambda: True, **TINY_TRAINING)
    assert stopped == tmp_path / "run" / "last.pt" and not (tmp_path / "run" / "best.pt").exists()
    assert _logged_epochs(tmp_path / "run") == 0
    with pytest.raises(ValueError, match="give no pairs"):
        logic.train(pairs, tmp_path / "run", resume=True)
    with pytest.raises(ValueError, match="holds no stopped run to resume"):
        logic.train([], tmp_path / "elsewhere", resume=True)
    events = []
    best = logic.train([], tmp_path / "run", resume=True, progress=events.append)
    assert best == tmp_path / "run" / "best.pt" and load_checkpoint(best).training["epochs"] == 2
    assert [event["epoch"] for event in events if event["event"] == "epoch"] == [1, 2]
    _check_checkpoint(best)


def _logged_epochs(folder) -> int:
    """Rows of a run's log.csv."""
    return len((folder / "log.csv").read_text().splitlines()) - 1


def test_the_curves_of_a_resumed_run_start_at_its_first_epoch(slicer_scene, logic, tmp_path):
    pairs = [phantom_pair(logic, seed=seed)[:2] for seed in (7, 8)]
    calls = []
    logic.train(pairs, tmp_path / "run", cancel=lambda: calls.append(1) or len(calls) >= 2, **TINY_TRAINING)
    assert _logged_epochs(tmp_path / "run") == 1, "the run did not stop in its second epoch"
    process = logic.trainInBackground([], tmp_path / "run", resume=True)
    assert "--resume" in process.arguments
    assert process.wait(timeout=300)
    table = process.tableNode
    np.testing.assert_array_equal(slicer.util.arrayFromTableColumn(table, "epoch"), [1, 2])
    assert not math.isnan(slicer.util.arrayFromTableColumn(table, "Dice organ")[0]), "epoch 1's Dice was lost"
