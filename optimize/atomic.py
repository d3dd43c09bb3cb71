"""Atomic writes: a reader sees the old file (or folder) or the new one, never half of either.

Files are written to a temporary sibling and renamed over the target; folders are assembled in a
temporary sibling and swapped into place. Both keep the permissions a plain ``open``/``mkdir``
would give, so a bundle stays readable by the user that serves it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        Path(tmp).chmod(0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def staging_folder(parent: Path, prefix: str) -> Path:
    """A fresh temporary folder in ``parent`` with the permissions of a plain ``mkdir``
    (``mkdtemp`` makes it private)."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    folder.chmod(0o777 & ~umask())
    return folder


def replace_folder(staged: Path, final: Path) -> Path:
    """Swap the complete folder ``staged`` into ``final``; an old ``final`` is removed after the swap."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(staged, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


class StagedFolder:
    """``with StagedFolder(final) as folder:`` fill ``folder``; on a clean exit it replaces ``final``,
    on an error it is removed and ``final`` is untouched."""

    def __init__(self, final: Path):
        self.final = Path(final)
        self.root = staging_folder(self.final.parent, f".{self.final.name}.tmp-")

    def commit(self) -> Path:
        return replace_folder(self.root, self.final)

    def abort(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Path:
        return self.root

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
