"""The INT8 search can reach FP32: every candidate node kept in FP32 gives the FP32 engine's outputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from optimize.inputs.calibration import Samples
from optimize.targets.base import ALL_NODES, BuildConfig, BuildInputs, RunnerConfig
from optimize.targets.layer_error import engine_layers


@pytest.fixture(scope="module")
def se_model(tmp_path_factory):
    """A small CNN with a squeeze-excitation Mul, a residual Add and pooling, exported to ONNX."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 4, 1), nn.SiLU(), nn.Conv2d(4, 8, 1),
                                    nn.Sigmoid())
            self.head = nn.Linear(8, 5)

        def forward(self, x):
            x = torch.relu(self.stem(x))
            y = nn.functional.silu(self.dw(x))
            y = y * self.se(y)
            x = nn.functional.max_pool2d(x + y, 2)
            return self.head(x.mean((2, 3)))

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("se")
    model = Net().eval()
    x = np.random.default_rng(0).standard_normal((48, 3, 12, 12)).astype(np.float32)
    torch.onnx.export(model, (torch.from_numpy(x[:2]),), str(folder / "model.onnx"), input_names=["x"],
                      output_names=["out"], dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    return folder / "model.onnx", Samples({"x": x}, None, "random"), folder


def _run(backend, folder, samples):
    with backend.runner(folder) as runner:
        return runner.infer_all(samples.batches(16))["out"]


def test_ort_ranking_covers_every_quantized_node_and_all_kept_is_fp32(se_model, tmp_path):
    from optimize.targets import onnxruntime as ort_target

    onnx_path, samples, _ = se_model
    backend = ort_target.BACKEND
    fp32 = backend.build(BuildInputs(onnx_path), BuildConfig("fp32"), None, tmp_path / "fp32")
    assert fp32.files
    config = BuildConfig("int8", "static")
    backend.build(BuildInputs(onnx_path), config, samples, tmp_path / "int8")
    graph = onnx.load(str(tmp_path / "int8" / "model.onnx")).graph
    quantized = ort_target.quantized_nodes(graph)
    kinds = {n.op_type for n in quantized}
    assert {"Conv", "Gemm"} <= kinds and kinds - {"Conv", "Gemm", "MatMul"}, kinds  # not only weight ops
    candidates = ort_target.fp32_candidates(onnx_path, tmp_path / "int8" / "model.onnx")
    assert sorted(candidates) == sorted(n.name for n in quantized)
    layers = engine_layers(backend, tmp_path / "int8", RunnerConfig(), onnx_path, samples, limit=16)
    groups = layers.ranked_groups(candidates)
    ranking = [name for _, _, names in groups for name in names]
    assert sorted(ranking) == sorted(candidates)
    assert all(np.isfinite(db) for _, db, _ in groups)  # every candidate belongs to a layer with an error
    assert [db for _, db, _ in groups] == sorted(db for _, db, _ in groups)  # worst first
    reference = _run(backend, tmp_path / "fp32", samples)
    int8 = _run(backend, tmp_path / "int8", samples)
    assert np.abs(int8 - reference).max() > 1e-4  # the INT8 engine really differs
    for keep, name in [((ALL_NODES,), "all"), (tuple(ranking), "named")]:
        backend.build(BuildInputs(onnx_path), BuildConfig("int8", "static", keep_fp32=keep), samples, tmp_path / name)
        kept = onnx.load(str(tmp_path / name / "model.onnx")).graph
        assert not [n for n in kept.node if n.op_type == "QuantizeLinear"], name
        np.testing.assert_allclose(_run(backend, tmp_path / name, samples), reference, rtol=1e-5, atol=1e-5)


def test_openvino_all_in_ignored_scope_is_fp32(se_model, tmp_path):
    from optimize.targets import openvino as ov_target

    onnx_path, samples, _ = se_model
    backend = ov_target.BACKEND
    backend.build(BuildInputs(onnx_path), BuildConfig("fp32"), None, tmp_path / "fp32")
    backend.build(BuildInputs(onnx_path), BuildConfig("int8", "static"), samples, tmp_path / "int8")
    assert "FakeQuantize" in (tmp_path / "int8" / "model.xml").read_text()
    backend.build(BuildInputs(onnx_path), BuildConfig("int8", "static", keep_fp32=(ALL_NODES,)), samples,
                  tmp_path / "all")
    assert "FakeQuantize" not in (tmp_path / "all" / "model.xml").read_text()
    reference = _run(backend, tmp_path / "fp32", samples)
    assert np.abs(_run(backend, tmp_path / "int8", samples) - reference).max() > 1e-4
    np.testing.assert_allclose(_run(backend, tmp_path / "all", samples), reference, rtol=1e-5, atol=1e-5)


def test_ort_dynamic_ranking_names_every_replaced_matmul_and_all_kept_is_fp32(tmp_path):
    """Dynamic INT8 has no Q/DQ pairs: its candidates are the MatMul/Gemm nodes it replaced."""
    import torch
    from torch import nn

    from optimize.targets import onnxruntime as ort_target

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4)).eval()
    x = np.random.default_rng(1).standard_normal((40, 16)).astype(np.float32)
    onnx_path = tmp_path / "mlp.onnx"
    torch.onnx.export(model, (torch.from_numpy(x[:2]),), str(onnx_path), input_names=["x"], output_names=["out"],
                      dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    samples, backend = Samples({"x": x}, None, "random"), ort_target.BACKEND
    backend.build(BuildInputs(onnx_path), BuildConfig("fp32"), None, tmp_path / "fp32")
    backend.build(BuildInputs(onnx_path), BuildConfig("int8", "dynamic"), None, tmp_path / "int8")
    replaced = ort_target.replaced_nodes(onnx.load(str(onnx_path)).graph,
                                         onnx.load(str(tmp_path / "int8" / "model.onnx")).graph)
    assert len(replaced) == 3
    candidates = ort_target.fp32_candidates(onnx_path, tmp_path / "int8" / "model.onnx")
    layers = engine_layers(backend, tmp_path / "int8", RunnerConfig(), onnx_path, samples, limit=16)
    groups = layers.ranked_groups(candidates)
    ranking = [name for _, _, names in groups for name in names]
    assert sorted(ranking) == sorted(n.name for n in replaced) == sorted(candidates)
    assert all(np.isfinite(db) for _, db, _ in groups)
    reference = _run(backend, tmp_path / "fp32", samples)
    assert np.abs(_run(backend, tmp_path / "int8", samples) - reference).max() > 1e-5
    for keep, name in [((ALL_NODES,), "all"), (tuple(ranking), "named")]:
        backend.build(BuildInputs(onnx_path), BuildConfig("int8", "dynamic", keep_fp32=keep), None, tmp_path / name)
        kept = onnx.load(str(tmp_path / name / "model.onnx")).graph
        assert not [n for n in kept.node if n.op_type == "MatMulInteger"], name
        np.testing.assert_allclose(_run(backend, tmp_path / name, samples), reference, rtol=1e-5, atol=1e-5)


def test_histogram_calibration_gets_whole_batches_only():
    from optimize.passes.ort_calibration import whole_batches

    samples = Samples({"x": np.zeros((469, 3), np.float32)}, None, "zeros")
    assert len(whole_batches(samples, 8)) == 464 and len(whole_batches(samples.take(np.arange(5)), 8)) == 5
    assert whole_batches(samples.take(np.arange(16)), 8) is not None


def test_a_candidate_the_backend_cannot_build_is_recorded_and_the_search_goes_on(se_model, tmp_path):
    from optimize.targets.candidates import Candidate, CandidateSearch
    from optimize.errors import BuildError
    from optimize.targets import onnxruntime as ort_target
    from optimize.targets.base import RecoveryContext
    from optimize.validate import GateData, Split

    onnx_path, samples, _ = se_model
    backend, config = ort_target.BACKEND, BuildConfig("int8", "static")

    def build(trial, label, builder=None, extra=None):
        folder = tmp_path / (label or "first")
        (builder or backend.build)(BuildInputs(onnx_path), trial, samples, folder)
        return folder, {"build_time_s": 0.0}

    def refuse(inputs, trial, calibration, workdir):
        raise BuildError("ONNX Runtime static quantization failed: the quantizer refused the graph")

    def select(folder):
        from optimize.validate import judge

        with backend.runner(folder) as runner:
            got = runner.infer_all(samples.batches(16))["out"]
        reference = _run(backend, tmp_path / "fp32", samples)
        metrics, verdict = judge("regress", reference, got, None, 1e9)
        return {"metrics": metrics, "gate": {"passed": verdict.passed, "drop": verdict.drop,
                                             "interval": verdict.interval, "message": verdict.message}}

    backend.build(BuildInputs(onnx_path), BuildConfig("fp32"), None, tmp_path / "fp32")
    split = Split(samples, {}, "held-out data")
    context = RecoveryContext(BuildInputs(onnx_path), config, samples, None, GateData("regress", "out", split, split),
                              1e9, build, lambda folder: ({}, {}), select)
    search = CandidateSearch(context, 60.0)
    chosen = search.first_within([Candidate("bad", config, "a refused variant", refuse),
                                  Candidate("keep-all", BuildConfig("int8", "static", keep_fp32=(ALL_NODES,)),
                                            "every node in FP32")])
    assert chosen is not None and chosen.candidate.label == "keep-all"
    summary = search.summary(chosen, "test", "test")
    assert summary["not_built"] == [{"label": "bad", "change": "a refused variant",
                                     "reason": "ONNX Runtime static quantization failed: the quantizer refused the graph"}]


@pytest.mark.slow
@pytest.mark.parametrize("target", ["onnxruntime", "openvino"])
def test_the_worst_layer_kept_in_fp32_adds_no_error_of_its_own(se_model, tmp_path, target):
    """The ranking's names are the ones the backend's build takes: the worst layer, rebuilt with its
    names kept in FP32, computes (next to) exactly what the FP32 model does when fed its inputs."""
    import importlib

    backend = importlib.import_module(f"optimize.targets.{target}").BACKEND
    onnx_path, samples, _ = se_model
    backend.build(BuildInputs(onnx_path), BuildConfig("int8", "static"), samples, tmp_path / "int8")
    layers = engine_layers(backend, tmp_path / "int8", RunnerConfig(), onnx_path, samples, limit=16)
    quantized = sorted({n for names in layers.keep.values() for n in names})
    (worst, db, names), *_ = layers.ranked_groups(quantized)
    assert db < 45, (worst, db)  # INT8 adds error there
    backend.build(BuildInputs(onnx_path), BuildConfig("int8", "static", keep_fp32=names), samples, tmp_path / "kept")
    after = engine_layers(backend, tmp_path / "kept", RunnerConfig(), onnx_path, samples, limit=16)
    local = after.local[worst].to_json()
    assert local["exact"] or local["sqnr_db"] > 80, (worst, names, local)
