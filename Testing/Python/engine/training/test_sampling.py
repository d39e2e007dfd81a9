"""Prepared cases and patch sampling: foreground oversampling, padding, ids, get_dataloader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from UNet3DSegmenterLib.datalist import folder_pair
from UNet3DSegmenterLib.io import write_volume
from UNet3DSegmenterLib.models import UNet3D
from UNet3DSegmenterLib.preprocess import Preprocessing
from UNet3DSegmenterLib.training.patches import (
    EpochSampler,
    PatchDataset,
    PreparedCase,
    _class_locations,
    get_dataloader,
    prepare_cases,
)
from UNet3DSegmenterLib.volume import Volume


def prepared(shape=(40, 40, 40), boxes=((1, (slice(18, 20), slice(18, 20), slice(18, 20))),)) -> PreparedCase:
    target = np.zeros(shape, np.uint8)
    for value, box in boxes:
        target[box] = value
    classes = 1 + max(value for value, _ in boxes)
    image = np.random.default_rng(0).normal(size=(1, *shape)).astype(np.float32)
    return PreparedCase("case", image, target, _class_locations(target, classes, "case"))


def centre_labels(dataset: PatchDataset, samples: int) -> np.ndarray:
    centre = tuple(size // 2 for size in dataset.patch_size)
    return np.array([int(dataset[sample_id][1][centre]) for sample_id in range(samples)])


def test_a_third_of_patches_are_centred_on_foreground_by_default():
    # 8 foreground voxels in 64000: a uniform patch centre almost never lands on one.
    dataset = PatchDataset([prepared()], (16, 16, 16), seed=1)
    on_foreground = (centre_labels(dataset, 1500) > 0).mean()
    assert abs(on_foreground - 1 / 3) < 0.05


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_foreground_fraction_is_honoured_at_its_extremes(fraction):
    dataset = PatchDataset([prepared()], (16, 16, 16), foreground_fraction=fraction)
    on_foreground = (centre_labels(dataset, 300) > 0).mean()
    assert on_foreground == pytest.approx(fraction, abs=0.02)


def test_oversampling_picks_each_foreground_class_alike():
    # class 2 is 64 times bigger than class 1, but both are chosen equally often as centres
    case = prepared(boxes=((1, (slice(5, 7), slice(5, 7), slice(5, 7))), (2, (slice(25, 33),) * 3)))
    dataset = PatchDataset([case], (8, 8, 8), foreground_fraction=1.0)
    counts = np.bincount(centre_labels(dataset, 600), minlength=3)
    assert counts[0] == 0 and abs(counts[1] - counts[2]) < 90


def test_cases_smaller_than_the_patch_are_padded_with_background():
    case = prepared(shape=(6, 20, 20), boxes=((1, (slice(2, 4), slice(8, 10), slice(8, 10))),))
    image, label = PatchDataset([case], (16, 32, 32))[0]
    assert image.shape == (1, 16, 32, 32) and label.shape == (16, 32, 32)
    assert label.dtype == torch.int64 and int(label.sum()) == 8  # the whole structure, padding is background
    assert int((image != 0).sum()) == 6 * 20 * 20


def test_a_patch_is_a_function_of_seed_and_sample_id_only():
    first, second = PatchDataset([prepared()], (16, 16, 16), seed=5), PatchDataset([prepared()], (16, 16, 16), seed=5)
    assert all(torch.equal(first[index][0], second[index][0]) for index in (3, 0, 7))
    assert not torch.equal(first[3][0], PatchDataset([prepared()], (16, 16, 16), seed=6)[3][0])


def test_sampler_ids_never_repeat_across_epochs_and_ranks():
    seen = []
    for rank in range(2):
        sampler = EpochSampler(samples=6, rank=rank, world_size=2)
        for epoch in range(3):
            sampler.set_epoch(epoch)
            seen.extend(sampler)
    assert len(seen) == len(set(seen)) == 36
    sampler = EpochSampler(samples=6)
    sampler.set_epoch(2, start=4)  # resuming mid-epoch continues where the interrupted epoch stopped
    assert list(sampler) == [16, 17]


def write_folder_pair(folder, cases=3, shape=(12, 20, 20)):
    rng = np.random.default_rng(0)
    for index in range(cases):
        labels = np.zeros(shape, np.uint8)
        labels[4:8, 6:12, 6:12] = 1
        labels[5:7, 8:10, 8:10] = 2
        image = (rng.normal(size=shape) + 3 * labels).astype(np.float32)
        write_volume(Volume(image, (1.0, 1.0, 2.0)), folder / "images" / f"case_{index}.nii.gz")
        write_volume(Volume(labels, (1.0, 1.0, 2.0)), folder / "labels" / f"case_{index}.nii.gz")
    return folder


def test_get_dataloader_feeds_a_model_in_a_plain_loop(tmp_path):
    write_folder_pair(tmp_path)
    loader = get_dataloader(tmp_path / "images", tmp_path / "labels", batch_size=2, patch_size=(16, 16, 16),
                            batches=2, workers=0)
    model = UNet3D(in_channels=1, out_channels=3, depth=3, base_width=4)
    batches = 0
    for images, labels in loader:
        outputs = model(images)
        loss = torch.nn.functional.cross_entropy(outputs, labels)
        batches += 1
        assert images.shape == (2, 1, 16, 16, 16) and images.dtype == torch.float32
        assert labels.shape == (2, 16, 16, 16) and labels.dtype == torch.int64
        assert torch.isfinite(loss)
    assert batches == 2
    assert loader.dataset.label_values == [0, 1, 2]
    first_pass = next(iter(loader))[0]
    assert not torch.equal(first_pass, next(iter(loader))[0])  # every pass draws new patches


def test_get_dataloader_with_a_background_worker(tmp_path):
    write_folder_pair(tmp_path)
    loader = get_dataloader(tmp_path / "images", tmp_path / "labels", patch_size=(8, 16, 16), batches=3, workers=1)
    assert [images.shape[0] for images, _ in loader] == [2, 2, 2]


def mirror_left_right(image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A user transform (module level, so loader workers can pickle it)."""
    return image.flip(-1), label.flip(-1)


