"""A FAKE of Slicer's Qt layer, and only of it: `qt`, `ctk`, the Qt widgets and application object of `slicer`, the
Qt-based helpers of `slicer.util`, `slicer.i18n`, `slicer.ScriptedLoadableModule` and the parameter node wrapper's
GUI binding. It exists because the real Qt layer runs only inside 3D Slicer; everything below it is real here: the
MRML scene and nodes (slicer-core), `slicer.util`'s non-Qt helpers, the engine, the job client and the worker
processes.

The fake offers exactly the members listed in `slicer_api.py` (each named with its source file in Slicer 5.10), and
reproduces the behaviour of Slicer's source that the panel depends on — `ScriptedLoadableModuleLogic.__init__`
calls `super().__init__()` without arguments; `tryWithErrorDisplay` shows the error and re-raises, and PythonQt
prints an exception raised in a slot instead of propagating it; the combo-box connectors clear the combo box and
fill it with their own items; a connector is chosen by the widget's exact class (`slicer_api.CONNECTORS`); the
parameter node wrapper stores each field as Slicer's serializers do (lists of lists too; a node removed from the
scene reads as None at its place in a list) and returns lists that refuse `+` like Slicer's `ObservedList`;
`confirmOkCancelDisplay` returns True in testing mode. `test_slicer_conformance.py` checks that the fake has
nothing the table lacks.
"""
from __future__ import annotations

import contextlib
import importlib.util
import inspect
import sys
import types
import typing
import unittest
import xml.etree.ElementTree as ET
from pathlib import Path

import slicer  # slicer-core: the real MRML classes
import vtk

import slicer_api

MODULE_FILE = Path(__file__).resolve().parents[1] / "PEFTAdapt" / "PEFTAdapt.py"


# -- qt ------------------------------------------------------------------------------------------------------------


def _signals(cls) -> set[str]:
    """The signals a fake class may emit or accept connections to: those the API table lists for it and its bases."""
    names = set()
    for name in slicer_api.ancestors(cls.__name__):
        names |= {member for member in slicer_api.CLASSES[name].members if "(" in member}
    return names


class QObject:
    def __init__(self, *args, **kwargs):
        self._slots: dict[str, list] = {}
        self._blocked = False
        self._properties: dict[str, object] = {}
        self._name = ""

    def connect(self, signal, slot):
        if signal not in _signals(type(self)):
            raise AssertionError(f"{type(self).__name__} has no signal {signal}")
        self._slots.setdefault(signal, []).append(slot)
        return True

    def disconnect(self, signal, slot):
        if slot in self._slots.get(signal, []):
            self._slots[signal].remove(slot)
        return True

    def blockSignals(self, block):
        previous, self._blocked = self._blocked, bool(block)
        return previous

    def property(self, name):
        return self._properties.get(name)

    def setProperty(self, name, value):
        self._properties[name] = value
        return True

    def __getattr__(self, name):
        """PythonQt's other spelling: `object.signal.connect(slot)`."""
        signal = next((s for s in _signals(type(self)) if s.startswith(name + "(")), None) \
            if not name.startswith("_") else None
        if signal is None:
            raise AttributeError(f"{type(self).__name__} has no attribute {name}")
        return types.SimpleNamespace(connect=lambda slot: self.connect(signal, slot),
                                     disconnect=lambda slot: self.disconnect(signal, slot))

    def _emit(self, signal, *args):
        """PythonQt calls a slot with as many arguments as it takes, and prints (does not raise) what it raises."""
        assert signal in _signals(type(self)), f"{type(self).__name__} has no signal {signal}"
        if self._blocked:
            return
        for slot in list(self._slots.get(signal, [])):
            try:
                parameters = inspect.signature(slot).parameters.values()
                accepted = len([p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)])
                slot(*args[:accepted])
            except Exception as exc:  # noqa: BLE001 - what PythonQt does with an exception in a slot
                FAKE.slotErrors.append(exc)


class QCoreApplication(QObject):
    def processEvents(self, *args):
        pass


class QApplication(QCoreApplication):
    pass


class QTimer(QObject):
    def __init__(self, parent=None):
        super().__init__()
        self._interval = 0
        self._active = False

    def setInterval(self, msec):
        self._interval = msec

    def start(self, msec=None):
        self._active = True

    def stop(self):
        self._active = False

    def isActive(self):
        return self._active

    def _fire(self):
        """What the event loop does every interval."""
        if self._active:
            self._emit("timeout()")


class QLayout(QObject):
    def __init__(self, parent=None):
        super().__init__()
        self._widgets = []
        if parent is not None:
            parent._layout = self

    def addWidget(self, widget, *args):
        self._widgets.append(widget)


