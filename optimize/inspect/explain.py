"""``optimize explain``: every layer's error in each of a bundle's engines against the FP32 model.

Held-out samples from the bundle run through the reference (the bundle's FP32 ``model.onnx`` under
ONNX Runtime, graph optimizations off) and through each built engine opened by its Runner's
``layer_probe`` (``optimize.targets.layer_error``). Written to ``BUNDLE/explain/`` atomically:
``layers.json`` (every row of every engine), ``report.md`` and ``layer_error.png``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from optimize import atomic
from optimize.errors import OptimizeError

log = logging.getLogger(__name__)
EXPLAIN_DIR = "explain"
BATCH = 8


def held_out(bundle: Path, count: int) -> list[dict[str, np.ndarray]]:
    """Up to ``count`` of the bundle's held-out inputs, in batches."""
    path = Path(bundle) / "data" / "heldout.npz"
    if not path.is_file():
        raise OptimizeError(f"{bundle} has no held-out inputs ({path}): rebuild it with this version")
    with np.load(path) as data:
        arrays = {k: data[k][:count] for k in data.files if k != "labels"}
    total = len(next(iter(arrays.values())))
    return [{k: v[i:i + BATCH] for k, v in arrays.items()} for i in range(0, total, BATCH)]


def explain_bundle(bundle: Path, targets: list[str] | None = None, samples: int = 64) -> dict[str, Any]:
    """Measure every built (or the named) target of ``bundle``; the record ``layers.json`` holds."""
    import onnx

    from optimize.bundle.folder import cache_dir_for, read_manifest
    from optimize.targets import registry
    from optimize.environment import machine_info
    from optimize.targets.layer_error import layer_rows, measure, precision_by_node

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    folders = {t: bundle / r.folder for t, r in manifest.targets.items() if r.built}
    for target, record in manifest.targets.items():  # failed: the engine left in the stage cache
        cached = cache_dir_for(bundle) / record.cache_entry if record.cache_entry else None  # absolute: as is
        if not record.built and cached is not None and cached.is_dir():
            folders[target] = cached
    wanted = targets or list(folders)
    unknown = [t for t in wanted if t not in folders]
    if unknown:
        raise OptimizeError(f"no engine of {', '.join(unknown)} in {bundle} or its stage cache (engines: "
                            f"{', '.join(folders) or 'none'}); build it, or pass one of those to --target")
    reference = bundle / "model.onnx"
    rows = layer_rows(onnx.load(str(reference), load_external_data=False))
    batches = held_out(bundle, samples)
    engines: dict[str, Any] = {}
    for target in wanted:
        entry = manifest.targets[target]
        started = time.perf_counter()
        with registry.backend(target).runner(folders[target], manifest.runner_config) as runner:
            probe = runner.layer_probe()
            if probe is None:
                engines[target] = {"skipped": f"the {runner.settings.get('backend', target)} Runner does not expose an "
                                              f"engine's intermediate tensors (per-layer error covers ONNX Runtime "
                                              f"and OpenVINO engines)"}
                continue
            try:
                result = measure(reference, probe, batches, untouched=runner, rows=rows,
                                 threads=manifest.runner_config.threads)
            finally:
                probe.close()
        engines[target] = {"precision": entry.precision, "status": entry.status, **result.to_json(precision_by_node(rows, entry.coverage)),
                           "seconds": round(time.perf_counter() - started, 2)}
        log.info(f"{target}: {len(rows)} layers measured in {engines[target]['seconds']:.1f} s")
    return {"model": manifest.model_name, "machine": machine_info(), "samples": sum(len(next(iter(b.values())))
                                                                                  for b in batches),
            "reference": "the bundle's FP32 model.onnx under ONNX Runtime, graph optimizations off",
            "engines": engines}


def write_explain(bundle: Path, record: dict[str, Any]) -> Path:
    """``layers.json``, ``report.md`` and the plot into ``bundle/explain/``, swapped in whole."""
    from optimize.inspect.report import markdown, plot

    with atomic.StagedFolder(Path(bundle) / EXPLAIN_DIR) as staging:
        (staging / "layers.json").write_text(json.dumps(record, indent=1) + "\n")
        image = plot(record, staging / "layer_error.png")
        (staging / "report.md").write_text(markdown(record, image))
    return Path(bundle) / EXPLAIN_DIR
