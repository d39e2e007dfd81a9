"""Which way of running a network is fastest on this machine: measured once, then remembered.

Whether the channels-last rewrite beats the untouched network under autocast depends on the
network, the window size and the processor (small windows can favour the untouched network), so
it is measured rather than assumed: at the first batch of a new shape each path runs on that very
batch a few times, one path after the other, and the fastest wins; the others are released, so
their copies of the network do not stay in memory. A path that raises (a kernel this processor
lacks) is dropped and the next one is used. The choice is stored in a small JSON file in the user's
cache folder (:func:`cache_folder`), keyed by everything that can change the answer: PyTorch
version, processor and its flags, threads, network, batch shape and precision. Later runs, and
every later Segment click, read it and measure nothing. Nothing here compiles code.

The paths agree only up to rounding, so once a choice is made it is kept: in memory for the rest
of the process (even where the cache cannot be written) and in the cache file for later ones, also
when other work kept the processor busy while measuring (the entry then says so). The same
checkpoint given twice, the members of an ensemble and the cases of a folder thus always take the
same path and give bit-identical results. Deleting the cache file measures again.

``UNET3D_SEGMENTER_INFERENCE_PATH`` (rewritten, autocast or plain) skips the measurement and takes
that path wherever it is offered, for reproducing a run or benchmarking one.

Example::

    >>> forward = CalibratedForward(model, torch.device("cpu"), torch.bfloat16)
    >>> logits = forward(batch)        # measures on the first batch of each shape, or reads the cache
    >>> forward.choices                # {(2, 1, 96, 96, 96): 'rewritten'}
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..atomic import write_text_atomically
from ..runtime import processor_record, return_freed_memory
from .fast import Forward, inference_paths

log = logging.getLogger("UNet3DSegmenterLib")

CACHE_ENVIRONMENT = "UNET3D_SEGMENTER_CACHE"
PATH_ENVIRONMENT = "UNET3D_SEGMENTER_INFERENCE_PATH"
CACHE_FILE = "inference-paths.json"
_ROUNDS = 3  # timed runs of each path after one warm-up run
_CLEAR_MARGIN = 1.3  # after one round, a path this much slower than the best is dropped
_chosen: dict[str, str] = {}  # cache key -> path, for the rest of this process


def cache_folder() -> Path:
    """Where the engine keeps what it measured: ``$UNET3D_SEGMENTER_CACHE`` when set, else the
    platform's per-user cache folder (``~/.cache/unet3d-segmenter`` on Linux,
    ``~/Library/Caches/unet3d-segmenter`` on macOS, ``%LOCALAPPDATA%\\unet3d-segmenter`` on Windows)."""
    if os.environ.get(CACHE_ENVIRONMENT):
        return Path(os.environ[CACHE_ENVIRONMENT])
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "unet3d-segmenter"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "unet3d-segmenter"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "unet3d-segmenter"


class CalibratedForward:
    """Runs batches through the fastest of :func:`~.fast.inference_paths` for each batch shape.

    Args:
        model: the trained network (left untouched).
        device: where it computes.
        dtype: the compute precision.
        calibrate: False takes the rewritten network without measuring (and without the cache).
    """

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype, calibrate: bool = True):
        self.paths: dict[str, Forward] = dict(inference_paths(model, device, dtype))
        self.device, self.dtype = device, dtype
        self.signature = _network_signature(model)
        self.calibrate = calibrate and len(self.paths) > 1
        self.choices: dict[tuple[int, ...], str] = {}

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        shape = tuple(batch.shape)
        if shape not in self.choices:
            self.choices[shape] = self._choose(batch) if self.calibrate else next(iter(self.paths))
        return self.paths[self.choices[shape]](batch)

    def release_memory(self) -> None:
        """Give back the working buffers that the paths keep between batches (see LazyPath.release_memory)."""
        for path in self.paths.values():
            release = getattr(path, "release_memory", None)
            if release is not None:
                release()

    def _choose(self, batch: torch.Tensor) -> str:
        if os.environ.get(PATH_ENVIRONMENT) in self.paths:
            return os.environ[PATH_ENVIRONMENT]
        record = self._record(tuple(batch.shape))
        key = hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()[:20]
        remembered = _chosen.get(key) or _read_cache().get(key, {}).get("path")
        if remembered in self.paths:
            _chosen[key] = remembered
            return remembered
        seconds = measure_paths(self.paths, batch)
        working = {name: value for name, value in seconds.items() if value != float("inf")}
        choice = min(working, key=lambda name: working[name])
        log.info("fastest inference path for %s windows: %s (%s)", "x".join(map(str, batch.shape[2:])), choice,
                 ", ".join(f"{name} {value * 1000:.0f} ms" for name, value in working.items()))
        _chosen[key] = choice
        busy = processor_busy()
        if busy:
            log.info("other work kept the processor busy while measuring: delete %s to measure again",
                     cache_folder() / CACHE_FILE)
        _remember(key, {"path": choice, "busy": busy, "failed": sorted(set(seconds) - set(working)),
                        "milliseconds": {name: round(value * 1000, 1) for name, value in working.items()}, **record})
        return choice

    def _record(self, shape: tuple[int, ...]) -> dict:
        """Everything that can change which path is fastest (stored beside the choice, to read)."""
        return {"torch": torch.__version__, "processor": processor_record(), "threads": torch.get_num_threads(),
                "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "network": self.signature, "batch": list(shape)}


def measure_paths(paths: Mapping[str, Forward], batch: torch.Tensor) -> dict[str, float]:
    """Best wall-clock seconds of each path on ``batch``, one path after the other: a warm-up run, then
    up to ``_ROUNDS`` timed runs, fewer once it is clearly slower than the best so far. A path whose
    warm-up raises (a kernel this processor lacks) gets infinity; when every path raises, the last
    error propagates. Each path is released when measured (see :func:`_release`), so a first run on a
    new network never holds two paths' networks and activations at once; only the last one stays
    built, where it is the fastest (a path released is built again when next called)."""
    best: dict[str, float] = {}
    with torch.inference_mode():
        for index, (name, forward) in enumerate(paths.items()):
            last = index == len(paths) - 1
            best[name] = float("inf")
            if _runs(name, forward, batch, only_hope=last and all(value == float("inf") for value in best.values())):
                for _ in range(_ROUNDS):
                    started = time.perf_counter()
                    forward(batch)
                    if batch.device.type == "cuda":
                        torch.cuda.synchronize()
                    best[name] = min(best[name], time.perf_counter() - started)
                    if best[name] > _CLEAR_MARGIN * min(best.values()):
                        break
            if not (last and best[name] == min(best.values())):
                _release(forward)
    return best


def _release(forward: Forward) -> None:
    """Drop a path's network (a :class:`~.fast.LazyPath` builds it again when next called) and give the
    memory its runs freed back to the system, rather than keep it in the heap beside the next path's."""
    release = getattr(forward, "release", None)
    with return_freed_memory():
        if release is not None:
            release()


