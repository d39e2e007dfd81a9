"""Recipes of other projects: plain Adam at a constant rate; weighted_dice's weights resolved once."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from UNet3DSegmenterLib.checkpoint import Checkpoint, Label
from UNet3DSegmenterLib.models import build_model
from UNet3DSegmenterLib.preprocess import Preprocessing
from UNet3DSegmenterLib.training.config import TrainingConfig
from UNet3DSegmenterLib.training.cross_validation import _trained_weights
from UNet3DSegmenterLib.training.planning import TrainingPlan, _optimiser_defaults
from UNet3DSegmenterLib.training.step import build_optimizer, learning_rate


def test_adam_is_plain_adam_without_weight_decay_and_a_constant_rate_stays_constant(tmp_path):
    config = TrainingConfig(data=tmp_path, output=tmp_path / "run", optimizer="adam", lr=1e-4, schedule="constant",
                            warmup_epochs=0)
    lr, weight_decay = _optimiser_defaults(config)
    optimizer = build_optimizer(torch.nn.Linear(2, 2).parameters(), "adam", lr, weight_decay, torch.device("cpu"))
    assert type(optimizer) is torch.optim.Adam and (lr, weight_decay) == (1e-4, 0.0)
    total = config.epochs * config.iterations_per_epoch
    assert {learning_rate(lr, "constant", 0, step, total) for step in (0, 99, 100, total - 1)} == {1e-4}


def _member(weights: list[float] | None) -> Checkpoint:
    model = build_model("unet3d", dict(in_channels=1, out_channels=3, depth=2, base_width=2))
    training = {"loss_class_weights": weights} if weights is not None else {}
    return Checkpoint.from_model(model, [Label(0, "background"), Label(1, "a"), Label(2, "b")],
                                 Preprocessing(spacing=(1.0, 1.0, 1.0)), (8, 8, 8), training=training)


def test_weighted_dice_weights_are_those_the_trainer_resolved_also_when_cross_validation_scores_the_test_set():
    plan = TrainingPlan([Label(0, "background"), Label(1, "a"), Label(2, "b")], Preprocessing(), (8, 8, 8), "unet3d",
                        {}, 1e-3, 0.0, "weighted_dice")
    target = torch.zeros((8, 8, 8), dtype=torch.uint8)
    target[:4] = 1
    target[:1] = 2  # class 2 is 3 times rarer than class 1
    weights = plan.loss_weights([SimpleNamespace(target=target.numpy())])
    assert weights[0] == 0.0 and weights[2] == pytest.approx(3 * weights[1])
    # cross-validation's test loss uses the weights the folds were trained with, not equal ones
    assert _trained_weights([_member(weights), _member(weights)]) == pytest.approx(weights)
    assert _trained_weights([_member(weights), _member(None)]) is None
