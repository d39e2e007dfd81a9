"""Where and in what precision the engine computes: one place for device and dtype decisions.

Inference and training ask the same questions (is there a GPU, can this CPU compute bfloat16 at
all, does it compute it natively) and must answer them alike; ``predict --device`` and
``train --precision`` both land here.

Processors differ in what bfloat16 costs them:

- native (AVX512-BF16 or AMX: Intel Cooper Lake, Sapphire Rapids and later, AMD Zen 4 and later):
  about twice as fast as float32, so 'auto' picks it;
- emulated (AVX-512 without AVX512-BF16, or AVX-NE-CONVERT): oneDNN converts on the fly; it works,
  but is no faster, so 'auto' stays in float32;
- absent (AVX2 only, most laptops and desktops; ARM without oneDNN's bf16 kernels): oneDNN refuses
  bfloat16 convolutions. Asking for bf16 there computes in float32 instead, and says so once.

oneDNN's ``ONEDNN_MAX_CPU_ISA`` (e.g. ``AVX2``) makes a processor behave like a smaller one; the
answers here follow it, so that one machine can run every kind's code path.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import platform
import threading
from collections.abc import Iterator

import torch

from .choices import DEVICES, PRECISIONS, check_choice
from .errors import UserError

log = logging.getLogger("UNet3DSegmenterLib")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' picks CUDA when PyTorch sees a GPU, else the CPU; 'mps' is an Apple GPU, only when asked
    for (PyTorch's Metal backend lacks some 3D operations on older releases); asking for a missing GPU
    is an error."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.split(":")[0] not in DEVICES:
        raise UserError(f"unknown device {name!r}: choose one of {', '.join(DEVICES)}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA GPU: use --device cpu or auto")
    if name == "mps" and not mps_available():
        raise UserError("--device mps was asked for, but PyTorch sees no Apple GPU (Metal): use --device cpu or auto")
    return torch.device(name)


def mps_available() -> bool:
    """Whether PyTorch runs on an Apple GPU here (Apple Silicon or AMD on macOS 12.3 and later)."""
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


# oneDNN's instruction-set limits below which bfloat16 is not native (its ONEDNN_MAX_CPU_ISA names)
_ISAS_WITHOUT_NATIVE_BF16 = {"sse41", "avx", "avx2", "avx2_vnni", "avx2_vnni_2", "avx512_core", "avx512_core_vnni"}


def _onednn_isa_limit() -> str:
    return (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().lower()


@functools.cache
def cpu_computes_bf16() -> bool:
    """True when oneDNN computes bfloat16 convolutions on this CPU at all (natively or emulated on
    AVX-512 / AVX-NE-CONVERT); False on AVX2-only and most ARM processors, where it refuses them."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a PyTorch built without oneDNN
        return False


@functools.cache
def cpu_supports_bf16() -> bool:
    """True when this CPU has native bfloat16 arithmetic (AVX512-BF16 or AMX), so bf16 is faster."""
    if not cpu_computes_bf16() or torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    if _onednn_isa_limit() in _ISAS_WITHOUT_NATIVE_BF16:
        return False
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = cpuinfo.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


def cpu_kind() -> str:
    """This processor in the words the README and the benchmarks use, for logs and reports."""
    if cpu_supports_bf16():
        return "native bf16"
    if cpu_computes_bf16():
        return "bf16 emulated (no AVX512-BF16 or AMX)"
    return "no bf16 (e.g. AVX2 only)"


_FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16", "avx_ne_convert")


def processor_record() -> dict:
    """The processor as benchmarks and the inference-path cache record it: model name, the flags that
    decide the engine's paths, PyTorch's capability, the limits set for oneDNN and PyTorch, and the kind."""
    import platform

    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as cpuinfo:  # Linux; elsewhere the platform's name, and no flags
            for line in cpuinfo:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
                if not line.strip():  # the first processor is enough
                    break
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    return {"model": name, "flags": [flag for flag in _FLAGS_OF_INTEREST if flag in flags],
            "capability": torch.backends.cpu.get_cpu_capability(), "onednn_limit": _onednn_isa_limit() or None,
            "aten_limit": os.environ.get("ATEN_CPU_CAPABILITY") or None, "kind": cpu_kind()}


