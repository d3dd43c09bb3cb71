"""TensorRT targets: everything up to the builder call runs here for real; the build itself where TensorRT is.

The typed graphs TensorRT 11 builds from are made and checked on CPU: the INT8 Q/DQ graph is
symmetric with zero points 0, per channel on weights, placed on the inputs TensorRT fuses, and runs
on ONNX Runtime as accurately as a static ``ort-int8`` build; the FP16 graph passes the checker and
holds only ops TensorRT takes in FP16. The engine build and run need a GPU and the ``tensorrt``
package and skip with the reason where those are missing. TensorRT is never imitated.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from optimize.inputs.calibration import Samples
from optimize.passes.precision import KEEP_FP32_OPS, TRT_FP16_OPS, fp16_graph, graph_report, qdq_graph
from optimize.targets import registry
from optimize.targets.base import BuildConfig
from optimize.targets.tensorrt import GRAPH_FILE, QDQ_FILE, compatibility_problem, prepare_graph, profile_shapes

TRT_REASON = registry.unavailable_reason("trt-int8")


def _export(model: torch.nn.Module, example: torch.Tensor, path: Path) -> Path:
    torch.onnx.export(model, example, str(path), input_names=["x"], output_names=["y"], opset_version=18,
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, dynamo=False)
    return path


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    from tiny_models import tiny_resnet

    folder = tmp_path_factory.mktemp("trt")
    onnx_path = _export(tiny_resnet(), torch.randn(1, 3, 16, 16), folder / "resnet.onnx")
    x = np.random.default_rng(0).standard_normal((64, 3, 16, 16)).astype(np.float32)
    return {"onnx": onnx_path, "folder": folder, "calib": Samples({"x": x[:48]}), "test": x[48:]}


def test_qdq_graph_is_symmetric_int8_per_channel_on_fused_inputs(resnet):
    out = resnet["folder"] / "qdq.onnx"
    details = qdq_graph(resnet["onnx"], out, resnet["calib"])
    report = graph_report(out)
    assert report["zero_points"] and all(dtype == "int8" and zero for dtype, zero in report["zero_points"])
    assert report["weights_per_channel"] and all(report["weights_per_channel"])
    graph = onnx.load(str(out)).graph
    producers = {o: n for n in graph.node for o in n.output}
    initializers = {i.name for i in graph.initializer}
    convs = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(convs) == 6 and details["quantized_weights"] == 6
    for node in convs:  # activation and weight both come through DequantizeLinear
        data, weight = (producers.get(name) for name in node.input[:2])
        assert data.op_type == "DequantizeLinear" and data.input[0] not in initializers
        assert weight.op_type == "DequantizeLinear" and weight.input[0] in initializers
        axis = next(a.i for a in weight.attribute if a.name == "axis")
        assert axis == (0 if node.op_type == "Conv" else 0)  # Gemm from Linear: transB=1, rows are outputs
    adds = [n for n in graph.node if n.op_type == "Add" and not set(n.input) & initializers]
    assert len(adds) == 2
    for add in adds:  # the skip input is quantized; the convolution's output is left to fuse with the Add
        kinds = [producers[name].op_type for name in add.input]
        assert kinds.count("DequantizeLinear") == 1
        assert "BatchNormalization" in kinds or "Conv" in kinds
    for node in graph.node:  # no Q on a convolution's output (no downsampling shortcut in this model)
        if node.op_type == "QuantizeLinear":
            source = producers.get(node.input[0])
            assert source is None or source.op_type not in ("Conv", "Gemm", "MatMul")


def test_qdq_graph_runs_on_onnxruntime_as_accurately_as_ort_int8(tmp_path):
    """Real digits: the TensorRT Q/DQ graph (FP32 elsewhere) against a static ort-int8 build of the same model."""
    from models.digits import DigitsNet, digits_split, train
    from optimize.targets.base import BuildInputs
    from optimize.targets.onnxruntime import BACKEND as ort_target

    train_x, train_y, test_x, test_y = digits_split()
    model = train(DigitsNet(), train_x, train_y, epochs=6)
    onnx_path = _export(model, torch.from_numpy(test_x[:1]), tmp_path / "digits.onnx")
    calib = Samples({"x": train_x[:256]})
    qdq_graph(onnx_path, tmp_path / "qdq.onnx", calib)
    ort_target.build(BuildInputs(onnx_path), BuildConfig(precision="int8", int8_scheme="static"), calib, tmp_path / "ort")

    def accuracy(path: Path) -> float:
        return float((_run(path, test_x).argmax(1) == test_y).mean() * 100)

    fp32, trt_qdq, ort_int8 = accuracy(onnx_path), accuracy(tmp_path / "qdq.onnx"), accuracy(tmp_path / "ort/model.onnx")
    assert fp32 > 80, fp32
    assert abs(trt_qdq - ort_int8) <= 2.0, (fp32, trt_qdq, ort_int8)
    assert trt_qdq >= fp32 - 2.0, (fp32, trt_qdq, ort_int8)


def test_fp16_graph_passes_checker_and_uses_only_ops_tensorrt_takes_in_fp16(resnet):
    out = resnet["folder"] / "fp16.onnx"
    details = fp16_graph(resnet["onnx"], out, resnet["calib"])
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    report = graph_report(out)
    assert set(report["ops"]) <= TRT_FP16_OPS, set(report["ops"]) - TRT_FP16_OPS
    assert report["initializer_types"] == ["float16"]
    assert report["inputs"] == {"x": "float32"} and report["outputs"] == {"y": "float32"}
    assert details["fp32_ops"] == ["ReduceMean"] and set(details["fp32_ops"]) <= set(KEEP_FP32_OPS)
    graph = onnx.load(str(out)).graph
    for node in graph.node:  # the convolutions really run in FP16
        if node.op_type == "Conv":
            weight = next(i for i in graph.initializer if i.name == node.input[1])
            assert weight.data_type == onnx.TensorProto.FLOAT16
    reference, half = _run(resnet["onnx"], resnet["test"]), _run(out, resnet["test"])
    assert np.abs(half - reference).max() < 1e-2 * max(1.0, np.abs(reference).max())


def test_fp16_graph_keeps_nodes_with_large_values_in_fp32(tmp_path):
    class Big(torch.nn.Module):
        def forward(self, x):
            return (x * 3000.0) * (x * 3000.0) / 1e6  # an intermediate of 9e6 overflows FP16

    onnx_path = _export(Big(), torch.randn(1, 4), tmp_path / "big.onnx")
    x = np.full((2, 4), 1.0, np.float32)
    details = fp16_graph(onnx_path, tmp_path / "big16.onnx", Samples({"x": x}))
    assert details["fp32_nodes_large_values"], details
    np.testing.assert_allclose(_run(tmp_path / "big16.onnx", x), _run(onnx_path, x), rtol=1e-3)


def test_trt_int8_graph_is_qdq_with_fp16_elsewhere(resnet):
    folder = resnet["folder"] / "trt-int8"
    config = BuildConfig(precision="int8", int8_scheme="static")
    details = prepare_graph(resnet["onnx"], config, resnet["calib"], folder)
    report = graph_report(folder / GRAPH_FILE)
    assert report["opset"] >= 19  # FP16 scales on Q/DQ
    assert set(report["ops"]) <= TRT_FP16_OPS
    assert {"QuantizeLinear", "DequantizeLinear"} <= set(report["ops"])
    assert set(report["initializer_types"]) == {"float16", "int8"}
    assert all(zero for _, zero in report["zero_points"])
    assert details["qdq"]["quantized_weights"] == 6
    assert (folder / QDQ_FILE).is_file()
    reference, built = _run(resnet["onnx"], resnet["test"]), _run(folder / GRAPH_FILE, resnet["test"])
    agreement = (reference.argmax(1) == built.argmax(1)).mean()
    assert agreement >= 0.8, agreement


def test_profile_spans_the_batch_sizes(resnet):
    shapes = profile_shapes(resnet["onnx"], resnet["calib"], (1, 8, 32))
    assert shapes == {"x": [[1, 3, 16, 16], [8, 3, 16, 16], [32, 3, 16, 16]]}


def test_engine_from_another_gpu_or_version_says_rebuild():
    record = {"tensorrt": "11.1.0.5", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    assert compatibility_problem(record, {"tensorrt": "11.1.0.5", "gpu": "NVIDIA H100 PCIe",
                                          "compute_capability": "9.0"}) is None
    message = compatibility_problem(record, {"tensorrt": "11.2.0.1", "gpu": "NVIDIA L4", "compute_capability": "8.9"})
    assert "TensorRT 11.1.0.5 built it" in message and "NVIDIA L4" in message and "rebuild" in message


@pytest.mark.skipif(TRT_REASON is None, reason="this machine can build TensorRT engines")
def test_trt_targets_report_unavailable_with_the_reason(tiny_checkpoint, tmp_path):
    from support import run_cli

    result = run_cli("build", str(tiny_checkpoint["ckpt"]), "--arch", tiny_checkpoint["arch"], "--calib",
                     str(tiny_checkpoint["calib"]), "--target", "trt-fp16,ort-fp32", "--out", str(tmp_path / "b"))
    assert result.returncode != 0 or "unavailable" in result.stdout + result.stderr
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    entry = manifest["targets"]["trt-fp16"]
    assert entry["status"] == "unavailable" and entry["reason"] == TRT_REASON
    assert manifest["targets"]["ort-fp32"]["status"] == "built"


@pytest.mark.skipif(registry.gpu_reason() is None, reason="a GPU install is checked where it runs")
def test_cpu_install_has_no_gpu_wheels():
    """The CPU install (``.[cpu,test]``) must not pull onnxruntime-gpu, TensorRT, CUDA wheels or CUDA torch."""
    names = {d.metadata["Name"].lower() for d in importlib.metadata.distributions()}
    gpu = sorted(n for n in names if n in ("onnxruntime-gpu", "cupy-cuda12x", "cuda-python", "cuda-bindings",
                                           "nvidia-modelopt") or n.startswith(("tensorrt", "nvidia-")))
    assert not gpu, gpu
    assert torch.version.cuda is None
    extras = importlib.metadata.metadata("optimize").get_all("Requires-Dist")
    cpu = [r for r in extras if 'extra == "cpu"' in r]
    assert cpu and not any(word in r for r in cpu for word in ("gpu", "tensorrt", "cuda"))


@pytest.mark.tensorrt
@pytest.mark.skipif(TRT_REASON is not None, reason=f"TensorRT: {TRT_REASON}")
def test_tensorrt_engines_build_and_match_fp32(resnet):
    from optimize.targets.base import BuildInputs
    from optimize.targets.tensorrt import BACKEND

    reference = _run(resnet["onnx"], resnet["test"])
    cache = resnet["folder"] / "timing.cache"
    for precision in ("fp16", "int8"):
        folder = resnet["folder"] / f"engine-{precision}"
        engine = BACKEND.build(BuildInputs(resnet["onnx"], timing_cache=cache),
                               BuildConfig(precision=precision, int8_scheme="static", batch_sizes=(1, 8, 16)),
                               resnet["calib"], folder)
        assert engine.details["tensorrt"].startswith("11")
        with BACKEND.runner(folder) as runner:
            for batch in (1, 16):
                out = runner.infer({"x": resnet["test"][:batch]})["y"]
                agreement = (out.argmax(1) == reference[:batch].argmax(1)).mean()
                assert agreement >= 0.8, (precision, batch, agreement)
            # Read back from the engine inspector (detailed profiling verbosity): most MACs in the
            # precision the target names, every convolution's tactic named.
            read = runner.coverage({"x": resnet["test"][:1]}).to_json()
            assert read["macs_pct"].get(precision, 0) > 50 and read["macs_total"] > 0, read["macs_pct"]
            assert all(layer.get("kernel") for layer in read["layers"]), read["layers"][:3]
    assert cache.is_file()  # written by the first build, reused by the second


@pytest.mark.slow
def test_torch_compile_target_matches_pytorch(tiny_checkpoint, tmp_path):
    """AOTInductor on CPU: built by the pipeline, gated, and equal to the model within FP32 noise (BF16's
    where the CPU has it natively: then it computes in BF16)."""
    from optimize.bundle import load_runner
    from support import native_bf16, run_cli

    t = tiny_checkpoint
    result = run_cli("build", str(t["ckpt"]), "--arch", t["arch"], "--calib", str(t["calib"]),
                     "--target", "torch-compile", "--out", str(tmp_path / "b"))
    assert result.returncode == 0, result.stderr
    entry = json.loads((tmp_path / "b" / "manifest.json").read_text())["targets"]["torch-compile"]
    bf16 = native_bf16()
    assert entry["status"] == "built" and entry["precision"] == ("bf16" if bf16 else "fp32") and entry["gate"]["passed"]
    assert entry["runner_settings"]["mode"] == "AOTInductor" and entry["runner_settings"]["device"] == "cpu"
    x = np.load(t["calib"])["x"][:5]
    with torch.no_grad():
        want = t["model"](torch.from_numpy(x)).numpy()
    with load_runner(tmp_path / "b", "torch-compile") as runner:
        tolerance = 5e-2 if bf16 else 1e-4  # BF16 keeps 8 bits of mantissa
        np.testing.assert_allclose(runner.infer({"x": x})["output"], want, atol=tolerance, rtol=tolerance)


def test_profile_spans_the_sequence_axis_up_to_the_serving_length(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from optimize.inputs.calibration import Samples

    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    out = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", "sequence"])
    graph = helper.make_graph([helper.make_node("Cast", ["input_ids"], ["output"], to=TensorProto.FLOAT)],
                              "tokens", [ids], [out])
    onnx.save(helper.make_model(graph), tmp_path / "tokens.onnx")
    calibration = Samples({"input_ids": np.zeros((4, 64), np.int64)})
    assert profile_shapes(tmp_path / "tokens.onnx", calibration, (1, 8, 32), 256) == {
        "input_ids": [[1, 1], [8, 64], [32, 256]]}
    assert profile_shapes(tmp_path / "tokens.onnx", calibration, (1, 8, 32)) == {
        "input_ids": [[1, 64], [8, 64], [32, 64]]}