class QBoxLayout(QLayout):
    def addStretch(self, stretch=0):
        pass


class QVBoxLayout(QBoxLayout):
    pass


class QHBoxLayout(QBoxLayout):
    pass


class QGridLayout(QLayout):
    def __init__(self, parent=None):
        super().__init__(parent)
        self._cells = {}  # widget → (row, column)

    def addWidget(self, widget, row=0, column=0, *span):
        super().addWidget(widget)
        self._cells[widget] = (row, column)


class QWidget(QObject):
    def __init__(self, parent=None):
        super().__init__()
        self.enabled = True
        self.visible = True
        self.toolTip = ""
        self.minimumSize = None
        self._layout = None

    def isHidden(self):
        return not self.visible

    def layout(self):
        return self._layout


class QFrame(QWidget):
    pass


class QLabel(QFrame):
    def __init__(self, text="", parent=None):
        super().__init__()
        self.text = text
        self.wordWrap = False


class QAbstractButton(QWidget):
    def __init__(self, parent=None):
        super().__init__()
        self.text = ""
        self._checked = False

    @property
    def checked(self):
        return self._checked

    @checked.setter
    def checked(self, value):
        changed = bool(value) != self._checked
        self._checked = bool(value)
        if changed:
            self._changed()

    def _changed(self):
        pass

    def click(self):
        """A user's click (the button must be enabled, as in Qt)."""
        if self.enabled:
            self._emit("clicked(bool)", self._checked)


class QPushButton(QAbstractButton):
    pass


class QCheckBox(QAbstractButton):
    def _changed(self):
        self._emit("stateChanged(int)", 2 if self._checked else 0)

    def click(self):
        if self.enabled:
            self.checked = not self.checked
            self._emit("clicked(bool)", self._checked)


class QComboBox(QWidget):
    def __init__(self, parent=None):
        super().__init__()
        self._items: list[list] = []
        self._current = -1

    def addItem(self, text, userData=None):
        self._items.append([str(text), userData])
        if self._current < 0:
            self.currentIndex = 0

    def clear(self):
        self._items = []
        self.currentIndex = -1

    @property
    def count(self):
        return len(self._items)

    @property
    def currentIndex(self):
        return self._current

    @currentIndex.setter
    def currentIndex(self, index):
        index = index if -1 <= index < len(self._items) else -1
        if index != self._current:
            self._current = index
            self._emit("currentIndexChanged(int)", index)

    def setCurrentIndex(self, index):
        self.currentIndex = index

    def itemData(self, index):
        return self._items[index][1] if 0 <= index < len(self._items) else None

    def itemText(self, index):
        return self._items[index][0] if 0 <= index < len(self._items) else ""

    def findData(self, data):
        if data is None:
            return -1
        return next((i for i, (_text, value) in enumerate(self._items) if value == data), -1)

    @property
    def currentText(self):
        return self.itemText(self._current)


class QAbstractSpinBox(QWidget):
    def __init__(self, parent=None):
        super().__init__()
        self.specialValueText = ""


class _BoundedValue:
    """A number kept within [minimum, maximum] that signals its changes (spin boxes and sliders)."""

    _number, _signal = int, ""

    def _initRange(self, minimum, maximum):
        self._minimum, self._maximum, self._value = self._number(minimum), self._number(maximum), self._number(0)

    minimum = property(lambda self: self._minimum, lambda self, v: self._setRange(v, max(v, self._maximum)))
    maximum = property(lambda self: self._maximum, lambda self, v: self._setRange(min(v, self._minimum), v))

    def _setRange(self, minimum, maximum):
        self._minimum, self._maximum = self._number(minimum), self._number(maximum)
        self.value = self._value

    @property
    def value(self):
        return self._value

    @value.setter
    def value(self, value):
        value = min(max(self._number(value), self._minimum), self._maximum)
        if value != self._value:
            self._value = value
            self._emit(self._signal, value)


class QSpinBox(QAbstractSpinBox, _BoundedValue):
    _number, _signal = int, "valueChanged(int)"

    def __init__(self, parent=None):
        super().__init__()
        self._initRange(0, 99)
        self.singleStep = 1

    def setRange(self, minimum, maximum):
        self._setRange(minimum, maximum)


