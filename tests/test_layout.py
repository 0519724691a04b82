"""The package's import graph: no cycles (lazy imports inside functions included), and every minirlhf import
at the top of its module, except those of the Triton kernels' module (Triton stays unimported on CPU)."""

import ast
import os

import minirlhf

ROOT = os.path.dirname(minirlhf.__file__)
# imported only when used: Triton stays unimported on CPU
TRITON_MODULES = {"minirlhf.kernels.int8_matmul", "minirlhf.kernels.nf4_matmul"}


def module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
    return rel.removesuffix(".__init__")


def imports(path: str) -> list[tuple[str, bool]]:
    """(imported minirlhf module, imported at the top level?) for every import statement in the file."""
    name = module_name(path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    tree = ast.parse(open(path, encoding="utf-8").read())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            # `from .x import y`: y is a module when a file or package of that name exists
            targets = [f"{base}.{a.name}" if is_module(f"{base}.{a.name}") else base for a in node.names]
        else:
            continue
        found += [(t, id(node) in top) for t in targets if t.split(".")[0] == "minirlhf" and t != "minirlhf"]
    return found


def is_module(name: str) -> bool:
    path = os.path.join(os.path.dirname(ROOT), *name.split("."))
    return os.path.isfile(path + ".py") or os.path.isfile(os.path.join(path, "__init__.py"))


def graph() -> dict[str, list[tuple[str, bool]]]:
    edges = {}
    for folder, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                edges[module_name(path)] = imports(path)
    return edges


def test_no_import_cycles():
    edges = {m: sorted({t for t, _ in targets if t != m}) for m, targets in graph().items()}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in edges.get(m, []):
            if state.get(t) == "open":
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert cycles == [], " ; ".join(" -> ".join(c) for c in cycles)


def test_package_imports_sit_at_the_top():
    lazy = {(m, t) for m, targets in graph().items() for t, at_top in targets if not at_top and t not in TRITON_MODULES}
    assert lazy == set(), sorted(lazy)
