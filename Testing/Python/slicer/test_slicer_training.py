"""Training from the scene: pair export (checked voxel by voxel), curves, and the real trainer."""

from __future__ import annotations

import importlib.util
import json
import math

import nibabel
import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")

from UNet3DSegmenterLib import Label, load_checkpoint, read_volume  # noqa: E402
from UNet3DSegmenterLib.phantom import PHANTOM_LABELS, make_phantom  # noqa: E402

needs_trainer = pytest.mark.skipif(importlib.util.find_spec("UNet3DSegmenterLib.training.trainer") is None,
                                   reason="UNet3DSegmenterLib.training.trainer is not there yet")

# Segment colours chosen in the scene, unlike the phantom's own, to see them reach the checkpoint.
COLORS = {"organ": (0.1, 0.2, 0.9), "lesion": (0.95, 0.85, 0.05), "vessel": (0.5, 0.0, 0.5)}
TINY_TRAINING = dict(epochs=2, patchSize=(16, 24, 24), batchSize=1, device="cpu", depth=2, base_width=4,
                     iterations_per_epoch=1, val_fraction=0.5, augment=False, workers=0, seed=0)



def _pair(slicer_scene, logic, seed: int, classes: int = 2, names=None, direction=None):
    """A phantom volume in the scene and a segmentation of its true labels (segments named by ``names``)."""
    test = slicer_scene.module.UNet3DSegmenterTest
    image, labels = make_phantom(shape=test.SHAPE, spacing=test.SPACING, seed=seed, classes=classes,
                                 direction=test.DIRECTION if direction is None else direction)
    volume = logic.addVolumeNode(image, f"phantom {seed}")
    names = names or {value: PHANTOM_LABELS[value][0] for value in range(1, classes + 1)}
    segmentation = slicer_scene.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"phantom {seed} labels")
    logic.updateSegmentationFromLabelmap(segmentation, labels, [Label(value, name, COLORS.get(name, (1, 1, 1)))
                                                                for value, name in names.items()], volume)
    return volume, segmentation, labels


def _scene_state(scene):
    return [scene.GetNthNode(index).GetID() for index in range(scene.GetNumberOfNodes())]


# --- export -------------------------------------------------------------------------------------


def test_training_pairs_are_exported_voxel_by_voxel_with_one_label_order(slicer_scene, logic, tmp_path):
    first = _pair(slicer_scene, logic, seed=5)  # organ=1, lesion=2
    # Second pair: its segments in another order, one name the first lacks, organ missing, axis-aligned grid.
    second = _pair(slicer_scene, logic, seed=6, classes=3, names={3: "vessel", 2: "lesion", 1: "kidney"},
                   direction=np.eye(3))
    before = _scene_state(slicer_scene.scene)

    folder = logic.exportTrainingPairs([first[:2], second[:2]], tmp_path / "data")

    assert _scene_state(slicer_scene.scene) == before
    dataset = json.loads((folder / "dataset.json").read_text())
    assert dataset["labels"] == {"0": "background", "1": "organ", "2": "lesion", "3": "vessel", "4": "kidney"}
    assert dataset["label_colors"]["1"] == pytest.approx(COLORS["organ"])
    assert len(dataset["training"]) == 2
    expected_values = [{1: 1, 2: 2}, {3: 3, 2: 2, 1: 4}]  # phantom value -> exported value
    for entry, (volume, _, truth), mapping in zip(dataset["training"], [first, second], expected_values):
        image_path, label_path = folder / entry["image"], folder / entry["label"]
        assert entry["volume"] == volume.GetName()
        image, labels = read_volume(image_path), read_volume(label_path)
        source = logic.volumeFromNode(volume)
        np.testing.assert_array_equal(image.array, source.array)
        expected = np.zeros(truth.shape, np.uint8)
        for value, exported in mapping.items():
            expected[truth.array == value] = exported
        np.testing.assert_array_equal(labels.array, expected)
        # the labelmap lies on the volume's grid (NIfTI stores it in single precision)
        assert labels.same_grid(source, tolerance=1e-4) and image.same_grid(source, tolerance=1e-4)
        # an independent reader agrees, voxel by voxel
        independent = np.asarray(nibabel.load(label_path).dataobj)
        np.testing.assert_array_equal(np.transpose(independent, (2, 1, 0)), expected)


def test_export_follows_the_segments_order_where_they_overlap(slicer_scene, logic, tmp_path):
    volume, segmentation, truth = _pair(slicer_scene, logic, seed=5)
    # a third segment covering everything the organ covers: it comes later, so it wins there
    organ = slicer.util.arrayFromSegmentBinaryLabelmap(
        segmentation, segmentation.GetSegmentation().GetSegmentIdBySegmentName("organ"), volume)
    segmentId = segmentation.GetSegmentation().AddEmptySegment("cover", "cover")
    slicer.util.updateSegmentBinaryLabelmapFromArray(organ, segmentation, segmentId, volume)
    folder = logic.exportTrainingPairs([(volume, segmentation)], tmp_path / "data")
    labels = read_volume(folder / json.loads((folder / "dataset.json").read_text())["training"][0]["label"]).array
    assert np.count_nonzero(labels == 1) == 0 and np.count_nonzero(labels == 3) == np.count_nonzero(truth.array == 1)


