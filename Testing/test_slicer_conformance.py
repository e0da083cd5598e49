"""Slicer-API conformance of the PEFTAdapt module, without Slicer.

Every `slicer.*`, `qt.*`, `ctk.*`, `vtk.*` name the module file uses, every member it reaches on a Slicer, CTK or Qt
object, every signal it connects to, and every class, property and connection of its `.ui` file must be in the API
table (`slicer_api.py`), which names the file defining each in Slicer 5.10 (the lowest supported version). Each
`SlicerParameterName` binding must have a connector under Slicer's rules (widget class × field type, from
guiConnectors.py), and a combo box filled by its connector must not be filled by the module. The module holds no
process code, no JSON and no worker event names. The fake of Slicer's Qt layer (`slicer_qt_fake.py`, a fake of that
layer only) may offer nothing the table lacks.

With `PEFTADAPT_SLICER_SOURCE` (a Slicer git checkout) and `PEFTADAPT_CTK_SOURCE` (a CTK checkout) set, every table
entry is looked up in the file it names, at v5.10.0 and at the CTK commit Slicer 5.10.0 builds.
"""
from __future__ import annotations

import ast
import inspect
import json
import os
import re
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import slicer_api
import slicer_qt_fake
from slicer_api import CLASSES, NAMES, find_member

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "PEFTAdapt"
SOURCE = (MODULE / "PEFTAdapt.py").read_text()
TREE = ast.parse(SOURCE)
UI_PATH = MODULE / "Resources" / "UI" / "PEFTAdapt.ui"
UI = ET.parse(UI_PATH)
ROOTS = {"slicer", "qt", "ctk", "vtk"}
OWN_WIDGET = "PEFTAdaptWidget"


def ui_widget_classes() -> dict[str, str]:
    return {w.get("name"): w.get("class") for w in UI.iter("widget")}


# -- which names and members the module uses -----------------------------------------------------------------------


