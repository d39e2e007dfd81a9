"""The module file, its .ui and CMakeLists.txt: what can be checked without the Slicer application.

The Widget's Qt wiring cannot run here, so it is checked statically: every widget it uses exists in
the .ui, every parameter binding fits, every ``connect('signal(args)', ...)`` names a signal that
widget's class declares (the table in data/qt_signals.json, with its sources), and every call into
the Logic matches a Logic method. The module's Logic and Test run on real MRML elsewhere.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
import textwrap
import typing
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[3]
MODULE_FILE = REPOSITORY / "UNet3DSegmenter.py"
UI_FILE = REPOSITORY / "Resources" / "UI" / "UNet3DSegmenter.ui"
ICON_FILE = REPOSITORY / "Resources" / "Icons" / "UNet3DSegmenter.png"
CMAKE_FILE = REPOSITORY / "CMakeLists.txt"
SIGNALS = json.loads((Path(__file__).parent / "data" / "qt_signals.json").read_text(encoding="utf-8"))

MODULE_SOURCE = MODULE_FILE.read_text(encoding="utf-8")
MODULE_TREE = ast.parse(MODULE_SOURCE)
TEMPLATE = ["UNet3DSegmenter", "UNet3DSegmenterParameterNode", "UNet3DSegmenterWidget", "UNet3DSegmenterLogic",
            "UNet3DSegmenterTest"]


def _class(name: str) -> ast.ClassDef:
    return next(node for node in MODULE_TREE.body if isinstance(node, ast.ClassDef) and node.name == name)


def _methods(class_name: str) -> dict[str, ast.FunctionDef]:
    return {node.name: node for node in _class(class_name).body if isinstance(node, ast.FunctionDef)}


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


# --- the module file as the template ------------------------------------------------------------


def test_module_file_holds_the_five_template_classes_in_order_and_little_else():
    names = [node.name for node in MODULE_TREE.body if isinstance(node, ast.ClassDef)]
    assert names == TEMPLATE
    functions = [node.name for node in MODULE_TREE.body if isinstance(node, ast.FunctionDef)]
    assert functions == ["_useTheEngineBesideThisFile"]
    assert len(MODULE_SOURCE.splitlines()) <= 800


def test_the_logic_keeps_its_documented_console_methods_as_short_delegates():
    logic = _methods("UNet3DSegmenterLogic")
    documented = {"segment", "segmentInBackground", "train", "trainInBackground", "segmentNames",
                  "labelmapFromSegmentation", "modelsFolder", "exportTrainingPairs", "segmentedPairs",
                  "installRequirements", "volumeFromNode", "addVolumeNode", "updateSegmentationFromLabelmap"}
    assert documented <= set(logic)
    for name, method in logic.items():
        body = [statement for statement in method.body if not isinstance(statement, ast.Expr)
                or not isinstance(statement.value, ast.Constant)]
        assert len(body) <= 4, f"Logic.{name} does work itself: move it into UNet3DSegmenterLib.slicer"
        if not name.startswith("_") and name != "__init__":
            assert ast.get_docstring(method) or name in ("getParameterNode", "modelsFolder"), f"Logic.{name} has no docstring"
    train = logic["train"].args
    assert "initCheckpoint" in [argument.arg for argument in train.args]


def test_no_other_python_file_in_the_module_folder():
    """Slicer loads every .py file in a module folder as a module."""
    assert sorted(path.name for path in REPOSITORY.glob("*.py")) == ["UNet3DSegmenter.py"]


def test_module_file_imports_only_the_torch_free_slicer_side_at_load_time():
    top_level = set()
    for node in MODULE_TREE.body:
        if isinstance(node, ast.Import):
            top_level |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            top_level.add(node.module or "")
    engine = {name for name in top_level if name.split(".")[0] == "UNet3DSegmenterLib"}
    assert engine == {"UNet3DSegmenterLib.choices", "UNet3DSegmenterLib.slicer"}
    assert not {name.split(".")[0] for name in top_level} & {"torch", "nibabel", "SimpleITK", "matplotlib"}


def _loaded_at_module_load() -> list[Path]:
    """The files Python runs when Slicer loads the module: the module file and, through the imports at the top
    of each file (not those inside functions, which run when the engine is used), the package's modules."""
    package = REPOSITORY / "UNet3DSegmenterLib"
    files, todo = [], [MODULE_FILE]
    while todo:
        path = todo.pop()
        if path in files:
            continue
        files.append(path)
        folder = package if path == MODULE_FILE else path.parent
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if not isinstance(node, ast.ImportFrom) or (node.module or "").startswith("__future__"):
                continue
            module = node.module or ""
            if node.level == 0 and not module.startswith("UNet3DSegmenterLib"):
                continue
            base = package if node.level == 0 else folder.parents[node.level - 2] if node.level > 1 else folder
            parts = module.split(".")[1:] if node.level == 0 else [part for part in module.split(".") if part]
            target = base.joinpath(*parts)
            todo += [target / "__init__.py"] if target.is_dir() else [target.with_suffix(".py")]
            if target.is_dir():  # from package import module, module
                todo += [target / f"{alias.name}.py" for alias in node.names if (target / f"{alias.name}.py").is_file()]
            for parent in [target, *target.parents]:  # importing a module runs its packages' __init__ first
                if parent == package.parent:
                    break
                if (parent / "__init__.py").is_file():
                    todo.append(parent / "__init__.py")
    return sorted(files)


