"""Cross-check against the vendor's own tool: OpenVINO's ``benchmark_app`` on the same engine files.

Run at batch 1 with the thread count and precision our Runner uses, synchronous API, latency hint:
the closest match to our one-caller batch-1 load. Its median beside ours shows whether our
measuring harness adds overhead.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

MEDIAN = re.compile(r"Median:\s+([0-9.]+)\s*(ms|us|s)\b")
TO_MS = {"ms": 1.0, "us": 0.001, "s": 1000.0}
SECONDS = 5


def _tool() -> str | None:
    local = Path(sys.executable).parent / "benchmark_app"
    return str(local) if local.is_file() else shutil.which("benchmark_app")


def _shape_arg(manifest: dict[str, Any], bundle: Path) -> str:
    import numpy as np

    held = np.load(bundle / "data" / "heldout.npz")
    parts = []
    for spec in manifest["inputs"]:
        shape = [1, *held[spec["name"]].shape[1:]]
        parts.append(f"{spec['name']}[{','.join(str(d) for d in shape)}]")
    return ",".join(parts)


def openvino_benchmark_app(bundle: Path, manifest: dict[str, Any], engines: dict[str, dict[str, Any]],
                           say: Callable[[str], None]) -> dict[str, Any]:
    """``{target: {benchmark_app_p50_ms, ours_p50_ms, ratio}}`` for every OpenVINO target measured."""
    targets = [n for n in engines if n.startswith("openvino-")]
    if not targets:
        return {}
    tool = _tool()
    if tool is None:
        return {"skipped": "benchmark_app is not installed (it ships with the openvino package)"}
    threads = manifest["runner_config"].get("threads") or 0
    results: dict[str, Any] = {}
    for name in targets:
        model = bundle / manifest["targets"][name]["folder"] / "model.xml"
        command = [tool, "-m", str(model), "-d", "CPU", "-hint", "latency", "-api", "sync",
                   "-t", str(SECONDS), "-shape", _shape_arg(manifest, bundle), "-infer_precision", "f32"]
        if threads:
            command += ["-nthreads", str(threads)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=SECONDS * 6 + 60)
        except subprocess.TimeoutExpired:
            results[name] = {"error": "benchmark_app timed out"}
            continue
        match = MEDIAN.search(done.stdout)
        if done.returncode != 0 or not match:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            results[name] = {"error": f"benchmark_app failed: {tail[0]}"}
            continue
        ours = next((p["p50_ms"] for p in engines[name]["points"] if p["load"] == "batch=1"), None)
        theirs = float(match.group(1)) * TO_MS[match.group(2)]
        results[name] = {"benchmark_app_p50_ms": theirs, "ours_p50_ms": ours,
                         "ours_over_benchmark_app": ours / theirs if ours and theirs else None,
                         "command": " ".join(command[1:])}
        say(f"{name}: benchmark_app median {theirs:.3f} ms, ours {ours:.3f} ms" if ours else
            f"{name}: benchmark_app median {theirs:.3f} ms")
    return results
