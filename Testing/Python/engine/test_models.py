"""The networks keep the input's size, and the registry rebuilds each of them."""

from __future__ import annotations

import pytest
import torch

from UNet3DSegmenterLib.models import ARCHITECTURES, UNet3D, build_model, count_parameters


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_every_architecture_maps_a_patch_to_class_logits(name, norm):
    model = build_model(name, dict(in_channels=2, out_channels=3, depth=3, base_width=4, norm=norm, dropout=0.1))
    output = model(torch.randn(2, 2, 16, 24, 32))
    assert output.shape == (2, 3, 16, 24, 32)
    output.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_unet3d_defaults_match_the_classic_widths():
    model = UNet3D(in_channels=1, out_channels=2)
    assert [block[0][0].out_channels for block in model.encoder] == [16, 32, 64, 128, 256]
    assert model.size_divisor == 16
    assert count_parameters(model) > 5_000_000


def test_registry_rebuilds_from_recorded_arguments():
    model = build_model("vnet", dict(in_channels=1, out_channels=2, depth=3, base_width=4))
    twin = build_model("vnet", model.architecture_args)
    twin.load_state_dict(model.state_dict())
    x = torch.randn(1, 1, 16, 16, 16)
    model.eval(), twin.eval()
    assert torch.equal(model(x), twin(x))


def test_unknown_architecture_is_named():
    with pytest.raises(ValueError, match="unknown architecture 'unet2d'"):
        build_model("unet2d", {})
