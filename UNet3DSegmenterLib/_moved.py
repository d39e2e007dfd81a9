"""Old module paths keep working: ``UNet3DSegmenterLib.predictor`` is ``inference.predictor``, and so on.

The engine's modules moved into the ``inference``, ``training`` and ``commands`` subpackages. Code
written against the flat layout still imports, with a DeprecationWarning naming the new path; the
module it gets is the very same module object.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

# old module name -> new module path, both relative to the package
MOVED = {
    "predictor": "inference.predictor", "sliding_window": "inference.sliding_window",
    "fast_inference": "inference.fast", "postprocess": "inference.postprocess",
    "trainer": "training.trainer", "training_loop": "training.step", "dataset": "training.patches",
    "planning": "training.planning", "augment": "training.augment", "losses": "training.losses",
    "validation": "training.validation", "splits": "training.splits", "distributed": "training.distributed",
    "cli": "commands.cli", "predict_command": "commands.predict", "train_command": "commands.train",
    "evaluate": "evaluation", "demo": "commands.demo",
}


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, package: str):
        self.package = package

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package != self.package or name not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        name = spec.name.rpartition(".")[2]
        new = f"{self.package}.{MOVED[name]}"
        warnings.warn(f"{spec.name} moved to {new}; import it from there", DeprecationWarning, stacklevel=2)
        module = importlib.import_module(new)
        self._own = module.__spec__, module.__loader__
        return module

    def exec_module(self, module) -> None:
        # The module already ran: it is the new module itself. The import system has just stamped
        # the old name's spec on it; give it its own back.
        module.__spec__, module.__loader__ = self._own


def install(package: str) -> None:
    if not any(isinstance(finder, _Finder) and finder.package == package for finder in sys.meta_path):
        sys.meta_path.append(_Finder(package))
