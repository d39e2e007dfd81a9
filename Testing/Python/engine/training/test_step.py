"""A training step channels-last computes what the plain network computes, with the same checkpoint."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from UNet3DSegmenterLib.models import build_model
from UNet3DSegmenterLib.training.losses import build_loss
from UNet3DSegmenterLib.training.step import ChannelsLastInstanceNorm3d, TrainingStep, use_channels_last_instance_norm

CPU = torch.device("cpu")


def norms(dtype: torch.dtype = torch.float64) -> tuple[nn.InstanceNorm3d, nn.Module]:
    """A plain instance norm with non-trivial parameters, and its channels-last twin."""
    torch.manual_seed(0)
    plain = nn.InstanceNorm3d(5, affine=True).to(dtype)
    plain.weight.data.uniform_(0.5, 1.5)
    plain.bias.data.uniform_(-1, 1)
    return plain, use_channels_last_instance_norm(copy.deepcopy(plain))


def channels_last_input(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    x = torch.randn(3, 5, 6, 7, 4, dtype=dtype) * 3 + 2
    return x.contiguous(memory_format=torch.channels_last_3d).requires_grad_()


def test_channels_last_instance_norm_equals_pytorch_forward_and_backward():
    plain, twin = norms()
    assert type(twin) is ChannelsLastInstanceNorm3d
    x = channels_last_input()
    gradient = torch.randn(3, 5, 6, 7, 4, dtype=torch.float64)
    expected = torch.autograd.grad(plain(x), [x, plain.weight, plain.bias], gradient)
    output = twin(x)
    assert output.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(output, plain(x), rtol=1e-10, atol=1e-10)
    for result, reference in zip(torch.autograd.grad(output, [x, twin.weight, twin.bias], gradient), expected):
        torch.testing.assert_close(result, reference, rtol=1e-10, atol=1e-10)


def test_channels_last_instance_norm_passes_gradcheck():
    _, twin = norms()
    x = channels_last_input()[:2, :, :3, :4, :3].contiguous(memory_format=torch.channels_last_3d)
    assert torch.autograd.gradcheck(lambda x, weight, bias: twin(x), (x, twin.weight, twin.bias))


def test_channels_last_instance_norm_in_bfloat16_keeps_float32_parameters():
    plain, twin = norms(torch.float32)
    x = channels_last_input(torch.float32)
    output = twin(x.detach().bfloat16().contiguous(memory_format=torch.channels_last_3d))
    assert output.dtype == torch.bfloat16 and twin.weight.dtype == torch.float32
    torch.testing.assert_close(output.float(), plain(x.detach()), rtol=0.02, atol=0.02)


def test_channels_last_training_keeps_the_state_dict_a_checkpoint_needs():
    model = build_model("unet3d", dict(in_channels=1, out_channels=2, depth=2, base_width=4))
    keys = list(model.state_dict())
    step = TrainingStep.create(model, build_loss("dicece", 2), "adamw", 1e-3, 0.0, 12.0, CPU, torch.float32)
    assert step.channels_last and any(type(m) is ChannelsLastInstanceNorm3d for m in step.module.modules())
    assert list(step.module.state_dict()) == keys
    fresh = build_model("unet3d", dict(in_channels=1, out_channels=2, depth=2, base_width=4))
    fresh.load_state_dict(step.module.state_dict())


@pytest.mark.parametrize("architecture", ["unet3d", "resunet3d", "vnet"])
def test_a_channels_last_step_has_the_loss_and_gradients_of_a_plain_step(architecture):
    torch.manual_seed(0)
    model = build_model(architecture, dict(in_channels=1, out_channels=3, depth=3, base_width=4))
    images = torch.randn(2, 1, 16, 16, 16)
    labels = torch.randint(0, 3, (2, 16, 16, 16))
    results = []
    for channels_last in (False, True):
        step = TrainingStep.create(copy.deepcopy(model), build_loss("dicece", 3), "adamw", 1e-3, 0.0, 12.0, CPU,
                                   torch.float32, channels_last=channels_last)
        loss = step(images, labels)  # gradients stay on the parameters after the optimiser step
        results.append((loss, {name: value.grad.clone() for name, value in step.module.named_parameters()}))
    (plain_loss, plain_gradients), (fast_loss, fast_gradients) = results
    assert fast_loss == pytest.approx(plain_loss, rel=1e-5)
    for name, gradient in plain_gradients.items():
        scale = float(gradient.abs().max()) + 1e-6
        torch.testing.assert_close(fast_gradients[name], gradient, rtol=1e-4, atol=1e-4 * scale)
