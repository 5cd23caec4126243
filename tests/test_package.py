"""The house: imgcls's modules import one way, down the pipeline, with no cycle.

A later stage may import an earlier one, never the reverse and never the interpreter; imports
inside functions count too, so a lazy import cannot hide an upward dependency.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "imgcls"

# Pipeline order, lowest first. A module may import modules of strictly lower layers only.
LAYERS = [
    {"errors"},
    {"config", "stats"},
    {"runtime", "checkpoint", "provenance", "decoding", "distributed", "augment"},
    {"cache", "calibration"},
    {"data", "models", "report", "datasets"},
    {"train"},
    {"evaluate"},
    {"predict", "rundir", "page", "calibrate"},
    {"run", "compare", "export"},
    {"verify", "sweep"},
]


def imports_of(path: Path) -> set[str]:
    """imgcls modules a file imports, wherever in the file the import stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "imgcls":
                found |= {alias.name for alias in node.names if alias.name != "__version__"}
            elif node.module.startswith("imgcls."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("imgcls.")}
    return found


def graph() -> dict[str, set[str]]:
    return {p.stem: imports_of(p) for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}


def violations(edges: dict[str, set[str]], layers: list[set[str]]) -> list[str]:
    level = {name: i for i, layer in enumerate(layers) for name in layer}
    problems = [f"{m} is in no layer of LAYERS" for m in sorted(edges) if m not in level]
    for module, targets in sorted(edges.items()):
        for target in sorted(targets):
            if module in level and level.get(target, len(layers)) >= level[module]:
                problems.append(f"{module} imports {target}, which is not below it")
    return problems


def test_every_module_imports_only_modules_below_it():
    assert violations(graph(), LAYERS) == []


def test_the_check_catches_an_upward_import_and_a_cycle():
    edges = graph()
    edges["evaluate"] = edges["evaluate"] | {"run"}  # the cycle evaluate <-> run that once existed
    assert "evaluate imports run, which is not below it" in violations(edges, LAYERS)
    edges = graph() | {"newcomer": set()}
    assert violations(edges, LAYERS) == ["newcomer is in no layer of LAYERS"]


@pytest.mark.parametrize("modules", ["imgcls.config, imgcls.errors", "imgcls.stats"])
def test_the_schema_errors_and_statistics_import_no_torch(modules):
    code = f"import sys, {modules}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent, check=True)
    assert out.stdout.strip() == "False"


# Standard modules imgcls may import that are newer than 3.8, with the version that brought them.
NEW_STDLIB = {"tomllib": (3, 11), "zoneinfo": (3, 9), "graphlib": (3, 9)}


def test_the_declared_python_is_one_the_code_runs_on():
    """pyproject's requires-python is true: every module parses at that version, every standard module
    imported exists there, and no dependency is a backport for an older Python."""
    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]
    low = tuple(int(v) for v in re.fullmatch(r">=(\d+)\.(\d+)", project["requires-python"]).groups())
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text(), feature_version=low)
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        for name in imported & set(NEW_STDLIB):
            assert NEW_STDLIB[name] <= low, f"{path.name} imports {name} (Python {NEW_STDLIB[name]}), below {low}"
    assert not [d for d in project["dependencies"] if "python_version" in d], "a backport for a Python below requires-python"