class ApiUses(ast.NodeVisitor):
    """Resolves the type of every expression it can (module names, table classes, the `.ui` widgets, the module's
    own classes), and records each use of a table name or member: (name, line, known)."""

    def __init__(self, tree: ast.Module, widgets: dict[str, str]):
        self.widgets = widgets
        self.uses: list[tuple[str, int, bool]] = []
        self.aliases: dict[str, str] = {}
        self.classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
        for node in tree.body:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in ROOTS:
                        self.aliases[alias.asname or alias.name] = alias.name
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ROOTS:
                for alias in node.names:
                    self.aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        for node in ast.walk(tree):  # guarded imports inside `if` blocks
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ROOTS:
                for alias in node.names:
                    self.aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        self.attributes = {name: self._self_attributes(node) for name, node in self.classes.items()}
        self.locals: dict[str, str | None] = {}
        self.current_class: str | None = None

    # type strings: a CLASSES key, "ui", "own:<Class>", "module:<dotted>", "method:<type>", "super:<Class>"
    def _self_attributes(self, classdef: ast.ClassDef) -> dict[str, ast.expr]:
        found = {}
        for node in ast.walk(classdef):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) \
                            and target.value.id == "self":
                        found.setdefault(target.attr, node.value)
        return found

    def record(self, name: str, node: ast.AST, known: bool) -> None:
        self.uses.append((name, getattr(node, "lineno", 0), known))

    def dotted(self, dotted: str, node: ast.AST) -> str | None:
        if dotted in NAMES:
            self.record(dotted, node, True)
            return NAMES[dotted].returns
        if any(key.startswith(dotted + ".") for key in NAMES) or dotted in ROOTS:
            return f"module:{dotted}"
        self.record(dotted, node, False)
        return None

    def member(self, owner: str, attr: str, node: ast.AST) -> str | None:
        if owner.startswith("module:"):
            return self.dotted(f"{owner[7:]}.{attr}", node)
        if owner == "ui":
            if attr not in self.widgets:
                self.record(f"ui.{attr}", node, False)
                return None
            return self.widgets[attr]
        if owner.startswith(("own:", "super:")):
            return self.own_member(owner.split(":", 1)[1], attr, node, skip_own=owner.startswith("super:"))
        found = find_member(owner, attr)
        self.record(f"{found[0] if found else owner}.{attr}", node, found is not None)  # named by its defining class
        return self.own(found[1]) if found else None

    def own(self, kind: str | None) -> str | None:
        """A table entry may give one of the module's own classes (e.g. the widget behind `.self()`)."""
        return f"own:{kind}" if kind in self.classes else kind

    def own_member(self, class_name: str, attr: str, node: ast.AST, skip_own: bool = False) -> str | None:
        classdef = self.classes[class_name]
        if not skip_own:
            for item in classdef.body:
                if isinstance(item, ast.FunctionDef) and item.name == attr:
                    returns = self.annotation(item.returns) if item.returns else None
                    return f"method:{returns}"
            if any(isinstance(item, (ast.Assign, ast.AnnAssign)) and attr in {
                    t.id for t in (item.targets if isinstance(item, ast.Assign) else [item.target])
                    if isinstance(t, ast.Name)} for item in classdef.body):
                return None  # a class attribute (an enum member, a field)
            if attr in self.attributes[class_name]:
                saved, self.locals = self.locals, {}
                kind = self.type_of(self.attributes[class_name][attr], record=False)
                self.locals = saved
                return kind
            if attr == "ui":
                return "ui"
        for base in classdef.bases:
            base_type = self.type_of(base, record=False)
            if base_type and base_type.startswith("own:"):
                found = self.own_member(base_type[4:], attr, node)
                if found is not None:
                    return found
            elif base_type in CLASSES:
                found = find_member(base_type, attr)
                if found:
                    self.record(f"{found[0]}.{attr}", node, True)
                    return self.own(found[1])
        if any(isinstance(b, ast.Name) or isinstance(b, ast.Attribute) for b in classdef.bases) and not skip_own:
            self.record(f"{class_name}.{attr}", node, False)
        return None

    def annotation(self, node: ast.expr) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return self.type_of(ast.parse(node.value, mode="eval").body)
        return None

    def type_of(self, node: ast.expr, record: bool = True) -> str | None:
        if not record:
            saved = self.uses
            self.uses = []
            try:
                return self.type_of(node)
            finally:
                self.uses = saved
        if isinstance(node, ast.Name):
            if node.id == "self" and self.current_class:
                return f"own:{self.current_class}"
            if node.id in self.locals:
                return self.locals[node.id]
            if node.id in self.aliases:
                return self.dotted(self.aliases[node.id], node)
            if node.id in self.classes:
                return f"own:{node.id}"
            return None
        if isinstance(node, ast.Attribute):
            owner = self.type_of(node.value)
            return self.member(owner, node.attr, node) if owner else None
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name) and node.func.id == "super" and self.current_class:
                return f"super:{self.current_class}"
            if isinstance(node.func, ast.Attribute) and node.func.attr == "import_module" and node.args \
                    and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).split(".")[0] in ROOTS:
                return self.dotted(node.args[0].value, node)
            kind = self.type_of(node.func)
            if isinstance(node.func, ast.Attribute) and node.func.attr in ("connect", "disconnect") and node.args \
                    and isinstance(node.args[0], ast.Constant) and "(" in str(node.args[0].value):
                owner = self.type_of(node.func.value, record=False)
                if owner and not owner.startswith(("module:", "own:")):
                    self.member(owner, node.args[0].value, node)
            for argument in [*node.args, *[k.value for k in node.keywords]]:
                self.type_of(argument)
            if kind and kind.startswith("method:"):
                return None if kind == "method:None" else kind[7:]
            return kind
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                self.type_of(child)
        return None

    # statements: keep local variable types in order
    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        saved, self.current_class = self.current_class, node.name
        for expression in [*node.bases, *node.decorator_list]:
            self.type_of(expression)
        for item in node.body:
            self.visit(item)
        self.current_class = saved

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        for decorator in node.decorator_list:
            self.type_of(decorator)
        saved, self.locals = self.locals, {}
        for argument in node.args.args + node.args.kwonlyargs:
            self.locals[argument.arg] = self.annotation(argument.annotation) if argument.annotation else None
        if node.returns is not None:
            self.annotation(node.returns)
        for item in node.body:
            self.visit(item)
        self.locals = saved

    def visit_Assign(self, node: ast.Assign) -> None:
        kind = self.type_of(node.value)
        for target in node.targets:
            if isinstance(target, ast.Name):
                if isinstance(node.value, ast.Constant) and node.value.value is None and target.id in self.locals:
                    continue  # `x = None` in a fallback branch keeps what x is where it is set
                self.locals[target.id] = kind
            else:
                self.type_of(target)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self.type_of(node.annotation)
        if node.value is not None:
            self.type_of(node.value)

    def visit_Expr(self, node: ast.Expr) -> None:
        self.type_of(node.value)

    def generic_visit(self, node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                self.type_of(child)
            else:
                self.visit(child)


def module_uses(tree: ast.Module = TREE) -> list[tuple[str, int, bool]]:
    visitor = ApiUses(tree, ui_widget_classes())
    visitor.visit(tree)
    return visitor.uses


# -- the tests ---------------------------------------------------------------------------------------------------------


def test_every_slicer_qt_ctk_vtk_use_of_the_module_is_in_the_table():
    uses = module_uses()
    unknown = sorted({f"{name} (line {line})" for name, line, known in uses if not known})
    assert not unknown, "Slicer/Qt/CTK/VTK uses not in the API table (slicer_api.py): " + ", ".join(unknown)
    names = {name for name, _line, _known in uses}
    # the analysis reached the module's widgets, the base classes and the Segment Editor (it is not vacuous)
    assert {"slicer.util.loadUI", "QComboBox.findData", "qMRMLSegmentEditorWidget.setActiveEffect",
            "VTKObservationMixin.addObserver", "qSlicerAbstractModuleWidget.isEntered",
            "QAbstractButton.clicked(bool)", "QTimer.timeout()"} <= names


def test_the_analysis_catches_a_use_that_the_table_lacks():
    tree = ast.parse(SOURCE.replace("editor.removeViewObservations()", "editor.removeAllViewObservations()", 1)
                     .replace("slicer.util.loadUI(", "slicer.util.loadUi(", 1))
    unknown = {name for name, _line, known in module_uses(tree) if not known}
    assert {"qMRMLSegmentEditorWidget.removeAllViewObservations", "slicer.util.loadUi"} <= unknown


def test_names_newer_than_the_lowest_slicer_are_reached_only_through_a_guarded_import():
    """`slicer.packaging` exists from 5.12: imported by name inside `try ... except ImportError`, nowhere else."""
    newer = {name for name, entry in NAMES.items() if entry.since and entry.since > slicer_api.LOWEST_SLICER}
    guarded = set()
    for node in ast.walk(TREE):
        if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                for h in node.handlers):
            for inner in ast.walk(ast.Module(body=node.body, type_ignores=[])):
                if isinstance(inner, ast.Constant) and inner.value in newer:
                    guarded.add(inner.lineno)
    used = [(name, line) for name, line, _known in module_uses() if name in newer]
    assert used, "the module uses slicer.packaging where it exists"
    assert all(line in guarded for _name, line in used), used
    assert not re.search(r"\bslicer\.packaging\.", SOURCE), "slicer.packaging used as an attribute of slicer"


