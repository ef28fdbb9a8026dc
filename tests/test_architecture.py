"""The package's shape, from its source: no import circle, the model layer below the stages
that use it, files and functions a reader can hold in their head."""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "stevs"
#: stages above the model layer: ``stevs.models`` imports none of them
ABOVE_MODELS = ("stevs.train", "stevs.training", "stevs.baselines", "stevs.predict",
                "stevs.predict_slide", "stevs.embed")  # fmt: skip
MAX_FILE_LINES = 700
MAX_FUNCTION_STATEMENTS = 60


def _modules() -> dict[str, Path]:
    """Module name -> file, for every module of the package."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The package module an import names (``stevs.a.b.func`` -> ``stevs.a.b``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, at module level or inside functions."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                found = _resolve(target, modules) if target.startswith("stevs") else None
                # a package's own __init__ is not a dependency of its submodules
                if found and found != name and not name.startswith(found + "."):
                    graph[name].add(found)
    return graph


def test_the_import_graph_has_no_circle():
    graph = import_graph()
    assert len(graph) > 40 and "stevs.models.factory" in graph["stevs.training.fold"]
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as err:
        pytest.fail(f"import circle: {' -> '.join(err.args[1])}")


def test_the_model_layer_imports_none_of_the_stages_above_it():
    graph = import_graph()
    layer = {name: deps for name, deps in graph.items() if name.startswith("stevs.models")}
    assert {"stevs.models.factory", "stevs.models.ridge", "stevs.models.stevs"} <= set(layer)
    for name, deps in layer.items():
        above = sorted(d for d in deps if d.startswith(ABOVE_MODELS))
        assert not above, f"{name} imports {above}"


def test_the_graph_sees_imports_inside_functions(tmp_path):
    """The checker itself: a function-level import counts like a module-level one."""
    tree = ast.parse("def f():\n    from stevs.train import run\n")
    names = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert names == ["stevs.train"]
    assert "stevs.device" in import_graph()["stevs.predict"]  # imported inside no function
    assert "stevs.training.fold" in import_graph()["stevs.predict"]  # imported inside one


def _statements(function: ast.AST) -> int:
    """Statements in a function's body, nested blocks included, nested functions not."""
    count = 0
    for child in ast.iter_child_nodes(function):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue
        if isinstance(child, ast.stmt):
            count += 1
        count += _statements(child)
    return count


def test_files_and_functions_stay_small():
    too_long, too_big = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > MAX_FILE_LINES:
            too_long.append(f"{path.name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                if _statements(node) > MAX_FUNCTION_STATEMENTS:
                    too_big.append(f"{path.name}:{node.name} {_statements(node)} statements")
    assert not too_long, too_long
    assert not too_big, too_big


def test_the_train_and_predict_commands_import_timm_only_to_build_a_backbone():
    """timm pulls torchvision and torch._dynamo (~3 s a process); a ridge job never builds a
    backbone, so loading the commands must not import it (issue 24: job cost)."""
    code = (
        "import sys; import stevs.train, stevs.predict, stevs.embed, stevs.models; "
        "print(sorted({'timm', 'torchvision'} & set(sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout
