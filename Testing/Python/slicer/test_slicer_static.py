"""Checks that need no scene: the panel's .ui against the code, CMakeLists.txt, icon, module loading without torch."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[3]
MODULE_FILE = REPOSITORY / "UNet3DSegmenter.py"
UI_FILE = REPOSITORY / "Resources" / "UI" / "UNet3DSegmenter.ui"
ICON_FILE = REPOSITORY / "Resources" / "Icons" / "UNet3DSegmenter.png"
CMAKE_FILE = REPOSITORY / "CMakeLists.txt"

MODULE_SOURCE = MODULE_FILE.read_text(encoding="utf-8")
MODULE_TREE = ast.parse(MODULE_SOURCE)


def _class(name: str) -> ast.ClassDef:
    return next(node for node in MODULE_TREE.body if isinstance(node, ast.ClassDef) and node.name == name)


def _ui_widgets() -> dict[str, str]:
    """widget name -> class, for every widget in the .ui."""
    return {widget.get("name"): widget.get("class") for widget in ElementTree.parse(UI_FILE).iter("widget")}


def _ui_bindings() -> dict[str, str]:
    """widget name -> parameter name, for widgets with the SlicerParameterName dynamic property."""
    bindings = {}
    for widget in ElementTree.parse(UI_FILE).iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                assert prop.get("stdset") == "0", f"{widget.get('name')}: SlicerParameterName must be a dynamic property"
                bindings[widget.get("name")] = prop.findtext("string")
    return bindings


def _parameters() -> dict[str, str]:
    """parameter name -> annotation source, from the parameter node class."""
    return {statement.target.id: ast.unparse(statement.annotation) for statement in _class("UNet3DSegmenterParameterNode").body
            if isinstance(statement, ast.AnnAssign)}


# --- the panel ----------------------------------------------------------------------------------


def test_every_widget_the_code_uses_exists_in_the_ui():
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_SOURCE))
    assert used, "the widget uses no .ui widgets?"
    missing = sorted(used - set(_ui_widgets()))
    assert not missing, f"used by UNet3DSegmenter.py but absent from {UI_FILE.name}: {missing}"


def test_every_bound_parameter_exists_in_the_parameter_node():
    bindings = _ui_bindings()
    assert len(bindings) >= 12
    unknown = {widget: name for widget, name in bindings.items() if name not in _parameters()}
    assert not unknown, f"SlicerParameterName values with no parameter: {unknown}"
    assert len(set(bindings.values())) == len(bindings), "two widgets bound to one parameter"


# Which widget classes Slicer's GUI connectors can bind to which parameter types.
_CONNECTORS = {
    "bool": {"QCheckBox", "QPushButton"},
    "int": {"QSpinBox", "QSlider"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget"},
    "str": {"QLineEdit", "QTextEdit"},
    "choice": {"QComboBox"},
    "path": {"ctkPathLineEdit", "ctkDirectoryButton"},
    "node": {"qMRMLNodeComboBox", "qMRMLSubjectHierarchyTreeView"},
}


def _kind(annotation: str) -> str:
    if "Choice(" in annotation:
        return "choice"
    base = annotation.removeprefix("Annotated[").split(",")[0].strip("] ")
    if base.startswith("vtkMRML"):
        return "node"
    if base in ("pathlib.Path", "Path"):
        return "path"
    return base


def test_bound_widgets_are_of_a_class_that_can_show_their_parameter():
    widgets, parameters = _ui_widgets(), _parameters()
    for widget, name in _ui_bindings().items():
        kind = _kind(parameters[name])
        assert widgets[widget] in _CONNECTORS[kind], f"{widget} ({widgets[widget]}) cannot be bound to {name}: {kind}"
        if kind == "float" and widgets[widget] == "ctkSliderWidget":
            assert "WithinRange" in parameters[name], f"{name}: a slider needs a bounded float"


def test_node_selectors_follow_the_scene():
    root = ElementTree.parse(UI_FILE).getroot()
    selectors = {name for name, cls in _ui_widgets().items() if cls == "qMRMLNodeComboBox"}
    connected = {connection.findtext("receiver") for connection in root.iter("connection")
                 if connection.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    assert selectors <= connected


def test_module_file_holds_the_five_template_classes_in_order():
    names = [node.name for node in MODULE_TREE.body if isinstance(node, ast.ClassDef)]
    template = ["UNet3DSegmenter", "UNet3DSegmenterParameterNode", "UNet3DSegmenterWidget", "UNet3DSegmenterLogic",
                "UNet3DSegmenterTest"]
    assert [name for name in names if name in template] == template
    assert names[-1] == "UNet3DSegmenterTest"


def test_no_other_python_file_in_the_module_folder():
    """Slicer loads every .py file in a module folder as a module."""
    assert sorted(path.name for path in REPOSITORY.glob("*.py")) == ["UNet3DSegmenter.py"]


# --- loading without torch ----------------------------------------------------------------------


def test_module_file_imports_no_engine_or_torch_at_load_time():
    top_level = set()
    for node in MODULE_TREE.body:
        if isinstance(node, ast.Import):
            top_level |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            top_level.add((node.module or "").split(".")[0])
    assert not top_level & {"torch", "UNet3DSegmenterLib", "nibabel", "SimpleITK", "matplotlib"}


def test_module_loads_and_explains_what_to_install_on_a_slicer_without_torch():
    pytest.importorskip("slicer", reason="slicer-core is not installed")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # as on a fresh Slicer: import torch fails
        sys.path[:0] = [{str(REPOSITORY)!r}, {str(REPOSITORY / "Testing" / "Python" / "slicer")!r}]
        from slicer_harness import SlicerHarness
        harness = SlicerHarness()
        module = harness.install()
        moduleObject, _ = harness.loadModule()
        moduleObject.runTest(msec=0)  # Reload and Test says it is skipped instead of failing
        logic = module.UNet3DSegmenterLogic()
        assert "torch>=2.1" in logic.missingRequirements(), logic.missingRequirements()
        assert "torch>=2.1" in logic.installDescription()
        assert logic.availableModels() is not None and not logic.cudaAvailable()
        assert logic.describeModel("any.pt") == "Install PyTorch to read the model."
        volume = module.slicer.util.addVolumeFromArray(__import__("numpy").zeros((4, 4, 4)))
        try:
            logic.segment(volume, "model.pt")
        except ValueError as error:
            assert "torch" in str(error) and "Install" in str(error), error
        else:
            raise AssertionError("segment ran without torch")
        assert "UNet3DSegmenterLib.checkpoint" not in sys.modules
        harness.uninstall()
        print("loaded without torch")
        """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded without torch" in result.stdout