def _ui_properties():
    for widget in UI.iter("widget"):
        for prop in widget.findall("property"):
            yield widget.get("class"), widget.get("name"), prop


def test_every_ui_class_property_and_connection_is_in_the_table():
    problems = []
    for widget in UI.iter("widget"):
        if widget.get("class") not in CLASSES:
            problems.append(f"class {widget.get('class')}")
    for layout in UI.iter("layout"):
        if layout.get("class") not in slicer_api.UI_LAYOUT_CLASSES:
            problems.append(f"layout {layout.get('class')}")
    for cls, name, prop in _ui_properties():
        if prop.get("stdset") != "0" and not find_member(cls, prop.get("name")):
            problems.append(f"{cls}.{prop.get('name')} ({name})")
    classes = ui_widget_classes()
    for connection in UI.iter("connection"):
        sender, receiver = classes[connection.findtext("sender")], classes[connection.findtext("receiver")]
        if not find_member(sender, connection.findtext("signal")):
            problems.append(f"{sender}.{connection.findtext('signal')}")
        if not find_member(receiver, connection.findtext("slot").split("(")[0]):
            problems.append(f"{receiver}.{connection.findtext('slot')}")
    for custom in UI.iter("customwidget"):
        if custom.findtext("extends") not in slicer_api.ancestors(custom.findtext("class")):
            problems.append(f"{custom.findtext('class')} does not extend {custom.findtext('extends')}")
    assert not problems, "not in the API table: " + ", ".join(problems)


