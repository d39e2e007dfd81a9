"""A headless 3D Slicer for tests: the real MRML core, and small stand-ins for the application layer.

Real, from the ``slicer-core`` wheel: the MRML scene, every node class and storage node,
``slicer.util``, and the Colors, Subject Hierarchy, Volumes, Segmentations, Tables and Plots module
logics, created and attached to the scene as the application does and reachable as
``slicer.modules.<name>.logic()``. The engine (``UNet3DSegmenterLib``) is the real one.

Stood in for, because the wheel has no Qt and no application (and only as much as the module's
Logic and Test classes touch):

- ``slicer.app``: testing mode on, a temporary folder, no event loop;
- ``qt`` and ``ctk``: empty modules; any use of them raises, since only the Widget may use Qt;
- ``slicer.ScriptedLoadableModule``: the four base classes (the Widget base refuses to build);
- ``slicer.parameterNodeWrapper``: typed properties over a ``vtkMRMLScriptedModuleNode``.

:meth:`SlicerHarness.install` puts these in place, puts the module folder on the Python path as Slicer
does, and imports ``UNet3DSegmenter``; :meth:`SlicerHarness.uninstall` restores ``sys.modules``,
``sys.path`` and the ``slicer`` package exactly as they were, so that other tests in the same process
see no trace of them.
"""

from __future__ import annotations

import importlib
import logging
import os
import pathlib
import shutil
import sys
import tempfile
import types
import typing
import unittest

import slicer

MODULE_NAME = "UNet3DSegmenter"
MODULE_FOLDER = pathlib.Path(__file__).resolve().parents[3]  # the repository root is the module folder
_MISSING = object()
_REPLACED_MODULES = ("qt", "ctk", "slicer.ScriptedLoadableModule", "slicer.parameterNodeWrapper", MODULE_NAME)
_REPLACED_ATTRIBUTES = ("app", "mrmlScene", "modules", "ScriptedLoadableModule", "parameterNodeWrapper", "selfTests")

# Module logics the application creates at start-up, by their slicer.modules name.
# slicer.modules name -> (logic class, the module's name as the application registers it).
_LOGICS = {
    "colors": ("vtkSlicerColorLogic", "Colors"),
    "subjecthierarchy": ("vtkSlicerSubjectHierarchyModuleLogic", "SubjectHierarchy"),
    "volumes": ("vtkSlicerVolumesLogic", "Volumes"),
    "segmentations": ("vtkSlicerSegmentationsModuleLogic", "Segmentations"),
    "tables": ("vtkSlicerTablesLogic", "Tables"),
    "plots": ("vtkSlicerPlotsLogic", "Plots"),
}


