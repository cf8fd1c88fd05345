"""The package's layering, read from its source: Ray only in the Ray layer, no arrow from the core
up into the glue, no import cycles, light subpackage ``__init__`` files."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[3] / "mvtec_ray"
RAY_LAYER = ("distributed",)  # plus the command line, which connects and hands over
STAGES = ("data", "features", "detectors", "evaluation", "fit", "report", "deploy", "distributed")


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(("mvtec_ray",) + (parts[:-1] if parts[-1] == "__init__" else parts))
        found[name] = ast.parse(path.read_text(), str(path))
    return found


def imported(tree: ast.Module, top_level_only: bool = False) -> set[str]:
    """Absolute names of the modules ``tree`` imports (anywhere, or at module level only)."""
    nodes = tree.body if top_level_only else ast.walk(tree)
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"relative import of {node.module!r}: the package uses absolute imports"
            out.add(node.module or "")
            out |= {f"{node.module}.{alias.name}" for alias in node.names}
    return out


def in_ray_layer(module: str) -> bool:
    return module == "mvtec_ray.cli" or any(module.startswith(f"mvtec_ray.{p}.") or module == f"mvtec_ray.{p}"
                                            for p in RAY_LAYER)


def test_only_the_ray_layer_imports_ray():
    offenders = sorted(f"{name} imports {dep}" for name, tree in modules().items() if not in_ray_layer(name)
                       for dep in imported(tree) if dep == "ray" or dep.startswith("ray."))
    assert not offenders, "Ray outside mvtec_ray/distributed/ and the CLI:\n" + "\n".join(offenders)


def test_the_core_never_imports_the_ray_layer():
    offenders = sorted(f"{name} imports {dep}" for name, tree in modules().items() if not in_ray_layer(name)
                       for dep in imported(tree) if dep.startswith("mvtec_ray.distributed"))
    assert not offenders, "the numerical core reaches up into the Ray glue:\n" + "\n".join(offenders)


def test_no_import_cycles_at_module_level():
    trees = modules()
    graph = {name: {dep for dep in imported(tree, top_level_only=True) if dep in trees and dep != name}
             for name, tree in trees.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name)):
            raise AssertionError("import cycle: " + " -> ".join(cycle))


def test_stage_packages_exist_and_their_init_files_hold_only_a_docstring():
    for stage in STAGES:
        init = PACKAGE / stage / "__init__.py"
        assert init.is_file(), f"missing stage package {stage}/"
        body = ast.parse(init.read_text()).body
        assert len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant), \
            f"{stage}/__init__.py must hold a docstring and nothing else (the fit driver stays light)"


def test_the_checks_can_fail(tmp_path):
    """The import reader sees a function-level ``import ray`` and a ``from ray.data import`` alike."""
    tree = ast.parse("def f():\n    import ray\n\nfrom ray.data import DataContext\n")
    assert {"ray", "ray.data"} <= imported(tree)
    assert not in_ray_layer("mvtec_ray.detectors.patch") and in_ray_layer("mvtec_ray.distributed.cluster")
