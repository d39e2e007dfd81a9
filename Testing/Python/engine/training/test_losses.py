"""Segmentation losses: what a perfect, a wrong and a weighted prediction cost."""

from __future__ import annotations

import pytest
import torch

from UNet3DSegmenterLib.training.losses import LOSSES, DiceLoss, FocalLoss, build_loss, inverse_frequency_weights


def logits_for(labels: torch.Tensor, classes: int, confidence: float = 20.0) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, classes).movedim(-1, 1).float() * confidence


@pytest.fixture
def labels() -> torch.Tensor:
    labels = torch.zeros((2, 8, 8, 8), dtype=torch.int64)
    labels[:, 2:5, 2:5, 2:5] = 1
    labels[:, 5:7, 5:7, 5:7] = 2
    return labels


@pytest.mark.parametrize("name", LOSSES)
def test_a_perfect_prediction_costs_almost_nothing_and_a_wrong_one_a_lot(name, labels):
    loss = build_loss(name, classes=3)
    perfect = float(loss(logits_for(labels, 3), labels))
    wrong = float(loss(logits_for((labels + 1) % 3, 3), labels))
    assert perfect < 1e-3 and wrong > 0.5


@pytest.mark.parametrize("name", LOSSES)
def test_losses_have_gradients_and_accept_half_precision_logits(name, labels):
    logits = torch.randn((2, 3, 8, 8, 8), requires_grad=True)
    value = build_loss(name, classes=3)(logits.to(torch.bfloat16), labels)
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(logits.grad).all()


def test_class_weights_decide_which_mistakes_cost_more(labels):
    wrong_lesion = labels.clone()
    wrong_lesion[labels == 2] = 0
    prediction = logits_for(wrong_lesion, 3)
    lesion_matters = build_loss("weighted_dice", 3, class_weights=[0.0, 1.0, 9.0])(prediction, labels)
    organ_matters = build_loss("weighted_dice", 3, class_weights=[0.0, 9.0, 1.0])(prediction, labels)
    assert float(lesion_matters) > 4 * float(organ_matters)


def test_rarer_classes_get_larger_default_weights():
    weights = inverse_frequency_weights([9000, 900, 90])
    assert weights[2] == pytest.approx(10 * weights[1]) and sum(weights) / 3 == pytest.approx(1.0)


@pytest.mark.parametrize("name", LOSSES)
def test_a_background_weight_is_honoured_by_every_loss(name, labels):
    # Never silently dropped: weighing background more or less changes what the same prediction costs.
    logits = torch.randn((2, 3, 8, 8, 8), generator=torch.Generator().manual_seed(0))
    light = build_loss(name, 3, class_weights=[0.0, 1.0, 1.0])(logits, labels)
    heavy = build_loss(name, 3, class_weights=[4.0, 1.0, 1.0])(logits, labels)
    assert abs(float(light) - float(heavy)) > 1e-3


def test_a_positive_background_weight_brings_background_into_the_dice(labels):
    # Class 1 predicted perfectly, so only background (and class 2's 8-voxel cubes) can cost anything.
    wrong_background = labels.clone()
    wrong_background[:, 0, 0, :] = 2  # 16 background voxels called class 2
    prediction = logits_for(wrong_background, 3)
    without = float(build_loss("dice", 3, class_weights=[0.0, 1.0, 0.0])(prediction, labels))
    with_background = float(build_loss("dice", 3, class_weights=[1.0, 1.0, 0.0])(prediction, labels))
    assert without < 1e-3 < with_background


def test_cross_entropy_weighs_each_voxel_by_its_true_class(labels):
    wrong_lesion = labels.clone()
    wrong_lesion[labels == 2] = 0
    prediction = logits_for(wrong_lesion, 3)
    assert float(build_loss("ce", 3, class_weights=[1.0, 1.0, 0.0])(prediction, labels)) < 1e-3
    unweighted = float(build_loss("ce", 3)(prediction, labels))
    assert unweighted == pytest.approx(float(torch.nn.functional.cross_entropy(prediction, labels)))
    assert float(build_loss("ce", 3, class_weights=[0.0, 0.0, 1.0])(prediction, labels)) == pytest.approx(3 * unweighted)


def test_dice_focal_is_the_sum_of_its_two_terms(labels):
    logits = torch.randn((2, 3, 8, 8, 8), generator=torch.Generator().manual_seed(1))
    weights = [0.5, 1.0, 2.0]
    expected = DiceLoss(weights)(logits, labels) + FocalLoss(class_weights=weights)(logits, labels)
    assert float(build_loss("dice_focal", 3, weights)(logits, labels)) == pytest.approx(float(expected))


def test_unknown_loss_and_wrong_weights_are_refused():
    with pytest.raises(ValueError, match="unknown loss 'l2'"):
        build_loss("l2", 3)
    with pytest.raises(ValueError, match="2 class weights for 3 classes"):
        build_loss("weighted_dice", 3, class_weights=[1.0, 2.0])
    for weights in ([1.0, -1.0, 1.0], [1.0, 0.0, 0.0]):
        with pytest.raises(ValueError, match="zero or more, with at least one foreground class above zero"):
            build_loss("dicece", 3, class_weights=weights)
