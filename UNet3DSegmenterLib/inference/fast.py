"""Make a trained network fast for inference without changing what it computes.

On the CPU, oneDNN's 3D convolutions run fastest on channels-last tensors and, on processors with
AVX512-BF16 or AMX, in bfloat16. The rewrite keeps every weight and every operation of the network
and only changes how they are carried out:

- batch norm is folded into the convolution before it (eval-mode batch norm is an affine map);
- instance norm (and the activation after it) normalises each sample in place with batch norm's
  statistics kernel, which is vectorised for channels-last (PyTorch's own instance norm views the
  batch as one sample of N x C channels, which copies a channels-last tensor twice);
- a convolution followed by ReLU runs as one oneDNN primitive, where this PyTorch has it;
- the final 1x1 convolution computes class logits in float32.

:func:`inference_paths` offers the ways to run a network on a device (the rewrite, or the
untouched network under autocast); :mod:`.calibration` measures which is fastest here. Each way is
built at its first batch and can be released again (:class:`LazyPath`): it holds a copy of the
weights (OpenVINO a compiled network with memory of its own), so only the chosen one stays.
The instance norm kernel (``models.instance_norm_per_sample``) and the allocator setting that keeps
freed activations in the process (``runtime.reuse_freed_memory``) are the core's: training uses them too.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import threading
from collections.abc import Callable

import torch
from torch import nn

from ..models import instance_norm_per_sample
from .openvino_path import OpenVINOForward, openvino_available

CHANNELS_LAST = torch.channels_last_3d


class _InstanceNormActivation(nn.Module):
    """InstanceNorm3d, and the activation after it, on channels-last tensors.

    ``in_place`` where the input is the output of the convolution just before, which nothing else
    reads; elsewhere the input is copied first. The affine weight and bias are plain attributes, not
    buffers, so that casting the network to bfloat16 leaves them (and the statistics they scale) in
    float32. CPU only.
    """

    def __init__(self, norm: nn.InstanceNorm3d, activation: nn.Module | None, in_place: bool):
        super().__init__()
        self.eps = norm.eps
        channels = norm.num_features
        self.weight = norm.weight.detach().float().clone() if norm.affine else torch.ones(channels)
        self.bias = norm.bias.detach().float().clone() if norm.affine else torch.zeros(channels)
        self.activation, self.in_place = activation, in_place

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.in_place or not x.is_contiguous(memory_format=CHANNELS_LAST):
            x = x.clone(memory_format=CHANNELS_LAST)
        x = instance_norm_per_sample(x, self.weight, self.bias, self.eps, out=x)
        if isinstance(self.activation, nn.ReLU):
            return x.relu_()
        return x if self.activation is None else self.activation(x)


class _OneDNNConv(nn.Module):
    """A convolution as one oneDNN primitive, with the ReLU after it applied while the output is in
    cache ('relu'), or alone ('none'). PyTorch itself sends single-channel inputs to a fallback that
    unfolds every window (27 copies of the input) instead."""

    def __init__(self, conv: nn.Conv3d, activation: str = "none"):
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        self.arguments = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding, stride, dilation, groups, activation = self.arguments
        return torch.ops.mkldnn._convolution_pointwise(x, self.weight, self.bias, padding, stride, dilation,
                                                       groups, activation, [], "")


class _Float32Head(nn.Module):
    """The final 1x1 convolution in float32: class logits are compared by argmax, and rounding them
    to bfloat16 (3 significant digits) would flip near-tied voxels for no speed gain."""

    def __init__(self, head: nn.Conv3d, fused: bool):
        super().__init__()
        self.head = head
        self.fused = fused  # PyTorch's own float32 channels-last 1x1 conv takes a slow path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.fused:
            head = self.head
            return torch.ops.mkldnn._convolution_pointwise(x, head.weight, head.bias, list(head.padding),
                                                           list(head.stride), list(head.dilation), head.groups,
                                                           "none", [], "")
        return self.head(x)


@functools.cache
def fused_kernels_available() -> bool:
    """Whether this PyTorch runs oneDNN's fused convolution primitives, checked on a small example."""
    try:
        conv = nn.Conv3d(2, 2, 3, padding=1).eval()
        x = torch.randn(1, 2, 4, 4, 4)
        with torch.inference_mode():
            fused = _OneDNNConv(conv, "relu")(x.contiguous(memory_format=CHANNELS_LAST))
            return bool(torch.allclose(fused, torch.relu(conv(x)), atol=1e-5))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def _fold_batch_norm(conv: nn.Conv3d, norm: nn.BatchNorm3d) -> nn.Conv3d:
    """A convolution that computes conv followed by (eval-mode) batch norm."""
    assert norm.running_mean is not None and norm.running_var is not None  # track_running_stats is checked
    folded = copy.deepcopy(conv)
    scale = norm.weight.detach() * torch.rsqrt(norm.running_var + norm.eps)
    folded.weight = nn.Parameter(conv.weight.detach() * scale.view(-1, 1, 1, 1, 1))
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(norm.running_mean)
    folded.bias = nn.Parameter((bias - norm.running_mean) * scale + norm.bias.detach())
    return folded


