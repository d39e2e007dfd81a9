"""The Slicer side's boundaries: it loads without torch, and the engine below it never imports Slicer.

(The engine's own boundaries are in Testing/Python/engine/test_boundaries.py.)
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[3]
PACKAGE = REPOSITORY / "UNet3DSegmenterLib"
SLICER_SIDE = sorted(path.stem for path in (PACKAGE / "slicer").glob("*.py") if path.stem != "__init__")
SLICER_MODULES = {"slicer", "vtk", "qt", "ctk", "vtkmodules", "mrml"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_slicer_side_and_each_of_its_modules_import_where_torch_cannot():
    pytest.importorskip("slicer", reason="slicer-core is not installed")
    script = textwrap.dedent(f"""
        import importlib, sys
        sys.modules["torch"] = None  # import torch raises ImportError, as on a Slicer without PyTorch
        sys.path.insert(0, {str(REPOSITORY)!r})
        import UNet3DSegmenterLib.slicer
        for name in {SLICER_SIDE!r}:
            importlib.import_module("UNet3DSegmenterLib.slicer." + name)
        loaded = sorted(name for name in sys.modules if name.startswith("UNet3DSegmenterLib"))
        print(" ".join(loaded))
        """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = set(result.stdout.split())
    assert {f"UNet3DSegmenterLib.slicer.{name}" for name in SLICER_SIDE} <= loaded
    engine = {name for name in loaded if not name.startswith("UNet3DSegmenterLib.slicer")}
    # the small torch-free core only: choices, whole-or-nothing writes, safe file names, errors, progress events
    # and the segment options
    light = {"", "._moved", ".choices", ".atomic", ".paths", ".errors", ".progress", ".protocol", ".labels",
             ".segment_options"}
    assert engine <= {"UNet3DSegmenterLib" + name for name in light}, \
        f"the Slicer side loads engine modules at import: {sorted(engine)}"


def test_no_engine_module_imports_slicer_vtk_qt_or_ctk():
    engine = [path for path in PACKAGE.rglob("*.py") if "slicer" not in path.relative_to(PACKAGE).parts]
    assert len(engine) > 30
    offenders = {str(path.relative_to(PACKAGE)): sorted(_imports(path) & SLICER_MODULES) for path in engine}
    assert not {path: names for path, names in offenders.items() if names}


def test_the_slicer_side_never_imports_torch_or_qt_at_module_level():
    """torch only inside functions, when the engine is used; Qt only in the Widget (the module file)."""
    for name in SLICER_SIDE + ["__init__"]:
        tree = ast.parse((PACKAGE / "slicer" / f"{name}.py").read_text(encoding="utf-8"))
        top = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
        top |= {(node.module or "").split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom) and node.level == 0}
        assert not top & {"torch", "qt", "ctk"}, f"slicer/{name}.py imports {sorted(top & {'torch', 'qt', 'ctk'})}"
    everywhere = set().union(*(_imports(PACKAGE / "slicer" / f"{name}.py") for name in SLICER_SIDE))
    assert not everywhere & {"qt", "ctk"}, "the panel's decisions stay Qt-free"


def test_the_process_runner_needs_only_the_standard_library():
    modules = _imports(PACKAGE / "slicer" / "process.py") - {"__future__"}
    assert all(name in sys.stdlib_module_names for name in modules), modules