def _runs(name: str, forward: Forward, batch: torch.Tensor, only_hope: bool) -> bool:
    """Warm ``forward`` up on ``batch``; False when it raises for want of a kernel (oneDNN's bf16
    convolutions on an AVX2-only processor, say). Running out of memory is not that: it propagates,
    and so does the error of the last path when no other one ran (``only_hope``)."""
    try:
        forward(batch)
        return True
    except torch.cuda.OutOfMemoryError:
        raise
    except (RuntimeError, NotImplementedError) as error:
        if only_hope:
            raise
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        log.info("inference path %s does not run on this processor (%s); trying the next one", name, reason)
        return False


def processor_busy() -> bool:
    """Whether more work was waiting for the cores than there are cores (the load average over the
    last minute, where the system keeps one): timings taken then mislead, so they are not cached."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows keeps no load average
        return False
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return load > cores


def _network_signature(model: nn.Module) -> str:
    """The architecture, from the module tree (layer types and sizes), whatever its weights."""
    return f"{type(model).__name__} {hashlib.sha1(repr(model).encode()).hexdigest()[:16]}"


def _read_cache() -> dict:
    path = cache_folder() / CACHE_FILE
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return content if isinstance(content, dict) else {}


def _remember(key: str, entry: dict) -> None:
    """Add one measurement to the cache file; a cache that cannot be written only costs a re-measure."""
    folder = cache_folder()
    content = _read_cache()
    content[key] = entry
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomically(folder / CACHE_FILE, json.dumps(content, indent=1, sort_keys=True))
    except OSError as error:
        log.debug("could not write the inference-path cache in %s: %s", folder, error)