def test_every_node_selector_gets_the_scene():
    selectors = {w.get("name") for w in UI.iter("widget") if find_member(w.get("class"), "setMRMLScene")} - {
        UI.getroot().find("widget").get("name")}
    connected = {c.findtext("receiver") for c in UI.iter("connection")
                 if c.findtext("signal").startswith("mrmlSceneChanged")}
    assert selectors and selectors <= connected, selectors - connected


# -- parameter node × connectors --------------------------------------------------------------------------------------


def parameter_fields(tree: ast.Module = TREE) -> dict[str, tuple[str, set[str]]]:
    """field → (kind, validators) of the parameterNodeWrapper class, read from its annotations."""
    classdef = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)
                    and any(getattr(d, "id", None) == "parameterNodeWrapper" for d in n.decorator_list))
    enums = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)
             and any(getattr(b, "attr", getattr(b, "id", "")) == "Enum" for b in n.bases)}

    def kind(annotation) -> tuple[str, set[str]]:
        if isinstance(annotation, ast.Subscript) and getattr(annotation.value, "id", "") == "Annotated":
            inner, *validators = annotation.slice.elts
            return kind(inner)[0], {getattr(v.func, "id", getattr(v.func, "attr", "")) for v in validators}
        if isinstance(annotation, ast.Subscript):
            return "list", set()
        if isinstance(annotation, ast.Name):
            return ("enum" if annotation.id in enums else annotation.id), set()
        if isinstance(annotation, ast.Attribute) and annotation.attr.startswith("vtkMRML"):
            return "node", set()
        return ast.unparse(annotation), set()

    return {s.target.id: kind(s.annotation) for s in classdef.body if isinstance(s, ast.AnnAssign)}


def parameter_bindings() -> dict[str, str]:
    return {w.get("name"): p.find("string").text for w in UI.iter("widget") for p in w.findall("property")
            if p.get("name") == "SlicerParameterName"}


def connector_problems(tree: ast.Module = TREE) -> list[str]:
    fields, classes, problems = parameter_fields(tree), ui_widget_classes(), []
    source = ast.unparse(tree)
    for widget, name in parameter_bindings().items():
        if name not in fields:
            problems.append(f"{widget}: SlicerParameterName '{name}' is no parameter-node field")
            continue
        kind, validators = fields[name]
        connector, problem = slicer_api.connector_for(classes[widget], kind, validators)
        if connector is None:
            problems.append(f"{widget} ({classes[widget]}) ↔ {name} ({kind}): {problem}")
        else:
            if connector.fills and re.search(rf"ui\.{widget}\.(addItem|addItems|insertItem|clear)\(", source):
                problems.append(f"{widget}: its connector fills it ({connector.fills}), yet the module fills it too")
            if connector.fills == "enum labels":
                problems.append(f"{widget}: an enum shows member names unless it has `label`; map the combo box by "
                                "hand")
    return problems