class SlicerHarness:
    """One real scene with the real module logics, and the module imported against it."""

    def __init__(self) -> None:
        self.scene = None
        self.module = None
        self.logics: dict[str, object] = {}
        self._saved: dict[str, object] = {}
        self._home = None
        self._addedPath = False

    # --- set-up and tear-down -----------------------------------------------------------------

    def install(self) -> types.ModuleType:
        self._home = pathlib.Path(tempfile.mkdtemp(prefix="slicer-harness-"))
        (self._home / "share" / "ColorFiles").mkdir(parents=True)  # no colour files to load, no warning
        self.scene = slicer.vtkMRMLScene()
        self.applicationLogic = slicer.vtkMRMLApplicationLogic()
        self.applicationLogic.SetMRMLScene(self.scene)
        self.applicationLogic.SetHomeDirectory(str(self._home))
        self.applicationLogic.SetShareDirectory("share")
        for name, (className, moduleName) in _LOGICS.items():
            logic = getattr(slicer, className)()
            logic.SetMRMLApplicationLogic(self.applicationLogic)
            logic.SetMRMLScene(self.scene)
            self.applicationLogic.SetModuleLogic(moduleName, logic)
            self.logics[name] = logic
        self.applicationLogic.SetColorLogic(self.logics["colors"])

        for name in _REPLACED_MODULES:
            self._saved["module:" + name] = sys.modules.get(name, _MISSING)
        for name in _REPLACED_ATTRIBUTES:
            self._saved["attribute:" + name] = getattr(slicer, name, _MISSING)
        sys.modules.pop(MODULE_NAME, None)
        if str(MODULE_FOLDER) not in sys.path:  # Slicer puts each module's folder on the Python path
            sys.path.insert(0, str(MODULE_FOLDER))
            self._addedPath = True

        scriptedLoadableModule = _scriptedLoadableModule()
        parameterNodeWrapper = _parameterNodeWrapper()
        sys.modules["qt"] = _absentModule("qt")
        sys.modules["ctk"] = _absentModule("ctk")
        sys.modules["slicer.ScriptedLoadableModule"] = scriptedLoadableModule
        sys.modules["slicer.parameterNodeWrapper"] = parameterNodeWrapper
        slicer.ScriptedLoadableModule = scriptedLoadableModule
        slicer.parameterNodeWrapper = parameterNodeWrapper
        slicer.app = _Application(self._home)
        slicer.mrmlScene = self.scene
        slicer.modules = types.SimpleNamespace(**{
            name: types.SimpleNamespace(logic=(lambda logic=logic: logic)) for name, logic in self.logics.items()})
        slicer.selfTests = {}
        self.module = importlib.import_module(MODULE_NAME)
        return self.module

    def uninstall(self) -> None:
        sys.modules.pop(MODULE_NAME, None)
        for key, value in self._saved.items():
            kind, name = key.split(":", 1)
            if kind == "module":
                if value is _MISSING:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = value
            elif value is _MISSING:
                if hasattr(slicer, name):
                    delattr(slicer, name)
            else:
                setattr(slicer, name, value)
        self._saved.clear()
        if self._addedPath:
            sys.path.remove(str(MODULE_FOLDER))
            self._addedPath = False
        if self.scene is not None:
            self.scene.Clear(1)
        # Released in the reverse order of creation, still attached, as the application exits; detaching
        # the Segmentations logic by hand makes it look for a subject hierarchy that is gone.
        for name in reversed(list(self.logics)):
            self.applicationLogic.SetModuleLogic(_LOGICS[name][1], None)
            del self.logics[name]
        self.scene = self.module = None
        shutil.rmtree(self._home, ignore_errors=True)

    def clear(self) -> None:
        """An empty scene, as after File > Close Scene (the application keeps a subject hierarchy in it)."""
        self.scene.Clear(0)
        slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene)

    # --- helpers for tests --------------------------------------------------------------------

    def loadModule(self, path: str | os.PathLike | None = None):
        """Instantiate the module class as the application's module factory does (``parent`` holds metadata)."""
        parent = types.SimpleNamespace(path=str(path or pathlib.Path(self.module.__file__)))
        return getattr(self.module, MODULE_NAME)(parent), parent


_TINY_CHECKPOINTS: dict = {}


def tiny_checkpoint(harness: SlicerHarness):
    """The self-test's tiny trained model (organ, lesion), trained once per test session."""
    if "checkpoint" not in _TINY_CHECKPOINTS:
        _TINY_CHECKPOINTS["checkpoint"] = harness.module.UNet3DSegmenterTest.trainTinyModel()
    return _TINY_CHECKPOINTS["checkpoint"]


def _absentModule(name: str) -> types.ModuleType:
    module = types.ModuleType(name, f"Stand-in: the headless harness has no {name}; only the Widget may use it.")

    def missing(attribute: str):
        raise AttributeError(f"{name}.{attribute} is not available without the Slicer application: "
                             "only the Widget may use the GUI toolkit")

    module.__getattr__ = missing
    return module


class _Application:
    """``slicer.app`` without Qt: testing mode, a temporary folder, no event loop."""

    applicationName = "Slicer (headless test harness)"

    def __init__(self, home: pathlib.Path) -> None:
        self.temporaryPath = str(home)

    @staticmethod
    def testingEnabled() -> bool:
        return True

    @staticmethod
    def processEvents() -> None:
        pass

    @staticmethod
    def commandOptions():
        return types.SimpleNamespace(testingEnabled=True, noMainWindow=True)


