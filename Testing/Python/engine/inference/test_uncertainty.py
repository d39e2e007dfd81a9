"""Where a segmentation is unsure: one float volume from the same pass as the labelmap."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from UNet3DSegmenterLib.checkpoint import Checkpoint, Label
from UNet3DSegmenterLib.inference.postprocess import uncertainty_from_probabilities
from UNet3DSegmenterLib.inference.predictor import Predictor
from UNet3DSegmenterLib.models import build_model
from UNet3DSegmenterLib.preprocess import Preprocessing
from UNet3DSegmenterLib.roi import RegionOfInterest
from UNet3DSegmenterLib.volume import Volume

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LABELS = [Label(0, "background"), Label(1, "organ"), Label(2, "lesion")]


def predictor(spacing=None) -> Predictor:
    torch.manual_seed(0)
    model = build_model("unet3d", dict(in_channels=1, out_channels=3, depth=3, base_width=4))
    return Predictor(Checkpoint.from_model(model, LABELS, Preprocessing(spacing=spacing), (16, 16, 16)),
                     device="cpu", precision="fp32")


def image(spacing=(1.0, 1.0, 1.0)) -> Volume:
    return Volume(np.random.default_rng(0).normal(size=(20, 24, 28)).astype(np.float32), spacing=spacing)


def test_entropy_is_zero_when_sure_and_one_when_undecided_and_probability_is_the_winner():
    probabilities = np.zeros((3, 2, 1, 1), np.float32)
    probabilities[:, 0] = [[[1.0]], [[0.0]], [[0.0]]]
    probabilities[:, 1] = 1 / 3
    np.testing.assert_allclose(uncertainty_from_probabilities(probabilities, "entropy")[:, 0, 0], [0, 1], atol=1e-6)
    np.testing.assert_allclose(uncertainty_from_probabilities(probabilities, "probability")[:, 0, 0], [1, 1 / 3],
                               atol=1e-6)


def test_entropy_is_that_of_float64_to_float32_rounding_with_zero_probabilities_allowed():
    logits = np.random.default_rng(1).normal(scale=3, size=(3, 40, 30, 20))
    exact = np.exp(logits) / np.exp(logits).sum(0)
    exact[:, 0, 0, 0] = [1.0, 0.0, 0.0]
    probabilities = exact.astype(np.float32)
    wide = probabilities.astype(np.float64)
    expected = -(wide * np.log(np.where(wide > 0, wide, 1.0))).sum(0) / np.log(3)
    np.testing.assert_allclose(uncertainty_from_probabilities(probabilities, "entropy"), expected, rtol=0, atol=3e-7)


@pytest.mark.parametrize("measure", ["entropy", "probability"])
@pytest.mark.parametrize("spacing", [None, (1.5, 1.5, 1.5)])
def test_uncertainty_from_the_labelmap_pass_equals_that_of_the_probabilities(measure, spacing):
    volume = image()
    alone = predictor(spacing).predict(volume, uncertainty=measure)
    with_probabilities = predictor(spacing).predict(volume, probabilities=True, uncertainty=measure)
    assert alone.probabilities is None and alone.uncertainty is not None
    assert alone.uncertainty.same_grid(volume) and alone.uncertainty.array.dtype == np.float32
    np.testing.assert_array_equal(alone.labelmap.array, with_probabilities.labelmap.array)
    if spacing is None:  # on the model's grid, the very probabilities give the same measure
        expected = uncertainty_from_probabilities(with_probabilities.probabilities.array, measure)
        np.testing.assert_allclose(alone.uncertainty.array, expected, atol=1e-5)
    low, high = (0.0, 1.0) if measure == "entropy" else (1 / 3, 1.0)
    assert low - 1e-6 <= alone.uncertainty.array.min() and alone.uncertainty.array.max() <= high + 1e-6


def test_outside_a_region_of_interest_the_answer_is_a_sure_background():
    volume = image()
    roi = RegionOfInterest.from_values([-2, -2, 2, -12, -12, 10])
    result = predictor().predict(volume, roi=roi, uncertainty="entropy")
    assert result.uncertainty is not None and result.uncertainty.same_grid(volume)
    inside = np.zeros(volume.shape, bool)
    inside[tuple(roi.block(volume))] = True
    assert 0 < inside.sum() < inside.size
    assert (result.uncertainty.array[~inside] == 0).all() and (result.uncertainty.array[inside] > 0).all()
