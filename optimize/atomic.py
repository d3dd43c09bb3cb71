"""Atomic writes: a reader sees the old file (or folder) or the new one, never half of either.

Files are written to a temporary sibling and renamed over the target; folders are assembled in a
temporary sibling and swapped into place. Both keep the permissions a plain ``open``/``mkdir``
would give, so a bundle stays readable by the user that serves it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
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


OWNER_FILE = ".staged-by.json"  # in a staging folder until it is committed: which process fills it


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (so a reused pid is not taken for the original), where known."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def owner() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid())}


def _alive(record: dict[str, Any]) -> bool:
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return True  # unreadable: assume it is somebody's
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    start = record.get("start")
    return start is None or _process_start(pid) in (None, start)


def remove_stale_staging(parent: Path, prefix: str) -> list[tuple[Path, int]]:
    """Remove the staging folders ``parent/prefix*`` whose process, on this host, is gone (a build
    killed with SIGKILL leaves its folder). A folder of a live process, of another host or without an
    owner record is left alone. Returns (folder, pid) of each removed."""
    removed = []
    host = socket.gethostname()
    for folder in sorted(Path(parent).glob(f"{prefix}*")) if Path(parent).is_dir() else []:
        try:
            record = json.loads((folder / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(record, dict) or record.get("host") != host or _alive(record):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append((folder, record["pid"]))
    return removed


class StagedFolder:
    """``with StagedFolder(final) as folder:`` fill ``folder``; on a clean exit it replaces ``final``,
    on an error it is removed and ``final`` is untouched. The folder records its process
    (``OWNER_FILE``) until the commit, so a later writer can tell a killed writer's folder from a
    running one's."""

    def __init__(self, final: Path):
        self.final = Path(final)
        self.prefix = f".{self.final.name}.tmp-"
        self.removed_stale = remove_stale_staging(self.final.parent, self.prefix)
        self.root = staging_folder(self.final.parent, self.prefix)
        (self.root / OWNER_FILE).write_text(json.dumps(owner()))

    def commit(self) -> Path:
        (self.root / OWNER_FILE).unlink(missing_ok=True)
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