def _rewrite_sequence(sequence: nn.Sequential, fuse: bool) -> None:
    """Fold conv + batch norm, make conv + instance norm (+ activation) normalise in place, fuse
    conv + ReLU, inside one Sequential.

    The remaining convolutions become oneDNN primitives in :func:`_rewrite` (when ``fuse``)."""
    items = list(sequence.children())
    for index, (first, second) in enumerate(zip(items, items[1:])):
        if isinstance(first, nn.Conv3d) and isinstance(second, nn.BatchNorm3d) and second.track_running_stats:
            sequence[index], sequence[index + 1] = _fold_batch_norm(first, second), nn.Identity()
    items = list(sequence.children())
    for index, item in enumerate(items):
        if not (isinstance(item, nn.InstanceNorm3d) and index and isinstance(items[index - 1], nn.Conv3d)):
            continue
        following = items[index + 1] if index + 1 < len(items) else None
        if isinstance(following, (nn.ReLU, nn.PReLU, nn.LeakyReLU)):
            sequence[index], sequence[index + 1] = _InstanceNormActivation(item, following, True), nn.Identity()
        else:
            sequence[index] = _InstanceNormActivation(item, None, True)
    if fuse:
        items = list(sequence.children())
        for index in range(len(items) - 2):
            conv, between, activation = items[index: index + 3]
            if isinstance(conv, nn.Conv3d) and isinstance(between, nn.Identity) and isinstance(activation, nn.ReLU):
                sequence[index], sequence[index + 2] = _OneDNNConv(conv, "relu"), nn.Identity()


def _rewrite(module: nn.Module, fuse: bool, keep: nn.Module | None = None) -> None:
    """Apply the rewrites to every Sequential, swap the remaining instance norms and (when ``fuse``)
    make the remaining convolutions, ``keep`` aside, oneDNN primitives, recursively."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Sequential):
            _rewrite_sequence(child, fuse)
        if isinstance(child, nn.InstanceNorm3d):
            setattr(module, name, _InstanceNormActivation(child, None, in_place=False))
        elif fuse and type(child) is nn.Conv3d and child is not keep:
            setattr(module, name, _OneDNNConv(child))
        else:
            _rewrite(child, fuse, keep)


def freeze(model: nn.Module) -> nn.Module:
    """``model`` itself, in eval mode and with parameters that ask for no gradients: ready to run as it is."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def _frozen_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` whose parameters ask for no gradients."""
    return freeze(copy.deepcopy(model))


