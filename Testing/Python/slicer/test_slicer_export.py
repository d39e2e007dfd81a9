"""Training data from the scene (UNet3DSegmenterLib.slicer.export): checked voxel by voxel, read back by the engine."""

from __future__ import annotations

import json

import nibabel
import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")

from slicer_harness import SEGMENT_COLORS, phantom_pair, scene_state  # noqa: E402

from UNet3DSegmenterLib import Label, read_volume  # noqa: E402
from UNet3DSegmenterLib.datalist import load_case, load_datalist  # noqa: E402
from UNet3DSegmenterLib.slicer import export, selftest  # noqa: E402

# --- export -------------------------------------------------------------------------------------


def test_training_pairs_are_exported_voxel_by_voxel_with_one_label_order(slicer_scene, logic, tmp_path):
    first = phantom_pair(logic, seed=5)  # organ=1, lesion=2
    # Second pair: its segments in another order, one name the first lacks, organ missing, axis-aligned grid.
    second = phantom_pair(logic, seed=6, classes=3, names={3: "vessel", 2: "lesion", 1: "kidney"},
                   direction=np.eye(3))
    before = scene_state(slicer_scene.scene)

    folder = logic.exportTrainingPairs([first[:2], second[:2]], tmp_path / "data")

    assert scene_state(slicer_scene.scene) == before
    dataset = json.loads((folder / "dataset.json").read_text())
    assert dataset["labels"] == {"0": "background", "1": "organ", "2": "lesion", "3": "vessel", "4": "kidney"}
    assert dataset["label_colors"]["1"] == pytest.approx(SEGMENT_COLORS["organ"])
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
    volume, segmentation, truth = phantom_pair(logic, seed=5)
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
    volume, segmentation, _ = phantom_pair(logic, seed=5)
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
    before = scene_state(scene)
    with pytest.raises(ValueError) as raised:
        logic.exportTrainingPairs(pairs, tmp_path / "data")
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "data").exists()
    assert scene_state(scene) == before
    with pytest.raises(ValueError):
        logic.trainInBackground(pairs, tmp_path / "run")
    assert not (tmp_path / "run").exists() and scene_state(scene) == before


def test_the_exported_dataset_reads_back_with_its_names_and_colours(slicer_scene, logic, tmp_path):
    pairs = [phantom_pair(logic, seed=seed)[:2] for seed in (5, 6)]
    folder = logic.exportTrainingPairs(pairs, tmp_path / "data")
    datalist = load_datalist(folder)
    assert datalist.label_names == {0: "background", 1: "organ", 2: "lesion"}
    assert datalist.label_colors[1] == pytest.approx(SEGMENT_COLORS["organ"])
    image, labels = load_case(datalist.cases[0], datalist.label_names)
    assert image.same_grid(labels)
    assert not (tmp_path / "data.partial").exists()


def test_exporting_again_replaces_the_previous_dataset(slicer_scene, logic, tmp_path):
    first = [phantom_pair(logic, seed=seed)[:2] for seed in (5, 6)]
    logic.exportTrainingPairs(first, tmp_path / "data")
    logic.exportTrainingPairs(first[:1], tmp_path / "data")
    assert len(load_datalist(tmp_path / "data").cases) == 1
    assert len(list((tmp_path / "data" / "images").iterdir())) == 1


def test_fine_tuning_labels_keep_the_models_values_and_new_names_follow(slicer_scene, logic, tmp_path):
    model = [Label(0, "background", (0, 0, 0)), Label(1, "lesion", (1, 0, 0)), Label(3, "organ", (0, 1, 0))]
    pair = phantom_pair(logic, seed=5, classes=3, names={1: "organ", 2: "vessel", 3: "lesion"})
    labels = export.trainingLabels([pair[:2]], model)
    assert [(label.value, label.name) for label in labels] == [(1, "lesion"), (3, "organ"), (4, "vessel")]
    assert labels[1].color == pytest.approx(SEGMENT_COLORS["organ"]), "the segment's colour wins"
    folder = export.exportTrainingPairs([pair[:2]], tmp_path / "data", labels)
    exported = read_volume(folder / json.loads((folder / "dataset.json").read_text())["training"][0]["label"]).array
    truth = pair[2].array
    expected = np.select([truth == 1, truth == 2, truth == 3], [3, 4, 1], 0)
    np.testing.assert_array_equal(exported, expected)


def test_segmented_pairs_are_the_modules_results_whose_input_is_still_there(slicer_scene, logic, checkpoint_path):
    first, _ = selftest.addPhantom(seed=5, name="first")
    second, _ = selftest.addPhantom(seed=6, name="second")
    results = [logic.segment(volume, checkpoint_path, device="cpu") for volume in (first, second)]
    phantom_pair(logic, seed=7)  # drawn by hand: not the module's result
    assert logic.segmentedPairs() == [(first, results[0]), (second, results[1])]
    slicer_scene.scene.RemoveNode(second)
    assert logic.segmentedPairs() == [(first, results[0])]


def test_export_never_replaces_a_folder_it_did_not_write(slicer_scene, logic, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="did not export"):
        logic.exportTrainingPairs([phantom_pair(logic, seed=5)[:2]], tmp_path / "data")
    assert (tmp_path / "data" / "notes.txt").read_text() == "mine"


def test_node_names_never_place_files_outside_the_export(slicer_scene, logic, tmp_path):
    volumeNode, segmentationNode, _ = phantom_pair(logic, seed=5)
    volumeNode.SetName("../../escaped")
    folder = logic.exportTrainingPairs([(volumeNode, segmentationNode)], tmp_path / "export" / "data")
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert written and all(path.is_relative_to(folder) for path in written), written
    assert [path.name for path in (folder / "images").iterdir()] == ["case_000_escaped.nii.gz"]