@pytest.mark.parametrize("case", ["no pairs", "no segments", "no segmentation", "2D volume", "duplicate names"])
def test_export_refuses_bad_pairs_and_writes_nothing(slicer_scene, logic, tmp_path, case):
    volume, segmentation, _ = _pair(slicer_scene, logic, seed=5)
    scene = slicer_scene.scene
    if case == "no pairs":
        pairs = []
    elif case == "no segments":
        pairs = [(volume, scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty"))]
    elif case == "no segmentation":
        pairs = [(volume, None)]
    elif case == "2D volume":
        pairs = [(slicer.util.addVolumeFromArray(np.zeros((1, 8, 8), np.int16), name="slice"), segmentation)]
    else:
        segmentation.GetSegmentation().AddEmptySegment("second organ", "organ")
        pairs = [(volume, segmentation)]
    before = _scene_state(scene)
    with pytest.raises(ValueError) as raised:
        logic.exportTrainingPairs(pairs, tmp_path / "data")
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "data").exists()
    assert _scene_state(scene) == before
    with pytest.raises(ValueError):
        logic.trainInBackground(pairs, tmp_path / "run")
    assert not (tmp_path / "run").exists() and _scene_state(scene) == before


# --- curves -------------------------------------------------------------------------------------


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


def test_training_options_are_options_of_the_train_command(slicer_harness, tmp_path):
    from UNet3DSegmenterLib.commands.cli import build_parser

    config = dict(data=tmp_path / "data", output=tmp_path / "run", architecture="vnet", epochs=3,
                  patch_size=(16, 32, 32), batch_size=4, lr=0.01, device="cpu", label_names={1: "organ"},
                  label_colors={1: (1, 0, 0)}, augment=False, iterations_per_epoch=5, depth=3, resume=True)
    arguments = slicer_harness.module._trainingArguments(config)
    parsed = build_parser().parse_args(["train", *arguments])
    assert (parsed.architecture, parsed.epochs, parsed.patch_size, parsed.batch_size, parsed.lr) == (
        "vnet", 3, [16, 32, 32], 4, 0.01)
    assert (parsed.device, parsed.augment, parsed.iterations_per_epoch, parsed.depth, parsed.resume) == (
        "cpu", False, 5, 3, True)


# --- the real trainer -----------------------------------------------------------------------------


def _check_checkpoint(path):
    checkpoint = load_checkpoint(path)
    names = [label.name for label in checkpoint.foreground_labels]
    assert names == ["organ", "lesion"]
    for label in checkpoint.foreground_labels:
        assert label.color == pytest.approx(COLORS[label.name])


@needs_trainer
def test_train_waits_for_the_trainer_and_returns_a_checkpoint_with_the_segment_names(slicer_scene, logic, tmp_path):
    pairs = [_pair(slicer_scene, logic, seed=seed)[:2] for seed in (7, 8)]
    events = []
    best = logic.train(pairs, tmp_path / "run", progress=events.append, **TINY_TRAINING)
    assert best == tmp_path / "run" / "best.pt" and best.is_file()
    _check_checkpoint(best)
    kinds = [event["event"] for event in events]
    assert kinds.count("epoch") == 2 and kinds[-1] == "done"
    tables = slicer.util.getNodesByClass("vtkMRMLTableNode")
    assert len(tables) == 1 and tables[0].GetNumberOfRows() == 2
    # the model segments in the scene at once
    segmentation = logic.segment(pairs[0][0], best, device="cpu")
    assert logic.segmentNames(segmentation) == ["organ", "lesion"]


@needs_trainer
def test_train_in_background_streams_epochs_into_the_table(slicer_scene, logic, tmp_path):
    pairs = [_pair(slicer_scene, logic, seed=seed)[:2] for seed in (7, 8)]
    events, finished, errors = [], [], []
    process = logic.trainInBackground(pairs, tmp_path / "run", onProgress=events.append, onFinished=finished.append,
                                      onError=errors.append, **TINY_TRAINING)
    assert process.tableNode.GetNumberOfRows() == 0 and process.chartNode is not None
    assert process.wait(timeout=300), errors
    assert errors == [] and finished == [tmp_path / "run" / "best.pt"]
    kinds = [event["event"] for event in events]
    assert "iteration" in kinds and kinds.count("epoch") == 2 and kinds[-1] == "done"
    table = process.tableNode
    assert table.GetNumberOfRows() == 2
    dice = slicer.util.arrayFromTableColumn(table, "Dice organ")
    assert not math.isnan(dice[-1]), "the last epoch validates"
    _check_checkpoint(finished[0])


@needs_trainer
def test_stopping_background_training_keeps_a_loadable_last_checkpoint(slicer_scene, logic, tmp_path):
    pairs = [_pair(slicer_scene, logic, seed=seed)[:2] for seed in (7, 8)]
    finished, errors = [], []
    options = dict(TINY_TRAINING, epochs=50)
    process = None

    def stopOnceStarted(event):
        if event["event"] in ("preparing", "iteration"):
            process.cancel()

    process = logic.trainInBackground(pairs, tmp_path / "run", onProgress=stopOnceStarted,
                                      onFinished=finished.append, onError=errors.append, **options)
    assert not process.wait(timeout=300)
    assert process.cancelled and finished == [] and errors == []
    assert load_checkpoint(tmp_path / "run" / "last.pt").foreground_labels