# --- CMakeLists.txt and resources ---------------------------------------------------------------


def _cmake_text() -> str:
    """CMakeLists.txt without its comments (a # inside a quoted string stays)."""
    return re.sub(r'"[^"]*"|#[^\n]*', lambda match: match.group(0) if match.group(0)[0] == '"' else "",
                  CMAKE_FILE.read_text(encoding="utf-8"))


def _cmake_sets() -> dict[str, list[str]]:
    text = _cmake_text()
    sets = {}
    for name, body in re.findall(r"\bset\(\s*(\w+)\s+(.*?)\)", text, flags=re.S):
        sets[name] = re.findall(r'"[^"]*"|\S+', body)
    return sets


def _cmake_files(variable: str, sets: dict[str, list[str]]) -> set[str]:
    """The files a CMake list names, with ${...} and file(GLOB ...) resolved against the repository."""
    text = _cmake_text()
    globs = {name: (kind, re.findall(r"[\w./*${}-]+", body))
             for kind, name, body in re.findall(r"file\(\s*(GLOB|GLOB_RECURSE)\s+(\w+)\s+(.*?)\)", text, flags=re.S)}
    files = set()
    for item in sets[variable]:
        item = item.strip('"').replace("${MODULE_NAME}", sets["MODULE_NAME"][0])
        reference = re.fullmatch(r"\$\{(\w+)\}", item)
        if reference and reference.group(1) in globs:
            kind, words = globs[reference.group(1)]
            for pattern in [word for word in words if "/" in word or word.endswith(".py")]:
                folder, name = pattern.rsplit("/", 1) if "/" in pattern else ("", pattern)
                found = (REPOSITORY / folder).rglob(name) if kind == "GLOB_RECURSE" else (REPOSITORY / folder).glob(name)
                files |= {str(path.relative_to(REPOSITORY)) for path in found}
        elif reference:
            files |= _cmake_files(reference.group(1), sets)
        else:
            files.add(item)
    return files


def test_cmake_declares_the_extension_metadata():
    sets = _cmake_sets()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert key in sets and sets[key] and sets[key][0].strip('"'), f"{key} is not set"
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert sets[key][0].strip('"').startswith("https://"), key
    assert "PyTorch" in " ".join(sets["EXTENSION_DEPENDS"])
    text = CMAKE_FILE.read_text(encoding="utf-8")
    assert re.search(r"project\(\s*UNet3DSegmenter\s*\)", text)
    assert "find_package(Slicer REQUIRED)" in text and "include(${Slicer_EXTENSION_CPACK})" in text