_EXPLICIT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The compute dtype of inference: 'auto' is fp16 autocast on CUDA, bf16 on CPUs with native
    bf16, else fp32; an explicit choice is taken as it is, but for bf16 or fp16 on a device that
    cannot compute it (see :func:`usable_dtype`)."""
    check_choice(precision, PRECISIONS, "precision")
    if precision != "auto":
        return usable_dtype(_EXPLICIT[precision], device)
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_supports_bf16() else torch.float32


def training_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype of training. 'auto': on CUDA bf16 where the GPU has it, else fp16 (with
    loss scaling); on the CPU bf16 where the processor computes it natively (about twice as fast,
    with losses that track fp32's to three decimals), else fp32. Weights, optimiser state and the
    loss always stay fp32. An explicit choice the device cannot compute falls back as in inference."""
    check_choice(precision, PRECISIONS, "precision")
    if precision != "auto":
        return usable_dtype(_EXPLICIT[precision], device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_supports_bf16() else torch.float32


def usable_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """``dtype``, or float32 where ``device`` cannot compute it: bfloat16 on a CPU without oneDNN's
    bf16 kernels (AVX2 only), or a half precision on the CPU or an Apple GPU. Says so once a run."""
    if dtype == torch.float32 or device.type == "cuda":
        return dtype
    if device.type == "cpu" and dtype == torch.bfloat16 and cpu_computes_bf16():
        return dtype
    _say_float32_instead(str(dtype).replace("torch.", ""), device.type)
    return torch.float32


@functools.cache
def _say_float32_instead(precision: str, device: str) -> None:
    reason = ("this processor has no bfloat16 kernels (they need AVX-512 or AVX-NE-CONVERT)"
              if device == "cpu" and precision == "bfloat16" else f"{precision} is not offered on the {device} here")
    log.warning("%s was asked for, but %s: computing in float32 instead (same results, no speed-up)",
                "bf16" if precision == "bfloat16" else precision, reason)


# glibc's mallopt parameters, and their defaults
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
_reuse_lock = threading.Lock()
_reuse_depth = 0


@functools.cache
def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[None]:
    """Inside the block, freed tensors stay in the process's heap for the next ones to reuse.

    glibc hands every allocation above 32 MB straight back to the operating system when it is
    freed, so each large activation of each window costs fresh pages, which the kernel zeroes
    one 4 KB fault at a time: a third of a forward pass on two cores. Inside this block glibc
    keeps them; on leaving the outermost block the defaults come back and the unused memory is
    returned. Elsewhere than Linux with glibc this does nothing.
    """
    global _reuse_depth
    libc = _glibc()
    if libc is None:
        yield
        return
    with _reuse_lock:
        _reuse_depth += 1
        if _reuse_depth == 1:
            _keep_freed(libc, True)
    try:
        yield
    finally:
        with _reuse_lock:
            _reuse_depth -= 1
            if _reuse_depth == 0:
                _keep_freed(libc, False)


@contextlib.contextmanager
def return_freed_memory() -> Iterator[None]:
    """Inside :func:`reuse_freed_memory`, a stretch of one-off work whose freed memory goes straight
    back to the system: what it frees (converting a network once, say) is not what the windows
    after it allocate, and kept in the heap beside theirs it only raised the process's peak."""
    libc = _glibc()
    if libc is None:
        yield
        return
    with _reuse_lock:
        if _reuse_depth:
            _keep_freed(libc, False)
    try:
        yield
    finally:
        with _reuse_lock:
            if _reuse_depth:
                libc.malloc_trim(0)
                _keep_freed(libc, True)


def _keep_freed(libc, keep: bool) -> None:
    """glibc's settings for keeping freed memory in the heap (``keep``), or its defaults, which give
    large blocks back when freed (and, switching to them, whatever the heap holds unused)."""
    if keep:
        libc.mallopt(_M_MMAP_MAX, 0)
        libc.mallopt(_M_TRIM_THRESHOLD, 2**30)
    else:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)
