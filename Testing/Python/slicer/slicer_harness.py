"""A headless 3D Slicer for tests: the real MRML core, and small stand-ins for the application layer.

Real, from the ``slicer-core`` wheel: the MRML scene, every node class and storage node,
``slicer.util``, and the Colors, Subject Hierarchy, Volumes, Segmentations, Tables and Plots module
logics, created and attached to the scene as the application does and reachable as
``slicer.modules.<name>.logic()``. The engine (``UNet3DSegmenterLib``) is the real one.

Stood in for, because the wheel has no Qt and no application (and only as much as the module's
Logic and Test classes touch):

- ``slicer.app``: testing mode on, a temporary folder, the slicer-core version, no event loop; its
  ``connect`` takes ``startupCompleted()`` only, whose slots :meth:`SlicerHarness.completeStartup` calls;
- ``SampleData`` (a module of the application, not of slicer-core): ``SampleDataLogic`` with the real
  ``registerCustomSampleDataSource`` signature and checks, and ``downloadFromSource`` for ``file:``
  sources (copied into a cache folder, checked against their checksum, loaded by the real Volumes logic);
- ``qt`` and ``ctk``: empty modules; any use of them raises, since only the Widget may use Qt;
- ``slicer.ScriptedLoadableModule``: the four base classes (the Widget base refuses to build);
- ``slicer.parameterNodeWrapper``: typed properties over a ``vtkMRMLScriptedModuleNode`` that check
  every value as Slicer's wrapper does (types, ``Choice``, ``WithinRange``), see ``_parameterNodeWrapper``.

The stand-ins are strict: an attribute they do not define raises, and setting a parameter that the
parameter node does not declare raises, so that a misspelt name fails a test instead of passing.

:meth:`SlicerHarness.install` puts these in place, appends the module folder to the Python path as
Slicer does (``qSlicerCorePythonManager::appendPythonPaths``), and imports ``UNet3DSegmenter``;
:meth:`SlicerHarness.uninstall` restores ``sys.modules``, ``sys.path`` and the ``slicer`` package
exactly as they were, so that other tests in the same process see no trace of them.
"""

from __future__ import annotations

import importlib
import importlib.metadata
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
_REPLACED_MODULES = ("qt", "ctk", "slicer.ScriptedLoadableModule", "slicer.parameterNodeWrapper", "SampleData",
                     MODULE_NAME)
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
        if str(MODULE_FOLDER) not in sys.path:  # Slicer appends each module's folder to the Python path
            sys.path.append(str(MODULE_FOLDER))
            self._addedPath = True

        scriptedLoadableModule = _scriptedLoadableModule()
        parameterNodeWrapper = _parameterNodeWrapper()
        sys.modules["qt"] = _absentModule("qt")
        sys.modules["ctk"] = _absentModule("ctk")
        sys.modules["slicer.ScriptedLoadableModule"] = scriptedLoadableModule
        sys.modules["slicer.parameterNodeWrapper"] = parameterNodeWrapper
        sys.modules["SampleData"] = _sampleData(self._home / "cache")
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

    def completeStartup(self) -> None:
        """What the application does once every module is loaded: emit ``startupCompleted()``."""
        for slot in slicer.app.startupSlots:
            slot()

    def clear(self) -> None:
        """An empty scene, as after File > Close Scene (the application keeps a subject hierarchy in it)."""
        self.scene.Clear(0)
        slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene)

    # --- helpers for tests --------------------------------------------------------------------

    def loadModule(self, path: str | os.PathLike | None = None):
        """Instantiate the module class as the application's module factory does (``parent`` holds metadata)."""
        parent = types.SimpleNamespace(path=str(path or pathlib.Path(self.module.__file__)))
        return getattr(self.module, MODULE_NAME)(parent), parent


def scene_state(scene) -> list[tuple[str, str]]:
    """(ID, name) of every node: equal before and after means the scene was left as it was."""
    return [(scene.GetNthNode(index).GetID(), scene.GetNthNode(index).GetName())
            for index in range(scene.GetNumberOfNodes())]


# Segment colours chosen in the scene, unlike the phantom's own, to see them reach checkpoints and datasets.
SEGMENT_COLORS = {"organ": (0.1, 0.2, 0.9), "lesion": (0.95, 0.85, 0.05), "vessel": (0.5, 0.0, 0.5)}