def _scriptedLoadableModule() -> types.ModuleType:
    """The four base classes of slicer.ScriptedLoadableModule, as far as Module, Logic and Test use them."""
    module = types.ModuleType("slicer.ScriptedLoadableModule", "Stand-in for the application's base classes.")

    class ScriptedLoadableModule:
        def __init__(self, parent) -> None:
            self.parent = parent
            self.moduleName = type(self).__name__
            parent.title, parent.categories, parent.dependencies = "", [], []
            parent.contributors, parent.helpText, parent.acknowledgementText = [], "", ""
            slicer.selfTests[self.moduleName] = self.runTest

        def resourcePath(self, filename: str) -> str:
            return os.path.join(os.path.dirname(self.parent.path), "Resources", filename)

        def runTest(self, msec: int = 100, **kwargs) -> None:
            testCase = getattr(importlib.import_module(type(self).__module__), self.moduleName + "Test")()
            testCase.messageDelay = msec
            testCase.runTest(**kwargs)

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None) -> None:
            raise RuntimeError("the module panel needs the Slicer application (Qt); it cannot be built headless")

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None) -> None:
            name = type(self).__name__
            self.moduleName = name[: -len("Logic")] if name.endswith("Logic") else name
            self.isSingletonParameterNode = True

        def getParameterNode(self):
            node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node is None:
                node = slicer.mrmlScene.AddNode(self.createParameterNode())
            node.SetAttribute("ModuleName", self.moduleName)
            return node

        def createParameterNode(self):
            node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.UnRegister(None)
            node.SetSingletonTag(self.moduleName)
            node.SetAttribute("ModuleName", self.moduleName)
            node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
            return node

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, requestedDelay=None, msec=None) -> None:
            logging.info(message)

        def runTest(self) -> None:
            logging.warning("no test is defined in %s", type(self).__name__)

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        cls.__module__ = module.__name__
        setattr(module, cls.__name__, cls)
    module.__all__ = [name for name in vars(module) if name.startswith("Scripted")]
    return module


def _parameterNodeWrapper() -> types.ModuleType:
    """``parameterNodeWrapper`` with the annotations the module uses: typed values kept in the node."""
    module = types.ModuleType("slicer.parameterNodeWrapper", "Stand-in for the application's parameter wrapper.")

    class WithinRange:
        def __init__(self, minimum, maximum) -> None:
            self.minimum, self.maximum = minimum, maximum

    class Choice:
        def __init__(self, choices) -> None:
            self.choices = list(choices)

    def baseType(hint):
        return typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint

    def isNode(kind) -> bool:
        return isinstance(kind, type) and issubclass(kind, slicer.vtkMRMLNode)

    def read(node, name, kind):
        if isNode(kind):
            return node.GetNodeReference(name)
        text = node.GetParameter(name)
        return text == "True" if kind is bool else kind(text)

    def write(node, name, kind, value) -> None:
        if isNode(kind):
            node.SetNodeReferenceID(name, value.GetID() if value is not None else None)
        else:
            node.SetParameter(name, str(value))

    def parameterNodeWrapper(cls):
        hints = typing.get_type_hints(cls, include_extras=True)
        cls.allParameters = {}
        for name, hint in hints.items():
            kind = baseType(hint)
            default = getattr(cls, name, None if isNode(kind) else kind())
            cls.allParameters[name] = (kind, default)
            getter = lambda self, name=name, kind=kind: read(self.parameterNode, name, kind)  # noqa: E731
            setter = lambda self, value, name=name, kind=kind: write(self.parameterNode, name, kind, value)  # noqa: E731
            setattr(cls, name, property(getter, setter))

        def __init__(self, parameterNode) -> None:
            self.parameterNode = parameterNode
            for name, (kind, default) in self.allParameters.items():
                if not isNode(kind) and not parameterNode.GetParameter(name):
                    write(parameterNode, name, kind, default)

        cls.__init__ = __init__
        return cls

    module.WithinRange, module.Choice, module.parameterNodeWrapper = WithinRange, Choice, parameterNodeWrapper
    return module
