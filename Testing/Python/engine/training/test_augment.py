"""Batched augmentation: spatial changes move image and labels together; intensity ones the image only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from UNet3DSegmenterLib.training.augment import Augmenter

NO_INTENSITY = dict(brightness_range=(1, 1), contrast_range=(1, 1), gamma_range=(1, 1), noise_std=0.0)


def labelled_batch(batch=4, shape=(16, 24, 24)) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels with asymmetric blocks (so every flip and turn changes them); the image is the labels."""
    labels = torch.zeros((batch, *shape), dtype=torch.int64)
    labels[:, 2:7, 3:12, 4:9] = 1
    labels[:, 9:14, 14:20, 2:18] = 2
    labels[:, 5:8, 16:22, 15:21] = 3
    return labels[:, None].float(), labels


@pytest.mark.parametrize("seed", range(4))
def test_flips_and_quarter_turns_keep_image_and_labels_aligned(seed):
    augment = Augmenter(spatial_probability=0.0, **NO_INTENSITY)
    images, labels = labelled_batch()
    moved_images, moved_labels = augment(images, labels, torch.Generator().manual_seed(seed))
    assert torch.equal(moved_images[:, 0], moved_labels.float())
    assert not torch.equal(moved_labels, labels)  # something did move


@pytest.mark.parametrize("seed", range(3))
def test_rotation_and_scaling_keep_image_and_labels_aligned(seed):
    augment = Augmenter(spacing_zyx=(2.0, 1.0, 1.0), flip_probability=0.0, spatial_probability=1.0,
                        rotation_degrees=20, **NO_INTENSITY)
    images, labels = labelled_batch()
    moved_images, moved_labels = augment(images, labels, torch.Generator().manual_seed(seed))
    assert moved_labels.dtype == torch.int64 and set(moved_labels.unique().tolist()) <= {0, 1, 2, 3}
    assert not torch.equal(moved_labels, labels)
    # linear interpolation blurs borders by at most a voxel; away from them image and labels agree
    agreement = (moved_images[:, 0].round() == moved_labels.float()).float().mean()
    assert agreement > 0.93
    shifted = (moved_images[:, 0].round() == moved_labels.roll(3, dims=-1).float()).float().mean()
    assert shifted < agreement - 0.03


def test_thick_slices_turn_only_within_the_slice_plane():
    augment = Augmenter(spacing_zyx=(5.0, 0.8, 0.8), flip_probability=0.0, spatial_probability=1.0,
                        scale_range=(1, 1), rotation_degrees=30, **NO_INTENSITY)
    images = torch.zeros((2, 1, 8, 24, 24))
    images[:, :, 3] = 1.0  # one slice: an in-plane rotation keeps it within that slice
    labels = images[:, 0].long()
    moved_images, _ = augment(images, labels, torch.Generator().manual_seed(0))
    assert float(moved_images[:, :, [0, 1, 5, 6, 7]].abs().max()) == 0


def test_intensity_changes_leave_labels_untouched_and_are_repeatable():
    augment = Augmenter(flip_probability=0.0, spatial_probability=0.0, intensity_probability=1.0)
    images = torch.randn((3, 1, 8, 8, 12))  # not square in-plane: no quarter turns either
    labels = torch.randint(0, 3, (3, 8, 8, 12))
    first = augment(images, labels, torch.Generator().manual_seed(1))
    second = augment(images, labels, torch.Generator().manual_seed(1))
    assert torch.equal(first[1], labels)
    assert torch.equal(first[0], second[0]) and not torch.equal(first[0], images)
    assert torch.isfinite(first[0]).all()


def test_switched_off_it_returns_the_batch_unchanged():
    images, labels = labelled_batch()
    moved_images, moved_labels = Augmenter(enabled=False)(images, labels, torch.Generator().manual_seed(0))
    assert moved_images is images and moved_labels is labels


def test_rotations_need_square_in_plane_patches():
    augment = Augmenter(spatial_probability=0.0, flip_probability=0.0, **NO_INTENSITY)
    images, labels = labelled_batch(shape=(8, 16, 24))
    moved_images, moved_labels = augment(images, labels, torch.Generator().manual_seed(0))
    assert torch.equal(moved_labels, labels) and np.array_equal(moved_images.shape, images.shape)
