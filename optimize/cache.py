"""The stage cache: each stage's output folder keyed by a hash of its inputs and config.

A stage that finished has a folder ``<stage>-<key>`` holding its files and ``result.json``. A
stage interrupted half-way leaves only a temporary folder, which is ignored and replaced, so a
rerun after a crash or a changed flag redoes only what changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

RESULT = "result.json"


def code_fingerprint() -> str:
    """Hash of this package's sources: a changed pass or backend must not reuse old results."""
    digest = hashlib.sha256()
    root = Path(__file__).parent
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def stage_key(config: dict[str, Any]) -> str:
    text = json.dumps({"code": code_fingerprint(), **config}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


class StageCache:
    """Run a stage once per key; later runs with the same key reuse its folder."""

    def __init__(self, root: Path | None):
        self.root = Path(root) if root else None
        self.hits: list[str] = []

    def run(self, stage: str, config: dict[str, Any],
            produce: Callable[[Path], dict[str, Any]]) -> tuple[Path, dict[str, Any]]:
        """``produce(folder)`` writes the stage's files into ``folder`` and returns its result."""
        if self.root is None:
            folder = Path(tempfile.mkdtemp(prefix=f"{stage}-"))
            return folder, produce(folder)
        key = stage_key(config)
        final = self.root / f"{stage}-{key}"
        result_path = final / RESULT
        if result_path.is_file():
            self.hits.append(stage)
            return final, json.loads(result_path.read_text())["result"]
        self.root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{stage}-{key}.tmp-"))
        try:
            result = produce(work)
            (work / RESULT).write_text(json.dumps({"config": config, "result": result},
                                                  indent=2, default=str))
            if final.exists():
                shutil.rmtree(final)
            os.replace(work, final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        return final, result
