"""Is a checkpoint's record consistent? Checked as a whole before any network is built from it.

A network is built from the record's architecture arguments, so a record whose depth or base width
was changed (by hand, by a damaged file, by a hostile one) would cost gigabytes of memory before its
weights were found not to fit. Every part of the record is checked here first: the arguments lie in
sane bounds, the labels match the network's outputs and fit the labelmap's type, the patch size
suits the network, the preprocessing is usable, and every weight has the shape the architecture
gives it, computed on PyTorch's ``meta`` device, which allocates nothing.
"""

from __future__ import annotations

import inspect
import math
from typing import TYPE_CHECKING

import torch

from .choices import MAX_PATCH_SIZE, MAX_RESIZE, NORMS
from .models import ARCHITECTURES, NNUNET_ARCHITECTURES, build_model
from .nnunet_networks import check_arguments, size_divisors

if TYPE_CHECKING:
    from .checkpoint import Checkpoint

# Bounds no trained network here comes near; a record beyond them is damaged.
_INTEGER_ARGUMENTS = {"in_channels": (1, 64), "out_channels": (1, 1024), "depth": (2, 8), "base_width": (1, 1024)}
_MAX_WIDTH = 8192
_MAX_LABEL_VALUE = 65535  # labelmaps are written as uint8 or uint16


def check_record(checkpoint: Checkpoint) -> None:
    """Raise ValueError saying what is inconsistent in ``checkpoint``; builds nothing and allocates no weights."""
    _check_architecture(checkpoint.architecture, checkpoint.architecture_args)
    _check_labels(checkpoint)
    _check_inference(checkpoint)
    _check_preprocessing(checkpoint)
    _check_weights(checkpoint)


def _check_architecture(architecture: str, arguments: dict) -> None:
    if architecture in NNUNET_ARCHITECTURES:  # nnU-Net's arguments, as its plans spell them
        check_arguments(arguments)
        return
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}: one of {', '.join(ARCHITECTURES)} is needed")
    known = set(inspect.signature(ARCHITECTURES[architecture]).parameters)
    unknown = sorted(set(arguments) - known)
    if unknown:
        raise ValueError(f"architecture arguments {', '.join(map(str, unknown))} are not those of {architecture}")
    for name, (low, high) in _INTEGER_ARGUMENTS.items():
        value = arguments.get(name)
        if name in ("in_channels", "out_channels") or value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"architecture argument {name} is {value!r}, not a whole number in {low}..{high}")
    depth, base_width = arguments.get("depth", 2), arguments.get("base_width", 1)
    if base_width * 2 ** (depth - 1) > _MAX_WIDTH:
        raise ValueError(f"depth {depth} and base width {base_width} make {base_width * 2 ** (depth - 1)} channels "
                         f"at the bottom, more than {_MAX_WIDTH}")
    if arguments.get("norm", "instance") not in NORMS:
        raise ValueError(f"architecture argument norm is {arguments.get('norm')!r}, not one of {', '.join(NORMS)}")
    dropout = arguments.get("dropout", 0.0)
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"architecture argument dropout is {dropout!r}, not a probability below 1")


def _check_labels(checkpoint: Checkpoint) -> None:
    outputs = checkpoint.architecture_args["out_channels"]
    if len(checkpoint.labels) != outputs:
        raise ValueError(f"{len(checkpoint.labels)} labels for a network with {outputs} outputs")
    values = [label.value for label in checkpoint.labels]
    if len(set(values)) != len(values) or not all(0 <= value <= _MAX_LABEL_VALUE for value in values):
        raise ValueError(f"label values {values} must be distinct whole numbers in 0..{_MAX_LABEL_VALUE}")
    if not all(math.isfinite(channel) and 0 <= channel <= 1 for label in checkpoint.labels for channel in label.color):
        raise ValueError("label colours must be red, green and blue in 0..1")


def _check_inference(checkpoint: Checkpoint) -> None:
    if checkpoint.architecture in NNUNET_ARCHITECTURES:
        divisors = size_divisors(checkpoint.architecture_args)
        if any(size < divisor or size > MAX_PATCH_SIZE or size % divisor
               for size, divisor in zip(checkpoint.patch_size, divisors)):
            raise ValueError(f"patch size {checkpoint.patch_size} must be multiples of {divisors} (the network's "
                             f"strides) up to {MAX_PATCH_SIZE}")
    else:
        depth = checkpoint.architecture_args.get("depth", 2)
        divisor = 2 ** (depth - 1)
        if any(size < divisor or size > MAX_PATCH_SIZE or size % divisor for size in checkpoint.patch_size):
            raise ValueError(f"patch size {checkpoint.patch_size} must be three multiples of {divisor} (the "
                             f"network's depth {depth}) up to {MAX_PATCH_SIZE}")
    if not 0 <= checkpoint.overlap < 1:
        raise ValueError(f"window overlap {checkpoint.overlap} must lie in [0, 1)")


def _check_preprocessing(checkpoint: Checkpoint) -> None:
    preprocessing = checkpoint.preprocessing
    if preprocessing.spacing is not None and not all(math.isfinite(s) and s > 0 for s in preprocessing.spacing):
        raise ValueError(f"preprocessing spacing {preprocessing.spacing} must be three positive numbers in mm")
    if preprocessing.size is not None and max(preprocessing.size) > MAX_RESIZE:
        raise ValueError(f"preprocessing resize {preprocessing.size} exceeds {MAX_RESIZE} voxels along an axis")
    numbers = [preprocessing.mean, preprocessing.std, *(preprocessing.clip or ())]
    if not all(math.isfinite(number) for number in numbers) or preprocessing.std <= 0:
        raise ValueError(f"preprocessing numbers (mean {preprocessing.mean}, std {preprocessing.std}, clip "
                         f"{preprocessing.clip}) must be finite, with a positive std")
    if preprocessing.channels != checkpoint.architecture_args["in_channels"]:
        raise ValueError(f"preprocessing for {preprocessing.channels} channels, a network taking "
                         f"{checkpoint.architecture_args['in_channels']}")


def _check_weights(checkpoint: Checkpoint) -> None:
    """Every weight has the shape the architecture gives it (the network is laid out on the meta device)."""
    if not isinstance(checkpoint.state_dict, dict):
        raise ValueError("the weights are not a table of tensors")
    with torch.device("meta"):
        expected = {name: tuple(tensor.shape) for name, tensor in
                    build_model(checkpoint.architecture, checkpoint.architecture_args).state_dict().items()}
    missing = sorted(set(expected) - set(checkpoint.state_dict))
    unexpected = sorted(set(checkpoint.state_dict) - set(expected))
    if missing or unexpected:
        names = (missing or unexpected)[:3]
        raise ValueError(f"the weights {'lack' if missing else 'add'} {', '.join(names)}"
                         f"{' and more' if len(missing or unexpected) > 3 else ''} for this architecture")
    for name, shape in expected.items():
        tensor = checkpoint.state_dict[name]
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
            found = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"weight {name} has shape {found} where the architecture record gives {shape}")
