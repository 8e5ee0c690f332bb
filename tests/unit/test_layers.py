"""The packages of megatron_v2pe form floors: a module imports only from its own floor or lower ones,
at top level or inside a function alike (a deferred import is still a dependency).

megatron_v2pe/configs/ holds package data (a YAML file), not code, so it has no floor.
"""

from __future__ import annotations

import ast
from pathlib import Path

import megatron_v2pe

ROOT = "megatron_v2pe"

FLOORS = [
    ROOT,  # the package's __init__: every import runs it, so it may import nothing of the project
    "errors",
    "optional_deps",
    "kernels",  # v2pe/fused.py picks the Triton rotary kernel
    "v2pe",
    "batch",
    "parallel",  # parallel imports neither model nor data; model builds on parallel's attention backends
    "model",
    "data",  # the loader reads model presets and parallel layouts
    "checkpoint",  # the on-disk format: training, conversion and evaluation all go through it
    "convert",
    "training",
    "eval",  # loads trained and converted checkpoints
]
"""Lowest first."""
FLOOR = {name: i for i, name in enumerate(FLOORS)}

def unit(module: str) -> str:
    """The floor name of a module: its top-level package or module under megatron_v2pe."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in FLOOR else ROOT


def imported_names(module: str, source: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of everything the source imports, relative imports resolved."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join([*package, *([node.module] if node.module else [])])
            names += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return sorted(names)


def upward_imports(module: str, source: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, name) of the project imports of ``module`` that reach a higher floor."""
    own = FLOOR[unit(module)]
    return [
        (line, name)
        for line, name in imported_names(module, source, is_package)
        if name.split(".")[0] == ROOT and FLOOR[unit(name)] > own
    ]


def package_modules() -> dict[str, Path]:
    package = Path(megatron_v2pe.__file__).parent
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def test_every_package_has_a_floor():
    unplaced = {m for m in package_modules() if m != ROOT and m.split(".")[1] not in FLOOR}
    assert not unplaced, f"give these a floor in FLOORS: {sorted(unplaced)}"


def test_no_module_imports_from_a_higher_floor():
    found = [
        f"{path}:{line}: {module} ({unit(module)}) imports {name} ({unit(name)})"
        for module, path in package_modules().items()
        for line, name in upward_imports(module, path.read_text(), path.name == "__init__.py")
    ]
    assert not found, "imports from a higher floor:\n" + "\n".join(found)


def test_an_upward_import_is_flagged():
    source = (
        "from megatron_v2pe.parallel.runtime import initialize\n"
        "def build():\n"
        "    from megatron_v2pe.training.train import train\n"
        "    from ..eval import generation\n"
    )
    assert upward_imports("megatron_v2pe.model.example", source) == [
        (3, "megatron_v2pe.training.train.train"),
        (4, "megatron_v2pe.eval.generation"),
    ]
    assert upward_imports("megatron_v2pe.eval.example", source) == []
