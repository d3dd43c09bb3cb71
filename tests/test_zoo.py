"""The zoo: models of many families, trained on real data, through every CPU target with default flags.

Each model must reach its FP32 quality and its exported graph must hold the operations of its
family, so it cannot quietly become a simpler model. Each cell (model x target) must be built within
the default budget, or fail as ``EXPECTED`` says, with a reason a user can act on.
"""

from __future__ import annotations

import json

import onnx
import pytest

from support import run_cli
from models import zoo

# (model, target) -> a substring of the failure reason; every other cell must be built within budget.
EXPECTED: dict[tuple[str, str], str] = {}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_zoo_model_through_every_cpu_target(name, tmp_path):
    model = zoo.ZOO[name]
    summary = zoo.make(name, tmp_path / name)
    assert summary["quality"]["score"] >= model.min_quality, summary
    out = tmp_path / "bundle"
    result = run_cli(*zoo.build_args(name, tmp_path / name, out))
    assert (out / "manifest.json").is_file(), result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    graph = onnx.load(str(out / "model.onnx")).graph
    ops: dict[str, list] = {}
    for node in graph.node:
        ops.setdefault(node.op_type, []).append(node)
    missing = [op for op in model.onnx_ops if not zoo.graph_has(ops, op)]
    assert not missing, f"{name}: the ONNX graph lacks {missing} (has {sorted(ops)})"
    assert [i.name for i in graph.input] == list(zoo.ZOO[name].data().train)
    for target in zoo.CPU_TARGETS:
        entry = manifest["targets"][target]
        expected = EXPECTED.get((name, target))
        if expected is None:
            assert entry["status"] == "built", f"{name} {target}: {entry.get('reason')}"
            assert entry["gate"]["passed"] and entry["gate"]["budget"] is not None
        else:
            assert entry["status"] == "failed" and expected in entry["reason"], entry.get("reason")
    assert result.returncode == (1 if any(k[0] == name for k in EXPECTED) else 0), result.stderr
    # Every engine's precision is read back over the same work: OpenVINO's engines count the same MACs,
    # ONNX Runtime's INT8 engine counts what one of the FP32 engines does (its FP32 layout may pad
    # channels), so no layer that multiplies is left out of the shares (a ConvTranspose fed dequantized
    # weights, an LSTM).
    totals = {t: (manifest["targets"][t].get("coverage") or {}).get("macs_total") for t in zoo.CPU_TARGETS}
    assert totals["openvino-fp32"] == totals["openvino-int8"] and totals["openvino-fp32"] > 0, totals
    assert totals["ort-int8"] in (totals["ort-fp32"], totals["openvino-fp32"]), totals
