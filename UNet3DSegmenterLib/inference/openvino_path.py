"""The network through OpenVINO's CPU runtime: an optional inference path, offered where it is installed.

On processors without native bfloat16 (AVX2 only, most laptops and desktops) OpenVINO's CPU plugin runs
the same 3D networks faster than PyTorch's float32 kernels. It is an optional extra
(``pip install "unet3d-segmenter[openvino]"``), used where it is installed unless
``UNET3D_SEGMENTER_OPENVINO=0`` turns it off (see :func:`openvino_available`); otherwise nothing here is
imported and the other paths run as before. :mod:`.calibration` measures it beside the others and keeps
whichever is fastest, so it is used only where it wins.

The untouched network is read into OpenVINO through its PyTorch front end (a TorchScript trace), in
float32, once per network and OpenVINO version: the result is kept in the engine's cache folder
(``openvino/<key>.xml`` and ``.bin``), and OpenVINO keeps its compiled kernels beside it, so a
later run, or a later Segment click, converts nothing. OpenVINO's usage telemetry is left out (see
:func:`import_without_telemetry`) and its model converter is not used. The compute precision
follows the engine's: float32, or bfloat16 where asked for and native.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import hashlib
import importlib.util
import io
import logging
import os
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..runtime import return_freed_memory

log = logging.getLogger("UNet3DSegmenterLib")

FOLDER = "openvino"
ON_ENVIRONMENT = "UNET3D_SEGMENTER_OPENVINO"


def openvino_available() -> bool:
    """Whether the OpenVINO runtime is installed (checked without importing it) and not turned off
    with ``UNET3D_SEGMENTER_OPENVINO=0``."""
    return os.environ.get(ON_ENVIRONMENT) != "0" and importlib.util.find_spec("openvino") is not None


class OpenVINOForward:
    """Runs batches of windows through ``model`` compiled by OpenVINO for the CPU; converts on the first call.

    Args:
        model: the trained network (left untouched; its float32 weights are what OpenVINO reads).
        dtype: the engine's compute precision (float32, or bfloat16 where native).
        cache: the folder that keeps converted networks and OpenVINO's compiled kernels; default the
            engine's cache folder (:func:`.calibration.cache_folder`).
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype, cache: Path | None = None):
        self.model, self.dtype, self.cache = model, dtype, cache
        self._network: Any = None  # the converted network, where the cache folder could not keep it
        self._model_key = ""  # names the converted network in the cache folder (see _key)
        self._requests: dict[tuple[int, ...], Any] = {}  # batch shape -> infer request of its compiled network
        self._lock = threading.Lock()

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        shape = tuple(batch.shape)
        with self._lock:  # an infer request is not shared between threads
            if shape not in self._requests:
                with signal_stack_kept():
                    self._requests[shape] = self._compile(batch)
            request = self._requests[shape]
            request.infer([batch.detach().to("cpu", torch.float32).contiguous().numpy()])
            return torch.from_numpy(request.get_output_tensor(0).data.copy())

    def release_memory(self) -> None:
        """Give back the compiled networks' working buffers until the next batch (which allocates them
        again); their weights stay. For networks that take turns: an ensemble's members."""
        with self._lock:
            for request in self._requests.values():
                request.get_compiled_model().release_memory()

    def __del__(self) -> None:
        with signal_stack_kept():  # each compiled network puts back a signal stack of its own when it goes
            getattr(self, "_requests", {}).clear()

    def _compile(self, batch: torch.Tensor) -> Any:
        """An infer request of the network compiled for exactly this batch shape (a fixed shape lets
        OpenVINO plan its memory and pick its kernels once: about a tenth faster than any shape)."""
        try:
            openvino = import_without_telemetry()
        except ImportError as error:  # installed but broken
            raise RuntimeError(f"OpenVINO does not load: {error}") from error
        from .calibration import cache_folder  # (calibration offers this path, so it is imported here)

        core = openvino.Core()
        self._model_key = self._model_key or self._key(openvino.__version__)
        model_file = (self.cache or cache_folder()) / FOLDER / f"{self._model_key}.xml"
        try:
            with return_freed_memory():  # tracing's activations are freed before any window runs
                network = (self._network.clone() if self._network is not None
                           else self._read_or_convert(openvino, core, model_file, batch))
                network.reshape({0: list(batch.shape)})
            properties = {"INFERENCE_PRECISION_HINT": "bf16" if self.dtype == torch.bfloat16 else "f32",
                          "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": torch.get_num_threads()}
            compiled = model_file.parent / "compiled"
            try:
                compiled.mkdir(parents=True, exist_ok=True)
                properties["CACHE_DIR"] = str(compiled)
            except OSError as error:  # a cache that cannot be written only costs compiling again
                log.debug("could not keep OpenVINO's compiled kernels in %s: %s", compiled, error)
            return core.compile_model(network, "CPU", properties).create_infer_request()
        except RuntimeError:
            raise
        except Exception as error:  # OpenVINO's own failures (an operation it cannot read, say) mean: not here
            raise RuntimeError(f"OpenVINO cannot run this network: {type(error).__name__}: {error}") from error

    def _read_or_convert(self, openvino: Any, core: Any, model_file: Path, batch: torch.Tensor) -> Any:
        """The network as OpenVINO reads it: from the cache folder, or converted and kept there. Only a
        network the cache could not keep stays in memory (its weights are a copy of the model's)."""
        if model_file.exists():
            return core.read_model(str(model_file))
        network = self._convert(batch)
        _save(openvino, network, model_file)
        if not model_file.exists():
            self._network = network
            return network.clone()  # reshaped for this batch; the kept one stays as converted
        return network

    def _key(self, version: str) -> str:
        """Everything the converted network depends on: its structure, its weights and both versions."""
        digest = hashlib.sha1(f"{version} {torch.__version__} {self.model!r}".encode())
        for name, tensor in self.model.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()[:24]

    def _convert(self, batch: torch.Tensor) -> Any:
        from openvino.frontend import FrontEndManager
        from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder

        log.info("reading the network into OpenVINO (once for this network on this computer)")
        example = batch.detach().to("cpu", torch.float32).contiguous()
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")  # tracing warns about every shape it records
            model = copy.deepcopy(self.model).eval() if self.model.training else self.model  # left as it is
            decoder = TorchScriptPythonDecoder(model, example_input=(example,))
        front_end = FrontEndManager().load_by_framework("pytorch")
        return front_end.convert(front_end.load(decoder))


