"""3D segmentation networks and the registry that rebuilds them from a checkpoint.

- :class:`UNet3D`: Cicek et al. 2016. Two 3x3x3 conv + norm + ReLU per level, max pooling down,
  transposed conv up, skip concatenation.
- :class:`ResidualUNet3D`: the same U shape with ResNet basic blocks in the encoder and bottleneck.
- :class:`ResNet18UNet3D`: ResNet-18's layout in 3D as the encoder (a stem, four stages of two basic
  blocks at 64-128-256-512 channels) and a matching U-Net decoder: about 41.5 M parameters.
- :class:`VNet`: Milletari et al. 2016. Residual stages of 5x5x5 convs with PReLU, strided-conv
  downsampling, transposed-conv upsampling.

All take ``(in_channels, out_channels)`` first, and ``depth`` (levels including the bottleneck),
``base_width`` (channels at the first level, doubled per level), ``norm`` ('instance', 'batch' or
'none': convolutions then carry a bias) and ``dropout`` (probability in the bottleneck). Inputs must be divisible by ``model.size_divisor``
along each axis; the sliding window takes care of that.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .choices import NORMS
from .nnunet_networks import PlainConvUNet, ResidualEncoderUNet


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown normalisation {kind!r}: choose one of {NORMS}")


def _conv_norm(in_channels: int, out_channels: int, kernel_size: int, norm: str, stride: int = 1) -> nn.Sequential:
    """conv -> norm. A convolution followed by a normalisation needs no bias (the norm's shift is
    one); without normalisation it keeps its bias."""
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=(kernel_size - 1) // 2,
                  bias=norm == "none"),
        _norm(norm, out_channels),
    )


class ConvNormAct(nn.Sequential):
    """conv -> norm -> activation, the unit every network here is made of."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, norm: str = "instance",
                 activation: type[nn.Module] = nn.ReLU, stride: int = 1):
        super().__init__(
            *_conv_norm(in_channels, out_channels, kernel_size, norm, stride),
            activation(inplace=True) if activation is nn.ReLU else activation(out_channels),
        )


class _SegmentationNetwork(nn.Module):
    """Shared bookkeeping: the constructor arguments (for the checkpoint) and the size divisor."""

    def __init__(self, **architecture_args):
        super().__init__()
        self.architecture_args = dict(architecture_args)
        self.size_divisor = 2 ** (architecture_args["depth"] - 1)

    @staticmethod
    def _widths(depth: int, base_width: int) -> list[int]:
        if depth < 2:
            raise ValueError(f"depth must be at least 2, got {depth}")
        return [base_width * 2**level for level in range(depth)]

    def decoder_levels(self) -> list[tuple[nn.Module, int]]:
        """The decoder's stages from coarse to fine, with the channels each outputs; the last one's
        output feeds the head. Deep supervision taps the coarser ones (training only)."""
        args = self.architecture_args
        widths = self._widths(args["depth"], args["base_width"])
        return list(zip(self._decoder_stages(), reversed(widths[:-1])))

    def _decoder_stages(self) -> list[nn.Module]:
        return list(getattr(self, "decoder").blocks)  # noqa: B009  (the U-Nets' shared _Decoder)


class _Decoder(nn.Module):
    """Transposed-conv up, concatenate the skip, then two conv units per level."""

    def __init__(self, widths: list[int], norm: str, kernel_size: int = 3, activation=nn.ReLU):
        super().__init__()
        self.ups = nn.ModuleList(
            nn.ConvTranspose3d(widths[level + 1], widths[level], kernel_size=2, stride=2)
            for level in reversed(range(len(widths) - 1))
        )
        self.blocks = nn.ModuleList(
            nn.Sequential(
                ConvNormAct(2 * widths[level], widths[level], kernel_size, norm, activation),
                ConvNormAct(widths[level], widths[level], kernel_size, norm, activation),
            )
            for level in reversed(range(len(widths) - 1))
        )

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for up, block, skip in zip(self.ups, self.blocks, reversed(skips)):
            x = block(torch.cat([up(x), skip], dim=1))
        return x