def test_cmake_builds_the_scripted_module_with_its_tests():
    text = _cmake_text()
    build = re.search(r"slicerMacroBuildScriptedModule\((.*?)\)", text, flags=re.S)
    assert build and "WITH_GENERIC_TESTS" in build.group(1)
    for keyword in ("NAME ${MODULE_NAME}", "SCRIPTS ${MODULE_PYTHON_SCRIPTS}", "RESOURCES ${MODULE_PYTHON_RESOURCES}"):
        assert keyword in " ".join(build.group(1).split())
    assert re.search(r"slicer_add_python_unittest\(\s*SCRIPT\s+\$\{MODULE_NAME\}\.py\s*\)", text)


def test_cmake_lists_every_python_file_and_resource_the_module_needs():
    sets = _cmake_sets()
    assert sets["MODULE_NAME"] == ["UNet3DSegmenter"]
    scripts = _cmake_files("MODULE_PYTHON_SCRIPTS", sets)
    needed = {"UNet3DSegmenter.py"} | {str(path.relative_to(REPOSITORY))
                                       for path in (REPOSITORY / "UNet3DSegmenterLib").rglob("*.py")}
    assert needed <= scripts, f"not installed with the module: {sorted(needed - scripts)}"
    resources = _cmake_files("MODULE_PYTHON_RESOURCES", sets)
    assert {"Resources/Icons/UNet3DSegmenter.png", "Resources/UI/UNet3DSegmenter.ui"} <= resources
    models = {str(path.relative_to(REPOSITORY)) for path in (REPOSITORY / "Resources" / "Models").glob("*.pt")}
    assert models <= resources
    for path in scripts | resources:
        assert (REPOSITORY / path).is_file(), f"CMakeLists.txt names {path}, which does not exist"


def test_icon_is_a_128_pixel_png():
    data = ICON_FILE.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (128, 128)


def _methods(class_name: str) -> dict[str, ast.FunctionDef]:
    return {node.name: node for node in _class(class_name).body if isinstance(node, ast.FunctionDef)}


def test_the_widget_calls_logic_methods_that_exist_with_arguments_they_accept():
    """The panel cannot run here: check its calls into the Logic against the Logic's signatures."""
    logic = _methods("UNet3DSegmenterLogic")
    calls = [node for node in ast.walk(_class("UNet3DSegmenterWidget")) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Attribute)
             and node.func.value.attr == "logic" and isinstance(node.func.value.value, ast.Name)
             and node.func.value.value.id == "self"]
    assert len(calls) >= 8
    for call in calls:
        name = call.func.attr
        assert name in logic, f"the widget calls logic.{name}, which does not exist"
        arguments = logic[name].args
        accepted = {argument.arg for argument in arguments.args + arguments.kwonlyargs}
        for keyword in call.keywords:
            assert keyword.arg in accepted or arguments.kwarg is not None, f"logic.{name} takes no {keyword.arg}="
        positional = [argument.arg for argument in arguments.args if argument.arg != "self"]
        assert len(call.args) <= len(positional), f"logic.{name} takes at most {len(positional)} positional arguments"


def test_every_slot_the_widget_connects_is_one_of_its_methods():
    widget = _methods("UNet3DSegmenterWidget")
    slots = [node.args[-1].attr for node in ast.walk(_class("UNet3DSegmenterWidget"))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "connect"
             and node.args and isinstance(node.args[-1], ast.Attribute)]
    assert len(slots) >= 8
    assert not [slot for slot in slots if slot not in widget]


def test_the_harness_leaves_no_trace_in_the_process():
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
    from slicer_harness import SlicerHarness

    attributes = {name: getattr(slicer, name, None) for name in ("app", "mrmlScene", "modules", "ScriptedLoadableModule")}
    modules = {name: sys.modules.get(name) for name in ("qt", "ctk", "UNet3DSegmenter", "slicer.ScriptedLoadableModule")}
    path = list(sys.path)
    harness = SlicerHarness()
    harness.install()
    assert sys.modules["qt"] is not None and slicer.mrmlScene is harness.scene
    harness.uninstall()
    assert {name: getattr(slicer, name, None) for name in attributes} == attributes
    assert {name: sys.modules.get(name) for name in modules} == modules
    assert sys.path == path
