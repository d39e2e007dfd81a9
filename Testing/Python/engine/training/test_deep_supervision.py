"""Deep supervision: auxiliary outputs from the decoder, a loss over all of them, and nothing of it saved."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from UNet3DSegmenterLib.checkpoint import load_checkpoint
from UNet3DSegmenterLib.models import ARCHITECTURES, build_model
from UNet3DSegmenterLib.phantom import write_phantom_dataset
from UNet3DSegmenterLib.training.config import TrainingConfig
from UNet3DSegmenterLib.training.deep_supervision import DeepSupervision, DeepSupervisionLoss
from UNet3DSegmenterLib.training.losses import build_loss
from UNet3DSegmenterLib.training.trainer import train


@pytest.mark.parametrize("architecture", ["unet3d", "resunet3d", "vnet"])
def test_outputs_come_at_full_half_and_quarter_resolution(architecture):
    network = build_model(architecture, dict(in_channels=1, out_channels=3, depth=4, base_width=4))
    outputs = DeepSupervision(network)(torch.randn(2, 1, 16, 32, 32))
    assert [tuple(output.shape) for output in outputs] == [(2, 3, 16, 32, 32), (2, 3, 8, 16, 16), (2, 3, 4, 8, 8)]


def test_the_first_output_is_the_networks_own():
    torch.manual_seed(0)
    network = build_model("unet3d", dict(in_channels=1, out_channels=3, depth=3, base_width=4)).eval()
    image = torch.randn(1, 1, 16, 16, 16)
    torch.testing.assert_close(DeepSupervision(network)(image)[0], network(image))


def test_a_shallow_network_gets_the_levels_it_has_and_one_without_any_is_refused():
    network = build_model("unet3d", dict(in_channels=1, out_channels=2, depth=3, base_width=4))
    assert len(DeepSupervision(network)(torch.randn(1, 1, 8, 8, 8))) == 2
    network = build_model("unet3d", dict(in_channels=1, out_channels=2, depth=2, base_width=4))
    with pytest.raises(ValueError, match="more than one level"):
        DeepSupervision(network)


def test_the_loss_weighs_levels_one_half_one_quarter_against_labels_at_their_resolution():
    base = build_loss("ce", 3)
    loss = DeepSupervisionLoss(base)
    labels = torch.randint(0, 3, (2, 8, 8, 8))
    outputs = [torch.randn(2, 3, 8, 8, 8), torch.randn(2, 3, 4, 4, 4), torch.randn(2, 3, 2, 2, 2)]
    coarse = [labels, labels[:, 1::2, 1::2, 1::2], labels[:, 2::4, 2::4, 2::4]]  # nearest-exact picks these
    expected = sum(weight * base(output, target) for weight, output, target in
                   zip([4 / 7, 2 / 7, 1 / 7], outputs, coarse))
    torch.testing.assert_close(loss(outputs, labels), expected)
    torch.testing.assert_close(loss(outputs[0], labels), base(outputs[0], labels))  # validation: one tensor


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("phantoms"), cases=4, shape=(24, 32, 32), seed=0)


@pytest.mark.slow
def test_training_with_deep_supervision_saves_the_plain_network_and_resumes_exactly(phantoms, tmp_path):
    config = TrainingConfig(data=phantoms, output=tmp_path / "whole", depth=3, base_width=4, patch_size=(16, 32, 32),
                            epochs=2, iterations_per_epoch=2, workers=0, val_fraction=0.25, deep_supervision=True)
    whole = train(config)
    checkpoint = load_checkpoint(whole.best_checkpoint)
    plain = build_model("unet3d", checkpoint.architecture_args)
    assert set(checkpoint.state_dict) == set(plain.state_dict()), "only the network's weights are saved"
    calls: list[int] = []
    broken = replace(config, output=tmp_path / "broken")
    train(broken, cancel=lambda: calls.append(1) or len(calls) >= 3)
    resumed = train(replace(broken, resume=True))
    assert [row["train_loss"] for row in resumed.history] == [row["train_loss"] for row in whole.history]
    expected = torch.load(whole.output / "last.state.pt", weights_only=True)
    actual = torch.load(resumed.output / "last.state.pt", weights_only=True)
    assert expected["auxiliary"] and set(expected["auxiliary"]) == set(actual["auxiliary"])
    assert all(torch.equal(expected["auxiliary"][key], actual["auxiliary"][key]) for key in expected["auxiliary"])
    assert all(torch.equal(expected["model"][key], actual["model"][key]) for key in expected["model"])


def test_every_registered_network_offers_its_decoder_levels():
    for name in ARCHITECTURES:
        arguments = dict(in_channels=1, out_channels=2, base_width=2)
        if name != "resnet18unet":
            arguments["depth"] = 4
        levels = build_model(name, arguments).decoder_levels()
        assert len(levels) == 3 and [channels for _, channels in levels] == sorted(
            (channels for _, channels in levels), reverse=True)