class UNet3D(_SegmentationNetwork):
    """The 3D U-Net of Cicek et al. (2016).

    Args:
        in_channels: image channels (1 for a single MR or CT series).
        out_channels: classes including background.
        depth: levels including the bottleneck (5 gives widths 16-32-64-128-256 with base_width 16).
        base_width: channels at the first level; doubled at each level down.
        norm: 'instance' or 'batch'.
        dropout: dropout probability before the bottleneck's second conv.

    Example::

        >>> model = UNet3D(in_channels=1, out_channels=3)
        >>> model(torch.zeros(1, 1, 32, 32, 32)).shape
        torch.Size([1, 3, 32, 32, 32])
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 2, depth: int = 5, base_width: int = 16,
                 norm: str = "instance", dropout: float = 0.0):
        super().__init__(in_channels=in_channels, out_channels=out_channels, depth=depth,
                         base_width=base_width, norm=norm, dropout=dropout)
        widths = self._widths(depth, base_width)
        channels = [in_channels] + widths
        self.encoder = nn.ModuleList(
            nn.Sequential(
                ConvNormAct(channels[level], widths[level], 3, norm),
                nn.Dropout3d(dropout) if dropout and level == depth - 1 else nn.Identity(),
                ConvNormAct(widths[level], widths[level], 3, norm),
            )
            for level in range(depth)
        )
        self.pool = nn.MaxPool3d(2)
        self.decoder = _Decoder(widths, norm)
        self.head = nn.Conv3d(widths[0], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level, block in enumerate(self.encoder):
            x = block(x if level == 0 else self.pool(x))
            skips.append(x)
        return self.head(self.decoder(skips.pop(), skips))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3x3 conv + norm with an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, norm: str, stride: int = 1):
        super().__init__()
        self.conv1 = ConvNormAct(in_channels, out_channels, 3, norm, stride=stride)
        self.conv2 = _conv_norm(out_channels, out_channels, 3, norm)
        self.shortcut = (
            nn.Identity() if stride == 1 and in_channels == out_channels else
            _conv_norm(in_channels, out_channels, 1, norm, stride)
        )
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResidualUNet3D(_SegmentationNetwork):
    """A U-Net whose encoder and bottleneck are ResNet basic blocks (strided first block per level).

    Same arguments as :class:`UNet3D`; the decoder is the U-Net's (transposed conv, concat, two convs).
    """

    _STEM_KERNEL = 3

    def __init__(self, in_channels: int = 1, out_channels: int = 2, depth: int = 5, base_width: int = 16,
                 norm: str = "instance", dropout: float = 0.0):
        super().__init__(in_channels=in_channels, out_channels=out_channels, depth=depth,
                         base_width=base_width, norm=norm, dropout=dropout)
        widths = self._widths(depth, base_width)
        self.stem = ConvNormAct(in_channels, widths[0], self._STEM_KERNEL, norm)
        self.encoder = nn.ModuleList(
            nn.Sequential(
                BasicBlock(widths[max(level - 1, 0)], widths[level], norm, stride=1 if level == 0 else 2),
                nn.Dropout3d(dropout) if dropout and level == depth - 1 else nn.Identity(),
                BasicBlock(widths[level], widths[level], norm),
            )
            for level in range(depth)
        )
        self.decoder = _Decoder(widths, norm)
        self.head = nn.Conv3d(widths[0], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        return self.head(self.decoder(skips.pop(), skips))


class ResNet18UNet3D(ResidualUNet3D):
    """ResNet-18's layout in 3D as a U-Net encoder, with the U-Net decoder to match.

    A 7x7x7 stem convolution, then four stages of two basic blocks at 64, 128, 256 and 512 channels
    (the first block of stages 2 to 4 strided), and per stage up a transposed convolution, the skip
    and two convolutions: about 41.5 M parameters with the default width. Unlike the classification
    ResNet the stem keeps full resolution, so that the finest skip connection carries full-resolution
    detail; inputs must be divisible by 8.

    Args:
        in_channels, out_channels, norm, dropout: as for :class:`UNet3D`.
        depth: ResNet-18 has four stages; any other value is refused.
        base_width: channels of the first stage (64 in ResNet-18; smaller for quick experiments).

    Example::

        >>> model = ResNet18UNet3D(in_channels=1, out_channels=3)
        >>> count_parameters(model)
        41505987
    """

    _STEM_KERNEL = 7

    def __init__(self, in_channels: int = 1, out_channels: int = 2, depth: int = 4, base_width: int = 64,
                 norm: str = "instance", dropout: float = 0.0):
        if depth != 4:
            raise ValueError(f"resnet18unet has ResNet-18's four stages: depth must be 4, got {depth}")
        super().__init__(in_channels, out_channels, depth, base_width, norm, dropout)


class _VNetStage(nn.Module):
    """``convolutions`` 5x5x5 conv units with a residual connection around them."""

    def __init__(self, channels: int, convolutions: int, norm: str, in_channels: int | None = None):
        super().__init__()
        in_channels = in_channels or channels
        self.units = nn.Sequential(*(
            ConvNormAct(in_channels if index == 0 else channels, channels, 5, norm, nn.PReLU)
            for index in range(convolutions)
        ))
        self.shortcut = nn.Identity() if in_channels == channels else nn.Conv3d(in_channels, channels, 1)
        self.activation = nn.PReLU(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.units(x) + self.shortcut(x))


class VNet(_SegmentationNetwork):
    """The V-Net of Milletari et al. (2016): residual stages of 5x5x5 convs, PReLU, strided-conv down.

    Stage ``level`` has ``min(level + 1, 3)`` convolutions, as in the paper (1, 2, 3, 3, 3).
    Same arguments as :class:`UNet3D`.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 2, depth: int = 5, base_width: int = 16,
                 norm: str = "instance", dropout: float = 0.0):
        super().__init__(in_channels=in_channels, out_channels=out_channels, depth=depth,
                         base_width=base_width, norm=norm, dropout=dropout)
        widths = self._widths(depth, base_width)
        self.input_stage = _VNetStage(widths[0], 1, norm, in_channels=in_channels)
        self.downs = nn.ModuleList(
            ConvNormAct(widths[level], widths[level + 1], 2, norm, nn.PReLU, stride=2)
            for level in range(depth - 1)
        )
        self.stages = nn.ModuleList(
            _VNetStage(widths[level], min(level + 1, 3), norm) for level in range(1, depth)
        )
        self.dropout = nn.Dropout3d(dropout) if dropout else nn.Identity()
        self.ups = nn.ModuleList(
            nn.ConvTranspose3d(widths[level + 1], widths[level], kernel_size=2, stride=2)
            for level in reversed(range(depth - 1))
        )
        self.up_stages = nn.ModuleList(
            _VNetStage(widths[level], min(level + 1, 3), norm, in_channels=2 * widths[level])
            for level in reversed(range(depth - 1))
        )
        self.head = nn.Conv3d(widths[0], out_channels, kernel_size=1)

    def _decoder_stages(self) -> list[nn.Module]:
        return list(self.up_stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_stage(x)
        skips = [x]
        for down, stage in zip(self.downs, self.stages):
            x = stage(down(x))
            skips.append(x)
        x = self.dropout(skips.pop())
        for up, stage, skip in zip(self.ups, self.up_stages, reversed(skips)):
            x = stage(torch.cat([up(x), skip], dim=1))
        return self.head(x)


ARCHITECTURES: dict[str, type[_SegmentationNetwork]] = {
    "unet3d": UNet3D,
    "resunet3d": ResidualUNet3D,
    "resnet18unet": ResNet18UNet3D,
    "vnet": VNet,
}
NNUNET_ARCHITECTURES: dict[str, type[nn.Module]] = {"nnunet_plain": PlainConvUNet, "nnunet_resenc": ResidualEncoderUNet}
"""nnU-Net's networks, read from its model folders (nnunet_folder.py) with nnU-Net's arguments; not trained here."""


def build_model(architecture: str, architecture_args: dict) -> _SegmentationNetwork:
    """Build a network by registry name (see :data:`ARCHITECTURES`, :data:`NNUNET_ARCHITECTURES`) and
    constructor arguments."""
    if architecture in NNUNET_ARCHITECTURES:
        return NNUNET_ARCHITECTURES[architecture](**architecture_args)  # type: ignore[return-value]
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}: choose one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[architecture](**architecture_args)


