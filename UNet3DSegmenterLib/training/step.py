"""The parts of a training iteration: precision, optimiser, learning-rate schedule, one step, the log.

:class:`TrainingStep` is the whole of what happens to a batch once it is on the device, so that the
trainer and the training benchmark run exactly the same code.

On the CPU a step runs channels-last, where oneDNN's 3D convolutions and their gradients are
fastest; instance norms then take :class:`ChannelsLastInstanceNorm3d`'s kernels, because PyTorch's
own instance norm copies channels-last tensors (forward and backward) into another layout.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_path
from ..choices import OPTIMIZERS
from ..models import instance_norm_per_sample

CHANNELS_LAST = torch.channels_last_3d


def build_optimizer(parameters, name: str, lr: float, weight_decay: float, device: torch.device):
    """AdamW, plain Adam (weight decay as an L2 term of the gradient), or SGD with Nesterov momentum 0.99
    (nnU-Net's); fused kernels where PyTorch has them."""
    parameters = list(parameters)
    if name in ("adamw", "adam"):
        kind = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        try:
            return kind(parameters, lr=lr, weight_decay=weight_decay, fused=True)
        except RuntimeError:  # PyTorch before 2.4 fuses on CUDA only
            return kind(parameters, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=0.99, nesterov=True, weight_decay=weight_decay,
                               fused=device.type == "cuda" or None)
    raise ValueError(f"unknown optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")


def learning_rate(base_lr: float, schedule: str, warmup_steps: int, step: int, total_steps: int) -> float:
    """Linear warm-up over ``warmup_steps``, then 'poly' (power 0.9), 'cosine' or 'constant' decay."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "poly":
        return base_lr * (1 - progress) ** 0.9
    if schedule == "cosine":
        return base_lr * 0.5 * (1 + math.cos(math.pi * progress))
    return base_lr


class _InstanceNormPerSample(torch.autograd.Function):
    """Instance norm of a channels-last batch as training-mode batch norm of each sample, whose CPU
    kernels (forward and backward) are vectorised for channels-last and keep float32 statistics."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        output = torch.empty_like(x, memory_format=CHANNELS_LAST)
        statistics = torch.float64 if x.dtype == torch.float64 else torch.float32
        means = torch.empty(len(x), x.shape[1], dtype=statistics, device=x.device)
        inverse_stds = torch.empty_like(means)
        instance_norm_per_sample(x, weight, bias, eps, output, means, inverse_stds)
        ctx.save_for_backward(x, weight, means, inverse_stds)
        ctx.eps = eps
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        x, weight, means, inverse_stds = ctx.saved_tensors
        grad_output = grad_output.contiguous(memory_format=CHANNELS_LAST)
        grad_input = torch.empty_like(x, memory_format=CHANNELS_LAST)
        grad_weight, grad_bias = torch.zeros_like(weight), torch.zeros_like(weight)
        weight_part, bias_part = torch.empty_like(weight), torch.empty_like(weight)
        for sample in range(len(x)):
            torch.ops.aten.native_batch_norm_backward.out(
                grad_output[sample: sample + 1], x[sample: sample + 1], weight, None, None, means[sample],
                inverse_stds[sample], True, ctx.eps, [True, True, True],
                out0=grad_input[sample: sample + 1], out1=weight_part, out2=bias_part)
            grad_weight += weight_part
            grad_bias += bias_part
        return grad_input, grad_weight, grad_bias, None


class ChannelsLastInstanceNorm3d(nn.InstanceNorm3d):
    """InstanceNorm3d that normalises channels-last batches in their own layout, in training too.

    Same parameters and state dict as :class:`torch.nn.InstanceNorm3d` (checkpoints do not change);
    :meth:`TrainingStep.create` turns a network's instance norms into this class for channels-last
    training. Other inputs, and norms with running statistics or without affine parameters, take
    PyTorch's path.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not x.is_contiguous(memory_format=CHANNELS_LAST) or x.dim() != 5 or not self.affine
                or self.track_running_stats):
            return super().forward(x)
        return _InstanceNormPerSample.apply(x, self.weight, self.bias, self.eps)


def use_channels_last_instance_norm(module: nn.Module) -> nn.Module:
    """Give ``module``'s instance norms :class:`ChannelsLastInstanceNorm3d`'s forward (in place)."""
    for child in module.modules():
        if type(child) is nn.InstanceNorm3d:
            child.__class__ = ChannelsLastInstanceNorm3d
    return module


class TrainingStep:
    """Forward under autocast, loss in float32, backward, gradient clipping, optimiser step.

    ``module`` is the bare network (for checkpoints and validation); ``trained`` is what the optimiser
    updates (the network, with the auxiliary heads of deep supervision when asked); ``model`` is what
    runs the forward pass (``trained``, wrapped in DistributedDataParallel under torchrun).
    """

    def __init__(self, module: nn.Module, model: nn.Module, loss: nn.Module, optimizer, device: torch.device,
                 dtype: torch.dtype, grad_clip: float, channels_last: bool, trained: nn.Module | None = None):
        self.module, self.model, self.loss, self.optimizer = module, model, loss, optimizer
        self.trained = trained if trained is not None else module
        self.device, self.dtype, self.grad_clip, self.channels_last = device, dtype, grad_clip, channels_last
        use_scaler = device.type == "cuda" and dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None

    @classmethod
    def create(cls, module: nn.Module, loss: nn.Module, optimizer: str, lr: float, weight_decay: float,
               grad_clip: float, device: torch.device, dtype: torch.dtype, distributed: bool = False,
               channels_last: bool | None = None, deep_supervision: bool = False) -> TrainingStep:
        """Move ``module`` to ``device`` and build its optimiser. ``channels_last`` (default: on the
        CPU, where it is faster in float32 and bfloat16 alike) puts weights and batches in that layout;
        with ``deep_supervision``, the loss also judges the decoder's coarser levels
        (:mod:`~UNet3DSegmenterLib.training.deep_supervision`)."""
        from .deep_supervision import DeepSupervision, DeepSupervisionLoss

        module = module.to(device)
        channels_last = device.type == "cpu" if channels_last is None else channels_last
        if channels_last:
            module = use_channels_last_instance_norm(module.to(memory_format=CHANNELS_LAST))  # type: ignore[call-overload]
        trained = DeepSupervision(module).to(device) if deep_supervision else module
        if channels_last and deep_supervision:
            trained = trained.to(memory_format=CHANNELS_LAST)  # type: ignore[call-overload]
        loss = DeepSupervisionLoss(loss) if deep_supervision else loss
        model = trained
        if distributed:
            model = nn.parallel.DistributedDataParallel(
                trained, device_ids=[device.index] if device.type == "cuda" else None)
        return cls(module, model, loss.to(device), build_optimizer(trained.parameters(), optimizer, lr, weight_decay,
                                                                   device), device, dtype, grad_clip, channels_last,
                   trained)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        self.model.train()
        if self.channels_last:
            images = images.contiguous(memory_format=CHANNELS_LAST)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            logits = self.model(images)
        loss = self.loss(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            self._clip()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self._clip()
            self.optimizer.step()
        return float(loss.detach())

    def _clip(self) -> None:
        if self.grad_clip:
            nn.utils.clip_grad_norm_(self.trained.parameters(), self.grad_clip)

    def auxiliary_state(self) -> dict:
        """The weights the optimiser trains beside the network's (deep supervision's heads), for resuming."""
        return {key: value.detach().cpu() for key, value in self.trained.state_dict().items()
                if not key.startswith("network.")} if self.trained is not self.module else {}

    def load_auxiliary_state(self, state: dict) -> None:
        if self.trained is not self.module and state:
            self.trained.load_state_dict(state, strict=False)

    def scaler_state(self) -> dict:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_scaler_state(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


class TrainingLog:
    """One row per epoch, written as log.csv and drawn as curves.png after every epoch."""

    def __init__(self, class_names: list[str]):
        self.class_names = class_names
        self.rows: list[dict] = []

    def columns(self) -> list[str]:
        return (["epoch", "train_loss", "val_loss"] + [f"dice_{name}" for name in self.class_names] + ["mean_dice"]
                + [f"iou_{name}" for name in self.class_names] + ["mean_iou", "accuracy", "lr", "seconds"])

    def write(self, csv_path: Path, png_path: Path) -> None:
        from ..plots import save_curves

        with atomic_path(csv_path) as temporary, open(temporary, "w", newline="", encoding="utf-8") as stream:
            writer = csv.writer(stream)
            writer.writerow(self.columns())
            writer.writerows([self._cell(row, column) for column in self.columns()] for row in self.rows)
        save_curves(self.rows, self.class_names, png_path)

    @staticmethod
    def _cell(row: dict, column: str) -> str:
        kind, _, name = column.partition("_")
        value = row.get(kind, {}).get(name) if kind in ("dice", "iou") and name else row.get(column)
        if value is None:
            return ""
        return f"{value:.6g}" if isinstance(value, float) else str(value)
