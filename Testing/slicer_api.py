"""The Slicer API the PEFTAdapt module may use: every `slicer.*`, `qt.*`, `ctk.*` and `vtk.*` name, every member of a
Slicer, CTK or Qt object it calls, and every class, property, signal and slot of its `.ui` file, each with the source
file that defines it in the lowest supported Slicer (5.10.0) — and the parameter-node GUI connector rules of that
version. `test_slicer_conformance.py` fails on any use that is not listed here and, given a Slicer (and CTK) git
checkout, checks every listed name against those files. The Qt-layer fake (`slicer_qt_fake.py`) offers exactly
these members.

Qt classes come from Qt 5.15 (the Qt of Slicer 5.10; Qt 6.8 builds of 5.12+ keep these names); PythonQt adds
`connect`/`disconnect` with a signal signature to every QObject and exposes Qt properties as attributes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

LOWEST_SLICER = (5, 10)
SLICER_TAG = "v5.10.0"
#: the CTK commit Slicer 5.10.0 builds (SuperBuild/External_CTK.cmake)
CTK_COMMIT = "dd4caeae7e979cf441e44ee85d3b0780120d113d"


@dataclass(frozen=True)
class Source:
    project: str  # Slicer, CTK, Qt, PythonQt, VTK, Python
    path: str

    def __str__(self) -> str:
        version = {"Slicer": SLICER_TAG, "CTK": CTK_COMMIT[:8], "Qt": "5.15"}.get(self.project, "")
        return f"{self.project} {version} {self.path}".replace("  ", " ")


def slicer(path: str) -> Source:
    return Source("Slicer", path)


def ctk(path: str) -> Source:
    return Source("CTK", path)


def qt(path: str) -> Source:
    return Source("Qt", path)


@dataclass(frozen=True)
class Name:
    """A module-level name (`slicer.util.loadUI`); `returns`: the class of the object it is or gives when called;
    `since`: the first Slicer that has it, when later than the lowest supported one."""

    source: Source
    returns: str | None = None
    since: tuple[int, int] | None = None


@dataclass
class Class:
    source: Source
    base: str | None = None
    #: member → the class of what it is or returns (None: not followed); members are looked for in the class's
    #: source file unless `elsewhere` names another one
    members: dict[str, str | None] = field(default_factory=dict)
    elsewhere: dict[str, Source] = field(default_factory=dict)


SLICER_UTIL = slicer("Base/Python/slicer/util.py")
SLICER_MODULE = slicer("Base/Python/slicer/ScriptedLoadableModule.py")
PYTHONQT = Source("PythonQt", "src/PythonQtStdDecorators.h (commontk/PythonQt)")

NAMES: dict[str, Name] = {
    "slicer.app": Name(slicer("Base/QTGUI/qSlicerApplication.h"), "qSlicerApplication"),
    "slicer.mrmlScene": Name(slicer("Base/QTCore/qSlicerCoreApplication.h"), "vtkMRMLScene"),
    "slicer.modules.peftadapt": Name(slicer("Base/Python/slicer/__init__.py"), "qSlicerScriptedLoadableModule"),
    "slicer.util.loadUI": Name(SLICER_UTIL, "qMRMLWidget"),
    "slicer.util.childWidgetVariables": Name(SLICER_UTIL, "ui"),
    "slicer.util.tryWithErrorDisplay": Name(SLICER_UTIL),
    "slicer.util.errorDisplay": Name(SLICER_UTIL),
    "slicer.util.warningDisplay": Name(SLICER_UTIL),
    "slicer.util.confirmOkCancelDisplay": Name(SLICER_UTIL),
    "slicer.util.NodeModify": Name(SLICER_UTIL),
    "slicer.util.tempDirectory": Name(SLICER_UTIL),
    "slicer.util.pip_install": Name(SLICER_UTIL),
    "slicer.util.addVolumeFromArray": Name(SLICER_UTIL),
    "slicer.util.VTKObservationMixin": Name(SLICER_UTIL, "VTKObservationMixin"),
    "slicer.i18n.tr": Name(slicer("Base/Python/slicer/i18n.py")),
    "slicer.i18n.translate": Name(slicer("Base/Python/slicer/i18n.py")),
    "slicer.ScriptedLoadableModule.ScriptedLoadableModule": Name(SLICER_MODULE, "ScriptedLoadableModule"),
    "slicer.ScriptedLoadableModule.ScriptedLoadableModuleWidget": Name(SLICER_MODULE, "ScriptedLoadableModuleWidget"),
    "slicer.ScriptedLoadableModule.ScriptedLoadableModuleLogic": Name(SLICER_MODULE, "ScriptedLoadableModuleLogic"),
    "slicer.ScriptedLoadableModule.ScriptedLoadableModuleTest": Name(SLICER_MODULE, "ScriptedLoadableModuleTest"),
    "slicer.parameterNodeWrapper.parameterNodeWrapper": Name(
        slicer("Base/Python/slicer/parameterNodeWrapper/wrapper.py")),
    "slicer.parameterNodeWrapper.Choice": Name(slicer("Base/Python/slicer/parameterNodeWrapper/validators.py")),
    "slicer.parameterNodeWrapper.WithinRange": Name(slicer("Base/Python/slicer/parameterNodeWrapper/validators.py")),
    "slicer.packaging": Name(slicer("Base/Python/slicer/packaging.py"), "slicer.packaging", since=(5, 12)),
    "slicer.qMRMLPlotWidget": Name(slicer("Libs/MRML/Widgets/qMRMLPlotWidget.h"), "qMRMLPlotWidget"),
    "slicer.qMRMLNodeComboBox": Name(slicer("Libs/MRML/Widgets/qMRMLNodeComboBox.h"), "qMRMLNodeComboBox"),
    "slicer.qSlicerSegmentEditorEffectFactory": Name(
        slicer("Modules/Loadable/Segmentations/EditorEffects/qSlicerSegmentEditorEffectFactory.h"),
        "qSlicerSegmentEditorEffectFactory"),
    "slicer.vtkMRMLScalarVolumeNode": Name(slicer("Libs/MRML/Core/vtkMRMLScalarVolumeNode.h")),
    "slicer.vtkMRMLSegmentationNode": Name(slicer("Libs/MRML/Core/vtkMRMLSegmentationNode.h")),
    "qt.QTimer": Name(qt("src/corelib/kernel/qtimer.h"), "QTimer"),
    "qt.QLabel": Name(qt("src/widgets/widgets/qlabel.h"), "QLabel"),
    "qt.QVBoxLayout": Name(qt("src/widgets/kernel/qboxlayout.h"), "QVBoxLayout"),
    "qt.QWidget": Name(qt("src/widgets/kernel/qwidget.h"), "QWidget"),
    "qt.QComboBox": Name(qt("src/widgets/widgets/qcombobox.h"), "QComboBox"),
    "qt.QTableWidgetItem": Name(qt("src/widgets/itemviews/qtablewidget.h"), "QTableWidgetItem"),
    "qt.QHeaderView.Stretch": Name(qt("src/widgets/itemviews/qheaderview.h")),
    "qt.QFileDialog.getExistingDirectory": Name(qt("src/widgets/dialogs/qfiledialog.h")),
    "vtk.vtkCommand.ModifiedEvent": Name(Source("VTK", "Common/Core/vtkCommand.h")),
}

#: functions of `slicer.packaging` (Slicer 5.12+): reached only through a guarded import
PACKAGING = Class(slicer("Base/Python/slicer/packaging.py"), members={"pip_ensure": None})

CLASSES: dict[str, Class] = {
    "slicer.packaging": PACKAGING,
    # -- Qt (PythonQt exposes Q_PROPERTYs as attributes and adds connect/disconnect to every QObject) -------------
    "QObject": Class(qt("src/corelib/kernel/qobject.h"), members={
        "connect": None, "disconnect": None, "blockSignals": None, "property": None, "setProperty": None},
        elsewhere={"connect": PYTHONQT, "disconnect": PYTHONQT}),
    "QCoreApplication": Class(qt("src/corelib/kernel/qcoreapplication.h"), "QObject", {"processEvents": None}),
    "QApplication": Class(qt("src/widgets/kernel/qapplication.h"), "QCoreApplication"),
    "QTimer": Class(qt("src/corelib/kernel/qtimer.h"), "QObject", {
        "setInterval": None, "start": None, "stop": None, "isActive": None, "timeout()": None}),
    "QLayout": Class(qt("src/widgets/kernel/qlayout.h"), "QObject", {"addWidget": None}),
    "QBoxLayout": Class(qt("src/widgets/kernel/qboxlayout.h"), "QLayout", {"addStretch": None}),
    "QVBoxLayout": Class(qt("src/widgets/kernel/qboxlayout.h"), "QBoxLayout"),
    "QHBoxLayout": Class(qt("src/widgets/kernel/qboxlayout.h"), "QBoxLayout"),
    "QGridLayout": Class(qt("src/widgets/kernel/qgridlayout.h"), "QLayout", {"addWidget": None}),
    "QWidget": Class(qt("src/widgets/kernel/qwidget.h"), "QObject", {
        "enabled": None, "visible": None, "isHidden": None, "toolTip": None, "minimumSize": None,
        "layout": "QLayout"}),
    "QFrame": Class(qt("src/widgets/widgets/qframe.h"), "QWidget"),
    "QLabel": Class(qt("src/widgets/widgets/qlabel.h"), "QFrame", {"text": None, "wordWrap": None}),
    "QAbstractButton": Class(qt("src/widgets/widgets/qabstractbutton.h"), "QWidget", {
        "text": None, "checked": None, "clicked(bool)": None, "click": None}),
    "QPushButton": Class(qt("src/widgets/widgets/qpushbutton.h"), "QAbstractButton"),
    "QCheckBox": Class(qt("src/widgets/widgets/qcheckbox.h"), "QAbstractButton", {"stateChanged(int)": None}),
    "QComboBox": Class(qt("src/widgets/widgets/qcombobox.h"), "QWidget", {
        "addItem": None, "clear": None, "count": None, "currentIndex": None, "setCurrentIndex": None,
        "itemData": None, "itemText": None, "findData": None, "currentText": None,
        "currentIndexChanged(int)": None}),
    "QAbstractSpinBox": Class(qt("src/widgets/widgets/qabstractspinbox.h"), "QWidget", {"specialValueText": None}),
    "QSpinBox": Class(qt("src/widgets/widgets/qspinbox.h"), "QAbstractSpinBox", {
        "minimum": None, "maximum": None, "singleStep": None, "value": None, "setRange": None,
        "valueChanged(int)": None}),
    "QProgressBar": Class(qt("src/widgets/widgets/qprogressbar.h"), "QWidget", {
        "value": None, "minimum": None, "maximum": None, "setRange": None, "setFormat": None, "format": None}),
    "QPlainTextEdit": Class(qt("src/widgets/widgets/qplaintextedit.h"), "QFrame", {
        "readOnly": None, "appendPlainText": None, "clear": None, "toPlainText": None}),
    "QAbstractItemView": Class(qt("src/widgets/itemviews/qabstractitemview.h"), "QFrame"),
    "QTableView": Class(qt("src/widgets/itemviews/qtableview.h"), "QAbstractItemView", {
        "horizontalHeader": "QHeaderView"}),
    "QTableWidget": Class(qt("src/widgets/itemviews/qtablewidget.h"), "QTableView", {
        "columnCount": None, "rowCount": None, "setRowCount": None, "setItem": None, "item": "QTableWidgetItem",
        "currentRow": None, "setCurrentCell": None, "setHorizontalHeaderLabels": None}),
    "QTableWidgetItem": Class(qt("src/widgets/itemviews/qtablewidget.h"), None, {
        "text": None, "setToolTip": None, "toolTip": None}),
    "QHeaderView": Class(qt("src/widgets/itemviews/qheaderview.h"), "QAbstractItemView", {
        "setSectionResizeMode": None}),
    # -- CTK ----------------------------------------------------------------------------------------------------------
    "ctkCollapsibleButton": Class(ctk("Libs/Widgets/ctkCollapsibleButton.h"), "QAbstractButton", {"collapsed": None}),
    "ctkPathLineEdit": Class(ctk("Libs/Widgets/ctkPathLineEdit.h"), "QWidget", {
        "currentPath": None, "nameFilters": None, "currentPathChanged(QString)": None}),
    "ctkSliderWidget": Class(ctk("Libs/Widgets/ctkSliderWidget.h"), "QWidget", {
        "decimals": None, "singleStep": None, "minimum": None, "maximum": None, "value": None,
        "valueChanged(double)": None}),
    # -- Slicer widgets -----------------------------------------------------------------------------------------------
    "qMRMLWidget": Class(slicer("Libs/MRML/Widgets/qMRMLWidget.h"), "QWidget", {
        "setMRMLScene": None, "mrmlSceneChanged(vtkMRMLScene*)": None}),
    "qMRMLNodeComboBox": Class(slicer("Libs/MRML/Widgets/qMRMLNodeComboBox.h"), "QWidget", {
        "nodeTypes": None, "hideChildNodeTypes": None, "noneEnabled": None, "addEnabled": None, "removeEnabled": None,
        "setMRMLScene": None,
        "currentNode": None, "setCurrentNode": None, "currentNodeChanged(vtkMRMLNode*)": None}),
    "qMRMLTableView": Class(slicer("Libs/MRML/Widgets/qMRMLTableView.h"), "QTableView", {
        "setMRMLScene": None, "setMRMLTableNode": None, "mrmlTableNode": None}),
    "qMRMLPlotWidget": Class(slicer("Libs/MRML/Widgets/qMRMLPlotWidget.h"), "qMRMLWidget", {
        "setMRMLPlotViewNode": None, "mrmlPlotViewNode": None}),
    "qMRMLSegmentEditorWidget": Class(slicer("Modules/Loadable/Segmentations/Widgets/qMRMLSegmentEditorWidget.h"),
                                      "qMRMLWidget", {
        "setMaximumNumberOfUndoStates": None, "setMRMLSegmentEditorNode": None, "setSegmentationNode": None,
        "setSourceVolumeNode": None, "setActiveEffect": None, "installKeyboardShortcuts": None,
        "uninstallKeyboardShortcuts": None, "removeViewObservations": None, "updateWidgetFromMRML": None,
        "updateEffectList": None}),
    "qSlicerSegmentEditorEffectFactory": Class(
        slicer("Modules/Loadable/Segmentations/EditorEffects/qSlicerSegmentEditorEffectFactory.h"), "QObject", {
            "instance": "qSlicerSegmentEditorEffectFactory", "effectRegistered(QString)": None}),
    "qSlicerCoreApplication": Class(slicer("Base/QTCore/qSlicerCoreApplication.h"), "QApplication", {
        "majorVersion": None, "minorVersion": None, "temporaryPath": None}),
    "qSlicerApplication": Class(slicer("Base/QTGUI/qSlicerApplication.h"), "qSlicerCoreApplication"),
    "qSlicerAbstractCoreModule": Class(slicer("Base/QTCore/qSlicerAbstractCoreModule.h"), "QObject", {
        "widgetRepresentation": "qSlicerScriptedLoadableModuleWidget", "path": None}),
    "qSlicerScriptedLoadableModule": Class(slicer("Base/QTGUI/qSlicerScriptedLoadableModule.h"),
                                           "qSlicerAbstractCoreModule", {
        "title": None, "categories": None, "dependencies": None, "contributors": None, "helpText": None,
        "acknowledgementText": None}),
    "qSlicerAbstractModuleWidget": Class(slicer("Base/QTGUI/qSlicerAbstractModuleWidget.h"), "qMRMLWidget", {
        "isEntered": None}),
    "qSlicerScriptedLoadableModuleWidget": Class(slicer("Base/QTGUI/qSlicerScriptedLoadableModuleWidget.h"),
                                                 "qSlicerAbstractModuleWidget", {"self": "PEFTAdaptWidget"}),
    # -- MRML (VTK classes; slicer-core runs the real ones) --------------------------------------------------------
    "vtkMRMLScene": Class(slicer("Libs/MRML/Core/vtkMRMLScene.h"), None, {
        "StartCloseEvent": None, "EndCloseEvent": None, "GetSingletonNode": None, "CreateNodeByClass": None,
        "AddNode": None, "AddNewNodeByClass": None, "RemoveNode": None, "Clear": None}),
    # -- Slicer's Python base classes ----------------------------------------------------------------------------------
    "ScriptedLoadableModule": Class(SLICER_MODULE, None, {"__init__": None, "parent": "qSlicerScriptedLoadableModule"}),
    "ScriptedLoadableModuleWidget": Class(SLICER_MODULE, None, {
        "__init__": None, "parent": "qSlicerScriptedLoadableModuleWidget", "layout": "QVBoxLayout",
        "resourcePath": None, "setup": None, "moduleName": None}),
    "ScriptedLoadableModuleLogic": Class(SLICER_MODULE, None, {"__init__": None, "getParameterNode": None}),
    "ScriptedLoadableModuleTest": Class(SLICER_MODULE, "unittest.TestCase", {"delayDisplay": None}),
    "VTKObservationMixin": Class(SLICER_UTIL, None, {
        "__init__": None, "addObserver": None, "removeObserver": None, "removeObservers": None, "hasObserver": None}),
}

#: the newest extension-catalog schema Slicer 5.10 has (v1.0.2 came with 5.12), and the fields it allows
CATALOG_SCHEMA = slicer("Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json")
CATALOG_FIELDS = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
                  "build_subdirectory", "enabled", "tier"}

#: `.ui` file: the classes a .ui may name for its layouts and spacers (Qt Designer's own)
UI_LAYOUT_CLASSES = {"QVBoxLayout", "QHBoxLayout", "QGridLayout"}
#: .ui properties Qt Designer writes for every widget or layout item, not Qt properties of the class
UI_GEOMETRY_PROPERTIES = {"orientation"}  # of spacers


def find_member(class_name: str, member: str) -> tuple[str, str | None] | None:
    """(defining class, returned class) of `class_name.member`, looking through the bases; None if not listed."""
    while class_name is not None:
        if class_name == "unittest.TestCase":
            import unittest

            return (class_name, None) if hasattr(unittest.TestCase, member) else None
        entry = CLASSES.get(class_name)
        if entry is None:
            return None
        if member in entry.members:
            return class_name, entry.members[member]
        signal = next((m for m in entry.members if m.startswith(member + "(")), None)
        if signal is not None:  # PythonQt's `object.signal.connect(slot)`
            return class_name, None
        class_name = entry.base
    return None


def ancestors(class_name: str) -> list[str]:
    chain = []
    while class_name in CLASSES:
        chain.append(class_name)
        class_name = CLASSES[class_name].base
    return chain


# -- parameter-node GUI connectors of Slicer 5.10 (Base/Python/slicer/parameterNodeWrapper/guiConnectors.py) -----------


@dataclass(frozen=True)
class Connector:
    """One `GuiConnector`: `canRepresent` is "the widget's exact class is one of `widgets` and the unannotated type
    is one of `types`"; `requires` is what `create`/`__init__` then insist on; `fills` says that it clears the combo
    box and adds its own items."""

    name: str
    widgets: frozenset[str]
    types: frozenset[str]
    requires: str = ""  # "Choice" | "bounded" (for `bounded_widgets`) | "RangeBounds"
    bounded_widgets: frozenset[str] = frozenset()
    fills: str = ""  # "choices" (str() of each) | "enum labels" (the enum's `label`, else member names)


_PATHS = frozenset({"pathlib.Path", "pathlib.PosixPath", "pathlib.WindowsPath", "pathlib.PurePath",
                    "pathlib.PurePosixPath", "pathlib.PureWindowsPath"})
#: in registration order: `createGuiConnector` takes the first whose `canRepresent` is true
CONNECTORS: list[Connector] = [
    Connector("QCheckBoxToBoolConnector", frozenset({"QCheckBox", "ctkCheckBox"}), frozenset({"bool"})),
    Connector("QCheckablePushButtonToBoolConnector", frozenset({"QPushButton"}), frozenset({"bool"})),
    Connector("ctkCheckablePushButtonToBoolConnector", frozenset({"ctkCheckablePushButton"}), frozenset({"bool"})),
    Connector("QSliderOrSpinBoxToIntConnector", frozenset({"QSlider", "QSpinBox"}), frozenset({"int"}),
              "bounded", frozenset({"QSlider"})),
    Connector("QDoubleSpinBoxCtkSliderWidgetToFloatIntConnector",
              frozenset({"QDoubleSpinBox", "ctkSliderWidget", "qMRMLSliderWidget", "ctkDoubleSlider",
                         "ctkDoubleSpinBox", "qMRMLSpinBox"}), frozenset({"float", "int"}),
              "bounded", frozenset({"ctkSliderWidget", "qMRMLSliderWidget"})),
    Connector("QComboBoxToStringableConnector", frozenset({"QComboBox", "ctkComboBox"}),
              frozenset({"int", "float", "str", "bool"}), "Choice", fills="choices"),
    Connector("QComboBoxToEnumConnector", frozenset({"QComboBox", "ctkComboBox"}), frozenset({"enum"}),
              fills="enum labels"),
    Connector("QLineEditToStrConnector", frozenset({"QLineEdit"}), frozenset({"str"})),
    Connector("QLabelToStrConnector", frozenset({"QLabel"}), frozenset({"str"})),
    Connector("QTextEditPlainTextToStrConnector", frozenset({"QTextEdit"}), frozenset({"str"})),
    Connector("ctkRangeWidgetToRangeConnector",
              frozenset({"ctkRangeWidget", "ctkDoubleRangeSlider", "qMRMLRangeWidget"}), frozenset({"FloatRange"}),
              "RangeBounds"),
    Connector("ctkPathLineEditToPathConnector", frozenset({"ctkPathLineEdit"}), _PATHS),
    Connector("ctkDirectoryButtonToPathConnector", frozenset({"ctkDirectoryButton"}), _PATHS),
    Connector("qMRMLNodeComboBoxToNodeConnector", frozenset({"qMRMLNodeComboBox"}), frozenset({"node"})),
    Connector("ctkColorPickerButtonToQColorConnector", frozenset({"ctkColorPickerButton"}), frozenset({"QColor"})),
]


def connector_for(widget_class: str, kind: str, validators: set[str]) -> tuple[Connector | None, str]:
    """The connector Slicer would create for a widget of `widget_class` bound to a field of `kind` with these
    validators, and "" — or None and the error Slicer would raise."""
    for connector in CONNECTORS:
        if widget_class in connector.widgets and kind in connector.types:
            if connector.requires == "Choice" and "Choice" not in validators:
                return None, f"{connector.name} requires the Choice annotation"
            if connector.requires == "RangeBounds" and "RangeBounds" not in validators:
                return None, f"{connector.name} needs a RangeBounds annotation"
            if connector.requires == "bounded" and widget_class in connector.bounded_widgets and not (
                    "WithinRange" in validators or {"Minimum", "Maximum"} <= validators):
                return None, f"{connector.name}: a {widget_class} needs a bounded type (WithinRange)"
            return connector, ""
    return None, f"no GUI connector from a '{kind}' parameter to a {widget_class}"