def default_arguments(architecture: str) -> dict:
    """The constructor defaults of a registered network, e.g. ``{"depth": 4, "base_width": 64, ...}``
    for 'resnet18unet'."""
    parameters = inspect.signature(ARCHITECTURES[architecture]).parameters.values()
    return {parameter.name: parameter.default for parameter in parameters}


def architecture_name(model: nn.Module) -> str:
    for name, cls in {**ARCHITECTURES, **NNUNET_ARCHITECTURES}.items():
        if type(model) is cls:
            return name
    raise ValueError(f"{type(model).__name__} is not a registered architecture")


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def instance_norm_per_sample(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                             out: torch.Tensor, means: torch.Tensor | None = None,
                             inverse_stds: torch.Tensor | None = None) -> torch.Tensor:
    """Instance norm of a channels-last batch into ``out`` (which may be ``x`` itself).

    Training-mode batch norm of a single sample is instance norm of that sample; its CPU kernel is
    vectorised for channels-last, takes float32 statistics of bfloat16 inputs and works element by
    element, so input and output may be the same memory. ``means`` and ``inverse_stds`` (samples x
    channels), when given, receive the statistics its backward needs.
    """
    for sample in range(x.shape[0]):
        torch.ops.aten.native_batch_norm.out(
            x[sample: sample + 1], weight, bias, None, None, True, 0.0, eps, out=out[sample: sample + 1],
            save_mean=torch.empty(0) if means is None else means[sample],
            save_invstd=torch.empty(0) if inverse_stds is None else inverse_stds[sample])
    return out
