"""Segmenting inside a region of interest, and the warning for inputs far outside the training data."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from UNet3DSegmenterLib.checkpoint import Checkpoint, Label, load_checkpoint
from UNet3DSegmenterLib.errors import UserError
from UNet3DSegmenterLib.fingerprint import TrainingFingerprint
from UNet3DSegmenterLib.inference.predictor import Predictor
from UNet3DSegmenterLib.io import read_volume
from UNet3DSegmenterLib.models import build_model
from UNet3DSegmenterLib.preprocess import Preprocessing
from UNet3DSegmenterLib.roi import RegionOfInterest, crop
from UNet3DSegmenterLib.volume import Volume

BUNDLED_MODEL = Path(__file__).resolve().parents[4] / "Resources" / "Models" / "hippocampus.pt"
LPS_AS_NIFTI = np.diag([-1.0, -1.0, 1.0])  # a NIfTI file with a RAS affine reads so

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL_CROPS = TrainingFingerprint.from_measurements([(10, 10, 10), (12, 12, 12)], [(1, 1, 1), (1, 1, 1)], [])


def tiny_checkpoint(fingerprint: TrainingFingerprint | None = SMALL_CROPS,
                    spacing=(1.0, 1.0, 1.0)) -> Checkpoint:
    torch.manual_seed(0)
    model = build_model("unet3d", dict(in_channels=1, out_channels=3, depth=2, base_width=4))
    labels = [Label(0, "background"), Label(1, "a", (1, 0, 0)), Label(2, "b", (0, 0, 1))]
    return Checkpoint.from_model(model, labels, Preprocessing(spacing=spacing), (16, 16, 16), fingerprint=fingerprint)


def head(seed: int = 0) -> Volume:
    """30 x 36 x 40 voxels of 1 x 1.5 x 2 mm, placed as a NIfTI file places them."""
    array = np.random.default_rng(seed).normal(100, 20, size=(20, 24, 30)).astype(np.float32)
    return Volume(array, spacing=(1.0, 1.5, 2.0), origin=(12.0, -7.0, 30.0), direction=LPS_AS_NIFTI)


def ras_corners(volume: Volume, first_ijk, last_ijk) -> list[float]:
    """The RAS corners of the voxel centres ``first_ijk`` and ``last_ijk``, as Slicer would show them."""
    to_ras = volume.ijk_to_ras()
    return [*(to_ras @ np.append(first_ijk, 1))[:3], *(to_ras @ np.append(last_ijk, 1))[:3]]


def test_the_box_selects_exactly_the_voxels_whose_centres_lie_in_it():
    volume = head()
    roi = RegionOfInterest.from_values(ras_corners(volume, (3, 4, 5), (20, 15, 12)))
    assert roi.block(volume) == (slice(5, 13), slice(4, 16), slice(3, 21))  # z, y, x
    swapped = RegionOfInterest(roi.second, roi.first)
    assert swapped.block(volume) == roi.block(volume)


def test_a_box_beyond_the_volume_is_clipped_to_it():
    volume = head()
    roi = RegionOfInterest.from_values(ras_corners(volume, (-10, -10, -10), (5, 100, 4)))
    assert roi.block(volume) == (slice(0, 5), slice(0, 24), slice(0, 6))


def test_a_box_that_misses_the_volume_is_a_one_line_error():
    volume = head()
    with pytest.raises(UserError, match=r"^the ROI \(R .* mm\) holds no voxel of the volume, which spans R .*: "
                                        r"place the box over the volume$"):
        RegionOfInterest.from_values(ras_corners(volume, (40, 0, 0), (50, 10, 10))).block(volume)


@pytest.mark.parametrize("values", [[1, 2, 3, 4, 5], [0, 0, 0, 1, 1, float("nan")]])
def test_an_roi_is_six_finite_numbers(values):
    with pytest.raises(UserError, match="six finite numbers R1 A1 S1 R2 A2 S2"):
        RegionOfInterest.from_values(values)


def test_the_result_lies_on_the_whole_grid_with_zeros_outside_and_the_crop_result_inside():
    volume, predictor = head(), Predictor(tiny_checkpoint(), device="cpu", precision="fp32")
    roi = RegionOfInterest.from_values(ras_corners(volume, (3, 4, 5), (20, 15, 12)))
    block = roi.block(volume)
    result = predictor.predict(volume, probabilities=True, roi=roi)
    alone = predictor.predict(crop(volume, block), probabilities=True)
    assert result.labelmap.same_grid(volume) and result.probabilities is not None
    assert alone.labelmap.array.any()  # an untrained network: something to compare inside
    np.testing.assert_array_equal(result.labelmap.array[block], alone.labelmap.array)
    outside = np.ones(volume.shape, bool)
    outside[block] = False
    assert not result.labelmap.array[outside].any()
    np.testing.assert_array_equal(result.probabilities.array[(slice(None), *block)], alone.probabilities.array)
    assert np.all(result.probabilities.array[0][outside] == 1) and not result.probabilities.array[1:, outside].any()


def test_the_crop_keeps_its_place_in_the_patient():
    volume = head()
    block = (slice(5, 13), slice(4, 16), slice(3, 21))
    part = crop(volume, block)
    assert part.shape == (8, 12, 18)
    np.testing.assert_allclose(part.ijk_to_ras() @ [0, 0, 0, 1], volume.ijk_to_ras() @ [3, 4, 5, 1])
    np.testing.assert_array_equal(part.array, volume.array[block])


def test_warnings_are_given_before_the_work_kept_on_the_result_and_computed_on_what_is_segmented(caplog):
    volume, predictor = head(), Predictor(tiny_checkpoint(), device="cpu", precision="fp32")
    heard: list[str] = []
    whole = predictor.predict(volume, warn=heard.append)
    assert heard == whole.warnings and len(heard) == 1
    assert heard[0].startswith("this volume covers 30 x 36 x 40 mm; the model was trained on crops of about "
                               "11 x 11 x 11 mm")
    inside = RegionOfInterest.from_values(ras_corners(volume, (0, 0, 0), (11, 7, 5)))  # 12 x 12 x 12 mm
    assert predictor.predict(volume, roi=inside).warnings == []
    with caplog.at_level(logging.WARNING, logger="UNet3DSegmenterLib"):
        predictor.predict(volume)
    assert [record.getMessage() for record in caplog.records] == heard  # by default, to the log


def test_checkpoints_without_a_fingerprint_give_no_warning():
    assert Predictor(tiny_checkpoint(None), device="cpu").predict(head()).warnings == []


def right_hippocampus_box(image: Volume, labels: np.ndarray, half_size=(18, 25, 18)) -> RegionOfInterest:
    """A box of about the training crops' size (36 x 50 x 36 mm) around the manual right hippocampus."""
    z, y, x = np.nonzero(labels == 4)
    centre = np.array([x.min() + x.max(), y.min() + y.max(), z.min() + z.max()]) / 2
    return RegionOfInterest.from_values(ras_corners(image, centre - half_size, centre + half_size))


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    return 2 * np.logical_and(prediction, truth).sum() / (prediction.sum() + truth.sum())