class QProgressBar(QWidget):
    def __init__(self, parent=None):
        super().__init__()
        self.minimum, self.maximum, self.value = 0, 100, 0
        self.format = "%p%"

    def setRange(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum

    def setFormat(self, text):
        self.format = text


class QPlainTextEdit(QFrame):
    def __init__(self, parent=None):
        super().__init__()
        self.readOnly = False
        self._lines: list[str] = []

    def appendPlainText(self, text):
        self._lines.append(text)

    def clear(self):
        self._lines = []

    def toPlainText(self):
        return "\n".join(self._lines)


class QAbstractItemView(QFrame):
    pass


class QHeaderView(QAbstractItemView):
    Stretch = 1

    def setSectionResizeMode(self, *args):
        pass


class QTableView(QAbstractItemView):
    def __init__(self, parent=None):
        super().__init__()
        self._header = QHeaderView()

    def horizontalHeader(self):
        return self._header


class QTableWidgetItem:
    def __init__(self, text=""):
        self._text = text
        self._toolTip = ""

    def text(self):
        return self._text

    def setToolTip(self, text):
        self._toolTip = text

    def toolTip(self):
        return self._toolTip


class QTableWidget(QTableView):
    def __init__(self, parent=None):
        super().__init__()
        self.columnCount = 0
        self._rows: list[list] = []
        self._currentRow = -1

    def rowCount(self):
        return len(self._rows)

    def setRowCount(self, rows):
        self._rows = (self._rows + [[None] * self.columnCount for _ in range(rows)])[:rows]
        self._currentRow = min(self._currentRow, rows - 1)

    def setItem(self, row, column, item):
        self._rows[row][column] = item

    def item(self, row, column):
        return self._rows[row][column]

    def currentRow(self):
        return self._currentRow

    def setCurrentCell(self, row, column):
        self._currentRow = row

    def setHorizontalHeaderLabels(self, labels):
        pass


class QFileDialog:
    @staticmethod
    def getExistingDirectory(parent=None, caption="", *args):
        return FAKE.folderAnswers.pop(0) if FAKE.folderAnswers else ""


# -- ctk -------------------------------------------------------------------------------------------------------------


class ctkCollapsibleButton(QAbstractButton):
    def __init__(self, parent=None):
        super().__init__()
        self.collapsed = False


class ctkPathLineEdit(QWidget):
    def __init__(self, parent=None):
        super().__init__()
        self.nameFilters = []
        self._path = ""

    @property
    def currentPath(self):
        return self._path

    @currentPath.setter
    def currentPath(self, path):
        if path != self._path:
            self._path = path
            self._emit("currentPathChanged(QString)", path)


class ctkSliderWidget(QWidget, _BoundedValue):
    _number, _signal = float, "valueChanged(double)"

    def __init__(self, parent=None):
        super().__init__()
        self._initRange(0, 99)
        self.decimals, self.singleStep = 2, 1.0


# -- slicer widgets and application ---------------------------------------------------------------------------------


class qMRMLWidget(QWidget):
    def __init__(self, parent=None):
        super().__init__()
        self._scene = None

    def setMRMLScene(self, scene):
        self._scene = scene
        self._emit("mrmlSceneChanged(vtkMRMLScene*)", scene)


class qMRMLNodeComboBox(QWidget):
    def __init__(self, parent=None):
        super().__init__()
        self.nodeTypes = []
        self.hideChildNodeTypes = []  # subclasses of nodeTypes not offered (qMRMLSortFilterProxyModel's filter)
        self.noneEnabled = self.addEnabled = self.removeEnabled = False
        self._scene = None
        self._node = None

    def setMRMLScene(self, scene):
        self._scene = scene

    def currentNode(self):
        """None once the node left the scene (the real combo box observes node removal)."""
        present = self._node is not None and self._scene is not None and self._scene.IsNodePresent(self._node)
        return self._node if present else None

    def setCurrentNode(self, node):
        if node is not None and not (self._scene is not None and self._scene.IsNodePresent(node)
                                     and any(node.IsA(kind) for kind in self.nodeTypes)
                                     and not any(node.IsA(kind) for kind in self.hideChildNodeTypes)):
            node = None  # not offered by the combo box: nothing is selected
        if node is not self._node:
            self._node = node
            self._emit("currentNodeChanged(vtkMRMLNode*)", node)


class qMRMLTableView(QTableView):
    def __init__(self, parent=None):
        super().__init__()
        self._table = None

    def setMRMLScene(self, scene):
        pass

    def setMRMLTableNode(self, node):
        self._table = node

    def mrmlTableNode(self):
        return self._table


class qMRMLPlotWidget(qMRMLWidget):
    def __init__(self, parent=None):
        super().__init__()
        self._view = None

    def setMRMLPlotViewNode(self, node):
        self._view = node

    def mrmlPlotViewNode(self):
        return self._view


class qMRMLSegmentEditorWidget(qMRMLWidget):
    """Tracks what the real editor would hold on to: its parameter node, effect, shortcuts and view observations."""

    def __init__(self, parent=None):
        super().__init__()
        self._editorNode = self._segmentation = self._source = self._activeEffect = None
        self._shortcuts = False
        self._viewObservations = False
        self._undoStates = 0

    def setMaximumNumberOfUndoStates(self, count):
        self._undoStates = count

    def setMRMLSegmentEditorNode(self, node):
        self._editorNode = node

    def setSegmentationNode(self, node):
        self._segmentation = node
        self._viewObservations = self._viewObservations or node is not None

    def setSourceVolumeNode(self, node):
        self._source = node

    def setActiveEffect(self, effect):
        self._activeEffect = effect

    def installKeyboardShortcuts(self, parent=None):
        self._shortcuts = True

    def uninstallKeyboardShortcuts(self):
        self._shortcuts = False

    def removeViewObservations(self):
        self._viewObservations = False

    def updateWidgetFromMRML(self):
        self._viewObservations = True

    def updateEffectList(self):
        pass


class qSlicerSegmentEditorEffectFactory(QObject):
    _instance = None

    @staticmethod
    def instance():
        if qSlicerSegmentEditorEffectFactory._instance is None:
            qSlicerSegmentEditorEffectFactory._instance = qSlicerSegmentEditorEffectFactory()
        return qSlicerSegmentEditorEffectFactory._instance


class qSlicerCoreApplication(QApplication):
    def __init__(self, version, temporaryPath):
        super().__init__()
        self.majorVersion, self.minorVersion = version
        self.temporaryPath = temporaryPath


class qSlicerApplication(qSlicerCoreApplication):
    pass


class qSlicerAbstractCoreModule(QObject):
    def __init__(self, path):
        super().__init__()
        self.path = str(path)
        self._widget = None

    def widgetRepresentation(self):
        return self._widget


class qSlicerScriptedLoadableModule(qSlicerAbstractCoreModule):
    def __init__(self, path):
        super().__init__(path)
        self.title, self.helpText, self.acknowledgementText = "", "", ""
        self.categories, self.dependencies, self.contributors = [], [], []


class qSlicerAbstractModuleWidget(qMRMLWidget):
    def __init__(self, parent=None):
        super().__init__()
        self.isEntered = False


class qSlicerScriptedLoadableModuleWidget(qSlicerAbstractModuleWidget):
    def __init__(self, parent=None):
        super().__init__()
        self._layout = QVBoxLayout()
        self._python = None

    def self(self):
        return self._python


#: the classes a .ui file may name, by name
UI_CLASSES = {cls.__name__: cls for cls in (
    QWidget, QLabel, QPushButton, QCheckBox, QComboBox, QSpinBox, QProgressBar, QPlainTextEdit, QTableWidget,
    ctkCollapsibleButton, ctkPathLineEdit, ctkSliderWidget, qMRMLWidget, qMRMLNodeComboBox, qMRMLTableView,
    qMRMLSegmentEditorWidget)}
LAYOUT_CLASSES = {cls.__name__: cls for cls in (QVBoxLayout, QHBoxLayout, QGridLayout)}


# -- slicer.util (the Qt-based helpers) ------------------------------------------------------------------------------


def _property_value(element):
    value = list(element)[0]
    if value.tag == "string":
        return value.text or ""
    if value.tag == "bool":
        return value.text == "true"
    if value.tag == "number":
        return int(value.text)
    if value.tag == "double":
        return float(value.text)
    if value.tag == "stringlist":
        return [item.text for item in value]
    if value.tag == "size":
        return (int(value.findtext("width")), int(value.findtext("height")))
    if value.tag == "enum":
        return value.text
    raise AssertionError(f"property type {value.tag} is not faked")


def loadUI(path):
    """Build the widget tree of a .ui file: every class must be a faked one (hence in the API table), every property a
    member of its class; `<connections>` are wired like Qt's uic does."""
    tree = ET.parse(path)
    widgets = {}

    def build(element):
        cls = UI_CLASSES.get(element.get("class"))
        assert cls is not None, f"{path}: widget class {element.get('class')} is not in Slicer's Qt layer as faked"
        widget = cls()
        widget._name = element.get("name")
        widgets[widget._name] = widget
        for prop in element.findall("property"):
            name = prop.get("name")
            if prop.get("stdset") == "0":
                widget.setProperty(name, _property_value(prop))
            else:
                assert slicer_api.find_member(cls.__name__, name), f"{cls.__name__} has no property {name}"
                setattr(widget, name, _property_value(prop))
        for layout in element.findall("layout"):
            assert layout.get("class") in LAYOUT_CLASSES, f"{path}: layout class {layout.get('class')}"
            built = LAYOUT_CLASSES[layout.get("class")](widget)
            for item in layout.findall("item"):
                assert item.find("layout") is None, f"{path}: a layout in a layout is not faked"
                if item.find("widget") is not None:
                    cell = [int(item.get(key)) for key in ("row", "column") if item.get(key) is not None]
                    built.addWidget(build(item.find("widget")), *cell)
        return widget

    root = build(tree.getroot().find("widget"))
    children = {name: widget for name, widget in widgets.items() if widget is not root}
    for connection in tree.getroot().iter("connection"):
        sender, receiver = widgets[connection.findtext("sender")], widgets[connection.findtext("receiver")]
        slot = connection.findtext("slot").split("(")[0]
        assert slicer_api.find_member(type(receiver).__name__, slot), f"{type(receiver).__name__} has no slot {slot}"
        sender.connect(connection.findtext("signal"), getattr(receiver, slot))
    root._children = children
    return root


def childWidgetVariables(widget):
    return types.SimpleNamespace(**widget._children)


@contextlib.contextmanager
def tryWithErrorDisplay(message=None, show=True, waitCursor=False):
    try:
        yield
    except Exception as exc:
        if show:
            errorDisplay(f"{message}\n\n{exc}" if message is not None else str(exc))
        raise


def errorDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kwargs):
    FAKE.dialogs.append(("error", text))


def warningDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kwargs):
    FAKE.dialogs.append(("warning", text))


def confirmOkCancelDisplay(text, windowTitle=None, parent=None, **kwargs):
    FAKE.dialogs.append(("confirm", text))
    return FAKE.confirmAnswers.pop(0) if FAKE.confirmAnswers else True  # testing mode: OK


def tempDirectory(key="__SlicerTemp__", tempDir=None, includeDateTime=True):
    path = Path(tempDir or slicer.app.temporaryPath) / key
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def pip_install(requirements):
    """Records the arguments, and the constraint files as pip reads them (they may be gone once it returns)."""
    FAKE.pipInstalls.append(requirements)
    FAKE.pipConstraints += [Path(requirements[i + 1]).read_text() for i, argument in enumerate(requirements)
                            if argument == "--constraint"]


UTIL = {function.__name__: function for function in (
    loadUI, childWidgetVariables, tryWithErrorDisplay, errorDisplay, warningDisplay, confirmOkCancelDisplay,
    tempDirectory, pip_install)}


# -- slicer.i18n, slicer.ScriptedLoadableModule ------------------------------------------------------------------------


def tr(text):
    return text


def translate(context, text):
    return text


class ScriptedLoadableModule:
    def __init__(self, parent):
        super().__init__()
        self.parent = parent
        self.moduleName = type(self).__name__


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        super().__init__()
        self.moduleName = type(self).__name__.removesuffix("Widget")
        self.parent = parent if parent is not None else qSlicerScriptedLoadableModuleWidget()
        self.layout = self.parent._layout

    def resourcePath(self, filename):
        return str(Path(FAKE.modulePath).parent / "Resources" / filename)

    def setup(self):
        pass


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        super().__init__()  # as Slicer's: no arguments for whatever comes next in the MRO
        self.moduleName = type(self).__name__.removesuffix("Logic")

    def getParameterNode(self):
        node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.UnRegister(None)
            node.SetSingletonTag(self.moduleName)
            node.SetAttribute("ModuleName", self.moduleName)
            node = slicer.mrmlScene.AddNode(node)
        return node


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message, requestedDelay=None, msec=None):
        FAKE.messages.append(message)


