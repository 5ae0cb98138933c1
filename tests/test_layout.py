"""The package's layout, checked statically: no import circle anywhere, and each stage imports only from itself and
the stages below it (calibrate -> localize -> compensate -> write -> serve -> evaluate)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "shortlvlm_vllm"
# Lowest first. A unit is a subpackage or a top-level module; it may import its own modules and any lower unit.
LAYERS = (
    {"__init__", "errors"},
    {"files", "plots", "chat", "adapters"},
    {"checkpoint"},
    {"data", "tiny_models", "models"},
    {"quantize", "serving"},
    {"prune"},
    {"evaluation", "toy"},
    {"search"},
    {"demo"},
    {"cli"},
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(module: str) -> set[str]:
    """Every package module `module` imports, at any depth of its code, with the packages that import runs."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            found |= {name for name in names if name in MODULES} or {node.module}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    found = {name for name in found if name in MODULES}
    # importing a.b.c runs a/__init__ and a/b/__init__ first (unless they hold the importer: they are running)
    parents = {".".join(name.split(".")[:i]) for name in found for i in range(1, name.count(".") + 1)}
    return (found | {p for p in parents if not module.startswith(p + ".")}) - {module}


GRAPH = {module: imports(module) for module in MODULES}


def test_no_import_circle():
    circles, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(GRAPH[module]):
            if state.get(target) == "open":
                circles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_each_stage_imports_only_itself_and_the_stages_below():
    level = {name: i for i, names in enumerate(LAYERS) for name in names}
    assert set(map(unit, MODULES)) == set(level), "every unit of the package has a layer"
    upward = [f"{module} imports {target}" for module, targets in GRAPH.items() for target in targets
              if unit(target) != unit(module) and level[unit(target)] >= level[unit(module)]]
    assert not upward, "imports against the layering: " + "; ".join(sorted(upward))


def test_the_checker_sees_function_level_imports_and_parent_packages():
    assert "shortlvlm_vllm.prune.calibrate" in GRAPH["shortlvlm_vllm.prune.pipeline"]  # imported inside a function
    assert "shortlvlm_vllm.checkpoint" in GRAPH["shortlvlm_vllm.prune.pipeline"]
