"""This process's place in a ``torchrun`` launch, and the few collectives the trainer needs.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the trainer joins the process group torchrun describes
(NCCL on CUDA, gloo on the CPU); run directly, it is rank 0 of 1 and every collective is the
identity, so the trainer never asks which case it is in.
"""

from __future__ import annotations

import os
import time
import weakref

import torch

from ..runtime import resolve_device

_RELEASE_TIMEOUT_SECONDS = 30.0


class Distributed:
    """Rank, world size and device of this process; ``main`` is the rank that validates and writes."""

    # The tensor of the last collective of this process, whichever instance ran it: a cross-validation
    # joins one process group from several instances (one per fold), and leaving it must wait for the
    # last collective of any of them (see stop).
    _last_tensor: weakref.ReferenceType[torch.Tensor] | None = None

    def __init__(self, rank: int, world_size: int, device: torch.device, started: bool):
        self.rank, self.world_size, self.device, self.started = rank, world_size, device, started

    @classmethod
    def start(cls, device_name: str) -> Distributed:
        """Join torchrun's process group when launched by it (each rank on its own GPU)."""
        device = resolve_device(device_name)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls(0, 1, device, False)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        started = not torch.distributed.is_initialized()
        if started:
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(torch.distributed.get_rank(), world_size, device, started)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, value: float) -> float:
        """The mean of ``value`` over all ranks."""
        if not self.enabled:
            return value
        return self._all_reduce(value, torch.float64, torch.distributed.ReduceOp.SUM) / self.world_size

    def maximum(self, value: float) -> float:
        """The largest ``value`` over all ranks (so that every rank plans alike)."""
        if not self.enabled:
            return value
        return self._all_reduce(value, torch.float64, torch.distributed.ReduceOp.MAX)

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any."""
        if not self.enabled:
            return flag
        return bool(self._all_reduce(int(flag), torch.int64, torch.distributed.ReduceOp.MAX))

    def _all_reduce(self, value, dtype: torch.dtype, op) -> float:
        device = self.device if self.device.type == "cuda" else torch.device("cpu")
        tensor = torch.tensor([value], dtype=dtype, device=device)
        torch.distributed.all_reduce(tensor, op=op)
        result = tensor.item()
        Distributed._last_tensor = weakref.ref(tensor)
        return result

    def stop(self) -> None:
        """Leave the process group, once the last collective's tensor is really released.

        gloo's worker thread drops its hold on a collective's tensors a moment after the collective
        completes, and releasing a tensor made in Python needs the GIL. If the interpreter is
        already shutting down by then, it refuses the GIL and the process aborts. So wait (with the
        GIL released) until that tensor is gone before leaving.
        """
        if not self.started or not torch.distributed.is_initialized():
            return
        deadline = time.monotonic() + _RELEASE_TIMEOUT_SECONDS
        while (last := Distributed._last_tensor) is not None and last() is not None and time.monotonic() < deadline:
            time.sleep(0.001)
        torch.distributed.destroy_process_group()
