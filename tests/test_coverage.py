"""What an engine really computes in: read back from the engine, named truthfully, checked at serve."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from optimize.targets.coverage import Coverage, Layer, describe, differences, label, problem, summary
from support import run_cli


def record(macs: dict[str, int], weights: dict[str, int]) -> dict:
    layers = [Layer(f"l{i}", "Conv", precision, count) for i, (precision, count) in enumerate(macs.items())]
    return Coverage("test", layers, weights).to_json()


def test_names_follow_what_the_engine_computes():
    static = record({"int8": 970, "fp32": 30}, {"int8": 900, "fp32": 100})
    assert static["macs_pct"] == {"int8": 97.0, "fp32": 3.0} and static["weight_bytes_pct"] == {"int8": 90.0, "fp32": 10.0}
    assert summary("int8", "static", static) == "97% of MACs in INT8" and problem("int8", "static", static) is None
    weights = record({"fp32": 1000}, {"int8": 710, "fp32": 290})
    assert label("int8", "weights", weights) == "int8 weights, fp32 compute"
    assert summary("int8", "weights", weights) == "71% of weight bytes INT8" and problem("int8", "weights", weights) is None
    # A static graph whose every quantized op runs in float is its FP32 graph, whatever it was asked for.
    float_graph = record({"fp32": 1000}, {"int8": 500, "fp32": 500})
    assert "no layer computes in INT8 (100% of MACs in FP32)" in problem("int8", "static", float_graph)
    assert "no weights are stored in INT8" in problem("int8", "weights", record({"fp32": 10}, {"fp32": 10}))
    # BF16 that runs FP32 kernels is not BF16; FP32 that runs BF16 kernels is not FP32.
    assert problem("bf16", None, record({"fp32": 900, "bf16": 100}, {"fp32": 1})) == \
        "not BF16: 90% of MACs in FP32, 10% in BF16"
    assert problem("fp32", None, record({"fp32": 900, "bf16": 100}, {"fp32": 1})).startswith("not FP32")
    assert problem("bf16", None, record({"bf16": 1000}, {"fp32": 1})) is None
    assert problem("fp32", None, record({"fp32": 1000}, {"fp32": 1})) is None
    # A bundle moved to a machine that runs another precision is told apart; noise of a few points is not.
    here = record({"bf16": 1000}, {"fp32": 1})
    assert differences(record({"fp32": 1000}, {"fp32": 1}), here) == \
        "recorded 100% of MACs in FP32; here 100% of MACs in BF16"
    assert differences(static, record({"int8": 960, "fp32": 40}, {"int8": 1})) is None
    assert describe({}) == "no MACs" and summary("fp32", None, None) == "-"
    assert Coverage.from_json(static).to_json() == static


# The engine inspector's JSON (TensorRT 10 and 11, detailed profiling verbosity): an INT8
# convolution fused with its Q/DQ, an FP16 convolution and an FP32 matrix product.
INSPECTOR = {"Layers": [
    {"Name": "conv1.weight + QuantizeLinear_3 + Conv_5", "LayerType": "CaskConvolution",
     "Inputs": [{"Name": "x_q", "Dimensions": [1, 3, 32, 32],
                 "Format/Datatype": "Four wide channel vectorized row major Int8 format"}],
     "Outputs": [{"Name": "c1", "Dimensions": [1, 16, 32, 32],
                  "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}],
     "ParameterType": "Convolution", "Kernel": [3, 3], "OutMaps": 16, "Groups": 1,
     "Weights": {"Type": "Int8", "Count": 432}, "Bias": {"Type": "Float", "Count": 16},
     "TacticName": "sm80_xmma_fprop_implicit_gemm_i8i8_i8i32_f32"},
    {"Name": "Conv_9", "LayerType": "CaskConvolution",
     "Inputs": [{"Name": "c1", "Dimensions": [1, 16, 32, 32],
                 "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],
     "Outputs": [{"Name": "c2", "Dimensions": [1, 16, 32, 32], "Format/Datatype": "Row major linear FP16 format"}],
     "ParameterType": "Convolution", "Kernel": [3, 3], "OutMaps": 16, "Groups": 16,
     "Weights": {"Type": "Half", "Count": 144}, "Bias": {"Type": "Half", "Count": 16}},
    {"Name": "Reformatting CopyNode for Input Tensor 0 to MatMul_12", "LayerType": "Reformat",
     "Inputs": [{"Name": "c2", "Dimensions": [1, 16, 32, 32], "Format/Datatype": "Row major linear FP16 format"}],
     "Outputs": [{"Name": "r", "Dimensions": [1, 16, 32, 32], "Format/Datatype": "Row major linear FP32"}],
     "ParameterType": "Reformat"},
    {"Name": "MatMul_12", "LayerType": "CaskGemmMatrixMultiply",
     "Inputs": [{"Name": "r", "Dimensions": [1, 16, 1024], "Format/Datatype": "Row major linear FP32"},
                {"Name": "w", "Dimensions": [1024, 10], "Format/Datatype": "Row major linear FP32"}],
     "Outputs": [{"Name": "y", "Dimensions": [1, 16, 10], "Format/Datatype": "Row major linear FP32"}],
     "ParameterType": "MatrixMultiply", "TacticName": "sm80_xmma_gemm_f32f32_f32f32_f32"},
]}


def test_tensorrt_layers_are_read_from_the_engine_inspector():
    from optimize.errors import BundleError
    from optimize.targets.tensorrt import inspector_layers

    layers, stored = inspector_layers(INSPECTOR)
    assert [(layer.precision, layer.macs) for layer in layers] == [
        ("int8", 16 * 32 * 32 * 27), ("fp16", 16 * 32 * 32 * 9), ("fp32", 16 * 10 * 1024)]
    assert layers[0].kernel.startswith("sm80_xmma") and layers[1].kernel is None
    assert stored == {"int8": 432, "fp32": 16 * 4 + 0, "fp16": (144 + 16) * 2}
    with pytest.raises(BundleError, match="without detailed profiling verbosity"):
        inspector_layers({"Layers": ["Conv_5", "MatMul_12"]})


@pytest.mark.slow
def test_a_scheme_that_quantizes_nothing_fails_with_that_said(tiny_checkpoint, tmp_path):
    """The tiny CNN's only Linear layer has 80 weights: weight-only INT8 would leave the FP32 graph."""
    t = tiny_checkpoint
    result = run_cli("build", t["ckpt"], "--arch", t["arch"], "--calib", t["calib"], "--target", "ort-int8",
                     "--int8-scheme", "weights", "--out", tmp_path / "b")
    assert result.returncode != 0
    assert "weights: no MatMul/Gemm weights to quantize in this model" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_serve_warns_when_the_engine_runs_another_precision_than_recorded(bundles, tmp_path, caplog):
    """A bundle moved to a machine whose engine computes otherwise (here: its record says BF16)."""
    from serve.server import ServeConfig, create_service

    from support import SERVED

    bundle = bundles.copy(tmp_path / "moved", *SERVED)
    manifest = json.loads((bundle / "manifest.json").read_text())
    recorded = manifest["targets"]["ort-fp32"]["coverage"]
    assert recorded["macs_pct"] == {"fp32": 100.0}
    manifest["targets"]["ort-fp32"]["coverage"] = {**recorded, "macs_pct": {"bf16": 100.0}}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING):
        app = create_service(ServeConfig(bundle, target="ort-fp32", drift=False))
    try:
        warned = [r.getMessage() for r in caplog.records if "another precision" in r.getMessage()]
        assert warned and "recorded 100% of MACs in BF16; here 100% of MACs in FP32" in warned[0], warned
        assert app.precision_read.startswith("100% of MACs in FP32")
    finally:
        app.batcher.close()