# -- slicer.parameterNodeWrapper ---------------------------------------------------------------------------------------


class Validator:
    def validate(self, value):
        pass


class WithinRange(Validator):
    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum

    def validate(self, value):
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"{value} is not within [{self.minimum}, {self.maximum}]")


class Choice(Validator):
    def __init__(self, choices):
        self.choices = list(choices)

    def validate(self, value):
        if value not in self.choices:
            raise ValueError(f"{value} is not one of {self.choices}")


def _field(annotation):
    """(kind, unannotated type, validators) of a parameter-node annotation."""
    validators = []
    if typing.get_origin(annotation) is typing.Annotated:
        annotation, *validators = typing.get_args(annotation)
    if typing.get_origin(annotation) is list:
        return "list", annotation, validators
    if isinstance(annotation, type) and issubclass(annotation, vtk.vtkObject):
        return "node", annotation, validators
    if isinstance(annotation, type) and issubclass(annotation, __import__("enum").Enum):
        return "enum", annotation, validators
    return annotation.__name__, annotation, validators


def _connect_widget(wrapper, name, widget):
    kind, cls, validators = _field(wrapper._fields[name])
    connector, problem = slicer_api.connector_for(type(widget).__name__, kind, {type(v).__name__ for v in validators})
    if connector is None:
        raise RuntimeError(f"Unable to create GUI connector for '{name}': {problem}")
    bounds = next((v for v in validators if isinstance(v, WithinRange)), None)
    if connector.fills:
        widget.clear()
        choices = (next(v for v in validators if isinstance(v, Choice)).choices if connector.fills == "choices"
                   else list(cls))
        labels = [str(c) for c in choices] if connector.fills == "choices" else [
            getattr(cls, "label", lambda e: e.name)(e) for e in choices]
        for label in labels:
            widget.addItem(label)
        read = lambda: choices[widget.currentIndex]  # noqa: E731
        write = lambda value: widget.setCurrentIndex(choices.index(value))  # noqa: E731
        signal = "currentIndexChanged(int)"
    elif kind == "node":
        widget.nodeTypes = [cls.__name__]
        read, write, signal = widget.currentNode, widget.setCurrentNode, "currentNodeChanged(vtkMRMLNode*)"
    elif kind == "bool":
        read = lambda: widget.checked  # noqa: E731
        write = lambda value: setattr(widget, "checked", value)  # noqa: E731
        signal = "stateChanged(int)"
    else:  # spin boxes and sliders
        if bounds is not None:
            widget.minimum, widget.maximum = bounds.minimum, bounds.maximum
        read = lambda: cls(widget.value)  # noqa: E731
        write = lambda value: setattr(widget, "value", value)  # noqa: E731
        signal = "valueChanged(int)" if isinstance(widget, QSpinBox) else "valueChanged(double)"
    return read, write, signal


