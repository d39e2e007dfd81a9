"""What the engine needs and how it is installed (UNet3DSegmenterLib.slicer.install), the Slicer version, Reload."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")

from UNet3DSegmenterLib.slicer import install  # noqa: E402

REPOSITORY = Path(__file__).resolve().parents[3]


def test_missing_packages_are_named_with_how_they_will_be_installed(slicer_scene, logic, monkeypatch):
    monkeypatch.setitem(sys.modules, "nibabel", None)
    assert logic.missingRequirements() == ["nibabel>=5.0"]
    assert "nibabel>=5.0" in logic.installDescription()
    monkeypatch.setitem(sys.modules, "torch", None)
    description = logic.installDescription()
    assert "torch>=2.1" in description and "pip" in description
    monkeypatch.setattr(slicer.modules, "pytorchutils", object(), raising=False)
    assert "PyTorch extension" in logic.installDescription()


def test_openvino_is_offered_only_where_it_is_missing_and_the_processor_lacks_native_bf16(slicer_scene, logic,
                                                                                           monkeypatch):
    import importlib.util

    from UNet3DSegmenterLib import runtime

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "openvino" else real_find_spec(name, *args))
    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: False)
    monkeypatch.setenv("UNET3D_SEGMENTER_OPENVINO", "0")
    assert logic.openVINOOffer() is None  # turned off
    monkeypatch.delenv("UNET3D_SEGMENTER_OPENVINO")
    offer = logic.openVINOOffer()
    assert offer and "OpenVINO" in offer and install.OPENVINO_REQUIREMENT in offer and "\n" not in offer
    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: True)
    assert logic.openVINOOffer() is None  # PyTorch's bf16 path is as fast there
    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: False)
    monkeypatch.setattr(install, "engineProblem", lambda: "PyTorch is not installed")
    assert logic.openVINOOffer() is None  # PyTorch comes first
    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)
    monkeypatch.setattr(install, "engineProblem", lambda: None)
    if real_find_spec("openvino") is not None:
        assert logic.openVINOOffer() is None and logic.installOpenVINO(askConfirmation=False)


def test_the_install_plan_uses_the_pytorch_extension_then_slicers_packaging_where_it_exists(slicer_scene,
                                                                                           monkeypatch):
    missing = ["torch>=2.1", "nibabel>=5.0"]
    assert install.installPlan(missing) == [("pip", missing)], "slicer-core has no slicer.packaging: pip_install"
    packaging = types.ModuleType("slicer.packaging")
    packaging.pip_ensure = lambda requirements, **options: None
    monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)
    assert install.installPlan(missing) == [("slicer.packaging", missing)]
    monkeypatch.setattr(slicer.modules, "pytorchutils", object(), raising=False)
    assert install.installPlan(missing) == [("PyTorch extension", ["torch>=2.1"]), ("slicer.packaging", ["nibabel>=5.0"])]


def test_an_older_slicer_is_told_which_release_it_needs():
    assert install.slicerVersionProblem((3, 12)) is None
    assert install.slicerVersionProblem((3, 10)) is None
    message = install.slicerVersionProblem((3, 9), "5.8.1")
    assert "Slicer 5.10 or newer" in message and "Slicer 5.8.1 runs Python 3.9" in message
    assert "\n" not in message


def test_a_broken_pytorch_is_a_problem_in_one_line_not_an_exception(tmp_path):
    """A PyTorch whose libraries do not load raises OSError on import: the engine's check says so, once."""
    broken = tmp_path / "site" / "torch"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise OSError('libtorch_cpu.so: cannot open shared object file')\n")
    script = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(tmp_path / 'site')!r}, {str(REPOSITORY)!r}]
        from UNet3DSegmenterLib.slicer import install
        assert install.missingRequirements() == [], install.missingRequirements()
        problem = install.engineProblem()
        assert problem.startswith("PyTorch is installed but does not load (OSError: libtorch_cpu.so"), problem
        assert not install.cudaAvailable()
        assert "Reinstall PyTorch" in install.installDescription(problem)
        try:
            install.engine()
        except ValueError as error:
            assert "does not load" in str(error), error
        print("reported")
        """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reported" in result.stdout


def test_forgetting_the_engine_modules_makes_reload_read_them_anew():
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPOSITORY)!r})
        import UNet3DSegmenterLib.slicer.panel as old
        import UNet3DSegmenterLib.cli  # a moved module: goes through the package's import hook
        hooks = len(sys.meta_path)
        from UNet3DSegmenterLib.slicer import install
        install.forgetEngineModules()
        assert not [name for name in sys.modules if name.startswith("UNet3DSegmenterLib")]
        import UNet3DSegmenterLib.slicer.panel as new
        assert new is not old and len(sys.meta_path) == hooks, (len(sys.meta_path), hooks)
        print("reloaded")
        """)
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reloaded" in result.stdout


def test_the_engine_door_is_typed_and_the_type_checker_covers_the_slicer_side():
    import typing

    import tomllib

    import UNet3DSegmenterLib

    assert typing.get_type_hints(install.engine)["return"] is install.Engine
    engine = install.engine()
    members = [name for name in install.Engine.__annotations__]
    assert members and all(getattr(engine, name) is getattr(UNet3DSegmenterLib, name) for name in members)
    config = tomllib.loads((Path(install.__file__).parents[2] / "pyproject.toml").read_text(encoding="utf-8"))
    mypy = config["tool"]["mypy"]
    assert "UNet3DSegmenterLib" in mypy["files"]
    assert not [path for path in mypy.get("exclude", []) if "slicer" in path], "mypy skips the Slicer side"