@pytest.mark.slow
def test_bf16_reexport_turns_the_dtypes_a_graph_names(tmp_path):
    """What failed on MiniLM: attention computed with ``softmax(dtype=float32).to(query.dtype)``,
    which ``torch.export`` records as a cast to float32; cast to BF16 too, every matrix product
    takes BF16 on both sides."""
    import torch

    from optimize.inputs.calibration import Samples
    from optimize.targets.torch_compile import _reexport, program_coverage

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(8, 24)

        def forward(self, x):
            q, k, v = self.qkv(x).chunk(3, -1)
            weights = torch.softmax(q @ k.transpose(1, 2), -1, dtype=torch.float32).to(q.dtype)
            return (weights @ v).mean(1)

    torch.manual_seed(0)
    model = Attention().eval()
    x = torch.randn(4, 5, 8)
    dims = {"x": {0: torch.export.Dim("batch", max=16), 1: torch.export.Dim.AUTO}}
    with torch.no_grad():
        want = model(x).numpy()
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=dims), tmp_path / "program.pt2")
    inputs = [{"name": "x", "shape": [-1, -1, 8], "dynamic": [0, 1], "dtype": "float32"}]
    samples = Samples({"x": x.numpy()})
    with pytest.raises(RuntimeError, match="expected scalar type|expected both|same dtype"):
        # what casting the program's parameters alone does (the build's program is read from its file)
        torch.export.load(tmp_path / "program.pt2").module().to(torch.bfloat16)(x.to(torch.bfloat16))
    bf16 = _reexport(torch.export.load(tmp_path / "program.pt2"), inputs, samples, 16, "cpu", "bf16")
    with torch.no_grad():
        got = bf16.module()(x.to(torch.bfloat16)).float()
    np.testing.assert_allclose(got.numpy(), want, atol=0.05)
    coverage = program_coverage(bf16, inputs, samples, "cpu").to_json()
    assert coverage["macs_pct"] == {"bf16": 100.0} and coverage["weight_bytes_pct"] == {"bf16": 100.0}
    assert coverage["macs_total"] == 5 * 8 * 24 + 2 * 5 * 5 * 8  # one sample: projections, then two products
    assert {layer["name"] for layer in coverage["layers"]} >= {"qkv"}
