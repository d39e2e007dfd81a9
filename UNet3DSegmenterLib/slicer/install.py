"""What the engine needs in Slicer's Python, whether it loads, and how to install what is missing.

Also the Slicer side's one door to the engine: :func:`engine` imports it when it is first used (so
that the module loads, and its panel opens, on a Slicer without PyTorch) and says what to install
when it cannot load; :func:`asValueError` turns the engine's user errors into ``ValueError``, the
module's one error type. :func:`slicerVersionProblem` says when this Slicer is too old.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import slicer

if TYPE_CHECKING:  # the engine's types, for the type checker only: loading them imports torch
    from ..checkpoint import Checkpoint as _Checkpoint
    from ..checkpoint import Ensemble as _Ensemble
    from ..inference.predictor import Predictor as _Predictor
    from ..labels import Label as _Label
    from ..models import UNet3D as _UNet3D
    from ..preprocess import Preprocessing as _Preprocessing
    from ..roi import RegionOfInterest as _RegionOfInterest
    from ..training.config import TrainingConfig as _TrainingConfig
    from ..volume import Volume as _Volume

MINIMUM_SLICER = "5.10"
"""The first Slicer release whose Python (3.12) the engine runs on; Slicer 5.8 ships Python 3.9."""
MINIMUM_PYTHON = (3, 10)

# Python packages the engine needs beyond what Slicer ships (numpy and SimpleITK come with Slicer),
# as pyproject.toml lists them: import name -> pip requirement.
ENGINE_REQUIREMENTS = {"torch": "torch>=2.1", "nibabel": "nibabel>=5.0", "matplotlib": "matplotlib>=3.7",
                       "scipy": "scipy>=1.10"}
TORCH_REQUIREMENT = ENGINE_REQUIREMENTS["torch"]
# Optional: OpenVINO's CPU runtime, the engine's fastest path on processors without native bfloat16.
OPENVINO_REQUIREMENT = "openvino>=2025.1"


def slicerVersionProblem(pythonVersion=None, slicerVersion: str = "") -> str | None:
    """Why this Slicer cannot run the module, in words for the user; None when it can."""
    pythonVersion = tuple((pythonVersion or sys.version_info)[:2])
    if pythonVersion >= MINIMUM_PYTHON:
        return None
    running = f"Slicer {slicerVersion}" if slicerVersion else "this Slicer"
    return (f"UNet3D Segmenter needs 3D Slicer {MINIMUM_SLICER} or newer: its engine needs Python "
            f"{MINIMUM_PYTHON[0]}.{MINIMUM_PYTHON[1]} or newer, and {running} runs Python "
            f"{pythonVersion[0]}.{pythonVersion[1]}. Install a current Slicer from https://download.slicer.org.")


def missingRequirements() -> list[str]:
    """pip requirements of the engine that are not installed (empty when it can run); imports nothing."""
    missing = []
    for name, requirement in ENGINE_REQUIREMENTS.items():
        if name in sys.modules:
            installed = sys.modules[name] is not None
        else:
            try:
                installed = importlib.util.find_spec(name) is not None
            except (ImportError, ValueError):
                installed = False
        if not installed:
            missing.append(requirement)
    return missing


def engineProblem() -> str | None:
    """Why the engine cannot run here, in one line; None when it can. Imports PyTorch (a few seconds, once)."""
    missing = missingRequirements()
    if missing:
        return f"the engine needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed"
    try:
        import torch  # noqa: F401
    except Exception as error:  # a broken install raises OSError, ImportError, RuntimeError, ...
        return f"PyTorch is installed but does not load ({type(error).__name__}: {oneLine(error)})"
    return None


def cudaAvailable() -> bool:
    """True when PyTorch loads and sees a CUDA GPU (imports torch)."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # no torch, or a broken one: no GPU to offer
        return False


