"""Preprocessing: resizing to a fixed grid keeps the physical box and inverts exactly; windows scale to [0, 1]."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from UNet3DSegmenterLib.preprocess import Preprocessing, normalize, preprocess_image, resize, resized_spacing
from UNet3DSegmenterLib.volume import Volume


def oblique(shape=(12, 30, 25), dtype=np.float32) -> Volume:
    angle = np.radians(25)
    direction = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    array = np.random.default_rng(0).integers(0, 4, size=shape).astype(dtype)
    return Volume(array, spacing=(0.9, 1.1, 3.0), origin=(10, -20, 5), direction=direction)


def box_corners(volume: Volume) -> np.ndarray:
    """The eight outer corners of the voxels' box in LPS mm."""
    x, y, z = volume.shape[::-1]
    corners = np.array([[i, j, k, 1.0] for i, j, k in itertools.product((-0.5, x - 0.5), (-0.5, y - 0.5),
                                                                         (-0.5, z - 0.5))])
    return (volume.index_to_physical() @ corners.T).T[:, :3]


def test_resize_gives_the_asked_voxels_over_the_same_physical_box():
    volume = oblique()
    resized = resize(volume, (20, 16, 40))
    assert resized.shape == (20, 16, 40)
    np.testing.assert_allclose(box_corners(resized), box_corners(volume), atol=1e-6)
    np.testing.assert_allclose(resized.spacing, resized_spacing(volume, (20, 16, 40)))
    np.testing.assert_allclose(resized.spacing, (0.9 * 25 / 40, 1.1 * 30 / 16, 3.0 * 12 / 20))
    np.testing.assert_allclose(resized.direction, volume.direction)


def test_resizing_a_labelmap_up_and_back_restores_it_exactly():
    labels = oblique(dtype=np.uint8)
    there = resize(labels, (24, 60, 50), "nearest")
    back = resize(there, labels.shape, "nearest")
    assert back.same_grid(labels)
    np.testing.assert_array_equal(back.array, labels.array)


def test_preprocessing_with_a_size_resizes_every_channel():
    volume = oblique()
    two_channels = volume.with_array(np.stack([volume.array, 2 * volume.array]))
    prepared = preprocess_image(two_channels, Preprocessing(size=(8, 16, 16), normalization="none", channels=2))
    assert prepared.array.shape == (2, 8, 16, 16)
    np.testing.assert_allclose(prepared.array[1], 2 * prepared.array[0], rtol=1e-5, atol=1e-5)


def test_window_clips_and_scales_to_the_unit_range():
    window = Preprocessing(normalization="window", clip=(-160, 240))
    values = np.array([[[[-1000, -160, 40, 240, 3000]]]], np.float32)
    np.testing.assert_allclose(normalize(values, window).ravel(), [0, 0, 0.5, 1, 1])
    assert window.describe() == "window (-160..240 scaled to 0..1)"


@pytest.mark.parametrize("arguments", [dict(normalization="window"), dict(normalization="window", clip=(5, 5)),
                                       dict(size=(8, 0, 8)), dict(size=(8, 8, 8), spacing=(1, 1, 1))])
def test_inconsistent_preprocessing_is_refused(arguments):
    with pytest.raises(ValueError):
        Preprocessing(**arguments)


def test_the_record_keeps_size_and_window_and_reads_older_records():
    resized = Preprocessing(normalization="window", clip=(-160, 240), size=(64, 128, 128))
    assert Preprocessing.from_dict(resized.to_dict()) == resized
    older = {"spacing": [1.0, 1.0, 1.0], "normalization": "zscore", "clip": None, "mean": 0.0, "std": 1.0,
             "channels": 1}
    assert Preprocessing.from_dict(older).size is None
    assert Preprocessing.from_dict(older).to_dict() == older  # unchanged records, unchanged cache keys