#: what a field without a class default holds until set (Slicer's `Serializer.default()`), by kind, from its type
_SERIALIZER_DEFAULTS = {"list": lambda cls: [], "node": lambda cls: None, "enum": lambda cls: next(iter(cls)),
                        **dict.fromkeys(("str", "int", "float", "bool"), lambda cls: cls())}


class _ObservedList(list):
    """A list read from the parameter node, as Slicer's `ObservedList`: its changes are written back, and `+` and `*`
    are refused (they would make a list that is not written back)."""

    def __init__(self, items, save):
        super().__init__(items)
        self._save = save

    def __add__(self, other):
        raise NotImplementedError("Adding an ObservedList is not supported. However, += is supported.")

    def __mul__(self, other):
        raise NotImplementedError("Multiplying an ObservedList is not supported. However, *= is supported.")

    __radd__, __rmul__ = __add__, __mul__


def _saving(change):
    def changed(self, *args, **kwargs):
        result = change(self, *args, **kwargs)
        self._save(list(self))
        return result
    return changed


for _change in ("__setitem__", "__delitem__", "__iadd__", "__imul__", "append", "extend", "insert", "remove", "pop",
                "clear", "sort", "reverse"):
    setattr(_ObservedList, _change, _saving(getattr(list, _change)))


def _is_in(node, name, annotation):
    return node.HasParameter(f"{name}.len" if _field(annotation)[0] == "list" else name)


def _length(node, name):
    """The length of the list stored as `name` (0 when none is)."""
    return int(node.GetParameter(f"{name}.len")) if node.HasParameter(f"{name}.len") else 0


def _write(node, name, annotation, value):
    """Store a value as Slicer's serializer for its type does (serializers.py): validated, then a number, string,
    bool or enum as a parameter; a node as the node reference `name` beside the parameter `name` (so that None is
    stored too); a list as "<name>.len" and each item, of any type (a list too), under "<name>.<index>"."""
    kind, cls, validators = _field(annotation)
    for validator in validators:
        validator.validate(value)
    expected = {"node": cls, "enum": cls, "str": str, "bool": bool, "int": int, "float": (int, float)}.get(kind)
    if expected is not None and not (value is None and kind == "node") and not isinstance(value, expected):
        raise TypeError(f"Value must be of type '{cls}', is type '{type(value)}' value '{value}'")  # IsInstance
    if kind == "list":
        (item,) = typing.get_args(cls)
        with slicer.util.NodeModify(node):
            length = _length(node, name)
            for index, element in enumerate(value):
                _write(node, f"{name}.{index}", item, element)
            node.SetParameter(f"{name}.len", str(len(value)))
            for index in range(len(value), length):
                _remove(node, f"{name}.{index}", item)
    elif kind == "node":
        node.SetParameter(name, "")
        node.SetNodeReferenceID(name, value.GetID() if value is not None else None)
    else:
        node.SetParameter(name, value.name if kind == "enum" else str(value))