def mpsAvailable() -> bool:
    """True when PyTorch loads and sees an Apple GPU (Metal; imports torch)."""
    try:
        import torch

        return bool(torch.backends.mps.is_available())
    except Exception:  # no torch, a broken one, or one without the Metal backend
        return False


def pyTorchExtensionAvailable() -> bool:
    """True when Slicer's PyTorch extension (module PyTorchUtils) is installed."""
    return hasattr(getattr(slicer, "modules", None), "pytorchutils")


def packagingAvailable() -> bool:
    """True when this Slicer has ``slicer.packaging.pip_ensure`` (Slicer 5.12 and newer)."""
    try:
        return hasattr(importlib.import_module("slicer.packaging"), "pip_ensure")
    except ImportError:
        return False


def installPlan(missing: list[str] | None = None) -> list[tuple[str, list[str]]]:
    """How :func:`installRequirements` installs ``missing``: (method, requirements) steps, in order.

    Methods: 'PyTorch extension' (PyTorchUtils picks the CUDA build that fits the GPU driver),
    'slicer.packaging' (``pip_ensure``) where this Slicer has it, otherwise 'pip' (``pip_install``).
    """
    missing = list(missingRequirements() if missing is None else missing)
    steps = []
    if TORCH_REQUIREMENT in missing and pyTorchExtensionAvailable():
        steps.append(("PyTorch extension", [TORCH_REQUIREMENT]))
        missing.remove(TORCH_REQUIREMENT)
    if missing:
        steps.append(("slicer.packaging" if packagingAvailable() else "pip", missing))
    return steps


def installDescription(problem: str | None = None) -> str:
    """What :func:`installRequirements` will do, or, for a ``problem`` it cannot fix, what the user can do."""
    if problem and not missingRequirements():
        return (f"The segmentation engine cannot start: {problem}. Reinstall PyTorch (PyTorch Utils module: "
                "Uninstall, restart Slicer, Install), then restart Slicer.")
    steps = installPlan()
    if not steps:
        return "Everything the engine needs is installed."
    texts = []
    for method, requirements in steps:
        if method == "PyTorch extension":
            texts.append("PyTorch (torch>=2.1, a download of 0.2 to 2.5 GB) will be installed by the PyTorch extension, "
                         "which picks the CUDA build that fits this computer's GPU driver, or the CPU build.")
        else:
            torchNote = (" Install the PyTorch extension from the Extensions Manager first for a PyTorch build matched "
                         "to your GPU (PyTorch is a download of 0.2 to 2.5 GB)." if TORCH_REQUIREMENT in requirements
                         else "")
            texts.append(f"With pip: {', '.join(requirements)}.{torchNote}")
    return "The segmentation engine needs Python packages that are not installed yet. " + " ".join(texts)


def installRequirements(askConfirmation: bool = True) -> bool:
    """Install the engine's missing packages into Slicer's Python; False when the user declines."""
    if not missingRequirements():
        return True
    if askConfirmation and not slicer.util.confirmOkCancelDisplay(installDescription() + " Continue?"):
        return False
    for method, requirements in installPlan():
        if method == "PyTorch extension":
            import PyTorchUtils

            version = TORCH_REQUIREMENT[len("torch"):]
            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                             torchVersionRequirement=version) is None:
                return False
        else:
            _pipInstall(requirements)
    importlib.invalidate_caches()
    return not missingRequirements()


def _pipInstall(requirements: list[str]) -> None:
    """pip install into Slicer's Python: ``slicer.packaging.pip_ensure`` where this Slicer has it, else ``pip_install``."""
    if packagingAvailable():
        importlib.import_module("slicer.packaging").pip_ensure(requirements, prompt_install=False,
                                                              requester="UNet3DSegmenter")
    else:
        slicer.util.pip_install(requirements)