def test_what_loads_with_the_module_parses_as_python_3_9():
    """Slicer 5.8 runs Python 3.9: the module must load there far enough to tell the user to update."""
    loaded = {str(path.relative_to(REPOSITORY)) for path in _loaded_at_module_load()}
    assert {"UNet3DSegmenterLib/__init__.py", "UNet3DSegmenterLib/choices.py", "UNet3DSegmenterLib/slicer/panel.py",
            "UNet3DSegmenterLib/slicer/install.py", "UNet3DSegmenterLib/slicer/process.py"} <= loaded, loaded
    for path in _loaded_at_module_load():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path), feature_version=(3, 9))
        future = [alias.name for node in tree.body if isinstance(node, ast.ImportFrom) and node.module == "__future__"
                  for alias in node.names]
        annotated = any(isinstance(node, ast.AnnAssign) or isinstance(node, ast.arg) and node.annotation
                        or isinstance(node, ast.FunctionDef) and node.returns for node in ast.walk(tree))
        assert "annotations" in future or not annotated, \
            f"{path.name}: X | None annotations need 'from __future__ import annotations' on Python 3.9"


def _python_3_9() -> str | None:
    """A Python 3.9 interpreter that runs (a pyenv shim may exist for a version it does not select)."""
    candidates = [shutil.which("python3.9"), *sorted(str(path) for path in Path.home().glob(".pyenv/versions/3.9*/bin/python3.9"))]
    for candidate in filter(None, candidates):
        if subprocess.run([candidate, "-c", "pass"], capture_output=True, timeout=60).returncode == 0:
            return candidate
    return None


def test_on_python_3_9_the_module_files_compile_and_say_which_slicer_they_need(tmp_path):
    python39 = _python_3_9()
    if python39 is None:
        pytest.skip("no Python 3.9 interpreter on this machine")
    script = textwrap.dedent(f"""
        import py_compile, sys, types
        for path in {[str(path) for path in _loaded_at_module_load()]!r}:
            py_compile.compile(path, cfile={str(tmp_path / "compiled.pyc")!r}, doraise=True)
        sys.modules["slicer"] = types.ModuleType("slicer")  # what install.py needs of Slicer to load
        sys.path.insert(0, {str(REPOSITORY)!r})
        from UNet3DSegmenterLib.slicer import install
        print(install.slicerVersionProblem(slicerVersion="5.8.1"))
        """)
    result = subprocess.run([python39, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "needs 3D Slicer 5.10 or newer" in result.stdout and "Slicer 5.8.1 runs Python 3.9" in result.stdout


# --- the panel: .ui, bindings, signals ----------------------------------------------------------


def test_every_widget_the_code_uses_exists_in_the_ui():
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_SOURCE))
    assert len(used) >= 20
    missing = sorted(used - set(_ui_widgets()))
    assert not missing, f"used by UNet3DSegmenter.py but absent from {UI_FILE.name}: {missing}"


