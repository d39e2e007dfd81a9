"""Datalists and splits: the three layouts, refused inputs, and splits by case."""

from __future__ import annotations

import json

import numpy as np
import pytest

from UNet3DSegmenterLib.datalist import load_case, load_datalist
from UNet3DSegmenterLib.errors import UserError
from UNet3DSegmenterLib.io import write_dicom_series, write_volume
from UNet3DSegmenterLib.training.splits import make_split, read_split, write_split
from UNet3DSegmenterLib.volume import Volume


def write_case(folder, name, labels=None, image_spacing=(1.0, 1.0, 1.0), label_spacing=(1.0, 1.0, 1.0),
               image_dir="images", label_dir="labels"):
    """A small image/labelmap pair: a labelled box in a noisy image."""
    image = np.random.default_rng(0).normal(100, 10, (8, 10, 12)).astype(np.float32)
    if labels is None:
        labels = np.zeros((8, 10, 12), np.uint8)
        labels[2:5, 3:6, 4:8] = 1
    write_volume(Volume(image, image_spacing), folder / image_dir / f"{name}.nii.gz")
    write_volume(Volume(labels, label_spacing), folder / label_dir / f"{name}.nii.gz")


def test_folder_pair_matches_images_and_labels_by_name(tmp_path):
    for name in ("b", "a", "c"):
        write_case(tmp_path, name)
    datalist = load_datalist(tmp_path)
    assert [case.name for case in datalist.cases] == ["a", "b", "c"]
    assert all(case.image.parent.name == "images" and case.label.parent.name == "labels" for case in datalist.cases)
    assert datalist.label_names is None and datalist.modality is None


def test_decathlon_folder_reads_cases_labels_and_modality(tmp_path):
    for name in ("liver_1", "liver_2"):
        write_case(tmp_path, name, image_dir="imagesTr", label_dir="labelsTr")
    (tmp_path / "dataset.json").write_text(json.dumps({
        "modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver"},
        "training": [{"image": f"./imagesTr/liver_{i}.nii.gz", "label": f"./labelsTr/liver_{i}.nii.gz"}
                     for i in (1, 2)]}))
    datalist = load_datalist(tmp_path)
    assert [case.name for case in datalist.cases] == ["liver_1", "liver_2"]
    assert datalist.label_names == {0: "background", 1: "liver"}
    assert datalist.modality == "CT"


def test_json_list_resolves_paths_relative_to_the_file(tmp_path):
    write_case(tmp_path / "data", "one")
    listing = tmp_path / "lists" / "train.json"
    listing.parent.mkdir()
    listing.write_text(json.dumps([{"image": "../data/images/one.nii.gz", "label": "../data/labels/one.nii.gz"}]))
    datalist = load_datalist(listing)
    assert [case.name for case in datalist.cases] == ["one"]
    assert datalist.cases[0].image.resolve() == (tmp_path / "data" / "images" / "one.nii.gz").resolve()


def case_volumes(seed: int = 0) -> tuple[Volume, Volume]:
    """A small oblique, anisotropic CT-like image (int16) and its labelmap (values 0, 1, 2)."""
    image = np.random.default_rng(seed).normal(0, 100, (6, 10, 12)).astype(np.int16)
    direction = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    volume = Volume(image, (0.8, 0.9, 2.5), (10.0, -20.0, 30.0), direction)
    return volume, volume.with_array(np.digitize(image, [-50, 50]).astype(np.uint8))