def _untouched(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` as it is, on ``device``: itself where it is frozen there already (a copy would be a
    second set of weights, hundreds of megabytes for a large 3D network), else a frozen copy."""
    frozen = not model.training and not any(parameter.requires_grad for parameter in model.parameters())
    on_device = all(tensor.device == device for tensor in (*model.parameters(), *model.buffers()))
    return model if frozen and on_device else _frozen_copy(model).to(device)


def prepare_for_inference(model: nn.Module, device: torch.device, dtype: torch.dtype,
                          fuse: bool | None = None) -> nn.Module:
    """An eval-mode copy of ``model`` rewritten for speed on ``device`` in ``dtype``.

    On the CPU: batch norm folded, instance norm swapped, conv + ReLU fused (``fuse``: default where
    this PyTorch has the kernels), channels-last layout and the weights cast to ``dtype``; feed it
    batches through :func:`input_layout`. On CUDA the model is only moved and put in eval mode;
    autocast does the rest.
    """
    fast = _frozen_copy(model)
    if device.type == "cpu":
        fuse = fused_kernels_available() if fuse is None else fuse
        holder, name = _head_place(fast)
        head = getattr(holder, name, None)
        _rewrite(fast, fuse, keep=head)
        fast = fast.to(dtype=dtype, memory_format=CHANNELS_LAST)  # type: ignore[call-overload]
        if isinstance(head, nn.Conv3d):
            setattr(holder, name, _Float32Head(head.float(), fuse))
    return fast.to(device)


def _head_place(model: nn.Module) -> tuple[nn.Module, str]:
    """Where the final 1x1 convolution sits: ``model.head``, or the last entry of the module list that
    ``model.head_path`` names (nnU-Net's networks keep a head per decoder stage and run the last)."""
    path = getattr(model, "head_path", None)
    if path is None:
        return model, "head"
    heads = model.get_submodule(path)
    assert isinstance(heads, nn.ModuleList)
    return heads, str(len(heads) - 1)


def input_layout(batch: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Put a batch of windows in the layout and dtype :func:`prepare_for_inference` expects."""
    batch = batch.to(device, non_blocking=True)
    if device.type == "cpu":
        return batch.to(dtype=dtype, memory_format=CHANNELS_LAST)
    return batch


Forward = Callable[[torch.Tensor], torch.Tensor]


class LazyPath:
    """One way to run a network, built by ``build`` at its first batch and dropped by :meth:`release`.

    A path's network is a copy of the weights, with memory of its own; a 3D nnU-Net model's is
    hundreds of megabytes. Built only when measured or chosen, and released when another path wins,
    no more of them live at once than the run needs."""

    def __init__(self, build: Callable[[], Forward]):
        self._build = build
        self._forward: Forward | None = None
        self._lock = threading.Lock()  # two threads meeting an unbuilt path build it once

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        with self._lock:
            if self._forward is None:
                self._forward = self._build()
            forward = self._forward
        return forward(batch)

    @property
    def built(self) -> bool:
        return self._forward is not None

    def release(self) -> None:
        """Drop the built network (it is built again if another batch comes)."""
        with self._lock:
            self._forward = None

    def release_memory(self) -> None:
        """Keep the built network but give back its working buffers, where it has its own (OpenVINO's)."""
        release = getattr(self._forward, "release_memory", None)
        if release is not None:
            release()


def inference_paths(model: nn.Module, device: torch.device, dtype: torch.dtype) -> dict[str, LazyPath]:
    """The ways to run ``model`` on batches of windows in ``dtype``, each a :class:`LazyPath` batch -> logits.

    'rewritten' is :func:`prepare_for_inference`'s network. On the CPU the untouched network is
    offered too ('autocast' in a lower precision, 'plain' in float32): for small windows, or on
    processors where oneDNN has no fast channels-last kernels, it can be the faster one; and, where
    the optional OpenVINO runtime is installed, the network compiled by it ('openvino', see
    :mod:`.openvino_path`), often the fastest on processors without native bfloat16. All compute
    the same function up to rounding; :mod:`.calibration` picks by measuring. ``model`` itself is
    never changed.
    """
    if device.type != "cpu":  # CUDA or an Apple GPU: the network as it is, under autocast
        return {"autocast": LazyPath(lambda: _under_autocast(prepare_for_inference(model, device, dtype), device, dtype))}
    paths = {"rewritten": LazyPath(lambda: _with_layout(prepare_for_inference(model, device, dtype), device, dtype))}
    if dtype == torch.float32:
        paths["plain"] = LazyPath(lambda: _untouched(model, device))
    else:
        paths["autocast"] = LazyPath(lambda: _under_autocast(_untouched(model, device), device, dtype))
    if openvino_available():
        paths["openvino"] = LazyPath(lambda: OpenVINOForward(model, dtype))
    return paths


def _with_layout(network: nn.Module, device: torch.device, dtype: torch.dtype) -> Forward:
    def forward(batch: torch.Tensor) -> torch.Tensor:
        return network(input_layout(batch, device, dtype))

    return forward


def _under_autocast(network: nn.Module, device: torch.device, dtype: torch.dtype) -> Forward:
    def forward(batch: torch.Tensor) -> torch.Tensor:
        precision = (contextlib.nullcontext() if dtype == torch.float32
                     else torch.autocast(device.type, dtype=dtype))
        with precision:
            return network(batch.to(device, non_blocking=True))

    return forward