def _read(node, name, annotation):
    """A stored value; a node that left the scene reads as None (its reference went with it), in a list too."""
    kind, cls, _validators = _field(annotation)
    if kind == "list":
        (item,) = typing.get_args(cls)
        return _ObservedList([_read(node, f"{name}.{index}", item) for index in range(_length(node, name))],
                             lambda value: _write(node, name, annotation, value))
    if kind == "node":
        return node.GetNodeReference(name)
    text = node.GetParameter(name)
    if kind == "enum":
        return cls[text]
    return text == "True" if kind == "bool" else cls(text)


def _remove(node, name, annotation):
    kind, cls, _validators = _field(annotation)
    if kind == "list":
        (item,) = typing.get_args(cls)
        for index in range(_length(node, name)):
            _remove(node, f"{name}.{index}", item)
        name = f"{name}.len"
    elif kind == "node":
        node.RemoveNodeReferenceIDs(name)
    node.UnsetParameter(name)


class _Wrapper:
    """A typed view of a vtkMRMLScriptedModuleNode, stored as Slicer's serializers store it (`_write`), so that a
    saved scene holds what Slicer's would, and a node that leaves the scene leaves the parameter node too."""

    _fields: dict
    _defaults: dict

    def __init__(self, parameterNode):
        object.__setattr__(self, "parameterNode", parameterNode)
        object.__setattr__(self, "_guis", {})
        object.__setattr__(self, "_updating", False)
        for name, annotation in self._fields.items():  # as Slicer's wrapper: every field is stored from the start
            if not _is_in(parameterNode, name, annotation):
                kind, cls, _validators = _field(annotation)
                default = self._defaults[name] if name in self._defaults else _SERIALIZER_DEFAULTS[kind](cls)
                _write(parameterNode, name, annotation, default)

    def __getattr__(self, name):
        if name not in self._fields:
            raise AttributeError(name)
        return _read(self.parameterNode, name, self._fields[name])

    def __setattr__(self, name, value):
        if name not in self._fields:
            raise AttributeError(f"parameter node has no field '{name}'")
        _write(self.parameterNode, name, self._fields[name], value)

    def connectGui(self, gui):
        mapping = {}
        for widget in vars(gui).values():
            name = widget.property("SlicerParameterName")
            if name:
                assert name in self._fields, f"SlicerParameterName '{name}' is no parameter of the node"
                mapping[name] = _connect_widget(self, name, widget)
        tag = len(self._guis) + 1
        self._guis[tag] = mapping
        for name, (read, write, signal) in mapping.items():
            write(getattr(self, name))
            widget = next(w for w in vars(gui).values() if w.property("SlicerParameterName") == name)
            callback = self._callback(name, read)
            widget.connect(signal, callback)
            mapping[name] = (read, write, signal, widget, callback)
        self.parameterNode.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda caller, event: self._updateGui())
        return tag

    def _callback(self, name, read):
        def changed(*args):
            if not self._updating and read() != getattr(self, name):
                setattr(self, name, read())
        return changed

    def _updateGui(self):
        if self._updating:
            return
        object.__setattr__(self, "_updating", True)
        try:
            for mapping in self._guis.values():
                for name, (read, write, signal, widget, callback) in mapping.items():
                    write(getattr(self, name))
        finally:
            object.__setattr__(self, "_updating", False)

    def disconnectGui(self, tag):
        for name, (read, write, signal, widget, callback) in self._guis.pop(tag, {}).items():
            widget.disconnect(signal, callback)

    def AddObserver(self, event, callback, priority=0.0):
        return self.parameterNode.AddObserver(event, callback, priority)

    def RemoveObserver(self, tag):
        self.parameterNode.RemoveObserver(tag)

    def StartModify(self):
        return self.parameterNode.StartModify()

    def EndModify(self, wasModified):
        return self.parameterNode.EndModify(wasModified)

    def Modified(self):
        self.parameterNode.Modified()


def parameterNodeWrapper(classtype):
    hints = typing.get_type_hints(classtype, include_extras=True)
    defaults = {name: getattr(classtype, name) for name in hints if hasattr(classtype, name)}
    return type(classtype.__name__, (_Wrapper,), {"_fields": hints, "_defaults": defaults,
                                                   "__doc__": classtype.__doc__})


