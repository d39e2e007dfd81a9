"""Make a trained network fast for inference without changing what it computes.

On the CPU, oneDNN's 3D convolutions run fastest on channels-last tensors and, on processors with
AVX512-BF16 or AMX, in bfloat16. PyTorch's own instance norm reshapes channels-last tensors into
copies, which costs more than the convolutions save, so it is replaced by an equivalent that
reduces in place. Batch norm is folded into the convolution before it. The weights stay the same
numbers: every change here is an exact rewrite of the same function (up to rounding).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class _InferenceInstanceNorm(nn.Module):
    """InstanceNorm3d for inference on channels-last tensors, normalising its input in place.

    Per-channel sums are matrix products with a vector of ones (oneDNN accumulates them in float32),
    which is several times faster than a strided reduction. The second pass works on values already
    centred by a first estimate of the mean, so the variance does not lose precision when the mean
    is large. In place is safe here: the input is always a convolution output that nothing else reads.
    """

    _CHUNK = 16384
    weight: torch.Tensor
    bias: torch.Tensor

    def __init__(self, norm: nn.InstanceNorm3d):
        super().__init__()
        self.eps = norm.eps
        channels = norm.num_features
        self.register_buffer("weight", norm.weight.detach().clone() if norm.affine else torch.ones(channels))
        self.register_buffer("bias", norm.bias.detach().clone() if norm.affine else torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels = x.shape[:2]
        if not x.is_contiguous(memory_format=torch.channels_last_3d):
            x = x.contiguous(memory_format=torch.channels_last_3d)
        voxels = x.permute(0, 2, 3, 4, 1).view(batch, -1, channels)  # (N, S, C), no copy
        count = voxels.shape[1]
        ones = voxels.new_ones(batch, 1, count)
        first_mean = torch.bmm(ones, voxels) / count
        voxels.sub_(first_mean)
        residual_mean = torch.bmm(ones, voxels).float() / count
        squares = sum(  # in chunks, so the squares stay in cache instead of a full-size temporary
            torch.bmm(ones[:, :, : chunk.shape[1]], chunk * chunk).float()
            for chunk in voxels.split(self._CHUNK, dim=1)
        ) / count
        variance = (squares - residual_mean.square()).clamp_min_(0)
        scale = self.weight.float().view(1, 1, -1) * torch.rsqrt(variance + self.eps)
        shift = self.bias.float().view(1, 1, -1) - residual_mean * scale
        voxels.mul_(scale.to(x.dtype)).add_(shift.to(x.dtype))
        return x


class _Float32Head(nn.Module):
    """The final 1x1 convolution in float32: class logits are compared by argmax, and rounding them
    to bfloat16 (3 significant digits) would flip near-tied voxels for no speed gain."""

    def __init__(self, head: nn.Conv3d):
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.float())


def _fold_batch_norm(conv: nn.Conv3d, norm: nn.BatchNorm3d) -> nn.Conv3d:
    """A convolution that computes conv followed by (eval-mode) batch norm."""
    assert norm.running_mean is not None and norm.running_var is not None  # track_running_stats is checked
    folded = copy.deepcopy(conv)
    scale = norm.weight.detach() * torch.rsqrt(norm.running_var + norm.eps)
    folded.weight = nn.Parameter(conv.weight.detach() * scale.view(-1, 1, 1, 1, 1))
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(norm.running_mean)
    folded.bias = nn.Parameter((bias - norm.running_mean) * scale + norm.bias.detach())
    return folded


def _rewrite(module: nn.Module) -> None:
    """Fold conv+batch-norm pairs inside Sequentials and swap instance norms, recursively."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Sequential):
            items = list(child.children())
            for index, (first, second) in enumerate(zip(items, items[1:])):
                if isinstance(first, nn.Conv3d) and isinstance(second, nn.BatchNorm3d) and second.track_running_stats:
                    child[index] = _fold_batch_norm(first, second)
                    child[index + 1] = nn.Identity()
        if isinstance(child, nn.InstanceNorm3d):
            setattr(module, name, _InferenceInstanceNorm(child))
        else:
            _rewrite(child)


def prepare_for_inference(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """An eval-mode copy of ``model`` rewritten for speed on ``device`` in ``dtype``.

    On the CPU: batch norm folded, instance norm swapped, channels-last layout and the weights cast
    to ``dtype``. On CUDA the model is only moved and put in eval mode; autocast does the rest.
    """
    fast = copy.deepcopy(model).eval()
    for parameter in fast.parameters():
        parameter.requires_grad_(False)
    if device.type == "cpu":
        _rewrite(fast)
        fast = fast.to(dtype=dtype, memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
        if isinstance(getattr(fast, "head", None), nn.Conv3d):
            fast.head = _Float32Head(fast.head.float())
    return fast.to(device)


def input_layout(batch: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Put a batch of windows in the layout and dtype :func:`prepare_for_inference` expects."""
    batch = batch.to(device, non_blocking=True)
    if device.type == "cpu":
        return batch.to(dtype=dtype, memory_format=torch.channels_last_3d)
    return batch
