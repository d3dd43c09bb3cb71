"""Accuracy recovery for INT8: keep the most sensitive layers in FP32, bounded in time.

- OpenVINO: NNCF's accuracy-controlled quantization (``quantize_with_accuracy_control``) ranks
  and reverts quantizers itself against a metric on the held-out data.
- ONNX Runtime: each quantized Conv/MatMul/Gemm output is compared with the FP32 graph's on
  held-out samples; nodes are ranked by how much error they add over their inputs, and the worst
  are excluded in growing steps (1, 2, 4, ...) until the gate passes or the budget runs out.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from optimize import validate
from optimize.targets.base import BuildConfig

TIME_BUDGET_S = 300.0
SENSITIVITY_SAMPLES = 32
QUANTIZABLE = ("Conv", "MatMul", "Gemm")


def recover(plan, target: str, module: Any, config: BuildConfig, prepared, onnx_path: Path,
            key: dict, cache, built: Path, say: Callable[[str], None]) -> dict | None:
    """Return the manifest fields of a recovered engine, or None when recovery does not apply."""
    if config.int8_scheme != "static":
        return None
    if target.startswith("openvino"):
        return _recover_openvino(plan, module, config, prepared, onnx_path, key, cache, say)
    if target.startswith("ort"):
        return _recover_onnxruntime(plan, module, config, prepared, onnx_path, key, cache, built, say)
    return None


def _evaluate(plan, module: Any, folder: Path, prepared) -> tuple[dict, Any]:
    from optimize.prepare import evaluate_runner

    runner = module.load_runner(folder, plan.runner)
    result = evaluate_runner(runner, prepared, plan.max_accuracy_drop)
    return result, runner


def _recover_openvino(plan, module, config, prepared, onnx_path, key, cache, say) -> dict | None:
    first = prepared.output_names[0]
    reference = prepared.reference[first]
    items = list(prepared.held_out.batches(1))
    task = prepared.task

    def metric(outputs: list[dict[str, np.ndarray]]) -> float:
        got = np.concatenate([next(iter(o.values())) for o in outputs])
        result = validate.metrics(task, reference[:len(got)], got)
        if task == "classify":
            return result["top1_agreement_pct"] / 100
        if task == "embed":
            return result["mean_cosine"]
        return -result["max_abs_error"]

    budget = plan.max_accuracy_drop if task == "regress" else plan.max_accuracy_drop / 100
    control = module.AccuracyControl(items, metric, budget, "held-out agreement with FP32")

    def produce(folder: Path) -> dict:
        start = time.perf_counter()
        engine = module.build(onnx_path, config, prepared.calibration, folder, accuracy_control=control)
        return {"files": engine.files, "details": engine.details,
                "build_time_s": round(time.perf_counter() - start, 3)}

    folder, result = cache.run(f"target-{config.precision}-accuracy-control",
                               {**key, "accuracy_control": budget, "metric": "held-out"}, produce)
    evaluation, runner = _evaluate(plan, module, folder, prepared)
    say(f"accuracy control: {evaluation['gate']['message']}")
    return {**result, **evaluation, "cache_folder": str(folder), "runner_settings": runner.settings,
            "recovery": {"method": "nncf.quantize_with_accuracy_control"}}


def sensitivity_ranking(fp32_path: Path, int8_path: Path, feeds: list[dict[str, np.ndarray]]) -> list[tuple[str, float]]:
    """(node name, error it adds) for quantized nodes, worst first."""
    import onnx
    import onnxruntime as ort

    fp32 = onnx.load(str(fp32_path))
    nodes = [n for n in fp32.graph.node if n.op_type in QUANTIZABLE]
    produced_by = {o: n for n in fp32.graph.node for o in n.output}
    tensors = sorted({n.output[0] for n in nodes})

    def outputs_of(path: Path) -> dict[str, np.ndarray]:
        model = onnx.load(str(path))
        existing = {o.name for o in model.graph.output}
        available = {o for n in model.graph.node for o in n.output}
        for name in tensors:
            if name in available and name not in existing:
                model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs() if o.name in tensors]
        collected: dict[str, list] = {n: [] for n in names}
        for feed in feeds:
            for name, value in zip(names, session.run(names, feed)):
                collected[name].append(value)
        return {k: np.concatenate(v) for k, v in collected.items()}

    ref, got = outputs_of(fp32_path), outputs_of(int8_path)

    def error(name: str) -> float:
        if name not in ref or name not in got:
            return 0.0
        r, g = ref[name].astype(np.float64), got[name].astype(np.float64)
        return float(np.linalg.norm(r - g) / max(np.linalg.norm(r), 1e-12))

    def upstream_error(node) -> float:
        # Error already present at the node's input: nearest tracked producers upstream.
        seen, frontier, worst = set(), list(node.input), 0.0
        while frontier:
            name = frontier.pop()
            if name in seen:
                continue
            seen.add(name)
            if name in ref:
                worst = max(worst, error(name))
            elif name in produced_by:
                frontier.extend(produced_by[name].input)
        return worst

    ranked = [(n.name, error(n.output[0]) - upstream_error(n)) for n in nodes]
    return sorted(ranked, key=lambda item: item[1], reverse=True)


def _recover_onnxruntime(plan, module, config, prepared, onnx_path, key, cache, built, say) -> dict | None:
    import dataclasses

    count = min(SENSITIVITY_SAMPLES, len(prepared.held_out))
    feeds = list(prepared.held_out.take(np.arange(count)).batches(8))
    ranking = sensitivity_ranking(onnx_path, built / "model.onnx", feeds)
    deadline = time.monotonic() + TIME_BUDGET_S
    best = None
    k = 1
    while k <= len(ranking) and time.monotonic() < deadline:
        keep = tuple(name for name, _ in ranking[:k])
        trial = dataclasses.replace(config, keep_fp32=keep)

        def produce(folder: Path, trial=trial) -> dict:
            start = time.perf_counter()
            engine = module.build(onnx_path, trial, prepared.calibration, folder)
            return {"files": engine.files, "details": engine.details,
                    "build_time_s": round(time.perf_counter() - start, 3)}

        folder, result = cache.run("target-ort-int8-keep", {**key, "config": trial.to_json()}, produce)
        evaluation, runner = _evaluate(plan, module, folder, prepared)
        say(f"kept {k} node(s) in FP32: {evaluation['gate']['message']}")
        best = {**result, **evaluation, "cache_folder": str(folder), "runner_settings": runner.settings,
                "build_config": trial.to_json(),
                "recovery": {"method": "exclude most sensitive nodes", "kept_fp32": list(keep),
                             "candidates": len(ranking)}}
        runner.close()
        if evaluation["gate"]["passed"]:
            return best
        k *= 2
    return best