def phantom_pair(logic, seed: int, classes: int = 2, names=None, direction=None):
    """A phantom volume in the scene and a segmentation of its true labels (segments named by ``names``,
    value -> name; coloured from SEGMENT_COLORS): (volume node, segmentation node, true labelmap)."""
    from UNet3DSegmenterLib import Label
    from UNet3DSegmenterLib.phantom import PHANTOM_LABELS, make_phantom
    from UNet3DSegmenterLib.slicer import selftest

    image, labels = make_phantom(shape=selftest.SHAPE, spacing=selftest.SPACING, seed=seed, classes=classes,
                                 direction=selftest.DIRECTION if direction is None else direction)
    volume = logic.addVolumeNode(image, f"phantom {seed}")
    names = names or {value: PHANTOM_LABELS[value][0] for value in range(1, classes + 1)}
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"phantom {seed} labels")
    logic.updateSegmentationFromLabelmap(segmentation, labels, [
        Label(value, name, SEGMENT_COLORS.get(name, (1, 1, 1))) for value, name in names.items()], volume)
    return volume, segmentation, labels


_TINY_CHECKPOINTS: dict = {}


def tiny_checkpoint():
    """The self-test's tiny trained model (organ, lesion), trained once per test session."""
    if "checkpoint" not in _TINY_CHECKPOINTS:
        from UNet3DSegmenterLib.slicer import selftest

        _TINY_CHECKPOINTS["checkpoint"] = selftest.trainTinyModel()
    return _TINY_CHECKPOINTS["checkpoint"]


def _absentModule(name: str) -> types.ModuleType:
    module = types.ModuleType(name, f"Stand-in: the headless harness has no {name}; only the Widget may use it.")

    def missing(attribute: str):
        raise AttributeError(f"{name}.{attribute} is not available without the Slicer application: "
                             "only the Widget may use the GUI toolkit")

    module.__getattr__ = missing
    return module


class _Application:
    """``slicer.app`` without Qt: testing mode, a temporary folder, the slicer-core version, no event loop."""

    applicationName = "Slicer (headless test harness)"
    __slots__ = ("temporaryPath", "applicationVersion", "majorVersion", "minorVersion", "startupSlots")

    def __init__(self, home: pathlib.Path) -> None:
        self.temporaryPath = str(home)
        self.startupSlots: list = []
        self.applicationVersion = importlib.metadata.version("slicer-core")
        self.majorVersion, self.minorVersion = (int(part) for part in self.applicationVersion.split(".")[:2])

    @staticmethod
    def testingEnabled() -> bool:
        return True

    @staticmethod
    def processEvents() -> None:
        pass

    def connect(self, signal: str, slot) -> None:
        if signal != "startupCompleted()":
            raise AttributeError(f"the harness's slicer.app emits startupCompleted() only, not {signal}")
        if not callable(slot):
            raise TypeError(f"slicer.app.connect({signal!r}, ...) needs a callable slot, got {slot!r}")
        self.startupSlots.append(slot)

    @staticmethod
    def commandOptions():
        return types.SimpleNamespace(testingEnabled=True, noMainWindow=True)


