"""The stage runner: each stage's output folder, keyed by what decides its content.

A ``Stage`` declares its name, the ``optimize`` modules whose code decides its output, and the
third-party packages whose versions do. ``StageCache.run(stage, inputs, config, produce)`` derives
the key from (stage name, the hashes of its input artifacts, ``config.to_json()``, the source hash
of the declared modules, those package versions); nobody assembles a key by hand. The source hash
is taken over the modules' syntax trees without docstrings, so a comment or docstring edit rebuilds
nothing and a code change rebuilds the stages that use it.

A finished stage has a folder ``<stage>-<key>`` holding its files and ``result.json``. A stage
interrupted half-way leaves only a temporary folder, which is ignored and replaced. Two processes
building the same key at once take turns on a lock per key: the second reuses the first's result.
"""

from __future__ import annotations

import ast
import dataclasses
import fcntl
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Protocol

RESULT = "result.json"


class StageConfig(Protocol):
    def to_json(self) -> dict[str, Any]: ...


@dataclasses.dataclass(frozen=True)
class Stage:
    """A cached stage: its name, the modules whose code decides its output, the packages whose
    versions do. ``tests/test_cache.py`` checks ``modules`` against the modules' real imports."""

    name: str
    modules: tuple[str, ...]
    packages: tuple[str, ...] = ()

    def code_hash(self) -> str:
        digest = hashlib.sha256()
        for module in sorted(self.modules):
            digest.update(module.encode())
            digest.update(module_source_hash(module).encode())
        return digest.hexdigest()[:16]

    def package_versions(self) -> dict[str, str | None]:
        return {name: package_version(name) for name in self.packages}


def module_path(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"stage module {module} does not exist")
    return Path(spec.origin)


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


@functools.lru_cache(maxsize=None)
def module_source_hash(module: str) -> str:
    """Hash of a module's syntax tree without docstrings (comments are not in the tree)."""
    tree = _strip_docstrings(ast.parse(module_path(module).read_text()))
    return hashlib.sha256(ast.dump(tree, include_attributes=False).encode()).hexdigest()[:16]


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except what sits under ``if TYPE_CHECKING:`` (imports for annotations)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", getattr(child.test, "attr", None)) \
                    == "TYPE_CHECKING":
                stack.extend(child.orelse)
                continue
            stack.append(child)


def _is_module(name: str) -> bool:
    """A plain module (not a package, not an attribute of a module)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ModuleNotFoundError, ValueError):
        return False
    return spec is not None and spec.submodule_search_locations is None


def imported_modules(module: str, package: str = "optimize") -> set[str]:
    """Every ``package.*`` module that ``module`` imports at run time, at the top or inside functions."""
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(module_path(module).read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found.update(n for n in names if n.split(".")[0] == package and _is_module(n))
    return found


def undeclared_imports(stage: Stage) -> dict[str, set[str]]:
    """Modules imported by a stage's declared modules but not declared: a stale-cache risk.
    This module, which only declares and runs stages, decides no stage's output."""
    declared = set(stage.modules) | {__name__}
    return {module: missing for module in stage.modules
            if (missing := imported_modules(module) - declared)}


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def stage_key(stage: Stage, inputs: dict[str, str | None], config: StageConfig) -> str:
    text = json.dumps({"stage": stage.name, "inputs": inputs, "config": config.to_json(),
                       "code": stage.code_hash(), "packages": stage.package_versions()},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


class StageCache:
    """Run a stage once per key; later runs with the same key reuse its folder."""

    def __init__(self, root: Path | None):
        self.root = Path(root) if root else None
        self.hits: list[str] = []
        self.misses: list[str] = []
        if self.root is not None:
            try:  # before any stage runs: a cache that cannot be written is the user's to fix
                (self.root / ".locks").mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                from optimize.errors import InputSpecError

                raise InputSpecError(f"the stage cache {self.root} cannot be written ({exc.strerror}): give "
                                     f"--cache-dir (or OPTIMIZE_CACHE_DIR) a folder you can write, or --no-cache") from exc

    def run(self, stage: Stage, inputs: dict[str, str | None], config: StageConfig,
            produce: Callable[[Path], dict[str, Any]], label: str | None = None) -> tuple[Path, dict[str, Any]]:
        """``produce(folder)`` writes the stage's files into ``folder`` and returns its (JSON) result.

        ``inputs`` maps each input artifact to its content hash; ``label`` names the folder
        (default: the stage's name)."""
        label = label or stage.name
        if self.root is None:
            folder = Path(tempfile.mkdtemp(prefix=f"{label}-"))
            self.misses.append(label)
            return folder, produce(folder)
        key = stage_key(stage, inputs, config)
        final = self.root / f"{label}-{key}"
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{label}-{key}", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process building this key: wait, then reuse
            cached = self._read(final)
            if cached is not None:
                self.hits.append(label)
                return final, cached
            self.misses.append(label)
            work = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{label}-{key}.tmp-"))
            try:
                result = produce(work)
                record = {"stage": stage.name, "inputs": inputs, "config": config.to_json(), "result": result}
                (work / RESULT).write_text(json.dumps(record, indent=2, default=str))
                if final.exists():
                    shutil.rmtree(final)
                os.replace(work, final)
            except BaseException:
                shutil.rmtree(work, ignore_errors=True)
                raise
        return final, result

    @staticmethod
    def _read(folder: Path) -> dict[str, Any] | None:
        try:
            return json.loads((folder / RESULT).read_text())["result"]
        except (OSError, ValueError, KeyError):
            return None  # absent, or left broken by a crash: rebuild
