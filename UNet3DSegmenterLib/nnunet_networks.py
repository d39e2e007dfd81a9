"""nnU-Net v2's 3D networks, built here with the same module tree and parameter names.

nnU-Net's plans name their network by class (``dynamic_network_architectures...PlainConvUNet`` or
``...ResidualEncoderUNet``, the ResEnc presets) and its constructor arguments; its checkpoints hold
that network's state dict. These classes take the same arguments (with the layer types spelled as
the plans spell them, e.g. ``"torch.nn.modules.conv.Conv3d"``) and register the same modules under
the same names, including the aliases nnU-Net's have (``conv`` beside ``all_modules.0``, the
encoder again as ``decoder.encoder``), so that nnU-Net's state dicts load unchanged and strictly.

dynamic_network_architectures itself is not a dependency: it requires timm, which brings a
torchvision build that does not load beside the CPU build of torch (and is large for Slicer's
Python). Only inference is built here: the deep-supervision heads are kept (their weights load) but
only the last one runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

_CONVOLUTIONS = {"torch.nn.modules.conv.Conv3d": nn.Conv3d, "torch.nn.Conv3d": nn.Conv3d}
_NORMS = {"torch.nn.modules.instancenorm.InstanceNorm3d": nn.InstanceNorm3d,
          "torch.nn.InstanceNorm3d": nn.InstanceNorm3d,
          "torch.nn.modules.batchnorm.BatchNorm3d": nn.BatchNorm3d, "torch.nn.BatchNorm3d": nn.BatchNorm3d}
_ACTIVATIONS = {"torch.nn.LeakyReLU": nn.LeakyReLU, "torch.nn.modules.activation.LeakyReLU": nn.LeakyReLU,
                "torch.nn.ReLU": nn.ReLU, "torch.nn.modules.activation.ReLU": nn.ReLU}
_DROPOUTS = {"torch.nn.Dropout3d": nn.Dropout3d, "torch.nn.modules.dropout.Dropout3d": nn.Dropout3d,
             "torch.nn.Dropout": nn.Dropout, "torch.nn.modules.dropout.Dropout": nn.Dropout}


def _layer(table: dict, name: str | None, what: str):
    if name is None:
        return None
    if name not in table:
        raise ValueError(f"the plans name a {what} this engine does not build: {name} (3D networks only)")
    return table[name]


def _triple(value) -> list[int]:
    return [int(value)] * 3 if isinstance(value, int) else [int(item) for item in value]


class _Layers:
    """The layer types and their arguments that every block of one network shares."""

    def __init__(self, conv_op: str, norm_op: str | None, norm_op_kwargs: dict | None, nonlin: str | None,
                 nonlin_kwargs: dict | None, dropout_op: str | None, dropout_op_kwargs: dict | None,
                 conv_bias: bool):
        self.conv = _layer(_CONVOLUTIONS, conv_op, "convolution")
        self.norm, self.norm_kwargs = _layer(_NORMS, norm_op, "normalisation"), dict(norm_op_kwargs or {})
        self.nonlin, self.nonlin_kwargs = _layer(_ACTIVATIONS, nonlin, "activation"), dict(nonlin_kwargs or {})
        self.dropout, self.dropout_kwargs = _layer(_DROPOUTS, dropout_op, "dropout"), dict(dropout_op_kwargs or {})
        self.conv_bias = bool(conv_bias)


class ConvDropoutNormReLU(nn.Module):
    """conv -> (dropout) -> (norm) -> (activation); ``conv``, ``norm`` and ``nonlin`` alias ``all_modules``."""

    def __init__(self, layers: _Layers, in_channels: int, out_channels: int, kernel_size, stride,
                 norm: bool = True, nonlin: bool = True, dropout: bool = True, bias: bool | None = None):
        super().__init__()
        kernel_size = _triple(kernel_size)
        self.conv = layers.conv(in_channels, out_channels, kernel_size, _triple(stride),
                                padding=[(size - 1) // 2 for size in kernel_size], dilation=1,
                                bias=layers.conv_bias if bias is None else bias)
        modules: list[nn.Module] = [self.conv]
        if dropout and layers.dropout is not None:
            self.dropout = layers.dropout(**layers.dropout_kwargs)
            modules.append(self.dropout)
        if norm and layers.norm is not None:
            self.norm = layers.norm(out_channels, **layers.norm_kwargs)
            modules.append(self.norm)
        if nonlin and layers.nonlin is not None:
            self.nonlin = layers.nonlin(**layers.nonlin_kwargs)
            modules.append(self.nonlin)
        self.all_modules = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_modules(x)


class StackedConvBlocks(nn.Module):
    def __init__(self, layers: _Layers, count: int, in_channels: int, out_channels: int, kernel_size, stride):
        super().__init__()
        self.convs = nn.Sequential(*[ConvDropoutNormReLU(layers, in_channels if index == 0 else out_channels,
                                                         out_channels, kernel_size, stride if index == 0 else 1)
                                     for index in range(count)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


class BasicBlockD(nn.Module):
    """ResNet-D basic block: two convolutions, the skip average-pooled (when strided) and projected
    by a 1x1 convolution (when the widths differ)."""

    def __init__(self, layers: _Layers, in_channels: int, out_channels: int, kernel_size, stride):
        super().__init__()
        stride = _triple(stride)
        self.conv1 = ConvDropoutNormReLU(layers, in_channels, out_channels, kernel_size, stride)
        self.conv2 = ConvDropoutNormReLU(layers, out_channels, out_channels, kernel_size, 1, nonlin=False,
                                         dropout=False)
        self.nonlin2 = layers.nonlin(**layers.nonlin_kwargs) if layers.nonlin is not None else nn.Identity()
        skip: list[nn.Module] = []
        if any(step != 1 for step in stride):
            skip.append(nn.AvgPool3d(stride, stride))
        if in_channels != out_channels:
            skip.append(ConvDropoutNormReLU(layers, in_channels, out_channels, 1, 1, nonlin=False, dropout=False,
                                            bias=False))
        self.skip = nn.Sequential(*skip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        out += self.skip(x)
        return self.nonlin2(out)


class StackedResidualBlocks(nn.Module):
    def __init__(self, layers: _Layers, count: int, in_channels: int, out_channels: int, kernel_size, stride):
        super().__init__()
        self.blocks = nn.Sequential(*[BasicBlockD(layers, in_channels if index == 0 else out_channels, out_channels,
                                                  kernel_size, stride if index == 0 else 1)
                                      for index in range(count)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class _Encoder(nn.Module):
    stages: nn.Sequential

    def __init__(self, layers: _Layers, features: Sequence[int], kernel_sizes, strides):
        super().__init__()
        self.output_channels = list(features)
        self.kernel_sizes = [_triple(size) for size in kernel_sizes]
        self.strides = [_triple(stride) for stride in strides]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        stem = getattr(self, "stem", None)
        if stem is not None:
            x = stem(x)
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class PlainConvEncoder(_Encoder):
    def __init__(self, layers: _Layers, in_channels: int, features, kernel_sizes, strides, n_conv_per_stage):
        super().__init__(layers, features, kernel_sizes, strides)
        stages = []
        for stage, width in enumerate(features):
            stages.append(nn.Sequential(StackedConvBlocks(layers, n_conv_per_stage[stage], in_channels, width,
                                                          self.kernel_sizes[stage], self.strides[stage])))
            in_channels = width
        self.stages = nn.Sequential(*stages)


class ResidualEncoder(_Encoder):
    def __init__(self, layers: _Layers, in_channels: int, features, kernel_sizes, strides, n_blocks_per_stage,
                 stem_channels: int | None):
        super().__init__(layers, features, kernel_sizes, strides)
        stem_channels = stem_channels or features[0]
        self.stem = StackedConvBlocks(layers, 1, in_channels, stem_channels, self.kernel_sizes[0], 1)
        in_channels = stem_channels
        stages = []
        for stage, width in enumerate(features):
            stages.append(StackedResidualBlocks(layers, n_blocks_per_stage[stage], in_channels, width,
                                                self.kernel_sizes[stage], self.strides[stage]))
            in_channels = width
        self.stages = nn.Sequential(*stages)


class UNetDecoder(nn.Module):
    """Transposed convolution up, concatenation with the skip, convolutions; one 1x1 head per stage
    (deep supervision in training), of which inference runs the last."""

    def __init__(self, layers: _Layers, encoder: _Encoder, num_classes: int, n_conv_per_stage: Sequence[int]):
        super().__init__()
        self.encoder = encoder
        widths = encoder.output_channels
        stages, transpconvs, seg_layers = [], [], []
        for stage in range(1, len(widths)):
            below, skip, stride = widths[-stage], widths[-(stage + 1)], encoder.strides[-stage]
            transpconvs.append(nn.ConvTranspose3d(below, skip, tuple(stride), tuple(stride),  # type: ignore[arg-type]
                                                  bias=layers.conv_bias))
            stages.append(StackedConvBlocks(layers, n_conv_per_stage[stage - 1], 2 * skip, skip,
                                            encoder.kernel_sizes[-(stage + 1)], 1))
            seg_layers.append(nn.Conv3d(skip, num_classes, 1, 1, 0, bias=True))
        self.stages = nn.ModuleList(stages)
        self.transpconvs = nn.ModuleList(transpconvs)
        self.seg_layers = nn.ModuleList(seg_layers)

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor:
        x = skips[-1]
        for stage in range(len(self.stages)):
            x = self.stages[stage](torch.cat((self.transpconvs[stage](x), skips[-(stage + 2)]), 1))
        return self.seg_layers[-1](x)


class _NnUNetNetwork(nn.Module):
    """What the engine asks of a network: its constructor arguments, the size its inputs must divide
    by, and where its final 1x1 convolution is (kept in float32 by the fast path)."""

    head_path = "decoder.seg_layers"
    encoder: _Encoder
    decoder: UNetDecoder

    def __init__(self, architecture_args: dict):
        super().__init__()
        self.architecture_args = dict(architecture_args)
        self.size_divisor = size_divisors(architecture_args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def _common(arguments: dict) -> tuple[_Layers, list[int]]:
    check_arguments(arguments)
    return _Layers(arguments["conv_op"], arguments.get("norm_op"), arguments.get("norm_op_kwargs"),
                   arguments.get("nonlin"), arguments.get("nonlin_kwargs"), arguments.get("dropout_op"),
                   arguments.get("dropout_op_kwargs"), bool(arguments.get("conv_bias", False))), \
        _per_stage(arguments["features_per_stage"], int(arguments["n_stages"]))


# Bounds no published nnU-Net plan comes near; a plans file beyond them is damaged or hostile.
_MAX_STAGES, _MAX_FEATURES, _MAX_KERNEL, _MAX_STRIDE, _MAX_CHANNELS, _MAX_CLASSES = 12, 4096, 7, 8, 64, 1024


def check_arguments(arguments: dict) -> None:
    """Raise ValueError where the network arguments (as the plans give them) are not a 3D network of sane
    size; checked before anything is built from them."""
    def whole(value, low: int, high: int, what: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ValueError(f"the network's {what} is {value!r}, not a whole number in {low}..{high}")
        return value

    stages = whole(arguments.get("n_stages"), 2, _MAX_STAGES, "number of stages")
    whole(arguments.get("in_channels"), 1, _MAX_CHANNELS, "number of input channels")
    whole(arguments.get("out_channels"), 1, _MAX_CLASSES, "number of outputs")
    if arguments.get("conv_op") not in _CONVOLUTIONS:
        raise ValueError(f"the plans name a {arguments.get('conv_op')} network: only 3D networks are supported")
    if arguments.get("nonlin_first"):
        raise ValueError("the plans put the activation before the normalisation (nonlin_first), not supported")
    for name in ("features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage", "n_blocks_per_stage"):
        value = arguments.get(name)
        if value is None and name in ("n_conv_per_stage", "n_blocks_per_stage"):
            continue
        items = [value] * stages if isinstance(value, int) else value
        if not isinstance(items, list) or len(items) != stages:
            raise ValueError(f"the network's {name} must list one entry for each of its {stages} stages")
        high = {"features_per_stage": _MAX_FEATURES, "kernel_sizes": _MAX_KERNEL, "strides": _MAX_STRIDE}.get(name, 16)
        for item in items:
            for number in ([item] * 3 if isinstance(item, int) else item if isinstance(item, list) else [None]):
                whole(number, 1, high, f"{name} entry")
            if isinstance(item, list) and len(item) != 3:
                raise ValueError(f"the network's {name} has a {len(item)}D entry: only 3D networks are supported")
    decoder = arguments.get("n_conv_per_stage_decoder")
    for number in ([decoder] * (stages - 1) if isinstance(decoder, int) else decoder or [None]):
        whole(number, 1, 16, "n_conv_per_stage_decoder entry")


def size_divisors(arguments: dict) -> tuple[int, int, int]:
    """What each axis (z, y, x) of an input must divide by: the product of the strides along it."""
    strides = [_triple(stride) for stride in arguments["strides"]]
    return tuple(math.prod(stride[axis] for stride in strides) for axis in range(3))  # type: ignore[return-value]


def _per_stage(value, count: int) -> list[int]:
    return [int(value)] * count if isinstance(value, int) else [int(item) for item in value]


class PlainConvUNet(_NnUNetNetwork):
    """nnU-Net's default U-Net (``PlainConvUNet``); arguments as the plans' ``arch_kwargs``, plus
    ``in_channels`` and ``out_channels`` (nnU-Net's ``input_channels`` and ``num_classes``)."""

    def __init__(self, **architecture_args):
        super().__init__(architecture_args)
        args = architecture_args
        layers, features = _common(args)
        stages = int(args["n_stages"])
        self.encoder = PlainConvEncoder(layers, int(args["in_channels"]), features, args["kernel_sizes"],
                                        args["strides"], _per_stage(args["n_conv_per_stage"], stages))
        self.decoder = UNetDecoder(layers, self.encoder, int(args["out_channels"]),
                                   _per_stage(args["n_conv_per_stage_decoder"], stages - 1))


class ResidualEncoderUNet(_NnUNetNetwork):
    """nnU-Net's residual-encoder U-Net (``ResidualEncoderUNet``, the ResEnc presets) with basic blocks."""

    def __init__(self, **architecture_args):
        super().__init__(architecture_args)
        args = architecture_args
        layers, features = _common(args)
        stages = int(args["n_stages"])
        if args.get("block", "BasicBlockD") not in ("BasicBlockD", None) or args.get("bottleneck_channels"):
            raise ValueError("the plans name a residual U-Net with bottleneck blocks: only basic blocks are supported")
        self.encoder = ResidualEncoder(layers, int(args["in_channels"]), features, args["kernel_sizes"],
                                       args["strides"], _per_stage(args["n_blocks_per_stage"], stages),
                                       args.get("stem_channels"))
        self.decoder = UNetDecoder(layers, self.encoder, int(args["out_channels"]),
                                   _per_stage(args["n_conv_per_stage_decoder"], stages - 1))


def describe(arguments: dict) -> str:
    """The network in words, as ``info`` prints it."""
    kind = "residual-encoder U-Net" if "n_blocks_per_stage" in arguments else "U-Net"
    features = _per_stage(arguments["features_per_stage"], int(arguments["n_stages"]))
    norm = str(arguments.get("norm_op") or "no").split(".")[-1].replace("3d", "").replace("Norm", " norm").lower()
    activation = str(arguments.get("nonlin") or "no activation").split(".")[-1]
    return (f"nnU-Net's {kind} ({arguments['n_stages']} stages, {'-'.join(map(str, features))} features, {norm}, "
            f"{activation})")


NETWORKS = {"PlainConvUNet": PlainConvUNet, "ResidualEncoderUNet": ResidualEncoderUNet}
"""nnU-Net's network class names (the last part of the plans' ``network_class_name``) -> the classes here."""