def _sampleData(cache: pathlib.Path) -> types.ModuleType:
    """Slicer's SampleData module, as far as an extension registers and loads a local sample.

    ``registerCustomSampleDataSource`` has the real signature and stores sources where the real one
    does (``slicer.modules.sampleDataSources[category]``); it checks what the real one relies on
    (one URI per file name and node name, ``<algo>:<digest>`` checksums, an existing thumbnail).
    ``downloadFromSource`` handles ``file:`` URIs only: copies into ``cache``, verifies the checksum
    as the real one does, and loads each file with the real Volumes logic.
    """
    import hashlib
    import urllib.parse
    import urllib.request

    module = types.ModuleType("SampleData", "Stand-in for Slicer's Sample Data module.")

    def listed(value) -> list:
        return list(value) if isinstance(value, (list, tuple)) else [value]

    class SampleDataLogic:
        @staticmethod
        def registerCustomSampleDataSource(category="Custom", sampleName=None, uris=None, fileNames=None,
                                           nodeNames=None, customDownloader=None, thumbnailFileName=None,
                                           loadFileTypes=None, loadFiles=None, loadFileProperties={},  # noqa: B006
                                           checksums=None, loadFileType=None) -> None:
            uris, fileNames, nodeNames = listed(uris), listed(fileNames), listed(nodeNames)
            checksums, loadFileTypes = listed(checksums), listed(loadFileTypes)
            if not (len(uris) == len(fileNames) == len(nodeNames) == len(checksums) == len(loadFileTypes)):
                raise ValueError("uris, fileNames, nodeNames, checksums and loadFileTypes must match one to one")
            for checksum in checksums:
                if checksum is not None:
                    algorithm, _, digest = checksum.partition(":")
                    if algorithm not in ("SHA256", "SHA512", "MD5") or not digest:
                        raise ValueError(f"checksum {checksum!r} is not <algo>:<digest>")
            if thumbnailFileName is not None and not pathlib.Path(thumbnailFileName).is_file():
                raise ValueError(f"thumbnail {thumbnailFileName} does not exist")
            sources = slicer.modules.__dict__.setdefault("sampleDataSources", {})
            source = types.SimpleNamespace(sampleName=sampleName, uris=uris, fileNames=fileNames, nodeNames=nodeNames,
                                           checksums=checksums, loadFileTypes=loadFileTypes,
                                           thumbnailFileName=thumbnailFileName)
            if all(vars(source) != vars(known) for known in sources.get(category, [])):
                sources.setdefault(category, []).append(source)

        def downloadFromSource(self, source) -> list:
            nodes = []
            for uri, fileName, nodeName, checksum in zip(source.uris, source.fileNames, source.nodeNames,
                                                         source.checksums):
                if urllib.parse.urlparse(uri).scheme != "file":
                    raise ValueError(f"the harness loads local (file:) samples only, not {uri}")
                cache.mkdir(parents=True, exist_ok=True)
                path = cache / fileName
                urllib.request.urlretrieve(uri, path)
                if checksum is not None:
                    algorithm, _, digest = checksum.partition(":")
                    if hashlib.new(algorithm.lower(), path.read_bytes()).hexdigest() != digest.lower():
                        path.unlink()
                        raise ValueError(f"Checksum verification failed for {uri}")
                node = slicer.modules.volumes.logic().AddArchetypeVolume(str(path), nodeName)
                if node is None:
                    raise ValueError(f"cannot load {path} as a volume")
                nodes.append(node)
            return nodes

    module.SampleDataLogic = SampleDataLogic
    return module


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
    """``slicer.parameterNodeWrapper`` as Slicer's behaves, for the types the module declares.

    As in Slicer's Base/Python/slicer/parameterNodeWrapper (wrapper.py, serializers.py,
    validators.py): a wrapper writes each missing parameter's default when it is created and when it
    is read; every write first runs the validators: NotNone and IsInstance for str, bool, int (int
    only), float (int or float) and pathlib.Path, IsInstance for node fields (None allowed), then the
    field's Choice and WithinRange; a node field is a parameter plus a node reference of that name.
    Stricter than Slicer's: setting an attribute that is not a field raises. ``connectGui`` needs Qt.
    """
    module = types.ModuleType("slicer.parameterNodeWrapper", "Stand-in for the application's parameter wrapper.")

    class Validator:
        def validate(self, value) -> None:
            raise NotImplementedError

    class WithinRange(Validator):
        def __init__(self, minimum, maximum) -> None:
            self.minimum, self.maximum = minimum, maximum

        def validate(self, value) -> None:
            if not self.minimum <= value <= self.maximum:
                raise ValueError(f"Value must be within range [{self.minimum}, {self.maximum}], is {value}")

    class Choice(Validator):
        def __init__(self, choices) -> None:
            self.choices = choices

        def validate(self, value) -> None:
            if value not in self.choices:
                raise ValueError(f"Value is {value}, but must be in one of the following: {self.choices}")

    class IsInstance(Validator):
        def __init__(self, classtype) -> None:
            self.classtype = classtype

        def validate(self, value) -> None:
            if value is not None and not isinstance(value, self.classtype):
                raise TypeError(f"Value must be of type '{self.classtype}', is type '{type(value)}' value '{value}'")

    class NotNone(Validator):
        def validate(self, value) -> None:
            if value is None:
                raise ValueError("Value must not be None")

    class Default:
        def __init__(self, value) -> None:
            self.value = value

    class ParameterInfo:
        def __init__(self, basename, kind, validators, default, unalteredType) -> None:
            self.basename, self.kind, self.validators = basename, kind, validators
            self.default, self.unalteredType = default, unalteredType

    plain = {str: str, bool: bool, int: int, float: (int, float), pathlib.Path: pathlib.Path}
    defaults = {str: "", bool: False, int: 0, float: 0, pathlib.Path: pathlib.Path()}
    reserved = {"allParameters", "default", "isCached", "dataType", "getValue", "setValue", "connectGui",
                "connectParametersToGui", "disconnectGui", "StartModify", "EndModify", "AddObserver",
                "RemoveObserver", "Modified"}

    def isNode(kind) -> bool:
        return isinstance(kind, type) and issubclass(kind, slicer.vtkMRMLNode)

    def parameterInfo(name, hint) -> ParameterInfo:
        kind, annotations = hint, []
        if typing.get_origin(hint) is typing.Annotated:
            kind, *annotations = typing.get_args(hint)
        unknown = [annotation for annotation in annotations if not isinstance(annotation, Validator)]
        if unknown:
            raise TypeError(f"{name}: annotations the stand-in does not know: {unknown}")
        if isNode(kind):
            validators, default = [IsInstance(kind)], None
        elif kind in plain:
            validators, default = [NotNone(), IsInstance(plain[kind])], defaults[kind]
        else:
            raise TypeError(f"{name}: the stand-in has no serializer for {kind}")
        return ParameterInfo(name, kind, validators + annotations, default, hint)

    def write(node, info: ParameterInfo, value) -> None:
        for validator in info.validators:
            validator.validate(value)
        if isNode(info.kind):
            node.SetParameter(info.basename, "")
            node.SetNodeReferenceID(info.basename, value.GetID() if value is not None else None)
        else:
            node.SetParameter(info.basename, ("True" if value else "False") if info.kind is bool else str(value))

    def read(node, info: ParameterInfo):
        if not node.HasParameter(info.basename):
            write(node, info, info.default.value)
        if isNode(info.kind):
            return node.GetNodeReference(info.basename)
        text = node.GetParameter(info.basename)
        return text == "True" if info.kind is bool else info.kind(text)

    def parameterNodeWrapper(cls):
        hints = typing.get_type_hints(cls, include_extras=True)
        clash = reserved & set(hints)
        if clash:
            raise ValueError(f"Cannot use reserved name '{sorted(clash)[0]}' in a parameterNodeWrapper")
        cls.allParameters = {}
        for name, hint in hints.items():
            info = parameterInfo(name, hint)
            if hasattr(cls, name):
                info.default = Default(getattr(cls, name))
            else:
                info.default = Default(info.default)
            cls.allParameters[name] = info
            setattr(cls, name, property(lambda self, info=info: read(self.parameterNode, info),
                                        lambda self, value, info=info: write(self.parameterNode, info, value)))

        def __init__(self, parameterNode) -> None:
            object.__setattr__(self, "parameterNode", parameterNode)
            for info in self.allParameters.values():
                if not parameterNode.HasParameter(info.basename):
                    write(parameterNode, info, info.default.value)

        def __setattr__(self, name, value) -> None:
            if name not in self.allParameters:
                raise AttributeError(f"{cls.__name__} has no parameter {name!r}")
            object.__setattr__(self, name, value)

        def connectGui(self, gui):
            raise RuntimeError("connectGui binds Qt widgets: it needs the Slicer application")

        cls.__init__, cls.__setattr__ = __init__, __setattr__
        cls.connectGui = cls.disconnectGui = connectGui
        cls.default = lambda self, name: self.allParameters[name].default
        cls.getValue = lambda self, name: getattr(self, name)
        cls.setValue = lambda self, name, value: setattr(self, name, value)
        cls.StartModify = lambda self: self.parameterNode.StartModify()
        cls.EndModify = lambda self, wasModifying: self.parameterNode.EndModify(wasModifying)
        cls.Modified = lambda self: self.parameterNode.Modified()
        cls.AddObserver = lambda self, event, callback, priority=0.0: self.parameterNode.AddObserver(
            event, callback, priority)
        cls.RemoveObserver = lambda self, tag: self.parameterNode.RemoveObserver(tag)
        return cls

    for item in (WithinRange, Choice, parameterNodeWrapper):
        setattr(module, item.__name__, item)
    return module
