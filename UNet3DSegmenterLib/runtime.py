"""Where and in what precision the engine computes: one place for device and dtype decisions.

Inference and training ask the same questions (is there a GPU, does this CPU compute bfloat16
natively) and must answer them alike; ``predict --device`` and ``train --precision`` both land here.
"""

from __future__ import annotations

import torch

from .choices import DEVICES, PRECISIONS, check_choice
from .errors import UserError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' picks CUDA when PyTorch sees a GPU, else the CPU; asking for a missing GPU is an error."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.split(":")[0] not in DEVICES:
        raise UserError(f"unknown device {name!r}: choose auto, cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA GPU: use --device cpu or auto")
    return torch.device(name)


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bfloat16 arithmetic (AVX512-BF16 or AMX), so bf16 is faster."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX512":
        return False
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = cpuinfo.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


_EXPLICIT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The compute dtype of inference: 'auto' is fp16 autocast on CUDA, bf16 on CPUs with native
    bf16, else fp32; an explicit choice is taken as it is."""
    check_choice(precision, PRECISIONS, "precision")
    if precision != "auto":
        return _EXPLICIT[precision]
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def training_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype of training. 'auto': on CUDA bf16 where the GPU has it, else fp16 (with
    loss scaling); on the CPU bf16 where the processor computes it natively (about twice as fast,
    with losses that track fp32's to three decimals), else fp32. Weights, optimiser state and the
    loss always stay fp32."""
    check_choice(precision, PRECISIONS, "precision")
    if precision != "auto":
        return _EXPLICIT[precision]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32