def test_every_parameter_binding_has_a_connector_under_slicers_rules():
    bindings = parameter_bindings()
    assert len(bindings) >= 8  # the parse found the .ui's bindings
    assert not connector_problems()


def test_the_connector_rules_refuse_the_original_bindings():
    """The original panel (issue 15, defect 2): `modelId: str` and `device: str` on plain combo boxes (no Choice),
    and the method enum filled with member names."""
    original = ast.parse(SOURCE.replace("device: Annotated[str, Choice(list(DEVICES))]", "device: str"))
    classdef = next(n for n in ast.walk(original) if isinstance(n, ast.ClassDef) and n.name == "PEFTAdaptParameterNode")
    classdef.body.insert(0, ast.parse("class AdaptationMethod(enum.Enum): pass").body[0])
    for statement in classdef.body:
        if isinstance(statement, ast.AnnAssign) and statement.target.id == "method":
            statement.annotation = ast.Name("AdaptationMethod")
    global UI
    saved = UI
    try:
        text = UI_PATH.read_text()
        for widget, field in (("modelComboBox", "modelId"), ("methodComboBox", "method")):
            text = text.replace(f'name="{widget}">', f'name="{widget}"><property name="SlicerParameterName" '
                                                     f'stdset="0"><string>{field}</string></property>', 1)
        UI = ET.ElementTree(ET.fromstring(text))
        problems = "\n".join(connector_problems(original))
    finally:
        UI = saved
    assert "modelComboBox (QComboBox) ↔ modelId (str): QComboBoxToStringableConnector requires the Choice" in problems
    assert "deviceComboBox (QComboBox) ↔ device (str)" in problems
    assert "methodComboBox: an enum shows member names" in problems


# -- what the module must not do ---------------------------------------------------------------------------------------


