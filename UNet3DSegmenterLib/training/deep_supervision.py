"""Deep supervision: the loss also judges the decoder's coarser levels (training only).

nnU-Net trains its U-Nets this way: small 1x1x1 heads read the decoder's features at half and
quarter resolution, and the loss adds their errors against the labels downsampled to match, with
weights halving per level. The early layers then get a direct signal, which speeds up learning;
the heads are discarded afterwards, so checkpoints and inference are those of the plain network.

Example::

    >>> trained = DeepSupervision(network, levels=2)          # network(x) -> [full, half, quarter]
    >>> loss = DeepSupervisionLoss(build_loss("dicece", 3))
    >>> value = loss(trained(images), labels)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DeepSupervision(nn.Module):
    """``network``'s output followed by up to ``levels`` auxiliary outputs from its decoder, finest first.

    The auxiliary outputs come from forward hooks on the decoder stages just above the finest (see
    ``decoder_levels`` of the networks in :mod:`UNet3DSegmenterLib.models`), through 1x1x1
    convolutions that this wrapper owns. ``network`` itself is unchanged and is what gets saved.
    """

    def __init__(self, network: nn.Module, levels: int = 2):
        super().__init__()
        tapped = network.decoder_levels()[:-1][::-1][:levels]  # type: ignore[operator]
        if not tapped:
            raise ValueError("deep supervision needs a decoder with more than one level: use a depth of 3 or more")
        self.network = network
        classes = int(network.architecture_args["out_channels"])  # type: ignore[index]
        self.heads = nn.ModuleList(nn.Conv3d(channels, classes, kernel_size=1) for _, channels in tapped)
        self._features: list[torch.Tensor | None] = [None] * len(tapped)
        for index, (stage, _) in enumerate(tapped):
            stage.register_forward_hook(self._keeper(index))

    def _keeper(self, index: int):
        def keep(module: nn.Module, inputs, output: torch.Tensor) -> None:
            if torch.is_grad_enabled():  # training; validation copies the network, hooks and all
                self._features[index] = output
        return keep

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        output = self.network(x)
        features, self._features = self._features, [None] * len(self.heads)
        return [output] + [head(feature) for head, feature in zip(self.heads, features)]


class DeepSupervisionLoss(nn.Module):
    """``loss`` on each output against the labels at its resolution, weights 1, 1/2, 1/4, ... normalised.

    A single tensor (what validation passes) is scored with ``loss`` alone.
    """

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, outputs: torch.Tensor | list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, target)
        weights = [0.5**level for level in range(len(outputs))]
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for weight, output in zip(weights, outputs):
            total = total + weight / sum(weights) * self.loss(output, _labels_at(target, output.shape[-3:]))
        return total


def _labels_at(target: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Class indices (b, z, y, x) at a coarser ``shape``, by nearest neighbour (labels stay labels)."""
    if target.shape[-3:] == shape:
        return target
    resized = F.interpolate(target[:, None].float(), size=tuple(shape), mode="nearest-exact")
    return resized[:, 0].long()
