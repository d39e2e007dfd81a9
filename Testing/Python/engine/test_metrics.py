"""Metrics and the evaluate command: Dice, IoU, HD95 and ASD in millimetres, per class, per case."""

from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np
import pytest

from UNet3DSegmenterLib.atomic import write_json
from UNet3DSegmenterLib.commands import evaluate as evaluate_command
from UNet3DSegmenterLib.errors import UserError
from UNet3DSegmenterLib.evaluation import evaluate, format_table
from UNet3DSegmenterLib.io import read_volume, write_dicom_series, write_volume
from UNet3DSegmenterLib.metrics import dice, iou, segmentation_metrics, surface_distances, voxel_accuracy
from UNet3DSegmenterLib.volume import Volume


def box(shape, start, size) -> np.ndarray:
    """A boolean array with a solid box of ``size`` voxels at ``start`` (both in z, y, x order)."""
    mask = np.zeros(shape, bool)
    mask[tuple(slice(s, s + n) for s, n in zip(start, size))] = True
    return mask


def ellipsoid(shape, centre_mm, radius_mm, spacing_zyx) -> np.ndarray:
    """A ball of ``radius_mm`` around ``centre_mm``: an ellipsoid in voxels when spacing is anisotropic."""
    grid = np.indices(shape, dtype=float) * np.asarray(spacing_zyx, float)[:, None, None, None]
    centre = np.asarray(centre_mm, float)[:, None, None, None]
    return ((grid - centre) ** 2).sum(axis=0) <= radius_mm**2


def brute_force_surface_distances(first, second, spacing_zyx) -> tuple[float, float]:
    """HD95 and ASD from every pair of surface voxels, with no distance transform and no cropping."""

    def is_surface(mask, index):
        for axis in range(3):
            for step in (-1, 1):
                neighbour = list(index)
                neighbour[axis] += step
                if not 0 <= neighbour[axis] < mask.shape[axis] or not mask[tuple(neighbour)]:
                    return True
        return False

    def surface_points(mask):
        scale = np.asarray(spacing_zyx, float)
        return np.array([index * scale for index in np.argwhere(mask) if is_surface(mask, index)])

    a, b = surface_points(first), surface_points(second)
    pairwise = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=-1))
    a_to_b, b_to_a = pairwise.min(axis=1), pairwise.min(axis=0)
    hd95 = max(np.percentile(a_to_b, 95), np.percentile(b_to_a, 95))
    return float(hd95), float(np.concatenate([a_to_b, b_to_a]).mean())