def test_get_dataloader_applies_the_transform_to_every_patch(tmp_path):
    write_folder_pair(tmp_path)
    options = dict(batch_size=2, patch_size=(8, 16, 16), batches=2, seed=3)
    plain = list(get_dataloader(tmp_path / "images", tmp_path / "labels", workers=0, **options))
    mirrored = list(get_dataloader(tmp_path / "images", tmp_path / "labels", transform=mirror_left_right, workers=1,
                                   **options))
    assert len(plain) == len(mirrored) == 2
    for (images, labels), (mirrored_images, mirrored_labels) in zip(plain, mirrored):
        assert torch.equal(mirrored_images, images.flip(-1)) and torch.equal(mirrored_labels, labels.flip(-1))


def test_a_transform_that_does_not_return_a_pair_is_named(tmp_path):
    write_folder_pair(tmp_path)
    loader = get_dataloader(tmp_path / "images", tmp_path / "labels", transform=lambda image, label: image, workers=0)
    with pytest.raises(TypeError, match=r"must return \(image, label\) as two tensors, got Tensor"):
        next(iter(loader))


def test_get_dataloader_resizes_and_scales_a_window(tmp_path):
    write_folder_pair(tmp_path)
    loader = get_dataloader(tmp_path / "images", tmp_path / "labels", patch_size=(8, 8, 8), resize=(6, 10, 12),
                            window=(-1.0, 2.0), workers=0)
    dataset = loader.dataset
    assert dataset.preprocessing.size == (6, 10, 12) and dataset.preprocessing.clip == (-1.0, 2.0)
    assert all(case.image.shape == (1, 6, 10, 12) and case.target.shape == (6, 10, 12) for case in dataset.cases)
    values = np.concatenate([case.image.ravel() for case in dataset.cases])
    assert values.min() == 0.0 and values.max() == 1.0  # noise and a brighter cube span the window


def test_cache_folder_is_reused_and_memory_mapped(tmp_path):
    datalist = folder_pair(write_folder_pair(tmp_path / "data") / "images", tmp_path / "data" / "labels")
    preprocessing = Preprocessing(spacing=(1.0, 1.0, 1.0))  # resampled from 2 mm slices
    fresh = prepare_cases(datalist.cases, preprocessing, [0, 1, 2], cache_dir=tmp_path / "cache")
    cached = prepare_cases(datalist.cases, preprocessing, [0, 1, 2], cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 6
    assert isinstance(cached[0].image, np.memmap)
    assert fresh[0].image.shape == (1, 24, 20, 20)
    for before, after in zip(fresh, cached):
        np.testing.assert_array_equal(before.image, after.image)
        np.testing.assert_array_equal(before.target, after.target)


def test_crop_to_foreground_cuts_empty_border(tmp_path):
    shape = (12, 20, 20)
    image, labels = np.zeros(shape, np.float32), np.zeros(shape, np.uint8)
    image[2:10, 4:16, 5:15] = 1.0 + np.random.default_rng(0).random((8, 12, 10))
    labels[4:6, 6:8, 6:8] = 1
    write_volume(Volume(image), tmp_path / "images" / "body.nii.gz")
    write_volume(Volume(labels), tmp_path / "labels" / "body.nii.gz")
    case = folder_pair(tmp_path / "images", tmp_path / "labels").cases
    cropped = prepare_cases(case, Preprocessing(spacing=(1.0, 1.0, 1.0)), [0, 1], crop_foreground=True)[0]
    assert cropped.image.shape == (1, 8, 12, 10) and int(cropped.target.sum()) == 8
