"""Every tensor the project creates follows its inputs' device, so a GPU worker never mixes CPU and CUDA tensors.

A CPU-only torch cannot run a module on a fake CUDA device (FakeTensorMode aborts in the device guard), so the
check that runs everywhere is static: a tensor factory in invgan_core/ or jobs/ takes its device from an input
(`device=...`, or `.to(<device>)` on the new tensor at once), or carries a comment on its line (or the line
above) saying why it is CPU-only. The CUDA tests of every defense and attack run where a GPU exists."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FACTORIES = {
    "zeros", "ones", "empty", "full", "arange", "linspace", "eye", "tensor", "as_tensor",
    "rand", "randn", "randint", "randperm", "rand_like_never",
}  # fmt: skip
# `*_like` factories take their device from their argument; `as_tensor` of a tensor keeps its device, but of a
# list or array it lands on the CPU, so it is checked like the others.


def _factory_calls(path: Path):
    """(line, factory name, follows an input's device?) for every torch.<factory>(...) call of a file."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        name, owner = node.func.attr, node.func.value
        if name not in FACTORIES or not (isinstance(owner, ast.Name) and owner.id == "torch"):
            continue
        has_device = any(k.arg == "device" for k in node.keywords)
        up = parents.get(node)  # torch.randn(...).to(device), possibly after an arithmetic step
        while isinstance(up, ast.BinOp):
            up = parents.get(up)
        moved = isinstance(up, ast.Attribute) and up.attr == "to"
        yield node.lineno, name, has_device or moved


def _says_cpu(lines: list[str], lineno: int) -> bool:
    """A comment on the call's line or the line above that says why the tensor lives on the CPU."""
    return any("#" in line and "cpu" in line.split("#", 1)[1].lower() for line in lines[max(0, lineno - 2) : lineno])


def test_every_tensor_factory_follows_its_inputs_device_or_says_why_it_is_cpu_only():
    offenders = []
    for layer in ("invgan_core", "jobs"):
        for path in sorted((ROOT / layer).rglob("*.py")):
            lines = path.read_text().splitlines()
            for lineno, name, follows in _factory_calls(path):
                if not follows and not _says_cpu(lines, lineno):
                    offenders.append(f"{path.relative_to(ROOT)}:{lineno}: torch.{name}(...) without device=")
    assert not offenders, (
        "tensors created on the CPU whatever the inputs' device (give device=x.device, or a comment saying "
        "why the tensor is CPU-only):\n" + "\n".join(offenders)
    )


def test_the_static_check_finds_a_cpu_tensor_written_through_cuda_indices(tmp_path):
    """The pattern the check exists for (`_Result.best` in inversion.py before the fix): a buffer created on the
    CPU and filled with tensors of the inputs' device. The check must flag it, and accept the fixed forms."""
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\ndef f(x):\n    best = torch.zeros(len(x), dtype=torch.int64)\n    return best\n")
    good = tmp_path / "good.py"
    good.write_text(
        "import torch\ndef f(x, g):\n"
        "    a = torch.zeros(len(x), device=x.device)\n"
        "    b = (torch.randn(3, generator=g) * 2).to(x.device)\n"
        "    c = torch.arange(3)  # CPU: indices into a CPU array\n"
        "    return a, b, c\n"
    )
    assert [(n, f) for _, n, f in _factory_calls(bad)] == [("zeros", False)]
    lines = good.read_text().splitlines()
    assert all(f or _says_cpu(lines, n) for n, _, f in _factory_calls(good))