def test_folder_pair_of_dicom_series_folders(tmp_path):
    for name, seed in (("ct_1", 0), ("ct_2", 1)):
        image, labels = case_volumes(seed)
        write_dicom_series(image, tmp_path / "images" / name, modality="CT")
        if name == "ct_1":
            write_dicom_series(labels, tmp_path / "labels" / name)
        else:  # a series image with a labelmap file, as Slicer saves segmentations
            write_volume(labels, tmp_path / "labels" / f"{name}.seg.nrrd")
    (tmp_path / "images" / "notes").mkdir()  # not a series, not a case
    datalist = load_datalist(tmp_path)
    assert [case.name for case in datalist.cases] == ["ct_1", "ct_2"]
    for case, seed in zip(datalist.cases, (0, 1)):
        image, labels = load_case(case, {0: "background", 1: "soft", 2: "dense"})
        expected_image, expected_labels = case_volumes(seed)
        assert image.same_grid(expected_image, tolerance=1e-4) and labels.same_grid(image)
        np.testing.assert_array_equal(image.array, expected_image.array)
        np.testing.assert_array_equal(labels.array, expected_labels.array)
        assert labels.array.dtype == np.uint8


def test_json_list_of_dicom_series_folders_named_by_entry(tmp_path):
    entries = []
    for patient, seed in (("patient_1", 0), ("patient_2", 1)):
        image, labels = case_volumes(seed)
        write_dicom_series(image, tmp_path / patient / "ct")
        write_dicom_series(labels, tmp_path / patient / "liver")
        entries.append({"image": f"{patient}/ct", "label": f"{patient}/liver", "name": patient})
    (tmp_path / "list.json").write_text(json.dumps(entries))
    datalist = load_datalist(tmp_path / "list.json")
    assert [case.name for case in datalist.cases] == ["patient_1", "patient_2"]
    _, labels = load_case(datalist.cases[1])
    np.testing.assert_array_equal(labels.array, case_volumes(1)[1].array)
    for entry in entries:
        del entry["name"]  # both series folders are called ct
    (tmp_path / "list.json").write_text(json.dumps(entries))
    with pytest.raises(UserError, match='lists case ct twice: .* give each entry a "name"'):
        load_datalist(tmp_path / "list.json")


def test_npy_cases_take_the_input_spacing(tmp_path):
    image, labels = case_volumes()
    for folder, volume in (("images", image), ("labels", labels)):
        (tmp_path / folder).mkdir()
        np.save(tmp_path / folder / "case.npy", volume.array)
    case = load_datalist(tmp_path, input_spacing=(0.8, 0.9, 2.5)).cases[0]
    loaded_image, loaded_labels = load_case(case)
    assert loaded_image.spacing == loaded_labels.spacing == (0.8, 0.9, 2.5)
    np.testing.assert_array_equal(loaded_labels.array, labels.array)
    assert load_case(load_datalist(tmp_path).cases[0])[0].spacing == (1.0, 1.0, 1.0)


def test_json_entry_spacing_is_for_npy_cases(tmp_path):
    image, labels = case_volumes()
    np.save(tmp_path / "a.npy", image.array)
    np.save(tmp_path / "a_seg.npy", labels.array)
    write_case(tmp_path, "b")
    listing = tmp_path / "list.json"
    listing.write_text(json.dumps([{"image": "a.npy", "label": "a_seg.npy", "spacing": [0.5, 0.5, 3]},
                                   {"image": "images/b.nii.gz", "label": "labels/b.nii.gz"}]))
    datalist = load_datalist(listing, input_spacing=(2.0, 2.0, 2.0))
    assert [case.spacing for case in datalist.cases] == [(0.5, 0.5, 3.0), (2.0, 2.0, 2.0)]
    assert load_case(datalist.cases[0])[0].spacing == (0.5, 0.5, 3.0)
    assert load_case(datalist.cases[1])[0].spacing == (1.0, 1.0, 1.0)  # a NIfTI keeps its own
    listing.write_text(json.dumps([{"image": "images/b.nii.gz", "label": "labels/b.nii.gz", "spacing": [1, 1, 1]}]))
    with pytest.raises(UserError, match='entry 0 gives a "spacing", but its files record their own'):
        load_datalist(listing)
    listing.write_text(json.dumps([{"image": "a.npy", "label": "a_seg.npy", "spacing": [1, 0, 1]}]))
    with pytest.raises(UserError, match="three positive numbers"):
        load_datalist(listing)


