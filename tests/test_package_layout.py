"""The shape of the package, kept: dependencies point down, no import circle, files a reader can hold."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nar_diffusers"
CORE = ("models", "schedulers", "pipelines", "loaders")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every `nar_diffusers` module a file imports (at any level: function-local imports count too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("nar_diffusers"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("nar_diffusers"):
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in node.names)
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    return {m for m in found if m in modules and m != name}


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_no_file_of_the_package_is_over_500_lines():
    long = {name: n for name, p in MODULES.items() if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500}
    assert long == {}


@pytest.mark.parametrize("area", CORE)
def test_the_core_never_imports_the_package_top_level(area):
    offenders = [name for name, path in MODULES.items()
                 if name.startswith(f"nar_diffusers.{area}") and "nar_diffusers" in imported_modules(path)]
    assert offenders == []


def test_the_model_and_the_schedulers_share_the_order_tables_and_the_model_imports_no_scheduler():
    allowed = {"nar_diffusers.schedulers.token_order", "nar_diffusers.schedulers.sampling"}
    for name, path in MODULES.items():
        if name.startswith("nar_diffusers.models"):
            assert {m for m in imported_modules(path) if m.startswith("nar_diffusers.schedulers")} <= allowed, name
        if name.startswith("nar_diffusers.schedulers"):
            assert not [m for m in imported_modules(path) if not m.startswith("nar_diffusers.schedulers")], name


def test_nothing_used_at_inference_imports_the_tools_or_the_training_package():
    for name, path in MODULES.items():
        if name.startswith(tuple(f"nar_diffusers.{area}" for area in CORE)):
            bad = [m for m in imported_modules(path) if m.startswith(("nar_diffusers.commands", "nar_diffusers.training"))]
            assert bad == [], name


def test_there_is_no_import_circle():
    graph = {name: {m for m in imported_modules(path) if not m.endswith("__init__")} for name, path in MODULES.items()}
    # A package's __init__ importing its own submodules is not a circle; submodule -> own package __init__ is.
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in graph.get(node, ()):
            if nxt.startswith(node + ".") or node.startswith(nxt + "."):
                continue  # a package and its own submodules
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])
    assert cycles == []
