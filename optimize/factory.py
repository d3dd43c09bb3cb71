"""Resolving ``module:function`` and ``path/to/file.py:function``: the user's architecture
factories (``--arch``) and data callables (``--calib module:function``)."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

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
            module = importlib.import_module(where)
        except ImportError as exc:
            raise CheckpointError(
                f"--arch {arch!r}: cannot import module {where!r} ({exc}); give a dotted module "
                f"on the Python path or a file path ending in .py") from exc
    factory = getattr(module, name, None)
    if factory is None or not callable(factory):
        raise CheckpointError(f"--arch {arch!r}: {where} has no callable named {name!r}")
    return factory
