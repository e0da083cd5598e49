"""Static checks of the Qt side that cannot run here (no Slicer GUI): the Widget uses only widgets that exist in the
.ui, every `SlicerParameterName` binds to a field of the parameter node, and the module file is valid Python for
Slicer's 3.12 (parsed, not imported — `qt`/`ctk` exist only inside Slicer)."""
from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

MODULE = Path(__file__).resolve().parents[1] / "PEFTAdapt"
SOURCE = (MODULE / "PEFTAdapt.py").read_text()
UI = ET.parse(MODULE / "Resources" / "UI" / "PEFTAdapt.ui")


def ui_widget_names() -> set[str]:
    return {w.get("name") for w in UI.iter("widget")}


def parameter_bindings() -> dict[str, str]:
    bindings = {}
    for w in UI.iter("widget"):
        for p in w.findall("property"):
            if p.get("name") == "SlicerParameterName":
                bindings[w.get("name")] = p.find("string").text
    return bindings


def parameter_fields() -> set[str]:
    tree = ast.parse(SOURCE)
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "PEFTAdaptParameterNode")
    assert any(getattr(d, "id", None) == "parameterNodeWrapper" for d in node.decorator_list)
    return {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)}


def test_every_widget_the_widget_uses_exists_in_the_ui():
    used = set(re.findall(r"self\.ui\.(\w+)", SOURCE))
    assert used, "the Widget reaches its widgets through self.ui"
    missing = used - ui_widget_names()
    assert not missing, f"widgets used in PEFTAdapt.py but absent from PEFTAdapt.ui: {sorted(missing)}"


def test_every_parameter_binding_matches_a_parameter_node_field():
    bindings = parameter_bindings()
    assert len(bindings) >= 10
    unknown = {w: p for w, p in bindings.items() if p not in parameter_fields()}
    assert not unknown, f"SlicerParameterName without a parameter-node field: {unknown}"


def test_module_has_the_four_template_classes_and_parses_for_python_312():
    tree = ast.parse(SOURCE, feature_version=(3, 10))
    classes = {n.name: [getattr(b, "id", getattr(b, "attr", "")) for b in n.bases]
               for n in tree.body if isinstance(n, ast.ClassDef)}
    assert "ScriptedLoadableModule" in classes["PEFTAdapt"]
    assert "ScriptedLoadableModuleWidget" in classes["PEFTAdaptWidget"]
    assert "ScriptedLoadableModuleLogic" in classes["PEFTAdaptLogic"]
    assert "ScriptedLoadableModuleTest" in classes["PEFTAdaptTest"]
    # user-facing strings go through Slicer's translation function
    assert "from slicer.i18n import tr as _" in SOURCE


def test_scene_connections_reach_every_node_selector():
    selectors = {w.get("name") for w in UI.iter("widget")
                 if w.get("class") in ("qMRMLNodeComboBox", "qMRMLTableView", "qMRMLSegmentEditorWidget")}
    connected = {c.findtext("receiver") for c in UI.iter("connection") if c.findtext("signal").startswith("mrmlSceneChanged")}
    assert selectors and selectors <= connected


def test_extensions_index_entry_matches_the_extension_cmake():
    """The catalog entry submitted to Slicer/ExtensionsIndex must agree with the CMake metadata (the build farm reads
    one, the Extensions Manager shows the other)."""
    import json

    root = MODULE.parent
    entry = json.loads((root / "Resources" / "ExtensionsIndex" / "PEFTAdapt.json").read_text())
    cmake = dict(re.findall(r'set\((EXTENSION_\w+) "([^"]*)"\)', (root / "CMakeLists.txt").read_text()))
    assert {"$schema", "category", "scm_url"} <= entry.keys()  # the schema's required fields
    assert entry["category"] == cmake["EXTENSION_CATEGORY"]
    assert entry["build_dependencies"] == cmake["EXTENSION_DEPENDS"].split()
    assert entry["scm_url"].removesuffix(".git") == cmake["EXTENSION_HOMEPAGE"]
