"""Resolving ``module:function`` and ``path/to/file.py:function``: the user's architecture
factories (``--arch``) and data callables (``--calib module:function``).

A dotted module resolves against the current directory first, as ``python -m`` would: a user's
own ``models.py`` or ``serve.py`` wins over an installed module of the same name.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterator

from optimize.errors import CheckpointError


def resolve_factory(arch: str):
    """Return the callable named by ``module:factory`` or ``path/to/file.py:factory``."""
    if ":" not in arch:
        raise CheckpointError(
            f"--arch {arch!r} must be module:factory or path/to/file.py:factory, "
            f"e.g. models.digits:DigitsNet")
    where, _, name = arch.rpartition(":")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise CheckpointError(f"--arch {arch!r}: file {where} does not exist")
        spec = importlib.util.spec_from_file_location(f"_arch_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # the user's file failed to import: say where
            raise CheckpointError(f"--arch {arch!r}: importing {where} failed: {exc}") from exc
    else:
        try:
            module = import_from_cwd_first(where)
        except ImportError as exc:
            raise CheckpointError(
                f"--arch {arch!r}: cannot import module {where!r} ({exc}); give a dotted module "
                f"on the Python path or a file path ending in .py") from exc
    factory = getattr(module, name, None)
    if factory is None or not callable(factory):
        raise CheckpointError(f"--arch {arch!r}: {where} has no callable named {name!r}")
    return factory


def _origin(module: ModuleType | importlib.machinery.ModuleSpec) -> set[Path]:
    """The file or folders a module (or a spec) comes from."""
    spec = module if isinstance(module, importlib.machinery.ModuleSpec) else getattr(module, "__spec__", None)
    if spec is None:
        return set()
    places = {Path(spec.origin).resolve()} if spec.origin and spec.origin not in ("built-in", "frozen") else set()
    return places | {Path(p).resolve() for p in (spec.submodule_search_locations or [])}


@contextlib.contextmanager
def _modules_set_aside(top: str) -> Iterator[None]:
    """``top`` and its submodules are out of ``sys.modules`` for the block and put back after; what
    the block imported under those names is dropped again."""
    ours = lambda name: name == top or name.startswith(top + ".")  # noqa: E731
    saved = {name: sys.modules.pop(name) for name in [n for n in sys.modules if ours(n)]}
    try:
        yield
    finally:
        for name in [n for n in sys.modules if ours(n)]:
            del sys.modules[name]
        sys.modules.update(saved)


def import_from_cwd_first(where: str) -> ModuleType:
    """Import dotted module ``where`` as ``python -m`` would from the current directory: a top-level
    module or package found here wins over one installed or already imported under the same name."""
    cwd = os.getcwd()
    top = where.split(".")[0]
    spec = importlib.machinery.PathFinder.find_spec(top, [cwd])
    if spec is None:
        return importlib.import_module(where)
    loaded = sys.modules.get(top)
    if loaded is None or _origin(loaded) & _origin(spec):
        if sys.path[:1] not in ([cwd], [""]):
            sys.path.insert(0, cwd)
        return importlib.import_module(where)
    # Another module of that name is imported already (one of ours, in this process): the user's is
    # imported beside it, and the one already imported stays what every other import sees.
    with _modules_set_aside(top):
        sys.path.insert(0, cwd)
        try:
            return importlib.import_module(where)
        finally:
            sys.path.remove(cwd)
