"""Sparse annotation from the scene: a segmentation painted on some slices trains on those slices only."""

from __future__ import annotations

import json

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")

from slicer_harness import phantom_pair, scene_state  # noqa: E402

from UNet3DSegmenterLib import Label, load_checkpoint, read_volume  # noqa: E402

TINY_TRAINING = dict(epochs=1, patchSize=(16, 24, 24), batchSize=1, device="cpu", depth=2, base_width=4,
                     iterations_per_epoch=2, val_fraction=0.5, augment=False, workers=0, seed=0)


def painted_on_every_third_slice(logic, seed: int):
    """A phantom pair whose segmentation holds the true labels on every third slice (k) only."""
    volume, segmentation, truth = phantom_pair(logic, seed=seed)
    painted = np.zeros_like(truth.array)
    painted[::3] = truth.array[::3]
    logic.updateSegmentationFromLabelmap(segmentation, truth.with_array(painted),
                                         [Label(1, "organ"), Label(2, "lesion")], volume)
    return volume, segmentation, painted


def test_unpainted_slices_of_a_marked_segmentation_are_exported_as_ignore(slicer_scene, logic, tmp_path):
    volume, segmentation, painted = painted_on_every_third_slice(logic, seed=5)
    dense = phantom_pair(logic, seed=6)
    logic.markSparselyAnnotated(segmentation)
    before = scene_state(slicer_scene.scene)

    folder = logic.exportTrainingPairs([(volume, segmentation), dense[:2]], tmp_path / "data")

    assert scene_state(slicer_scene.scene) == before
    dataset = json.loads((folder / "dataset.json").read_text())
    assert dataset["labels"] == {"0": "background", "1": "organ", "2": "lesion", "3": "ignore"}
    sparse, whole = (read_volume(folder / entry["label"]).array for entry in dataset["training"])
    annotated = painted.reshape(len(painted), -1).any(axis=1)
    assert 1 < annotated.sum() < len(painted) / 2
    np.testing.assert_array_equal(sparse[annotated], painted[annotated])  # background of painted slices kept
    assert (sparse[~annotated] == 3).all()
    np.testing.assert_array_equal(whole, dense[2].array)  # an unmarked pair is exported as painted


def test_the_slices_of_a_segmentation_painted_across_another_axis_are_found(slicer_scene, logic, tmp_path):
    volume, segmentation, truth = phantom_pair(logic, seed=5)
    painted = np.zeros_like(truth.array)
    painted[:, :, ::4] = truth.array[:, :, ::4]  # painted on sagittal-like slices (i)
    logic.updateSegmentationFromLabelmap(segmentation, truth.with_array(painted),
                                         [Label(1, "organ"), Label(2, "lesion")], volume)
    logic.markSparselyAnnotated(segmentation)
    folder = logic.exportTrainingPairs([(volume, segmentation)], tmp_path / "data")
    exported = read_volume(folder / "labels" / next(path.name for path in (folder / "labels").iterdir())).array
    annotated = painted.any(axis=(0, 1))
    assert (exported[:, :, ~annotated] == 3).all()
    np.testing.assert_array_equal(exported[:, :, annotated], painted[:, :, annotated])


@pytest.mark.slow
def test_logic_train_on_a_marked_pair_learns_its_slices_and_records_the_ignore_label(slicer_scene, logic,
                                                                                     tmp_path):
    pairs = [painted_on_every_third_slice(logic, seed)[:2] for seed in (5, 6)]
    for _, segmentation in pairs:
        logic.markSparselyAnnotated(segmentation)
    events: list[dict] = []
    best = logic.train(pairs, tmp_path / "run", progress=events.append, **TINY_TRAINING)
    checkpoint = load_checkpoint(best)
    assert [label.name for label in checkpoint.labels] == ["background", "organ", "lesion"]
    assert checkpoint.ignore_value == 3
    assert any(event.get("scored_on") == "annotated voxels only" for event in events if event["event"] == "epoch")
    segmented = logic.segment(pairs[0][0], best, device="cpu")
    assert "ignore" not in logic.segmentNames(segmented)