def label_volume(array, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> Volume:
    return Volume(np.asarray(array, np.uint8), spacing=spacing, origin=origin)


# Dice and IoU


def test_dice_of_identical_masks_is_one():
    mask = box((8, 8, 8), (2, 2, 2), (3, 4, 5))
    assert dice(mask, mask) == 1.0
    assert iou(mask, mask) == 1.0


def test_dice_and_iou_of_half_overlapping_cubes_match_a_hand_count():
    # Two 4x4x4 cubes (64 voxels each), one shifted 2 voxels along x: they share 4*4*2 = 32 voxels.
    first = box((10, 10, 10), (2, 2, 2), (4, 4, 4))
    second = box((10, 10, 10), (2, 2, 4), (4, 4, 4))
    assert dice(first, second) == pytest.approx(2 * 32 / (64 + 64))
    assert iou(first, second) == pytest.approx(32 / (64 + 64 - 32))


def test_dice_of_a_mask_inside_another_counts_the_small_one_twice():
    outer = box((10, 10, 10), (1, 1, 1), (4, 4, 4))  # 64 voxels
    inner = box((10, 10, 10), (2, 2, 2), (2, 2, 2))  # 8 voxels, all inside
    assert dice(inner, outer) == pytest.approx(2 * 8 / 72)
    assert iou(inner, outer) == pytest.approx(8 / 64)


def test_dice_and_iou_of_disjoint_masks_are_zero():
    first = box((6, 6, 6), (0, 0, 0), (2, 2, 2))
    second = box((6, 6, 6), (4, 4, 4), (2, 2, 2))
    assert dice(first, second) == 0.0
    assert iou(first, second) == 0.0


def test_dice_and_iou_of_two_empty_masks_are_one():
    empty = np.zeros((4, 4, 4), bool)
    assert dice(empty, empty) == 1.0
    assert iou(empty, empty) == 1.0


def test_dice_and_iou_are_zero_when_only_one_mask_is_empty():
    mask = box((4, 4, 4), (1, 1, 1), (2, 2, 2))
    empty = np.zeros_like(mask)
    assert dice(mask, empty) == dice(empty, mask) == 0.0
    assert iou(mask, empty) == iou(empty, mask) == 0.0


def test_dice_refuses_masks_of_different_shapes():
    with pytest.raises(ValueError, match="shape"):
        dice(np.ones((2, 3, 4), bool), np.ones((2, 3, 5), bool))


# Surface distances


def test_surface_distances_of_identical_masks_are_zero():
    mask = ellipsoid((12, 12, 12), (6, 6, 6), 4, (1, 1, 1))
    assert surface_distances(mask, mask, (1.0, 1.0, 1.0)) == (0.0, 0.0)


@pytest.mark.parametrize(
    "axis, spacing_zyx, expected_mm",
    [(0, (3.0, 1.0, 1.0), 9.0), (1, (1.0, 0.7, 1.0), 2.1), (2, (1.0, 1.0, 0.5), 1.5)],
)
def test_parallel_planes_three_voxels_apart_are_three_spacings_apart(axis, spacing_zyx, expected_mm):
    # Every voxel of a one-voxel-thick plane is surface, and each one's nearest neighbour on the
    # other plane lies straight across: every distance, hence HD95 and ASD, is 3 voxel spacings.
    first, second = np.zeros((8, 8, 8), bool), np.zeros((8, 8, 8), bool)
    np.moveaxis(first, axis, 0)[2] = True
    np.moveaxis(second, axis, 0)[5] = True
    hd95, asd = surface_distances(first, second, spacing_zyx)
    assert hd95 == pytest.approx(expected_mm, abs=1e-5)
    assert asd == pytest.approx(expected_mm, abs=1e-5)


def test_spheres_offset_along_the_thick_axis_match_a_brute_force_count_in_mm():
    spacing = (2.5, 0.9, 1.2)
    shape = (14, 26, 22)
    first = ellipsoid(shape, (15.0, 11.0, 12.0), 8.0, spacing)
    second = ellipsoid(shape, (15.0 + 2 * 2.5, 11.0, 12.0), 8.0, spacing)  # two slices further
    hd95, asd = surface_distances(first, second, spacing)
    expected_hd95, expected_asd = brute_force_surface_distances(first, second, spacing)
    assert hd95 == pytest.approx(expected_hd95, abs=1e-4)
    assert asd == pytest.approx(expected_asd, abs=1e-4)
    # A two-slice shift can put no surface point further than 5 mm from the other surface.
    assert 0 < hd95 <= 5.0 + 1e-5


def test_cubes_offset_diagonally_match_a_brute_force_count_in_mm():
    spacing = (2.0, 0.5, 1.5)
    first = box((10, 16, 12), (2, 3, 2), (5, 7, 6))
    second = box((10, 16, 12), (3, 5, 3), (4, 8, 6))
    assert surface_distances(first, second, spacing) == pytest.approx(
        brute_force_surface_distances(first, second, spacing), abs=1e-4
    )


def test_masks_touching_the_array_border_count_the_border_as_surface():
    spacing = (1.0, 2.0, 0.8)
    first = box((6, 7, 8), (0, 0, 0), (4, 7, 5))
    second = box((6, 7, 8), (1, 2, 0), (5, 5, 8))
    assert surface_distances(first, second, spacing) == pytest.approx(
        brute_force_surface_distances(first, second, spacing), abs=1e-4
    )


def test_surface_distances_are_symmetric():
    spacing = (2.0, 1.0, 0.7)
    first = ellipsoid((12, 20, 20), (10, 9, 7), 6, spacing)
    second = box((12, 20, 20), (3, 4, 4), (5, 9, 12))
    assert surface_distances(first, second, spacing) == pytest.approx(surface_distances(second, first, spacing))


def test_surface_distances_of_two_empty_masks_are_zero():
    empty = np.zeros((5, 5, 5), bool)
    assert surface_distances(empty, empty, (1.0, 1.0, 1.0)) == (0.0, 0.0)


def test_surface_distances_are_infinite_when_only_one_mask_is_empty():
    mask = box((5, 5, 5), (1, 1, 1), (2, 2, 2))
    empty = np.zeros_like(mask)
    assert surface_distances(mask, empty, (1.0, 1.0, 1.0)) == (math.inf, math.inf)
    assert surface_distances(empty, mask, (1.0, 1.0, 1.0)) == (math.inf, math.inf)


# Per-class metrics on volumes


def test_segmentation_metrics_scores_every_label_found_in_either_volume():
    reference = np.zeros((8, 8, 8), np.uint8)
    reference[1:4, 1:4, 1:4] = 1
    reference[5:7, 5:7, 5:7] = 3
    prediction = reference.copy()
    prediction[prediction == 3] = 0
    prediction[0, 0, 7] = 2
    scores = segmentation_metrics(label_volume(prediction), label_volume(reference))
    assert list(scores) == [1, 2, 3]
    assert scores[1] == {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "asd": 0.0}
    assert scores[2]["dice"] == 0.0 and scores[2]["hd95"] == math.inf  # predicted, not in the reference
    assert scores[3]["dice"] == 0.0 and scores[3]["asd"] == math.inf  # in the reference, missed


def test_segmentation_metrics_scores_only_the_requested_labels_and_absent_ones_as_correct():
    reference = label_volume(box((6, 6, 6), (1, 1, 1), (3, 3, 3)))
    scores = segmentation_metrics(reference, reference, labels=[1, 4])
    assert list(scores) == [1, 4]
    assert scores[4] == {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "asd": 0.0}


def test_segmentation_metrics_measures_distances_with_the_volume_spacing_in_x_y_z_order():
    first, second = np.zeros((8, 8, 8), np.uint8), np.zeros((8, 8, 8), np.uint8)
    first[2], second[5] = 1, 1  # planes three slices apart along z
    spacing = (0.5, 0.7, 3.0)  # (x, y, z): slices are 3 mm apart
    scores = segmentation_metrics(label_volume(first, spacing), label_volume(second, spacing))
    assert scores[1]["hd95"] == pytest.approx(9.0, abs=1e-5)
    assert scores[1]["asd"] == pytest.approx(9.0, abs=1e-5)


def test_segmentation_metrics_refuses_different_shapes_and_describes_both():
    prediction = label_volume(np.ones((4, 5, 6)))
    reference = label_volume(np.ones((4, 5, 7)))
    with pytest.raises(UserError, match=r"different voxel grids") as error:
        segmentation_metrics(prediction, reference, prediction_name="pred.nii.gz", reference_name="ref.nii.gz")
    message = str(error.value)
    assert "pred.nii.gz" in message and "ref.nii.gz" in message
    assert "(4, 5, 6)" in message and "(4, 5, 7)" in message


def test_segmentation_metrics_refuses_the_same_shape_placed_elsewhere():
    prediction = label_volume(np.ones((4, 4, 4)), origin=(0.0, 0.0, 0.0))
    reference = label_volume(np.ones((4, 4, 4)), origin=(0.0, 0.0, 5.0))
    with pytest.raises(UserError, match=r"origin \(0, 0, 5\)"):
        segmentation_metrics(prediction, reference)


def test_segmentation_metrics_refuses_a_probability_map():
    probabilities = Volume(np.full((4, 4, 4), 0.3, np.float32))
    with pytest.raises(UserError, match="non-integer"):
        segmentation_metrics(probabilities, label_volume(np.ones((4, 4, 4))))


def test_segmentation_metrics_accepts_integral_float_labels():
    labels = np.zeros((6, 6, 6), np.float32)
    labels[1:4, 1:4, 1:4] = 2.0
    scores = segmentation_metrics(Volume(labels), label_volume(labels))
    assert scores == {2: {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "asd": 0.0}}


def test_metrics_are_plain_python_floats():
    mask = box((6, 6, 6), (1, 1, 1), (3, 3, 3))
    shifted = box((6, 6, 6), (2, 1, 1), (3, 3, 3))
    scores = segmentation_metrics(label_volume(mask), label_volume(shifted))[1]
    assert all(type(value) is float for value in scores.values())


# evaluate: files and folders


@pytest.fixture
def case_folders(tmp_path):
    """A reference folder of two cases and a prediction folder (other file format) with one voxel layer off."""
    references, predictions = tmp_path / "references", tmp_path / "predictions"
    spacing = (1.0, 1.0, 2.0)
    for name, start in (("case_a", 2), ("case_b", 3)):
        reference = np.zeros((10, 10, 10), np.uint8)
        reference[start:start + 4, 2:6, 2:6] = 1  # a 4x4x4 cube
        prediction = reference.copy()
        prediction[start] = 0  # drop one 4x4 layer: Dice 2*48/(48+64) = 6/7
        write_volume(label_volume(reference, spacing), references / f"{name}.nii.gz")
        write_volume(label_volume(prediction, spacing), predictions / f"{name}.nrrd")
    return predictions, references


def test_evaluate_matches_folder_cases_by_name_across_file_formats(case_folders):
    predictions, references = case_folders
    result = evaluate(predictions, references)
    assert list(result["cases"]) == ["case_a", "case_b"]
    assert result["cases"]["case_a"][1]["dice"] == pytest.approx(6 / 7)
    assert result["mean"][1]["dice"] == pytest.approx(6 / 7)
    assert result["mean_foreground_dice"] == pytest.approx(6 / 7)
    assert result["ignored_predictions"] == []


def test_evaluate_reports_voxel_accuracy_and_mean_iou_per_case_and_over_cases(case_folders):
    predictions, references = case_folders
    result = evaluate(predictions, references)
    # each case: 16 of its 1000 voxels wrong; IoU 48/64 of the one foreground class
    assert result["accuracy"] == {"case_a": pytest.approx(0.984), "case_b": pytest.approx(0.984)}
    assert result["mean_accuracy"] == pytest.approx(0.984)
    assert result["mean_foreground_iou"] == pytest.approx(0.75)


def test_voxel_accuracy_counts_every_voxel_background_included():
    reference = np.zeros((4, 5, 5), np.uint8)
    reference[0] = 1
    prediction = reference.copy()
    prediction[0, 0, :2] = 2  # 2 wrong of 100
    prediction[3, 4, 4] = 1  # and one background voxel called 1
    assert voxel_accuracy(prediction, reference) == pytest.approx(0.97)
    with pytest.raises(ValueError, match="differ in shape"):
        voxel_accuracy(prediction, reference[1:])


def test_evaluate_scores_a_single_pair_of_files(case_folders):
    predictions, references = case_folders
    result = evaluate(predictions / "case_b.nrrd", references / "case_b.nii.gz")
    assert list(result["cases"]) == ["case_b"]
    assert result["cases"]["case_b"][1]["iou"] == pytest.approx(48 / 64)


def test_evaluate_refuses_a_prediction_folder_missing_reference_cases(case_folders):
    predictions, references = case_folders
    (predictions / "case_b.nrrd").unlink()
    with pytest.raises(UserError, match=r"no prediction for 1 of the 2 cases .*case_b"):
        evaluate(predictions, references)


def test_evaluate_ignores_predictions_without_a_reference_and_lists_them(case_folders):
    predictions, references = case_folders
    write_volume(label_volume(np.zeros((10, 10, 10))), predictions / "case_extra.nii.gz")
    result = evaluate(predictions, references)
    assert list(result["cases"]) == ["case_a", "case_b"]
    assert result["ignored_predictions"] == ["case_extra"]
    assert "case_extra" in format_table(result)


def test_evaluate_refuses_a_file_compared_with_a_folder(case_folders):
    predictions, references = case_folders
    with pytest.raises(UserError, match="two files or two folders"):
        evaluate(predictions / "case_a.nrrd", references)


def test_evaluate_reads_dicom_series_as_single_volumes_and_as_cases(tmp_path):
    reference = np.zeros((6, 8, 8), np.uint8)
    reference[1:5, 2:6, 2:6] = 1
    write_dicom_series(label_volume(reference), tmp_path / "references" / "case_a")
    write_volume(label_volume(reference), tmp_path / "predictions" / "case_a.nii.gz")
    single = evaluate(tmp_path / "predictions" / "case_a.nii.gz", tmp_path / "references" / "case_a")
    assert single["cases"]["case_a"][1]["dice"] == 1.0
    assert list(evaluate(tmp_path / "predictions", tmp_path / "references")["cases"]) == ["case_a"]


def test_evaluate_refuses_a_missing_path(tmp_path, case_folders):
    _, references = case_folders
    with pytest.raises(UserError, match="not found"):
        evaluate(tmp_path / "nowhere", references)


def test_evaluate_names_both_files_of_a_misaligned_pair(tmp_path):
    write_volume(label_volume(np.ones((4, 4, 4)), spacing=(1.0, 1.0, 1.0)), tmp_path / "prediction.nii.gz")
    write_volume(label_volume(np.ones((4, 4, 4)), spacing=(1.0, 1.0, 3.0)), tmp_path / "reference.nii.gz")
    with pytest.raises(UserError, match=r"prediction\.nii\.gz and .*reference\.nii\.gz are on different voxel grids"):
        evaluate(tmp_path / "prediction.nii.gz", tmp_path / "reference.nii.gz")


def test_evaluate_gives_a_class_absent_from_both_sides_of_a_case_full_marks(tmp_path):
    # Label 2 appears in case_a only; case_b, where neither side has it, scores it as correct,
    # so both cases report the same labels and the means run over the same set.
    references, predictions = tmp_path / "references", tmp_path / "predictions"
    with_two = np.zeros((6, 6, 6), np.uint8)
    with_two[1:3, 1:3, 1:3], with_two[4:6, 4:6, 4:6] = 1, 2
    without_two = np.where(with_two == 2, 0, with_two)
    for name, labels in (("case_a", with_two), ("case_b", without_two)):
        write_volume(label_volume(labels), references / f"{name}.nii.gz")
        write_volume(label_volume(labels), predictions / f"{name}.nii.gz")
    result = evaluate(predictions, references)
    assert result["cases"]["case_b"][2] == {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "asd": 0.0}
    assert result["mean"][2]["dice"] == 1.0


def test_format_table_shows_each_case_and_label_the_mean_and_infinite_distances(tmp_path):
    reference = np.zeros((6, 6, 6), np.uint8)
    reference[1:3, 1:3, 1:3], reference[4:6, 4:6, 4:6] = 1, 2
    prediction = np.where(reference == 2, 0, reference)  # label 2 missed entirely
    write_volume(label_volume(prediction), tmp_path / "prediction.nii.gz")
    write_volume(label_volume(reference), tmp_path / "knee_01.nii.gz")
    table = format_table(evaluate(tmp_path / "prediction.nii.gz", tmp_path / "knee_01.nii.gz"))
    rows = table.splitlines()
    assert rows[0].split() == ["case", "label", "dice", "iou", "hd95", "mm", "asd", "mm", "accuracy"]
    # 8 of the 216 voxels (label 2) are wrong; the case's accuracy is shown once, on its first row
    assert rows[2].split() == ["knee_01", "1", "1.0000", "1.0000", "0.00", "0.00", "0.9630"]
    assert rows[3].split() == ["knee_01", "2", "0.0000", "0.0000", "inf", "inf"]
    assert rows[4].split() == ["mean", "1", "1.0000", "1.0000", "0.00", "0.00", "0.9630"]
    assert rows[-3:] == ["mean foreground Dice: 0.5000", "mean foreground IoU:  0.5000",
                         "mean voxel accuracy:  0.9630 (all voxels, background included)"]


# JSON output and the command line


def test_json_output_is_valid_json_with_null_for_infinite_distances(tmp_path):
    result = {"cases": {"case": {1: {"dice": 0.0, "iou": 0.0, "hd95": math.inf, "asd": math.inf}}},
              "mean": {1: {"dice": 0.0, "iou": 0.0, "hd95": math.inf, "asd": math.inf}},
              "mean_foreground_dice": 0.0, "ignored_predictions": []}
    path = write_json(result, tmp_path / "metrics.json")

    def refuse(constant):
        raise AssertionError(f"{constant} is not valid JSON")

    loaded = json.loads(path.read_text(), parse_constant=refuse)
    assert loaded["cases"]["case"]["1"] == {"dice": 0.0, "iou": 0.0, "hd95": None, "asd": None}


def test_json_output_is_atomic_and_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    path.write_text('{"old": true}')

    def failing_replace(source, destination):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(UserError, match="cannot write .*metrics.json"):
        write_json({"mean_foreground_dice": 1.0}, path)
    assert json.loads(path.read_text()) == {"old": True}
    assert sorted(os.listdir(tmp_path)) == ["metrics.json"]  # no partial file left behind


def test_json_output_refuses_a_folder_as_the_file(tmp_path):
    with pytest.raises(UserError, match="is a folder"):
        write_json({}, tmp_path)


def test_run_prints_the_table_writes_json_and_returns_zero(case_folders, tmp_path, capsys):
    predictions, references = case_folders
    parser = argparse.ArgumentParser()
    evaluate_command.add_arguments(parser)
    output = tmp_path / "out" / "metrics.json"
    args = parser.parse_args(["--prediction", str(predictions), "--reference", str(references),
                              "--json", str(output)])
    assert evaluate_command.run(args) == 0
    assert "mean foreground Dice: 0.8571" in capsys.readouterr().out
    written = json.loads(output.read_text())
    assert written["mean_foreground_dice"] == pytest.approx(6 / 7)
    assert sorted(os.listdir(output.parent)) == ["metrics.json"]


def test_command_line_requires_both_prediction_and_reference():
    parser = argparse.ArgumentParser()
    evaluate_command.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--prediction", "p.nii.gz"])


# Real data


def test_real_hippocampus_label_compared_with_itself_has_dice_one_and_hd95_zero(shared_dataset):
    label = shared_dataset("msd_hippocampus") / "labels" / "hippocampus_001.nii.gz"
    result = evaluate(label, label)
    assert list(result["cases"]["hippocampus_001"]) == [1, 2]  # anterior and posterior hippocampus
    for scores in result["cases"]["hippocampus_001"].values():
        assert scores == {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "asd": 0.0}


def test_real_hippocampus_label_shifted_one_slice_matches_a_brute_force_count(shared_dataset):
    reference = read_volume(shared_dataset("msd_hippocampus") / "labels" / "hippocampus_001.nii.gz")
    labels = reference.array.astype(np.uint8)
    shifted = np.zeros_like(labels)
    shifted[1:] = labels[:-1]
    scores = segmentation_metrics(reference.with_array(shifted), reference.with_array(labels))
    expected = brute_force_surface_distances(shifted == 1, labels == 1, reference.spacing_zyx)
    assert (scores[1]["hd95"], scores[1]["asd"]) == pytest.approx(expected, abs=1e-4)
    assert 0.5 < scores[1]["dice"] < 1.0
