"""Synthetic phantoms: deterministic, labelled, in physical units, written as a readable dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest

from UNet3DSegmenterLib.io import case_name, read_volume
from UNet3DSegmenterLib.phantom import PHANTOM_LABELS, case_seeds, make_phantom, write_phantom_dataset

ALL_CLASSES = len(PHANTOM_LABELS)


def label_volume_mm3(labels, value):
    return np.count_nonzero(labels.array == value) * float(np.prod(labels.spacing))


def test_same_seed_gives_the_same_phantom():
    first_image, first_labels = make_phantom(seed=7)
    second_image, second_labels = make_phantom(seed=7)
    np.testing.assert_array_equal(first_image.array, second_image.array)
    np.testing.assert_array_equal(first_labels.array, second_labels.array)


def test_different_seeds_give_different_phantoms():
    first_image, first_labels = make_phantom(seed=0)
    second_image, second_labels = make_phantom(seed=1)
    assert not np.array_equal(first_labels.array, second_labels.array)
    assert not np.allclose(first_image.array, second_image.array)


def test_types_and_label_values():
    image, labels = make_phantom(classes=3)
    assert image.array.dtype == np.float32
    assert labels.array.dtype == np.uint8
    assert image.shape == labels.shape == (48, 64, 64)
    assert set(np.unique(labels.array)) == {0, 1, 2, 3}
    assert np.isfinite(image.array).all()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("classes", [1, 2, ALL_CLASSES])
def test_every_class_is_present_with_a_plausible_volume_fraction(seed, classes):
    _, labels = make_phantom(seed=seed, classes=classes)
    fractions = np.bincount(labels.array.ravel(), minlength=classes + 1) / labels.array.size
    assert len(fractions) == classes + 1
    assert 0.6 < fractions[0] < 0.98
    assert 0.02 < fractions[1] < 0.2  # organ
    assert all(0.0003 < fraction < 0.05 for fraction in fractions[2:])  # lesion and smaller shapes


def test_more_classes_keep_the_same_organ_and_lesion():
    _, two = make_phantom(seed=5, classes=2)
    _, five = make_phantom(seed=5, classes=ALL_CLASSES)
    np.testing.assert_array_equal(two.array == 2, five.array == 2)
    # Later classes may paint over the organ, never the other way round.
    assert np.all(two.array[five.array == 1] == 1)


def test_tiny_grid_still_holds_every_class():
    _, labels = make_phantom(shape=(6, 8, 8), spacing=(4.0, 4.0, 6.0), seed=2, classes=ALL_CLASSES)
    assert set(np.unique(labels.array)) == set(range(ALL_CLASSES + 1))


def test_geometry_is_as_requested():
    image, labels = make_phantom(shape=(20, 30, 40), spacing=(0.8, 0.9, 2.5))
    assert image.shape == (20, 30, 40)
    assert image.spacing == labels.spacing == (0.8, 0.9, 2.5)
    np.testing.assert_allclose(image.direction, np.eye(3))
    assert image.same_grid(labels)
    # The field of view is centred on the scanner's origin, so voxel [0, 0, 0] is not at zero.
    np.testing.assert_allclose(image.origin, (-0.8 * 39 / 2, -0.9 * 29 / 2, -2.5 * 19 / 2))


def test_given_direction_is_kept_and_the_field_of_view_stays_centred():
    angle = np.radians(30)
    direction = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    image, labels = make_phantom(shape=(11, 21, 31), spacing=(1.0, 1.5, 3.0), direction=direction)
    np.testing.assert_allclose(image.direction, direction)
    assert image.same_grid(labels)
    centre = image.index_to_physical() @ np.array([15, 10, 5, 1.0])
    np.testing.assert_allclose(centre[:3], 0, atol=1e-9)


def test_direction_must_be_a_rotation():
    with pytest.raises(ValueError, match="orthonormal"):
        make_phantom(direction=np.diag([1.0, 2.0, 1.0]))


@pytest.mark.parametrize(
    "other_grid",
    [((96, 64, 64), (1.0, 1.0, 1.0)), ((96, 128, 128), (0.5, 0.5, 1.0))],
    ids=["isotropic", "finer"],
)
def test_anatomy_has_the_same_size_in_millimetres_at_any_spacing(other_grid):
    # Both grids cover the same 64 x 64 x 96 mm field of view.
    _, reference = make_phantom(shape=(48, 64, 64), spacing=(1.0, 1.0, 2.0), seed=3, classes=2)
    _, other = make_phantom(*other_grid, seed=3, classes=2)
    for value in (1, 2):
        assert label_volume_mm3(other, value) == pytest.approx(label_volume_mm3(reference, value), rel=0.1)


def test_ct_intensities_are_in_hounsfield_units():
    image, labels = make_phantom(seed=4, classes=ALL_CLASSES, modality="CT")
    values = image.array
    assert values.min() >= -1024 and values.max() <= 3071
    assert np.median(values[0, :3, :3]) < -900  # air in the corner of the field of view
    organ, lesion, bone = (np.median(values[labels.array == value]) for value in (1, 2, 4))
    assert 50 < organ < 110
    assert organ < lesion < 250
    assert bone > 300


def test_mr_intensities_are_positive_with_a_bright_lesion_in_a_brighter_organ():
    image, labels = make_phantom(seed=4, classes=2, modality="MR")
    values = image.array
    assert values.min() >= 0
    background, organ, lesion = (np.median(values[labels.array == value]) for value in (0, 1, 2))
    assert background < organ < lesion


@pytest.mark.parametrize("modality", ["MR", "CT"])
def test_organ_and_background_intensities_overlap(modality):
    # A model has to use texture and context: no global threshold separates the organ from the body.
    image, labels = make_phantom(seed=1, classes=2, modality=modality)
    organ = image.array[labels.array == 1]
    background = image.array[labels.array == 0]
    assert np.count_nonzero(background > np.percentile(organ, 10)) > 0.05 * organ.size


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(classes=0), "classes must be between 1 and 5, got 0"),
        (dict(classes=ALL_CLASSES + 1), "classes must be between 1 and 5, got 6"),
        (dict(modality="PET"), "modality must be one of .* got 'PET'"),
        (dict(shape=(0, 10, 10)), r"shape must be three positive sizes .* got \(0, 10, 10\)"),
        (dict(spacing=(1.0, -1.0, 1.0)), r"spacing must be three positive sizes .* got \(1.0, -1.0, 1.0\)"),
        (dict(seed=-1), "seed must be a non-negative integer, got -1"),
    ],
)
def test_bad_arguments_are_refused_with_the_offending_value(arguments, message):
    with pytest.raises(ValueError, match=message):
        make_phantom(**arguments)


def test_every_label_has_a_name_and_a_colour():
    assert sorted(PHANTOM_LABELS) == list(range(1, ALL_CLASSES + 1))
    names = [name for name, _ in PHANTOM_LABELS.values()]
    assert names[:2] == ["organ", "lesion"] and len(set(names)) == len(names)
    for _, colour in PHANTOM_LABELS.values():
        assert len(colour) == 3 and all(0.0 <= component <= 1.0 for component in colour)


def test_dataset_pairs_images_and_labels_under_the_same_names(tmp_path):
    folder = write_phantom_dataset(tmp_path / "phantoms", cases=3, shape=(16, 24, 24), seed=2, classes=3)
    assert folder == tmp_path / "phantoms"
    images = sorted((folder / "images").iterdir())
    labels = sorted((folder / "labels").iterdir())
    assert [case_name(path) for path in images] == ["phantom_000", "phantom_001", "phantom_002"]
    assert [path.name for path in images] == [path.name for path in labels]
    assert sorted(path.name for path in folder.iterdir()) == ["dataset.json", "images", "labels"]


def test_dataset_json_follows_the_decathlon_layout(tmp_path):
    folder = write_phantom_dataset(tmp_path, cases=2, shape=(16, 24, 24), classes=3, modality="CT")
    description = json.loads((folder / "dataset.json").read_text())
    assert description["modality"] == {"0": "CT"}
    assert description["labels"] == {"0": "background", "1": "organ", "2": "lesion", "3": "vessel"}
    assert description["numTraining"] == len(description["training"]) == 2
    for entry in description["training"]:
        assert entry["image"].startswith("./images/") and entry["label"].startswith("./labels/")
        assert (folder / entry["image"]).is_file() and (folder / entry["label"]).is_file()


def test_the_phantom_dataset_is_written_by_the_datalist_writer_and_reads_back_with_its_colours(tmp_path):
    from UNet3DSegmenterLib.datalist import load_datalist

    folder = write_phantom_dataset(tmp_path, cases=2, shape=(16, 24, 24), classes=2, modality="CT")
    datalist = load_datalist(folder)
    assert datalist.label_names == {0: "background", 1: "organ", 2: "lesion"}
    assert datalist.label_colors == {value: PHANTOM_LABELS[value][1] for value in (1, 2)}
    assert datalist.modality == "CT" and [case.name for case in datalist.cases] == ["phantom_000", "phantom_001"]


def test_dataset_files_read_back_as_the_generated_phantoms(tmp_path):
    shape, spacing = (16, 24, 24), (1.5, 1.5, 3.0)
    folder = write_phantom_dataset(tmp_path, cases=2, shape=shape, spacing=spacing, seed=9, classes=2)
    for index, case_seed in enumerate(case_seeds(9, 2)):
        expected_image, expected_labels = make_phantom(shape, spacing, case_seed, classes=2)
        image = read_volume(folder / "images" / f"phantom_{index:03d}.nii.gz")
        labels = read_volume(folder / "labels" / f"phantom_{index:03d}.nii.gz")
        assert image.same_grid(expected_image) and labels.same_grid(expected_image)
        np.testing.assert_allclose(image.array, expected_image.array)
        np.testing.assert_array_equal(labels.array, expected_labels.array)
        assert labels.array.dtype == np.uint8


def test_datasets_with_different_seeds_share_no_case():
    assert not set(case_seeds(0, 50)) & set(case_seeds(1, 50))
    assert case_seeds(0, 3) == case_seeds(0, 5)[:3]
