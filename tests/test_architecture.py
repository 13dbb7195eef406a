"""The layers of docs/architecture.md hold, read from the source with `ast`: each layer imports only the layers
below it, no module imports another in a circle, and imports sit at the top of the module except the heavy
or optional ones, which say why."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# each layer and the project layers it may import (docs/architecture.md)
LAYERS = {
    "invgan": {"invgan", "cluster", "tuning", "jobs", "invgan_core"},
    "cluster": {"cluster", "jobs", "invgan_core"},
    "tuning": {"tuning", "jobs", "invgan_core"},
    "jobs": {"jobs", "invgan_core"},
    "invgan_core": {"invgan_core"},
}
# what invgan_core never imports: the science runs in a notebook without a cluster or a tracking store
NOT_IN_CORE = {"ray", "mlflow", "accelerate", "optuna"}
# Heavy or optional modules a function may import where it needs them, so that importing a module (and the
# `invgan --help` front door) does not pay for them: Ray and Tune (~2 s), MLflow (~1 s), matplotlib, Accelerate,
# Optuna, tomllib (Python 3.11+ only), and the project's own layers from the front door (one layer per command).
LAZY = {"ray", "mlflow", "matplotlib", "accelerate", "optuna", "foolbox", "psutil", "rich", "tomllib"}


def _modules() -> dict[str, Path]:
    out = {}
    for layer in LAYERS:
        for path in (ROOT / layer).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def _imports(path: Path):
    """(imported module, in a function?, under TYPE_CHECKING?, line) for every import of a file."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.ImportFrom):
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module in LAYERS else [node.module or ""]
        else:
            names = [a.name for a in node.names]
        up, in_function, type_only = parents.get(node), False, False
        while up is not None:
            in_function |= isinstance(up, (ast.FunctionDef, ast.AsyncFunctionDef))
            type_only |= isinstance(up, ast.If) and "TYPE_CHECKING" in ast.unparse(up.test)
            up = parents.get(up)
        for name in names:
            yield name, in_function, type_only, node.lineno


def _target(name: str, modules: dict[str, Path]) -> str | None:
    """The project module an import names (`jobs.config.load_config` -> `jobs.config`), if any."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def test_each_layer_imports_only_the_layers_below_it():
    wrong = []
    for module, path in _modules().items():
        layer = module.split(".")[0]
        for name, _, _, line in _imports(path):
            top = name.split(".")[0]
            if top in LAYERS and top not in LAYERS[layer]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
            if layer == "invgan_core" and top in NOT_IN_CORE:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {name} (invgan_core stays plain torch)")
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_another_in_a_circle():
    """Counting imports inside functions too: a circle hidden in a function is still a circle."""
    modules = _modules()
    edges: dict[str, set[str]] = defaultdict(set)
    for module, path in modules.items():
        for name, _, type_only, _ in _imports(path):
            target = _target(name, modules)
            if target and target != module and not type_only and not module.startswith(target + "."):
                edges[module].add(target)
    circles, state, stack = [], {}, []

    def visit(u: str) -> None:
        state[u] = "open"
        stack.append(u)
        for v in sorted(edges[u]):
            if state.get(v) == "open":
                circles.append(" -> ".join(stack[stack.index(v) :] + [v]))
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = "done"

    for module in sorted(modules):
        if module not in state:
            visit(module)
    assert not circles, "\n".join(circles)


def test_imports_inside_functions_are_only_the_heavy_or_optional_ones():
    """Everything else is imported at the top of its module, where a reader looks for it. The front door
    (invgan/cli.py) imports a command's layer inside the command: `invgan --help` loads none of them."""
    modules = _modules()
    inside = []
    for module, path in modules.items():
        for name, in_function, _, line in _imports(path):
            top = name.split(".")[0]
            if not in_function or top in LAZY or (module.startswith("invgan.") and top in LAYERS):
                continue
            inside.append(f"{path.relative_to(ROOT)}:{line} imports {name} inside a function")
    assert not inside, f"{len(inside)} imports inside functions:\n" + "\n".join(inside)
