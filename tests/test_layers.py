"""The package's import direction: every module imports only modules below its own layer (imports
inside functions and those for type annotations count too), and the server's import closure (what
runs) holds no torch.

The layers, top to bottom, are written in ``optimize/__init__.py``; ``LAYERS`` here is the same
list as a contract. Groups in one layer are siblings: neither imports the other (the server and
the build share nothing but what lies below them both).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LAYERS: list[tuple[str, ...]] = [
    ("optimize.__main__",),
    ("optimize.cli",),
    ("optimize.search",),
    ("optimize.auto",),
    ("optimize.build", "optimize.tune", "serve"),
    ("optimize.bench", "optimize.deploy", "optimize.inspect"),
    ("optimize.select", "optimize.drift"),
    ("optimize.bundle",),
    ("optimize.targets",),
    ("optimize.passes",),
    ("optimize.validate",),
    ("optimize.inputs",),
    ("optimize.environment", "optimize.quiet", "optimize.atomic", "optimize.plots", "optimize.oip"),
    ("optimize.cpu", "optimize.errors", "optimize"),
]
# What serving must never import, whatever path an import takes.
NOT_SERVED = {"torch", "torchvision", "nncf", "onnxscript", "torch_pruning", "sklearn", "transformers"}


def modules(root: Path = ROOT) -> dict[str, Path]:
    found = {}
    for package in ("optimize", "serve"):
        for path in (root / package).rglob("*.py"):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _nodes(tree: ast.AST, runtime: bool):
    """Every node of ``tree``; with ``runtime``, not those under ``if TYPE_CHECKING:`` (never run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if runtime and isinstance(child, ast.If) and ast.unparse(child.test).endswith("TYPE_CHECKING"):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def imported(source: str, name: str, is_package: bool, runtime: bool = False) -> set[str]:
    """Every module named by an import statement anywhere in ``source`` (in functions too; with
    ``runtime``, leaving out the imports for type annotations only)."""
    package = name if is_package else name.rpartition(".")[0]
    names: set[str] = set()
    for node in _nodes(ast.parse(source), runtime):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def group(module: str) -> tuple[int, str]:
    """(layer index, group prefix) of one of our modules: the longest prefix that names a group."""
    best = None
    for index, layer in enumerate(LAYERS):
        for prefix in layer:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[1])):
                best = (index, prefix)
    assert best is not None, f"{module} is in no layer: add it to LAYERS and the package docstring"
    return best


def ours(name: str, known: dict[str, Path]) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def violations(known: dict[str, Path], sources: dict[str, str]) -> list[str]:
    """``importer -> imported`` for every import that points up a layer or across to a sibling."""
    found = []
    for name, source in sorted(sources.items()):
        layer, prefix = group(name)
        for target in sorted(imported(source, name, known[name].name == "__init__.py")):
            module = ours(target, known)
            if module is None or module == name:
                continue
            other_layer, other_prefix = group(module)
            if other_prefix == prefix or other_layer > layer:
                continue
            found.append(f"{name} -> {module} ({'up a layer' if other_layer < layer else 'a sibling'})")
    return sorted(set(found))


def test_every_import_points_down():
    known = modules()
    bad = violations(known, {name: path.read_text() for name, path in known.items()})
    assert not bad, "imports against the layers (see optimize/__init__.py):\n" + "\n".join(bad)


def test_the_check_catches_an_import_that_points_up():
    known = modules()
    sources = {name: path.read_text() for name, path in known.items()}
    sources["optimize.targets.base"] += "\n\ndef _late():\n    from optimize.build.pipeline import run_build\n"
    sources["serve.app"] += "\nfrom optimize.build import prepare\n"
    assert violations(known, sources) == ["optimize.targets.base -> optimize.build.pipeline (up a layer)",
                                          "serve.app -> optimize.build (a sibling)",
                                          "serve.app -> optimize.build.prepare (a sibling)"]


def test_the_layers_name_what_exists_and_the_docstring_lists_them():
    import optimize

    known = modules()
    groups = {group(name)[1] for name in known}
    declared = {prefix for layer in LAYERS for prefix in layer}
    assert declared == groups, f"layers naming nothing: {declared - groups}"
    for layer in LAYERS:
        for prefix in layer:
            assert prefix.removeprefix("optimize.") in optimize.__doc__, prefix


def test_the_server_import_closure_holds_no_torch():
    """From ``serve`` through every import of ours (in functions too) to the third-party packages
    reached: none of the build's heavy libraries. (The server tests run it with them blocked.)"""
    known = modules()
    todo = [name for name in known if name.split(".")[0] == "serve"]
    seen, third_party, path_to = set(todo), set(), {name: name for name in todo}
    while todo:
        name = todo.pop()
        for target in imported(known[name].read_text(), name, known[name].name == "__init__.py", runtime=True):
            module = ours(target, known)
            if module is None:
                top = target.split(".")[0]
                if top and top not in sys.stdlib_module_names:
                    third_party.add(top)
                    path_to.setdefault(top, f"{path_to[name]} -> {top}")
            elif module not in seen:
                seen.add(module)
                path_to[module] = f"{path_to[name]} -> {module}"
                todo.append(module)
    reached = third_party & NOT_SERVED
    assert not reached, "\n".join(path_to[t] for t in sorted(reached))
    assert not any(m.startswith(("optimize.build", "optimize.search", "optimize.auto", "optimize.passes"))
                   for m in seen), sorted(m for m in seen if m.startswith("optimize.build"))
