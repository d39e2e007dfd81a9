"""The package's boundaries: what each layer may import, checked on the real import graph."""

from __future__ import annotations

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import UNet3DSegmenterLib
from UNet3DSegmenterLib import _moved

PACKAGE = Path(UNet3DSegmenterLib.__file__).resolve().parent
SLICER_MODULES = {"slicer", "vtk", "qt", "ctk", "vtkmodules", "mrml"}


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=PACKAGE.parent)


def _engine_files() -> list[Path]:
    return [path for path in PACKAGE.rglob("*.py") if "slicer" not in path.relative_to(PACKAGE).parts]


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", _engine_files(), ids=lambda path: str(path.relative_to(PACKAGE)))
def test_the_engine_never_imports_slicer_vtk_qt_or_ctk(path):
    assert not _imported_modules(path) & SLICER_MODULES


def test_importing_the_package_imports_no_torch():
    result = _run("import sys, UNet3DSegmenterLib; assert 'torch' not in sys.modules, 'torch was imported'")
    assert result.returncode == 0, result.stderr


def test_the_command_line_parser_imports_no_torch():
    code = ("import sys; from UNet3DSegmenterLib.commands.cli import build_parser; build_parser(); "
            "assert 'torch' not in sys.modules")
    result = _run(code)
    assert result.returncode == 0, result.stderr


def test_public_names_load_on_first_use():
    code = ("import sys, UNet3DSegmenterLib as engine; assert 'torch' not in sys.modules; "
            "engine.Predictor; assert 'torch' in sys.modules")
    result = _run(code)
    assert result.returncode == 0, result.stderr


def test_every_public_name_is_exported_and_resolves():
    assert sorted(UNet3DSegmenterLib.__all__) == sorted(UNet3DSegmenterLib._PUBLIC)
    for name in UNet3DSegmenterLib.__all__:
        assert getattr(UNet3DSegmenterLib, name) is not None


@pytest.mark.parametrize("old, new", sorted(_moved.MOVED.items()))
def test_a_moved_module_still_imports_from_its_old_path_with_a_warning(old, new):
    import importlib

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sys.modules.pop(f"UNet3DSegmenterLib.{old}", None)
        module = importlib.import_module(f"UNet3DSegmenterLib.{old}")
    assert module is importlib.import_module(f"UNet3DSegmenterLib.{new}")
    assert module.__name__ == f"UNet3DSegmenterLib.{new}"
    assert any(issubclass(warning.category, DeprecationWarning) and new in str(warning.message) for warning in caught)


def _relative_imports(path: Path, level: int) -> set[str]:
    """The first part of each package-relative module ``path`` imports at ``level`` (1: ``from .x``, 2: ``from ..x``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.module.split(".")[0] for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == level and node.module}


def test_imports_flow_one_way_core_never_imports_the_pipelines_or_commands():
    """The package's entry points (__init__'s lazy names, __main__) may name anything; the core may not."""
    core = [path for path in PACKAGE.glob("*.py") if path.name not in ("__init__.py", "__main__.py")]
    for path in core:
        imported = _relative_imports(path, 1) & {"inference", "training", "commands", "slicer"}
        assert not imported, f"{path.name} imports {sorted(imported)}"


def test_training_reaches_inference_only_for_validation_on_whole_cases():
    """Validation runs whole cases through inference's own sliding window, as Segment does; every other helper
    training shares with inference lives in the core."""
    for path in sorted((PACKAGE / "training").glob("*.py")):
        if path.name != "validation.py":
            assert "inference" not in _relative_imports(path, 2), f"training/{path.name} imports inference"
