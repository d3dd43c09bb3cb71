"""Cross-check against the vendors' own tools (OpenVINO's ``benchmark_app``) on the same engine files.

Each backend that has such a tool names the command (``Backend.vendor_benchmark``): batch 1, the
thread count and precision our Runner uses, synchronous API, latency hint, the closest match to our
one-caller batch-1 load. Its median beside ours shows whether our measuring harness adds overhead.
"""

from __future__ import annotations

import logging
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from optimize.bundle.manifest import Manifest
from optimize.targets import registry

log = logging.getLogger(__name__)

MEDIAN = re.compile(r"Median:\s+([0-9.]+)\s*(ms|us|s)\b")
TO_MS = {"ms": 1.0, "us": 0.001, "s": 1000.0}
SECONDS = 5


def _shape_arg(manifest: Manifest, bundle: Path) -> str:
    held = np.load(bundle / "data" / "heldout.npz")
    parts = []
    for spec in manifest.inputs:
        shape = [1, *held[spec.name].shape[1:]]
        parts.append(f"{spec.name}[{','.join(str(d) for d in shape)}]")
    return ",".join(parts)


def _run(command: list[str]) -> tuple[float | None, str | None]:
    """(the tool's median in ms, None) or (None, why it failed)."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=SECONDS * 6 + 60)
    except subprocess.TimeoutExpired:
        return None, f"{Path(command[0]).name} timed out"
    match = MEDIAN.search(done.stdout)
    if done.returncode != 0 or not match:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return None, f"{Path(command[0]).name} failed: {tail[0]}"
    return float(match.group(1)) * TO_MS[match.group(2)], None


def vendor_benchmarks(bundle: Path, manifest: Manifest, engines: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``{target: {benchmark_app_p50_ms, ours_p50_ms, ours_over_benchmark_app, command}}`` for every
    measured target whose backend has a vendor tool; ``{target: {"skipped": why}}`` when it is missing."""
    threads = manifest.runner_config.threads or 0
    results: dict[str, Any] = {}
    for name in engines:
        if name not in registry.TARGETS:
            continue  # the torch baseline and a server are not engines of a backend
        backend = registry.facts(name)
        command = backend.vendor_benchmark(bundle / manifest.targets[name].folder, _shape_arg(manifest, bundle),
                                           threads, SECONDS)
        if command is None:
            continue
        if isinstance(command, str):
            results[name] = {"skipped": command}
            continue
        theirs, error = _run(command)
        if error:
            results[name] = {"error": error}
            continue
        ours = next((p["p50_ms"] for p in engines[name]["points"] if p["load"] == "batch=1"), None)
        results[name] = {"benchmark_app_p50_ms": theirs, "ours_p50_ms": ours,
                         "ours_over_benchmark_app": ours / theirs if ours and theirs else None,
                         "command": " ".join(command[1:])}
        log.info(f"{name}: benchmark_app median {theirs:.3f} ms, ours {ours:.3f} ms" if ours else
            f"{name}: benchmark_app median {theirs:.3f} ms")
    return results
