"""The package's layers point one way (README, "Architecture"): no module imports from a layer above its own, and no
two modules import each other through any chain, lazy imports inside functions included."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hf_patch"

# bottom to top; modules of one rank may import each other (no circle), never a higher rank
RANKS = {
    "kernels": 0, "data": 0, "models": 0,
    "config": 1, "parallel": 1, "generation": 1, "step_graphs": 1, "decode_loop": 1,
    "loki": 2, "transnormer": 2,
    "eval": 3,
    "app": 4,
    "__init__": 5, "__main__": 5,
}
# siblings of one rank that must not import each other
APART = {frozenset({"loki", "transnormer"})}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """hf_patch modules that the file imports, at top level or inside functions (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("hf_patch")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("hf_patch"):
                submodules = {f"{target}.{a.name}" for a in node.names} & modules  # `from . import x`: module x
                found |= submodules or {target}
    return {t for t in found if t in modules and t != name}


def area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


GRAPH = {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def test_every_area_has_a_rank():
    assert {area(m) for m in GRAPH} <= set(RANKS), "a new top-level module or package needs a rank in RANKS"


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_import_from_a_layer_above(module):
    upward = [t for t in GRAPH[module] if RANKS[area(t)] > RANKS[area(module)]]
    apart = [t for t in GRAPH[module] if frozenset({area(t), area(module)}) in APART]
    assert not upward and not apart, f"{module} imports {upward + apart}"


def test_no_import_circle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    source = tmp_path / "hf_patch" / "loki" / "x.py"
    source.parent.mkdir(parents=True)
    source.write_text("from ..app import cli\ndef f():\n    from .patch import patch_loki\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "hf_patch"
    try:
        (tmp_path / "hf_patch" / "app").mkdir()
        for name in ("app/cli.py", "loki/patch.py"):
            (tmp_path / "hf_patch" / name).write_text("")
        assert imports(source) == {"hf_patch.app.cli", "hf_patch.loki.patch"}
    finally:
        PACKAGE = saved