def test_every_bound_parameter_exists_in_the_parameter_node():
    bindings = _ui_bindings()
    assert len(bindings) >= 13
    unknown = {widget: name for widget, name in bindings.items() if name not in _parameters()}
    assert not unknown, f"SlicerParameterName values with no parameter: {unknown}"
    assert len(set(bindings.values())) == len(bindings), "two widgets bound to one parameter"


# Which widget classes Slicer's GUI connectors (parameterNodeWrapper/guiConnectors.py) bind to which parameter types.
_CONNECTORS = {
    "bool": {"QCheckBox", "QPushButton"},
    "int": {"QSpinBox", "QSlider"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget"},
    "str": {"QLineEdit", "QTextEdit"},
    "choice": {"QComboBox"},
    "path": {"ctkPathLineEdit", "ctkDirectoryButton"},
    "node": {"qMRMLNodeComboBox"},  # Slicer 5.10 has no subject hierarchy tree view connector
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


def test_no_node_selector_offers_two_ways_to_create_a_node():
    """With addEnabled, the box's own 'Create new ...' entry sits beside a none entry that says the same."""
    for widget in ElementTree.parse(UI_FILE).getroot().iter("widget"):
        if widget.get("class") != "qMRMLNodeComboBox":
            continue
        properties = {prop.get("name"): prop[0] for prop in widget.findall("property")}
        adds = properties.get("addEnabled") is not None and properties["addEnabled"].text == "true"
        none = properties.get("noneDisplay")
        assert not (adds and none is not None and none.text.lower().startswith("create new")), widget.get("name")


def test_node_selectors_follow_the_scene():
    root = ElementTree.parse(UI_FILE).getroot()
    selectors = {name for name, cls in _ui_widgets().items() if cls == "qMRMLNodeComboBox"}
    connected = {connection.findtext("receiver") for connection in root.iter("connection")
                 if connection.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    assert selectors <= connected


def test_the_region_controls_bind_to_their_parameters_and_the_roi_selector_lists_only_rois():
    bindings = _ui_bindings()
    assert bindings["regionComboBox"] == "region" and bindings["roiSelector"] == "roiNode"
    selector = next(widget for widget in ElementTree.parse(UI_FILE).getroot().iter("widget")
                    if widget.get("name") == "roiSelector")
    properties = {prop.get("name"): prop for prop in selector.findall("property")}
    assert [item.text for item in properties["nodeTypes"].iter("string")] == ["vtkMRMLMarkupsROINode"]
    assert properties["noneEnabled"].findtext("bool") == "true"
    assert "self.ui.placeRoiButton.connect(\"clicked()\", self.onPlaceRoi)" in MODULE_SOURCE


def _signals(class_name: str) -> set[str]:
    """Every signal of a class, its bases' included, from the table."""
    signals: set[str] = set()
    while class_name is not None:
        assert class_name in SIGNALS["classes"], f"{class_name} is not in data/qt_signals.json: add it with its source"
        signals |= set(SIGNALS["classes"][class_name]["signals"])
        class_name = SIGNALS["classes"][class_name]["base"]
    return signals


def _connections() -> list[tuple[str, str, str]]:
    """(object expression, class, signal) of every ``X.connect('signal(args)', slot)`` in the Widget."""
    widgets = _ui_widgets()
    created = {}  # self._name -> class, for objects the Widget makes itself (qt.QTimer())
    for node in ast.walk(_class("UNet3DSegmenterWidget")):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Attribute) \
                and isinstance(node.value.func.value, ast.Name) and node.value.func.value.id == "qt":
            created[ast.unparse(node.targets[0])] = node.value.func.attr
    found = []
    for node in ast.walk(_class("UNet3DSegmenterWidget")):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "connect" \
                and node.args and isinstance(node.args[0], ast.Constant):
            target = ast.unparse(node.func.value)
            name = target.removeprefix("self.ui.")
            found.append((target, widgets.get(name) if target.startswith("self.ui.") else created.get(target),
                          node.args[0].value))
    return found


def test_every_signal_the_widget_connects_is_declared_by_that_widgets_class():
    connections = _connections()
    assert len(connections) >= 11
    for target, class_name, signal in connections:
        assert class_name, f"{target}: cannot tell its class"
        assert signal.replace(" ", "") in _signals(class_name), f"{target} ({class_name}) has no signal {signal}"


def test_every_signal_the_ui_file_connects_is_declared_by_its_senders_class():
    widgets = _ui_widgets()
    for connection in ElementTree.parse(UI_FILE).getroot().iter("connection"):
        sender, signal = connection.findtext("sender"), connection.findtext("signal")
        assert signal in _signals(widgets[sender]), f"{sender} has no signal {signal}"


def test_the_signal_table_names_its_sources_and_a_wrong_signal_is_caught():
    assert set(SIGNALS["sources"]) == {"Qt", "CTK", "Slicer"} and all(SIGNALS["sources"].values())
    assert "clicked(bool)" in _signals("QPushButton") and "clicked(int)" not in _signals("QPushButton")
    assert "currentNodeChanged(vtkMRMLNode*)" in _signals("qMRMLNodeComboBox")
    assert "currentIndexChanged(int)" not in _signals("QTableWidget")


def test_every_slot_the_widget_connects_is_one_of_its_methods():
    widget = _methods("UNet3DSegmenterWidget")
    slots = [node.args[-1].attr for node in ast.walk(_class("UNet3DSegmenterWidget"))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                 "connect", "addObserver", "singleShot") and node.args and isinstance(node.args[-1], ast.Attribute)]
    assert len(slots) >= 15
    assert not [slot for slot in slots if slot not in widget]


def test_the_widget_shows_the_device_choices_after_every_binding():
    """Binding the panel (connectGui) refills the choice combo boxes and enables every item again."""
    setParameterNode = ast.unparse(_methods("UNet3DSegmenterWidget")["setParameterNode"])
    assert setParameterNode.index("connectGui") < setParameterNode.rindex("self.updateGUI()")
    updateGUI = ast.unparse(_methods("UNet3DSegmenterWidget")["updateGUI"])
    for comboBox in ("deviceComboBox", "trainingDeviceComboBox"):
        assert comboBox in updateGUI
    assert "setEnabled(choice.enabled)" in updateGUI


def test_the_widget_waits_for_the_engine_only_through_the_panels_limit():
    methods = _methods("UNet3DSegmenterWidget")
    for name in ("cleanup", "onReload"):
        source = ast.unparse(methods[name])
        assert "self.state.shutdown()" in source and ".wait(" not in source, name
    assert "forgetEngineModules" in ast.unparse(methods["onReload"])


def test_the_widget_calls_methods_that_exist_with_arguments_they_accept():
    """The panel cannot run here: check its calls into the Logic and the panel state against their signatures."""
    from UNet3DSegmenterLib.slicer import panel

    logic = _methods("UNet3DSegmenterLogic")
    calls = [node for node in ast.walk(_class("UNet3DSegmenterWidget")) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Attribute)
             and node.func.value.attr in ("logic", "state") and isinstance(node.func.value.value, ast.Name)
             and node.func.value.value.id == "self"]
    assert len(calls) >= 12
    for call in calls:
        owner, name = call.func.value.attr, call.func.attr
        if owner == "logic":
            assert name in logic, f"the widget calls logic.{name}, which does not exist"
            arguments = logic[name].args
            accepted = [argument.arg for argument in arguments.args + arguments.kwonlyargs if argument.arg != "self"]
            positional = [argument.arg for argument in arguments.args if argument.arg != "self"]
        else:
            import inspect

            assert hasattr(panel.PanelState, name), f"the widget calls state.{name}, which does not exist"
            parameters = list(inspect.signature(getattr(panel.PanelState, name)).parameters)[1:]
            accepted = positional = parameters
        for keyword in call.keywords:
            assert keyword.arg in accepted, f"{owner}.{name} takes no {keyword.arg}="
        assert len(call.args) <= len(positional), f"{owner}.{name} takes at most {len(positional)} positional arguments"


# --- loading ------------------------------------------------------------------------------------


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
        from UNet3DSegmenterLib.slicer import panel
        state = panel.PanelState(logic)
        state.setParameterNode(logic.getParameterNode())
        state.checkEngine()
        view = state.view()
        assert view.installVisible and view.installEnabled and not view.segment.enabled, view
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


def test_the_module_uses_the_engine_beside_it_even_when_a_pip_installed_one_comes_first(tmp_path):
    """Slicer appends module folders to sys.path, after site-packages: the engine's wheel, if installed
    there, has no Slicer side and must not shadow the module's own package."""
    pytest.importorskip("slicer", reason="slicer-core is not installed")
    shadow = tmp_path / "site-packages" / "UNet3DSegmenterLib"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("WHEEL = True\n")
    script = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(tmp_path / "site-packages")!r}, {str(REPOSITORY / "Testing" / "Python" / "slicer")!r}]
        import UNet3DSegmenterLib
        assert UNet3DSegmenterLib.WHEEL
        from slicer_harness import SlicerHarness
        harness = SlicerHarness()
        module = harness.install()  # appends the module folder, as Slicer does
        import UNet3DSegmenterLib.slicer.panel as panel
        assert panel.__file__.startswith({str(REPOSITORY)!r}), panel.__file__
        assert module.panel is panel
        harness.uninstall()
        print("own engine")
        """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "own engine" in result.stdout


def test_module_describes_itself_and_registers_its_self_test(slicer_scene):
    slicer = pytest.importorskip("slicer")
    _, parent = slicer_scene.loadModule()
    assert parent.title and parent.categories == ["Segmentation"] and parent.contributors
    assert "Segment" in parent.helpText and "Train" in parent.helpText and "fine-tunes" in parent.helpText
    assert "Slicer 5.10" not in parent.helpText, "this Slicer is recent enough: no warning"
    assert "license" in parent.acknowledgementText.lower()
    assert "UNet3DSegmenter" in slicer.selfTests


# --- the parameter node -------------------------------------------------------------------------


def test_parameter_choices_come_from_the_engines_choices_and_defaults_fit(slicer_scene):
    from UNet3DSegmenterLib import choices
    from UNet3DSegmenterLib.slicer import panel

    parameters = slicer_scene.module.UNet3DSegmenterParameterNode
    hints = typing.get_type_hints(parameters, include_extras=True)
    expected = {"device": choices.DEVICES, "trainingDevice": choices.DEVICES, "architecture": choices.ARCHITECTURES,
                "startFrom": panel.START_FROM, "region": panel.REGIONS}
    checked = 0
    for name, hint in hints.items():
        for annotation in getattr(hint, "__metadata__", ()):
            default = parameters.allParameters[name].default.value
            if hasattr(annotation, "choices"):
                assert annotation.choices is expected.pop(name), name
                assert default in annotation.choices, name
            if hasattr(annotation, "minimum"):
                assert annotation.minimum <= default <= annotation.maximum, name
            checked += 1
    assert checked >= 9 and not expected


def test_each_segment_option_the_panel_shows_is_a_bound_parameter_with_the_engines_default(slicer_scene):
    import dataclasses

    from UNet3DSegmenterLib.segment_options import SegmentOptions

    parameters = slicer_scene.module.UNet3DSegmenterParameterNode.allParameters
    bound = set(_ui_bindings().values())
    shown = SegmentOptions.parameter_names()
    assert {"device", "overlap", "tta", "largest_component"} <= set(shown)
    for item in dataclasses.fields(SegmentOptions):
        if item.name in shown and item.default is not None:  # None (overlap): the model's, set as the model changes
            assert parameters[shown[item.name]].default.value == item.default, item.name
    assert set(shown.values()) <= bound, "a segment option the panel holds has no widget"


def test_parameter_node_keeps_the_panel_state_in_the_scene_and_refuses_what_slicer_refuses(slicer_scene, logic):
    node = slicer_scene.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "input")
    parameters = logic.getParameterNode()
    parameters.inputVolume = node
    parameters.overlap = 0.25
    again = logic.getParameterNode()
    assert again.inputVolume is node and again.overlap == 0.25 and again.device == "auto"
    assert again.parameterNode.GetAttribute("ModuleName") == "UNet3DSegmenter"
    for name, value, error in [("device", "tpu", ValueError), ("overlap", 0.95, ValueError), ("epochs", 2.5, TypeError),
                               ("inputVolume", again.parameterNode, TypeError), ("devices", "cpu", AttributeError),
                               ("region", "inside a sphere", ValueError), ("roiNode", node, TypeError)]:
        with pytest.raises(error):
            setattr(again, name, value)


# --- CMakeLists.txt, licence and resources ------------------------------------------------------


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


def test_cmake_declares_the_extension_metadata_without_invented_addresses():
    sets = _cmake_sets()
    for key in ("EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_DEPENDS"):
        assert key in sets and sets[key] and sets[key][0].strip('"'), f"{key} is not set"
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        value = sets[key][0].strip('"')
        assert value == "" or value.startswith("https://"), key  # empty until the release step gives real ones
    assert "PyTorch" in " ".join(sets["EXTENSION_DEPENDS"])
    text = CMAKE_FILE.read_text(encoding="utf-8")
    assert re.search(r"project\(\s*UNet3DSegmenter\s*\)", text)
    assert "find_package(Slicer REQUIRED)" in text and "include(${Slicer_EXTENSION_CPACK})" in text


def test_cmake_refuses_a_slicer_older_than_the_one_the_module_asks_for():
    from UNet3DSegmenterLib.slicer import install

    sets = _cmake_sets()
    assert sets["MINIMUM_SLICER_VERSION"] == [f'"{install.MINIMUM_SLICER}"']
    assert re.search(r'VERSION_LESS\s+"\$\{MINIMUM_SLICER_VERSION\}"\)\s*message\(FATAL_ERROR', _cmake_text())
    readme = (REPOSITORY / "README.md").read_text(encoding="utf-8")
    assert f"Slicer {install.MINIMUM_SLICER} or newer" in readme


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
    models = {str(path.relative_to(REPOSITORY)) for path in (REPOSITORY / "Resources" / "Models").iterdir()}
    assert models <= resources, f"model files not installed: {sorted(models - resources)}"
    samples = {str(path.relative_to(REPOSITORY)) for path in (REPOSITORY / "Resources" / "Samples").iterdir()}
    assert samples <= resources, f"sample files not installed: {sorted(samples - resources)}"
    for path in scripts | resources:
        assert (REPOSITORY / path).is_file(), f"CMakeLists.txt names {path}, which does not exist"


def test_the_licence_file_is_the_one_pyproject_names():
    pyproject = (REPOSITORY / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'license\s*=\s*\{\s*text\s*=\s*"Apache-2.0"\s*\}', pyproject)
    licence = (REPOSITORY / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence


def test_the_slicer_side_stays_out_of_the_wheel():
    pyproject = (REPOSITORY / "pyproject.toml").read_text(encoding="utf-8")
    packages = re.search(r"packages\s*=\s*\[(.*?)\]", pyproject, flags=re.S).group(1)
    assert "UNet3DSegmenterLib.slicer" not in packages and '"UNet3DSegmenterLib"' in packages


def test_icon_is_a_128_pixel_png():
    data = ICON_FILE.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (128, 128)


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


def test_slicer_core_does_not_take_this_test_folder_for_part_of_slicer(slicer_harness):
    slicer = pytest.importorskip("slicer")
    assert not [path for path in slicer.__path__ if "Testing" in Path(path).parts]
    assert not [name for name in sys.modules if name.startswith("slicer.test_") or name == "slicer.slicer_harness"]


def test_the_harness_stand_ins_are_strict(slicer_harness):
    slicer = pytest.importorskip("slicer")
    import qt

    with pytest.raises(AttributeError):
        qt.QTimer  # noqa: B018  (only the Widget may use Qt)
    with pytest.raises(AttributeError):
        slicer.app.mainWindow  # noqa: B018
    with pytest.raises(AttributeError):
        slicer.app.someSetting = 1
    with pytest.raises(RuntimeError):
        slicer_harness.module.UNet3DSegmenterWidget()


# --- extension readiness -----------------------------------------------------------------------------


def test_the_help_links_the_documentation_that_ships_with_the_module(slicer_scene):
    _, parent = slicer_scene.loadModule()
    links = re.findall(r'<a href="([^"]+)">', parent.helpText)
    assert links, "the help text has no documentation link"
    from urllib.parse import unquote, urlparse

    readme = Path(unquote(urlparse(links[-1]).path))
    assert readme.name == "README.md" and readme.is_file()
    assert "README.md" in _cmake_sets()["MODULE_PYTHON_RESOURCES"], "the package would lack the linked page"


def _wrapped(node: ast.AST) -> bool:
    """A ``_("...")`` call, or text built from such calls, names and markup without words."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "_":
        return True
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
        return _wrapped(node.func.value)
    if isinstance(node, ast.BinOp):
        return _wrapped(node.left) and _wrapped(node.right)
    literal = [part for part in ([node] if isinstance(node, ast.Constant) else
                                 node.values if isinstance(node, ast.JoinedStr) else []) if isinstance(part, ast.Constant)]
    return not any(re.search("[A-Za-z]", re.sub("<[^>]+>", "", str(part.value))) for part in literal)  # words, not tags