# -- installing the fake -------------------------------------------------------------------------------------------


def _module(name, **members):
    module = types.ModuleType(name)
    module.__dict__.update(members)
    return module


QT = _module("qt", **{cls.__name__: cls for cls in (
    QObject, QTimer, QLabel, QVBoxLayout, QWidget, QComboBox, QTableWidgetItem, QHeaderView, QFileDialog)})
CTK = _module("ctk", ctkCollapsibleButton=ctkCollapsibleButton, ctkSliderWidget=ctkSliderWidget)
SLICER_ATTRIBUTES = {"qMRMLPlotWidget": qMRMLPlotWidget, "qMRMLNodeComboBox": qMRMLNodeComboBox,
                     "qSlicerSegmentEditorEffectFactory": qSlicerSegmentEditorEffectFactory}


class SlicerQtFake:
    """Installs the fake (and removes it on `close`): sys.modules entries, attributes of the real `slicer` package,
    a real slicer-core scene as `slicer.mrmlScene`. Records dialogs and pip calls; answers dialogs from queues."""

    def __init__(self, scene, temporaryPath, version=slicer_api.LOWEST_SLICER, modulePath=MODULE_FILE):
        global FAKE
        FAKE = self
        self.scene = scene
        self.modulePath = str(modulePath)
        self.dialogs: list[tuple[str, str]] = []
        self.messages: list[str] = []
        self.pipInstalls: list = []
        self.pipConstraints: list[str] = []
        self.slotErrors: list[Exception] = []
        self.confirmAnswers: list[bool] = []
        self.folderAnswers: list[str] = []
        self._saved_modules = {}
        self._saved_attributes = []
        self.app = qSlicerApplication(version, str(temporaryPath))
        self.moduleObject = qSlicerScriptedLoadableModule(self.modulePath)
        modules = {
            "qt": QT, "ctk": CTK,
            "slicer.i18n": _module("slicer.i18n", tr=tr, translate=translate),
            "slicer.ScriptedLoadableModule": _module(
                "slicer.ScriptedLoadableModule", ScriptedLoadableModule=ScriptedLoadableModule,
                ScriptedLoadableModuleWidget=ScriptedLoadableModuleWidget,
                ScriptedLoadableModuleLogic=ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest=ScriptedLoadableModuleTest),
            "slicer.parameterNodeWrapper": _module(
                "slicer.parameterNodeWrapper", parameterNodeWrapper=parameterNodeWrapper, Choice=Choice,
                WithinRange=WithinRange),
        }
        for name, module in modules.items():
            self._saved_modules[name] = sys.modules.get(name)
            sys.modules[name] = module
        attributes = {**SLICER_ATTRIBUTES, "app": self.app, "mrmlScene": scene,
                      "modules": types.SimpleNamespace(peftadapt=self.moduleObject),
                      "i18n": modules["slicer.i18n"],
                      "ScriptedLoadableModule": modules["slicer.ScriptedLoadableModule"],
                      "parameterNodeWrapper": modules["slicer.parameterNodeWrapper"]}
        for name, value in attributes.items():
            self._setattr(slicer, name, value)
        for name, function in UTIL.items():
            self._setattr(slicer.util, name, function)

    def _setattr(self, owner, name, value):
        self._saved_attributes.append((owner, name, getattr(owner, name, None), hasattr(owner, name)))
        setattr(owner, name, value)

    def loadModule(self):
        """As Slicer's scripted-module factory does: the module's folder on sys.path, then the file executed as the
        module named after it (importlib spec from the file location)."""
        folder = str(Path(self.modulePath).parent)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        self._saved_modules.setdefault("PEFTAdapt", sys.modules.get("PEFTAdapt"))
        spec = importlib.util.spec_from_file_location("PEFTAdapt", self.modulePath)
        module = importlib.util.module_from_spec(spec)
        sys.modules["PEFTAdapt"] = module
        spec.loader.exec_module(module)
        self.module = module
        module.PEFTAdapt(self.moduleObject)
        return module

    def createWidget(self):
        """What Slicer does when the module is first shown: the widget with its representation as parent, setup."""
        representation = qSlicerScriptedLoadableModuleWidget()
        widget = self.module.PEFTAdaptWidget(representation)
        representation._python = widget
        self.moduleObject._widget = representation
        widget.setup()
        return widget

    def close(self):
        for owner, name, value, existed in reversed(self._saved_attributes):
            if existed:
                setattr(owner, name, value)
            else:
                delattr(owner, name)
        for name, module in self._saved_modules.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


FAKE: SlicerQtFake | None = None