def openVINOOffer() -> str | None:
    """Why installing the optional OpenVINO runtime would speed Segment up here, in words for the panel;
    None where it is installed, the engine cannot run yet, the processor computes bfloat16 natively
    (PyTorch's own path is as fast there), or the OpenVINO path is turned off
    (``UNET3D_SEGMENTER_OPENVINO=0``, see the engine's inference/openvino_path.py). Imports torch."""
    if importlib.util.find_spec("openvino") is not None or engineProblem() is not None:
        return None
    from ..inference.openvino_path import ON_ENVIRONMENT
    from ..runtime import cpu_supports_bf16

    if os.environ.get(ON_ENVIRONMENT) == "0" or cpu_supports_bf16():
        return None
    return ("This processor has no native bfloat16, so PyTorch segments in float32 here. The optional OpenVINO "
            f"runtime ({OPENVINO_REQUIREMENT}, about 60 MB, its usage telemetry left out) is often several times "
            "faster on such processors: Segment measures it beside PyTorch once per model and uses the faster.")


def installOpenVINO(askConfirmation: bool = True) -> bool:
    """Install the optional OpenVINO runtime into Slicer's Python; False when the user declines."""
    if importlib.util.find_spec("openvino") is not None:
        return True
    if askConfirmation and not slicer.util.confirmOkCancelDisplay((openVINOOffer() or "") + " Install it now?"):
        return False
    _pipInstall([OPENVINO_REQUIREMENT])
    importlib.invalidate_caches()
    return importlib.util.find_spec("openvino") is not None


class Engine(Protocol):
    """The engine package as the Slicer side uses it: what :func:`engine` returns, typed for the checker."""

    Checkpoint: type[_Checkpoint]
    Ensemble: type[_Ensemble]
    Label: type[_Label]
    Predictor: type[_Predictor]
    Preprocessing: type[_Preprocessing]
    RegionOfInterest: type[_RegionOfInterest]
    TrainingConfig: type[_TrainingConfig]
    UNet3D: type[_UNet3D]
    Volume: type[_Volume]
    load_checkpoint: Callable[..., _Checkpoint | _Ensemble]
    save_checkpoint: Callable[..., Any]
    read_volume: Callable[..., _Volume]
    write_volume: Callable[..., Any]


def engine() -> Engine:
    """The engine package, ready to use; ValueError naming what to install when PyTorch cannot load."""
    try:
        import torch  # noqa: F401  (the package itself imports lazily; the engine needs torch)
    except ImportError as error:
        missing = getattr(error, "name", None) or "torch"
        raise ValueError(f"the segmentation engine cannot start because the Python package {missing!r} is not "
                         "installed: open the UNet3DSegmenter module and click Install, or run "
                         "UNet3DSegmenterLogic().installRequirements()") from None
    except Exception as error:
        raise ValueError(f"the segmentation engine cannot start: PyTorch is installed but does not load "
                         f"({type(error).__name__}: {oneLine(error)}); reinstall it") from None
    import UNet3DSegmenterLib

    return UNet3DSegmenterLib


@contextlib.contextmanager
def asValueError():
    """Turn the engine's UserError (a mistake the user can fix) into ValueError, the module's one error type."""
    from ..errors import UserError

    try:
        yield
    except UserError as error:
        raise ValueError(str(error)) from None


def forgetEngineModules() -> None:
    """Drop every UNet3DSegmenterLib module from ``sys.modules``, so that the next import (Reload) reads them anew.

    Removing them all, rather than ``importlib.reload`` one by one, leaves no module holding names
    from an old version of another; the package's import hook for moved modules goes with them.
    """
    package = __name__.split(".")[0]
    for name in [name for name in sys.modules if name.split(".")[0] == package]:
        del sys.modules[name]
    sys.meta_path[:] = [finder for finder in sys.meta_path
                        if not type(finder).__module__.startswith(package + ".")]
    importlib.invalidate_caches()


def oneLine(error: BaseException) -> str:
    """The last line of an error's message (tracebacks and chained messages end with the point)."""
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__
