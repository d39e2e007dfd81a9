"""nnU-Net's preprocessing and export steps, each against what nnU-Net's own code computes."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from UNet3DSegmenterLib import nnunet_preprocess
from UNet3DSegmenterLib.volume import Volume


def test_window_starts_are_nnunets():
    # the example in nnU-Net's compute_steps_for_sliding_window: 110 voxels, patch 64, step 0.5
    assert nnunet_preprocess.window_starts(110, 64, 0.5) == [0, 23, 46]
    assert nnunet_preprocess.window_starts(64, 64, 0.5) == [0]
    # an odd patch: nnU-Net's step is 2.5 voxels, not 2
    assert nnunet_preprocess.window_starts(10, 5, 0.5) == [0, 2, 5]


def test_gaussian_weights_are_nnunets_and_made_once_per_patch_size():
    weights = nnunet_preprocess.gaussian_weights([24, 40, 32])
    assert weights.dtype == np.float32 and weights.shape == (24, 40, 32)
    assert weights[12, 20, 16] == weights.max() == np.float16(10)  # the top, at size // 2, scaled to 10
    assert weights.min() > 0  # float16's underflow raised to its smallest value, never zero
    assert np.array_equal(weights, weights.astype(np.float16).astype(np.float32))  # float16 values
    assert nnunet_preprocess.gaussian_weights((24, 40, 32)) is weights  # kept, list or tuple alike
    assert nnunet_preprocess.gaussian_weights((24, 40, 33)) is not weights


def test_padding_to_the_patch_is_centred_with_the_odd_voxel_after():
    array = np.ones((2, 5, 6, 7), np.float32)
    padded, unpad = nnunet_preprocess.pad_to_patch(array, (8, 6, 4))
    assert padded.shape == (2, 8, 6, 7)
    assert unpad == (slice(1, 6), slice(0, 6), slice(0, 7))
    assert padded[:, 0].sum() == 0 and padded[:, 6:].sum() == 0 and (padded[(slice(None), *unpad)] == 1).all()


def test_separate_z_axis_follows_nnunets_rule():
    assert nnunet_preprocess.separate_z_axis((3.5, 1.0, 1.0), (3.5, 1.0, 1.0), None) == 0
    assert nnunet_preprocess.separate_z_axis((1.0, 1.0, 1.0), (1.0, 1.0, 3.2), None) == 2
    assert nnunet_preprocess.separate_z_axis((1.0, 1.0, 1.0), (1.0, 1.0, 2.9), None) is None
    assert nnunet_preprocess.separate_z_axis((4.0, 4.0, 1.0), (4.0, 4.0, 1.0), None) is None  # two coarse axes
    assert nnunet_preprocess.separate_z_axis((1.0, 1.0, 1.0), (1.0, 1.0, 1.0), False) is None


def test_nearest_slice_across_equals_nnunets_map_coordinates_on_the_whole_grid():
    image = np.random.default_rng(0).normal(size=(7, 5, 6))
    for depth in (3, 7, 12, 16):
        shape = (depth, 5, 6)
        scale = [old / new for old, new in zip(image.shape, shape)]
        grid = np.mgrid[:depth, :5, :6].astype(np.float64)
        coordinates = np.stack([factor * (axis + 0.5) - 0.5 for factor, axis in zip(scale, grid)])
        expected = ndimage.map_coordinates(image, coordinates, order=0, mode="nearest")
        np.testing.assert_array_equal(nnunet_preprocess._across(image, shape, 0, 0), expected)


def test_resize_is_scikit_images_without_anti_aliasing():
    """skimage's resize(order 3, mode 'edge') is ndimage.zoom on the grid, clipped to the input's range."""
    image = np.random.default_rng(1).uniform(0, 1, size=(6, 9))
    resized = nnunet_preprocess._resize(image, (12, 4), 3)
    assert resized.shape == (12, 4)
    assert resized.min() >= image.min() and resized.max() <= image.max()
    np.testing.assert_allclose(nnunet_preprocess._resize(image, image.shape, 3), image)


def _plan(transpose_forward, transpose_backward, spacing, schemes=("NoNormalization",)) -> dict:
    return {"transpose_forward": transpose_forward, "transpose_backward": transpose_backward, "spacing": spacing,
            "normalization": [{"scheme": scheme, "use_mask": False} for scheme in schemes],
            "resampling_data": {"order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_probabilities": {"order": 1, "order_z": 0, "force_separate_z": None}, "mirror_axes": None}


def test_crop_transpose_and_back_restore_the_input_grid():
    """A result computed on the cropped, transposed grid lands on the right voxels of the input."""
    labels = np.zeros((6, 7, 8), np.uint8)
    labels[2:5, 1:6, 3:7] = 1
    labels[3, 2:4, 4:6] = 2
    image = np.where(labels > 0, 100.0 + labels, 0.0).astype(np.float32)
    volume = Volume(image, spacing=(1.0, 1.0, 1.0))
    plan = _plan([2, 0, 1], [1, 2, 0], [1.0, 1.0, 1.0])
    prepared = nnunet_preprocess.prepare(volume, plan)
    assert prepared.shape_before_cropping == (8, 6, 7)  # x, z, y
    assert prepared.box == [(3, 7), (2, 5), (1, 6)]
    network_labels = np.rint(prepared.array[0] - 100.0).clip(0, 2).astype(int)  # what a perfect network says
    logits = np.stack([network_labels == value for value in (0, 1, 2)]).astype(np.float32)
    labelmap, probabilities = nnunet_preprocess.labels_back(logits, prepared, plan, [0, 1, 2], probabilities=True)
    np.testing.assert_array_equal(labelmap, labels)
    assert probabilities is not None and probabilities.shape == (3, 6, 7, 8)
    np.testing.assert_allclose(probabilities.sum(0), 1.0, rtol=1e-5)
    assert (probabilities[0][labels == 0] > 0.5).all()


def test_ct_normalisation_clips_then_scales_with_the_plans_numbers():
    volume = Volume(np.array([[[-2000.0, 0.0], [40.0, 3000.0]]] * 2, np.float32), spacing=(1.0, 1.0, 1.0))
    plan = _plan([0, 1, 2], [0, 1, 2], [1.0, 1.0, 1.0], ("CTNormalization",))
    plan["normalization"][0].update({"mean": 40.0, "std": 100.0, "percentile_00_5": -1000.0, "percentile_99_5": 1000.0})
    prepared = nnunet_preprocess.prepare(volume, plan)
    np.testing.assert_allclose(prepared.array[0, 0], [[-10.4, -0.4], [0.0, 9.6]], rtol=1e-6)