def test_input_spacing_without_npy_cases_is_refused(tmp_path):
    write_case(tmp_path, "a")
    with pytest.raises(UserError, match="--input-spacing gives the spacing of .npy arrays"):
        load_datalist(tmp_path, input_spacing=(1.0, 1.0, 1.0))


def test_two_volumes_of_one_case_are_refused(tmp_path):
    write_case(tmp_path, "a")
    write_volume(Volume(np.zeros((4, 4, 4), np.float32)), tmp_path / "images" / "a.nrrd")
    with pytest.raises(UserError, match="holds two volumes for case a"):
        load_datalist(tmp_path)


def test_image_without_label_is_refused_naming_the_case(tmp_path):
    write_case(tmp_path, "complete")
    write_volume(Volume(np.zeros((4, 4, 4), np.float32)), tmp_path / "images" / "lonely.nii.gz")
    with pytest.raises(UserError, match="case lonely has no label file"):
        load_datalist(tmp_path)


def test_json_entry_naming_a_missing_file_is_refused(tmp_path):
    listing = tmp_path / "list.json"
    listing.write_text(json.dumps([{"image": "nowhere.nii.gz", "label": "nowhere_seg.nii.gz"}]))
    with pytest.raises(UserError, match="entry 0 names .*nowhere.nii.gz, which does not exist"):
        load_datalist(listing)


def test_folder_of_neither_layout_is_refused(tmp_path):
    with pytest.raises(UserError, match="neither images/ and labels/ folders nor a dataset.json"):
        load_datalist(tmp_path)


def test_mismatched_geometry_is_refused_naming_the_case(tmp_path):
    write_case(tmp_path, "shifted", label_spacing=(1.0, 1.0, 2.0))
    case = load_datalist(tmp_path).cases[0]
    with pytest.raises(UserError, match="case shifted: image and labels lie on different grids.*--resample-labels"):
        load_case(case)


def test_mismatched_geometry_is_resampled_onto_the_image_when_asked(tmp_path):
    labels = np.zeros((4, 10, 12), np.uint8)
    labels[1:3, 3:6, 4:8] = 1  # z spacing 2 mm: twice as thick slices as the image
    write_case(tmp_path, "coarse", labels=labels, label_spacing=(1.0, 1.0, 2.0))
    image, resampled = load_case(load_datalist(tmp_path).cases[0], resample_labels=True)
    assert resampled.same_grid(image)
    assert set(np.unique(resampled.array)) == {0, 1}
    assert resampled.array[3, 4, 5] == 1 and resampled.array[7, 4, 5] == 0


def test_fractional_label_values_are_refused(tmp_path):
    labels = np.zeros((8, 10, 12), np.float32)
    labels[2, 2, 2] = 1.5
    write_case(tmp_path, "blurred", labels=labels)
    with pytest.raises(UserError, match="case blurred: the labelmap .* holds non-integer values"):
        load_case(load_datalist(tmp_path).cases[0])


def test_float_labels_with_whole_values_are_cast_to_integers(tmp_path):
    labels = np.zeros((8, 10, 12), np.float32)
    labels[2:4, 2:4, 2:4] = 2.0
    write_case(tmp_path, "stored_as_float", labels=labels)
    _, loaded = load_case(load_datalist(tmp_path).cases[0])
    assert loaded.array.dtype == np.uint8 and set(np.unique(loaded.array)) == {0, 2}


def test_label_value_missing_from_the_label_map_is_refused(tmp_path):
    labels = np.zeros((8, 10, 12), np.uint8)
    labels[1, 1, 1], labels[2, 2, 2] = 1, 7
    write_case(tmp_path, "extra", labels=labels)
    with pytest.raises(UserError, match=r"case extra: the labelmap holds value\(s\) \[7\] that the label map"):
        load_case(load_datalist(tmp_path).cases[0], {0: "background", 1: "organ"})