def import_without_telemetry() -> Any:
    """``import openvino``, with its usage telemetry left out.

    Importing OpenVINO reports the import to Intel's analytics unless the user has declined on
    that computer; where the ``openvino_telemetry`` package cannot be imported, OpenVINO takes its
    own do-nothing stand-in instead. So it is made unimportable for the moment of the import (and
    put back after it, for anyone else in the process who wants it)."""
    if "openvino" in sys.modules:
        return sys.modules["openvino"]
    blocked = ("openvino_telemetry", "openvino_telemetry.backend")
    previous = {name: sys.modules.get(name) for name in blocked}
    sys.modules.update(dict.fromkeys(blocked))  # type: ignore[arg-type]  # None: importing it raises ImportError
    try:
        import openvino

        return openvino
    finally:
        for name, module in previous.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


class _SignalStack(ctypes.Structure):
    """Linux's ``stack_t``: where a thread's signal handlers run (``sigaltstack``)."""
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@contextlib.contextmanager
def signal_stack_kept() -> Iterator[None]:
    """Put this thread's alternate signal stack back as it was, whatever OpenVINO did to it meanwhile.

    OpenVINO's CPU plugin gives the calling thread a signal stack of its own when it compiles a
    network and, when that network is destroyed, sets back the stack it found then. Networks that go
    in another order than they came leave the thread on a freed stack, and the next signal handled
    there (a child process ending: SIGCHLD, in a DataLoader worker's shutdown for one) kills the
    process with a segmentation fault. So every compile and every destruction here is wrapped."""
    if sys.platform != "linux":  # the layout above is Linux's; other systems are left alone
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    before = _SignalStack()
    if libc.sigaltstack(None, ctypes.byref(before)) != 0:
        yield
        return
    try:
        yield
    finally:
        before.ss_flags &= _SS_DISABLE  # (SS_ONSTACK is only reported, never set)
        libc.sigaltstack(ctypes.byref(before), None)


_SS_DISABLE = 2


def _save(openvino: Any, network: Any, path: Path) -> None:
    """Keep a converted network for later runs; a cache that cannot be written only costs a new conversion.

    The pair is written under temporary names and renamed, ``.bin`` before ``.xml``, so that a reader
    never finds an ``.xml`` without its complete weights."""
    temporary = path.with_name(f".{path.stem}.{threading.get_ident()}.partial.xml")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        openvino.save_model(network, str(temporary), compress_to_fp16=False)
        temporary.with_suffix(".bin").replace(path.with_suffix(".bin"))
        temporary.replace(path)
    except (OSError, RuntimeError) as error:
        log.debug("could not keep the OpenVINO network in %s: %s", path.parent, error)
        for leftover in (temporary, temporary.with_suffix(".bin")):
            with contextlib.suppress(OSError):  # (where the folder could not be made, there is none)
                leftover.unlink(missing_ok=True)
