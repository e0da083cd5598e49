"""The code runs on the oldest Python it claims, checked with the parser of this Python (CI has one interpreter).

- The engine (`PEFTAdaptLib`, `requires-python` in pyproject.toml) and the panel's engine side: Python 3.10, which
  covers the supported Slicer range (5.10 and later ship Python 3.12). Syntax is parsed with `feature_version`, and
  standard-library names added after 3.10 are refused, since the parser does not see those.
- The module file `PEFTAdapt/PEFTAdapt.py` itself: Python 3.9, because Slicer 5.6/5.8 (Python 3.9) must be able to
  load it and say which Slicer it needs; so no annotation evaluated at run time may use `X | Y`.
"""
from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_FILE = ROOT / "PEFTAdapt" / "PEFTAdapt.py"

#: standard-library names new in Python 3.11 or 3.12 (module → names; "*" for a whole new module)
NEWER_THAN_310 = {
    "tomllib": {"*"}, "wsgiref.types": {"*"},
    "typing": {"Self", "LiteralString", "Never", "assert_never", "assert_type", "reveal_type", "Required",
               "NotRequired", "Unpack", "TypeVarTuple", "dataclass_transform", "override", "TypeAliasType",
               "get_overloads", "clear_overloads"},
    "datetime": {"UTC"}, "enum": {"StrEnum", "ReprEnum", "EnumCheck", "verify", "member", "nonmember",
                                  "global_enum", "show_flag_values"},
    "itertools": {"batched"}, "hashlib": {"file_digest"}, "contextlib": {"chdir"}, "operator": {"call"},
    "math": {"cbrt", "exp2"}, "asyncio": {"TaskGroup", "timeout", "Runner"}, "sys": {"exception"},
    "inspect": {"markcoroutinefunction", "getmembers_static"}, "logging": {"getLevelNamesMapping"},
}
NEWER_BUILTINS = {"ExceptionGroup", "BaseExceptionGroup"}


def lowest_python(pyproject: Path = ROOT / "pyproject.toml") -> tuple[int, int]:
    spec = tomllib.loads(pyproject.read_text())["project"]["requires-python"]
    major, minor = re.fullmatch(r">=\s*(\d+)\.(\d+)", spec).groups()
    return int(major), int(minor)


def newer_names(tree: ast.Module) -> list[str]:
    found, modules = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if NEWER_THAN_310.get(alias.name) == {"*"}:
                    found.append(f"import {alias.name} (line {node.lineno})")
                modules[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = NEWER_THAN_310.get(node.module, set())
            found += [f"from {node.module} import {a.name} (line {node.lineno})" for a in node.names
                      if "*" in names or a.name in names]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.attr in NEWER_THAN_310.get(modules.get(node.value.id, ""), set()):
            found.append(f"{modules[node.value.id]}.{node.attr} (line {node.lineno})")
        elif isinstance(node, ast.Name) and node.id in NEWER_BUILTINS:
            found.append(f"{node.id} (line {node.lineno})")
    return found


def engine_files() -> list[Path]:
    return sorted((ROOT / "PEFTAdaptLib").rglob("*.py"))


def test_the_engine_claims_the_python_the_supported_slicers_ship():
    assert lowest_python() == (3, 10)  # Slicer 5.10+ ship 3.12; the command line keeps 3.10 and 3.11 users


@pytest.mark.parametrize("path", engine_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_engine_file_is_valid_for_the_lowest_python(path):
    tree = ast.parse(path.read_text(), filename=str(path), feature_version=lowest_python())
    assert not newer_names(tree), newer_names(tree)


def test_the_check_refuses_what_the_lowest_python_lacks():
    with pytest.raises(SyntaxError):
        ast.parse("try:\n    pass\nexcept* ValueError:\n    pass\n", feature_version=(3, 10))
    assert newer_names(ast.parse("import tomllib\nfrom typing import Self\nimport datetime\nx = datetime.UTC\n")) \
        == ["import tomllib (line 1)", "from typing import Self (line 2)", "datetime.UTC (line 4)"]


def runtime_unions(tree: ast.Module) -> list[int]:
    """Lines where `X | Y` is evaluated at run time on Python 3.9: in function signatures, or anywhere outside the
    block that runs only on a supported Slicer (`if not UNSUPPORTED:`)."""
    gated = set()
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "not UNSUPPORTED":
            gated |= {n.lineno for n in ast.walk(node) if hasattr(n, "lineno")}
    lines = []
    for node in ast.walk(tree):
        annotations = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            annotations = [a.annotation for a in arguments if a.annotation] + ([node.returns] if node.returns else [])
        elif isinstance(node, ast.AnnAssign) and node.lineno not in gated:
            annotations = [node.annotation]
        for annotation in annotations:
            lines += [n.lineno for n in ast.walk(annotation)
                      if isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr)]
    return lines


def test_the_module_file_loads_on_the_python_of_older_slicers():
    source = MODULE_FILE.read_text()
    tree = ast.parse(source, feature_version=(3, 9))
    assert "from __future__ import annotations" not in source  # the parameter node reads real annotations
    assert not runtime_unions(tree)
    assert not newer_names(tree)
    assert runtime_unions(ast.parse("def f(x: int | None) -> str | None: pass")) == [1, 1]