def worker_event_names() -> set[str]:
    """The events of the job protocol, from the table in docs/worker.md."""
    text = (ROOT / "docs" / "worker.md").read_text().split("## Events", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(\w+)` \|", text, flags=re.M))


def test_the_module_holds_no_process_code_no_json_and_no_event_names():
    events = worker_event_names()
    assert {"started", "step", "audit", "finished", "failed", "cancelled"} <= events
    imported = {alias.name.split(".")[0] for node in ast.walk(TREE) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names} | {node.module.split(".")[0] for node in ast.walk(TREE)
                                             if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"subprocess", "json", "psutil", "signal", "multiprocessing", "threading"}, imported
    literals = {node.value for node in ast.walk(TREE) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    assert not literals & events, literals & events
    assert not re.search(r"\b(Popen|kill|terminate|read_events|events\.jsonl)\b", SOURCE)


# -- one supported range, stated alike everywhere ----------------------------------------------------------------------


def test_the_supported_slicer_is_stated_alike_in_module_cmake_readme_docs_and_catalog_entry():
    minimum = ".".join(map(str, slicer_api.LOWEST_SLICER))
    [assignment] = [n for n in TREE.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") ==
                    "MINIMUM_SLICER"]
    assert ast.literal_eval(assignment.value) == slicer_api.LOWEST_SLICER
    cmake_text = (ROOT / "CMakeLists.txt").read_text()
    cmake = dict(re.findall(r'set\((\w+) "([^"]*)"\)', cmake_text))
    assert cmake["PEFTADAPT_MINIMUM_SLICER_VERSION"] == minimum
    assert "find_package(Slicer ${PEFTADAPT_MINIMUM_SLICER_VERSION} REQUIRED)" in cmake_text
    assert cmake["EXTENSION_DESCRIPTION"].endswith(f"Requires 3D Slicer {minimum} or later.")
    readme = (ROOT / "README.md").read_text().split("## 3D Slicer extension", 1)[1].split("\n## ", 1)[0]
    assert f"**Supported: 3D Slicer {minimum} or later**" in readme
    assert f"**3D Slicer {minimum} or later.**" in (ROOT / "docs" / "slicer.md").read_text()
    # the catalog entry: the schema of the lowest Slicer's index, its fields only, and the CMake metadata's values
    entry = json.loads((ROOT / "Resources" / "ExtensionsIndex" / "PEFTAdapt.json").read_text())
    assert entry["$schema"].split("/")[-1].rstrip("#") == Path(slicer_api.CATALOG_SCHEMA.path).name
    assert {"$schema", "category", "scm_url"} <= set(entry) <= slicer_api.CATALOG_FIELDS
    assert entry["category"] == cmake["EXTENSION_CATEGORY"]
    assert entry["build_dependencies"] == cmake["EXTENSION_DEPENDS"].split()
    assert entry["scm_url"].removesuffix(".git") == cmake["EXTENSION_HOMEPAGE"]


# -- the fake has nothing the table lacks ------------------------------------------------------------------------------


def _public_members(cls) -> set[str]:
    names = {name for klass in cls.__mro__ if klass.__module__ == slicer_qt_fake.__name__
             for name in vars(klass) if not name.startswith("_")}
    return names


def test_the_qt_layer_fake_offers_only_what_the_table_lists():
    problems = []
    for name, cls in inspect.getmembers(slicer_qt_fake, inspect.isclass):
        if cls.__module__ != slicer_qt_fake.__name__ or name not in CLASSES:
            continue
        for member in _public_members(cls):
            if not find_member(name, member) and member not in ("Stretch",):
                problems.append(f"{name}.{member}")
        instance_members = set()
        if name in slicer_qt_fake.UI_CLASSES:
            instance_members = {m for m in vars(cls()) if not m.startswith("_")}
        problems += [f"{name}.{m}" for m in instance_members if not find_member(name, m)]
    fake_names = {f"qt.{n}" for n in vars(slicer_qt_fake.QT) if not n.startswith("_")} | {
        f"slicer.util.{n}" for n in slicer_qt_fake.UTIL} | {f"slicer.{n}" for n in slicer_qt_fake.SLICER_ATTRIBUTES}
    for dotted in fake_names:
        if dotted not in NAMES and not any(key.startswith(dotted + ".") for key in NAMES) \
                and dotted.split(".")[-1] not in CLASSES:
            problems.append(dotted)
    assert not problems, "the fake offers members the API table does not list: " + ", ".join(sorted(problems))


# -- the table against Slicer's and CTK's source -----------------------------------------------------------------------


def _git_file(env: str, revision: str, path: str) -> str:
    checkout = os.environ.get(env)
    if not checkout:
        pytest.skip(f"set {env} to a git checkout to check the table against the source (CI has none)")
    result = subprocess.run(["git", "-C", checkout, "show", f"{revision}:{path}"], capture_output=True, text=True)
    assert result.returncode == 0, f"{path} is not in {revision}: {result.stderr.strip()}"
    return result.stdout


def _entries():
    """(entry, source, identifier to find, Slicer tag): names newer than the lowest Slicer at the tag adding them."""
    for dotted, name in NAMES.items():
        tag = f"v{name.since[0]}.{name.since[1]}.0" if name.since else slicer_api.SLICER_TAG
        yield dotted, name.source, dotted.split(".")[-1], tag
    for class_name, cls in CLASSES.items():
        since = NAMES.get(class_name, None)
        tag = f"v{since.since[0]}.{since.since[1]}.0" if since and since.since else slicer_api.SLICER_TAG
        for member in cls.members:
            yield f"{class_name}.{member}", cls.elsewhere.get(member, cls.source), member.split("(")[0], tag


#: entries whose name is made at run time: `slicer.modules.<module>` (Base/Python/slicer/__init__.py documents it),
#: `slicer.app` / `slicer.mrmlScene` (set by the application, declared in its header as app / mrmlScene())
UNNAMED_IN_SOURCE = {"slicer.modules.peftadapt", "slicer.app", "slicer.mrmlScene"}


def test_the_table_names_files_that_define_each_entry_in_the_lowest_slicer():
    checked = 0
    for entry, source, identifier, tag in _entries():
        if source.project == "Slicer":
            text = _git_file("PEFTADAPT_SLICER_SOURCE", tag, source.path)
        elif source.project == "CTK":
            text = _git_file("PEFTADAPT_CTK_SOURCE", slicer_api.CTK_COMMIT, source.path)
        else:
            continue
        if entry not in UNNAMED_IN_SOURCE:
            assert re.search(rf"\b{re.escape(identifier)}\b", text), f"{entry}: '{identifier}' not in {source}"
        checked += 1
    assert checked > 60


def test_the_connector_rules_match_slicers_gui_connectors():
    text = _git_file("PEFTADAPT_SLICER_SOURCE", slicer_api.SLICER_TAG,
                     "Base/Python/slicer/parameterNodeWrapper/guiConnectors.py")
    registered = re.findall(r"@parameterNodeGuiConnector\s*\nclass (\w+)", text)
    packs = "WidgetChildrenToParameterPackConnector"  # parameter packs: not used by the module
    assert [c.name for c in slicer_api.CONNECTORS] == [name for name in registered if name != packs]
    for connector in slicer_api.CONNECTORS:
        body = text.split(f"class {connector.name}(", 1)[1].split("def create", 1)[0]
        for widget in connector.widgets:
            assert re.search(rf"\b{widget}\b", body), f"{connector.name}: {widget}"
    assert "requires the Choice annotation" in text and "self._widget.clear()" in text


def test_the_catalog_schema_is_the_newest_of_the_lowest_slicer():
    schema = json.loads(_git_file("PEFTADAPT_SLICER_SOURCE", slicer_api.SLICER_TAG, slicer_api.CATALOG_SCHEMA.path))
    assert set(schema["properties"]) == slicer_api.CATALOG_FIELDS and schema["additionalProperties"] is False
    listing = subprocess.run(["git", "-C", os.environ["PEFTADAPT_SLICER_SOURCE"], "ls-tree", "--name-only",
                              f"{slicer_api.SLICER_TAG}:Schemas"], capture_output=True, text=True).stdout.split()
    catalog = sorted(name for name in listing if name.startswith("slicer-extension-catalog-entry-schema"))
    assert catalog[-1] == Path(slicer_api.CATALOG_SCHEMA.path).name


def test_the_slicer_version_facts_the_module_relies_on():
    """Python 3.9 in 5.8, 3.12 in 5.10; slicer.packaging from 5.12; Logic.__init__ calls super().__init__() bare."""
    def python(tag):
        text = _git_file("PEFTADAPT_SLICER_SOURCE", tag, "CMakeLists.txt")
        return re.search(r'set\(Slicer_REQUIRED_PYTHON_VERSION "(\d+\.\d+)', text).group(1)

    assert python("v5.8.1") == "3.9" and python(slicer_api.SLICER_TAG) == "3.12"
    checkout = os.environ["PEFTADAPT_SLICER_SOURCE"]
    has_packaging = lambda tag: subprocess.run(  # noqa: E731
        ["git", "-C", checkout, "cat-file", "-e", f"{tag}:Base/Python/slicer/packaging.py"]).returncode == 0
    assert not has_packaging(slicer_api.SLICER_TAG) and has_packaging("v5.12.0")
    module = _git_file("PEFTADAPT_SLICER_SOURCE", slicer_api.SLICER_TAG, "Base/Python/slicer/ScriptedLoadableModule.py")
    logic = module.split("class ScriptedLoadableModuleLogic", 1)[1].split("def getParameterNode", 1)[0]
    assert "super().__init__()" in logic
