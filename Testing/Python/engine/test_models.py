"""The networks keep the input's size, and the registry rebuilds each of them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from UNet3DSegmenterLib.choices import NORMS
from UNet3DSegmenterLib.models import (
    ARCHITECTURES,
    BasicBlock,
    ResNet18UNet3D,
    UNet3D,
    build_model,
    count_parameters,
    default_arguments,
)


def small(name: str, **changes) -> dict:
    """Constructor arguments of a tiny version of ``name`` (resnet18unet keeps its four stages)."""
    depth = default_arguments(name)["depth"] if name == "resnet18unet" else 3
    return dict(in_channels=2, out_channels=3, depth=depth, base_width=4, **changes)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
@pytest.mark.parametrize("norm", NORMS)
def test_every_architecture_maps_a_patch_to_class_logits(name, norm):
    model = build_model(name, small(name, norm=norm, dropout=0.1))
    output = model(torch.randn(2, 2, 16, 24, 32))
    assert output.shape == (2, 3, 16, 24, 32)
    output.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_unet3d_defaults_match_the_classic_widths():
    model = UNet3D(in_channels=1, out_channels=2)
    assert [block[0][0].out_channels for block in model.encoder] == [16, 32, 64, 128, 256]
    assert model.size_divisor == 16
    assert count_parameters(model) > 5_000_000


def test_resnet18unet_has_resnet18_stages_and_about_42_million_parameters():
    model = ResNet18UNet3D(in_channels=1, out_channels=3)
    assert 41_000_000 < count_parameters(model) < 42_500_000
    assert model.stem[0].kernel_size == (7, 7, 7) and model.stem[0].out_channels == 64
    stages = [[block for block in stage if isinstance(block, BasicBlock)] for stage in model.encoder]
    assert [len(blocks) for blocks in stages] == [2, 2, 2, 2]
    assert [blocks[-1].conv2[0].out_channels for blocks in stages] == [64, 128, 256, 512]
    assert [blocks[0].conv1[0].stride for blocks in stages] == [(1, 1, 1)] + [(2, 2, 2)] * 3
    assert len(model.decoder.blocks) == 3 and model.size_divisor == 8
    with torch.inference_mode():  # the full-width network at a tiny size: the test stays quick
        assert model.eval()(torch.randn(1, 1, 8, 8, 16)).shape == (1, 3, 8, 8, 16)


def test_resnet18unet_refuses_another_number_of_stages():
    with pytest.raises(ValueError, match="four stages: depth must be 4, got 5"):
        build_model("resnet18unet", dict(in_channels=1, out_channels=2, depth=5))


def test_norm_none_gives_plain_convolutions_with_a_bias():
    for name in ARCHITECTURES:
        model = build_model(name, small(name, norm="none"))
        norms = (nn.InstanceNorm3d, nn.BatchNorm3d)
        assert not any(isinstance(module, norms) for module in model.modules()), name
        assert all(conv.bias is not None for conv in model.modules() if isinstance(conv, nn.Conv3d)), name
    with_norm = build_model("vnet", small("vnet", norm="instance"))
    assert any(conv.bias is None for conv in with_norm.modules() if isinstance(conv, nn.Conv3d))


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