def test_user_facing_text_is_marked_for_translation():
    shown = []
    for node in ast.walk(MODULE_TREE):
        if isinstance(node, ast.Assign) and any(isinstance(target, ast.Attribute) and target.attr in
                                                ("title", "helpText", "acknowledgementText") for target in node.targets):
            shown.append(node.value)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                "tryWithErrorDisplay", "infoDisplay", "confirmOkCancelDisplay", "getOpenFileName", "getExistingDirectory"):
            shown += [argument for argument in node.args if not isinstance(argument, ast.Call)
                      or not isinstance(argument.func, ast.Attribute)]  # mainWindow() is no text
    unwrapped = [ast.unparse(node)[:60] for node in shown if not _wrapped(node)]
    assert len(shown) > 15 and not unwrapped, unwrapped
    panel_tree = ast.parse((REPOSITORY / "UNet3DSegmenterLib" / "slicer" / "panel.py").read_text(encoding="utf-8"))
    labels = [node.args[0] for node in ast.walk(panel_tree) if isinstance(node, ast.Call)
              and isinstance(node.func, ast.Name) and node.func.id == "Button" and node.args]
    assert labels and all(_wrapped(label) for label in labels), "a button label is not marked for translation"


def test_without_slicers_translation_layer_the_text_is_shown_as_written():
    from UNet3DSegmenterLib.slicer import translation

    assert translation._("Segment") == "Segment"


def test_what_the_extensions_index_check_can_see_before_publishing_passes():
    """scripts/check_description_files.py of the Extensions Index: the project name is the extension's, the
    category one it accepts, a licence file at the root; addresses stay empty until they exist."""
    text = CMAKE_FILE.read_text(encoding="utf-8")
    assert re.findall(r"project\s*\(\s*([^\s)]+)", text, re.IGNORECASE)[0] == "UNet3DSegmenter"
    assert _cmake_sets()["EXTENSION_CATEGORY"][0].strip('"') == "Segmentation"
    assert (REPOSITORY / "LICENSE").is_file()


def test_the_input_selector_offers_scalar_and_vector_volumes_but_no_labelmaps():
    selector = next(widget for widget in ElementTree.parse(UI_FILE).getroot().iter("widget")
                    if widget.get("name") == "inputSelector")
    properties = {prop.get("name"): prop for prop in selector.findall("property")}
    assert [item.text for item in properties["nodeTypes"].iter("string")] == ["vtkMRMLScalarVolumeNode",
                                                                             "vtkMRMLVectorVolumeNode"]
    assert properties["showChildNodeTypes"][0].text == "false"  # labelmaps are scalar volumes' children