def test_validation_fraction_splits_by_case_with_a_fixed_seed():
    names = [f"case_{index:02d}" for index in range(10)]
    split = make_split(names, val_fraction=0.2, seed=3)
    assert len(split.validation) == 2 and sorted(split.train + split.validation) == names
    assert make_split(list(reversed(names)), val_fraction=0.2, seed=3) == split


def test_k_folds_partition_the_cases():
    names = [f"case_{index}" for index in range(11)]
    folds = [make_split(names, folds=5, fold=fold, seed=0) for fold in range(5)]
    validated = [name for split in folds for name in split.validation]
    assert sorted(validated) == sorted(names)  # every case validates exactly once
    assert all(not set(split.train) & set(split.validation) for split in folds)
    assert {len(split.validation) for split in folds} == {2, 3}


def test_split_round_trips_through_split_json(tmp_path):
    split = make_split(["a", "b", "c", "d"], folds=2, fold=1, seed=7)
    assert read_split(write_split(split, tmp_path / "split.json")) == split


@pytest.mark.parametrize("arguments, message", [
    (dict(val_fraction=1.0), "--val-fraction must be at least 0 and below 1"),
    (dict(folds=3, fold=3), "k-fold needs --folds K of at least 2 and --fold i"),
    (dict(folds=9, fold=0), "9-fold cross-validation needs at least 9 cases"),
])
def test_impossible_splits_are_refused(arguments, message):
    with pytest.raises(UserError, match=message):
        make_split(["a", "b", "c"], **arguments)


def test_hippocampus_folder_pair_is_discovered(shared_dataset):
    folder = shared_dataset("msd_hippocampus")
    datalist = load_datalist(folder)
    assert len(datalist.cases) == 208
    image, labels = load_case(datalist.subset(["hippocampus_003"])[0], {0: "bg", 1: "anterior", 2: "posterior"})
    assert labels.array.dtype == np.uint8 and set(np.unique(labels.array)) == {0, 1, 2}
    assert labels.same_grid(image)


def test_a_case_pattern_pairs_hipmri_names(tmp_path):
    for name in ("B006_Week0", "B006_Week5"):
        write_volume(Volume(np.zeros((4, 5, 6), np.float32)), tmp_path / "images" / f"{name}_LFOV.nii.gz")
        write_volume(Volume(np.zeros((4, 5, 6), np.uint8)), tmp_path / "labels" / f"{name}_SEMANTIC_LFOV.nii.gz")
    with pytest.raises(UserError, match="has no label file"):
        load_datalist(tmp_path)
    datalist = load_datalist(tmp_path, case_pattern="^(.+?)(?:_SEMANTIC)?_LFOV$")
    assert [(case.name, case.image.name, case.label.name) for case in datalist.cases] == [
        ("B006_Week0", "B006_Week0_LFOV.nii.gz", "B006_Week0_SEMANTIC_LFOV.nii.gz"),
        ("B006_Week5", "B006_Week5_LFOV.nii.gz", "B006_Week5_SEMANTIC_LFOV.nii.gz")]


@pytest.mark.parametrize(("pattern", "message"), [
    ("^(.+?)_LFOV$", "case B006_Week0 has no label file"),
    ("^(B006)", "are both case 'B006'"),
    ("^B006", "has no group"),
    ("^(B006", "not a valid regular expression"),
    ("^(.+)_T2$", "does not match --case-pattern"),
])
def test_a_case_pattern_that_cannot_pair_the_files_is_refused_in_one_line(tmp_path, pattern, message):
    for name in ("B006_Week0", "B006_Week5"):
        write_volume(Volume(np.zeros((4, 5, 6), np.float32)), tmp_path / "images" / f"{name}_LFOV.nii.gz")
        write_volume(Volume(np.zeros((4, 5, 6), np.uint8)), tmp_path / "labels" / f"{name}_SEMANTIC_LFOV.nii.gz")
    with pytest.raises(UserError, match=message):
        load_datalist(tmp_path, case_pattern=pattern)