@pytest.mark.slow
def test_the_bundled_model_warns_on_a_whole_brain(shared_dataset):
    image = read_volume(shared_dataset("mni152_2009a_tissue") / "images" / "mni152_2009a.nii.gz")
    [warning] = Predictor(BUNDLED_MODEL, device="cpu").input_warnings(image)
    assert warning.startswith("this volume covers 197 x 233 x 189 mm; the model was trained on crops of about "
                              "35 x 50 x 36 mm")


@pytest.mark.slow
def test_a_box_around_one_hippocampus_segments_it_far_better_than_the_whole_crop(shared_dataset):
    """ITK-SNAP's MRIcrop (78 x 110 x 64 mm, manual labels 4 right and 5 left hippocampus): measured
    0.36 for the whole volume against both hippocampi, 0.77 inside a box around the right one."""
    folder = shared_dataset("itksnap_mricrop")
    image, labels = read_volume(folder / "images" / "mricrop.nii.gz"), read_volume(folder / "labels" / "mricrop.nii.gz")
    checkpoint = load_checkpoint(BUNDLED_MODEL)
    predictor = Predictor(checkpoint, device="cpu")
    whole = predictor.predict(image)
    assert len(whole.warnings) == 1 and "78 x 110 x 64 mm" in whole.warnings[0]
    whole_dice = dice(whole.labelmap.array > 0, np.isin(labels.array, (4, 5)))
    boxed = predictor.predict(image, roi=right_hippocampus_box(image, labels.array))
    assert boxed.warnings == []
    box_dice = dice(boxed.labelmap.array > 0, labels.array == 4)
    assert box_dice > 0.7 and whole_dice < 0.5 and box_dice > whole_dice + 0.25, (box_dice, whole_dice)
