"""Per-layer error (``optimize explain`` and the INT8 fallback's ranking): the arithmetic, the names,
and on real engines that a layer's local error is the error it adds."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import helper

from optimize.targets.layer_error import EngineLayers, ErrorSum, LayerRow, layer_rows, module_name, precision_by_node

from support import DEPLOYED, run_cli


def test_sqnr_and_cosine_are_what_they_say():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 1000)).astype(np.float32)
    noise = 0.1 * rng.standard_normal((4, 1000)).astype(np.float32)
    total = ErrorSum()
    total.add(ref[:2], ref[:2] + noise[:2])
    total.add(ref[2:], ref[2:] + noise[2:])  # summed over batches like one pass
    expected = 10 * math.log10(float(np.sum(ref.astype(np.float64) ** 2)) / float(np.sum(noise.astype(np.float64) ** 2)))
    assert total.sqnr_db == pytest.approx(expected, abs=1e-3) and 19 < total.sqnr_db < 21
    cosines = [np.dot(r, r + n) / np.linalg.norm(r) / np.linalg.norm(r + n) for r, n in zip(ref, noise)]
    assert total.cosine == pytest.approx(np.mean(cosines), abs=1e-6) and total.count == 4
    exact = ErrorSum()
    exact.add(ref, ref.copy())
    assert exact.sqnr_db is None and exact.to_json()["exact"] and exact.cosine == pytest.approx(1.0)
    flipped = ErrorSum()
    flipped.add(ref, -ref)
    assert flipped.cosine == pytest.approx(-1.0) and flipped.sqnr_db == pytest.approx(10 * math.log10(1 / 4), abs=1e-6)


def test_masks_filled_with_the_float_minimum_do_not_poison_the_error():
    ref = np.array([[1.0, -3.4e38, 2.0], [0.5, -np.inf, 1.0]], np.float32)
    got = ref.copy()
    got[0, 0] = 1.1
    total = ErrorSum()
    total.add(ref, got)
    assert math.isfinite(total.sqnr_db) and 0.99 < total.cosine < 1.0


def test_module_names_come_from_the_exporter():
    dynamo = helper.make_node("MatMul", ["a", "b"], ["c"], name="node_MatMul_17")
    entry = dynamo.metadata_props.add()
    entry.key, entry.value = "pkg.torch.onnx.name_scopes", "['', 'encoder', 'encoder.layer.3', 'encoder.layer.3.attention', 'matmul']"
    assert module_name(dynamo) == "encoder.layer.3.attention"
    assert module_name(helper.make_node("Conv", ["x", "w"], ["y"], name="/layer1/conv/Conv")) == "layer1.conv"
    assert module_name(helper.make_node("Relu", ["x"], ["y"], name="relu_3")) == "relu_3"


def test_rows_are_computing_nodes_with_float_outputs():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), helper.make_node("Reshape", ["c", "s"], ["r"], name="reshape"),
             helper.make_node("Relu", ["r"], ["y"], name="relu"), helper.make_node("Shape", ["y"], ["shape"], name="shape"),
             helper.make_node("Cast", ["shape"], ["out2"], name="cast")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 4, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("out2", onnx.TensorProto.INT64, None)],
                              [onnx.numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), "w"),
                               onnx.numpy_helper.from_array(np.array([1, 1, 4, 4], np.int64), "s")])
    rows = layer_rows(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    assert [(r.node, r.output, r.depth) for r in rows] == [("conv", "c", 0), ("relu", "y", 2)]


def test_precision_matches_the_names_engines_give_layers():
    rows = [LayerRow("node_Conv_3", "Conv", "getitem", 0, "stem"), LayerRow("node_relu", "Relu", "relu", 1, "stem"),
            LayerRow("node_MatMul_5", "MatMul", "mm", 2, "fc"), LayerRow("node_linear", "Gemm", "output", 3, "head")]
    openvino = {"layers": [{"name": "node_Conv_3/WithoutBiases", "precision": "int8"},
                           {"name": "output", "precision": "fp32"}, {"name": "unrelated", "precision": "bf16"}]}
    assert precision_by_node(rows, openvino) == {"node_Conv_3": "int8", "node_linear": "fp32"}
    ort = {"layers": [{"name": "relu_nchwc", "precision": "fp32"}, {"name": "node_MatMul_5_token_12", "precision": "int8"},
                      {"name": "node_linear_MatMul_quant", "precision": "int8"}]}
    assert precision_by_node(rows, ort) == {"node_Conv_3": "fp32", "node_MatMul_5": "int8", "node_linear": "int8"}


def test_ranking_is_worst_local_error_first_and_maps_to_the_names_a_backend_keeps():
    rows = [LayerRow(n, "Conv", n + ":0", i, n) for i, n in enumerate(["a", "b", "c", "d"])]

    def error(db):
        e = ErrorSum()
        e.signal, e.noise, e.cosines, e.count = 1.0, 10 ** (-db / 10), 1.0, 1
        return e

    layers = EngineLayers(rows, {}, {"a": error(40), "b": error(10), "c": error(25)}, {"d": "not exposed"}, {}, {}, 1,
                          keep={"b": ("b_conv", "b_add"), "c": ("c",)})
    assert [n for n, _ in layers.ranking()] == ["b", "c", "a"]
    groups = layers.ranked_groups(["a", "b_add", "b_conv", "c", "d"])
    assert [(node, names) for node, _, names in groups] == [("b", ("b_conv", "b_add")), ("c", ("c",)), ("a", ("a",)),
                                                            ("d", ("d",))]
    assert math.isnan(groups[-1][1]) and groups[0][1] == pytest.approx(10)


def test_broken_layers_go_first_then_growing_steps():
    from optimize.targets.base import BuildConfig
    from optimize.targets.candidates import layer_steps

    groups = [("s1", 0.5, ("s1", "a1")), ("s2", 1.5, ("s2",)), ("n", 12.0, ("n",)), ("m", 30.0, ("m",)),
              ("k", 35.0, ("k",)), ("j", float("nan"), ("j",))]
    broken, steps = layer_steps(groups, BuildConfig("int8", "static"), "keep")
    assert broken.config.keep_fp32 == ("s1", "a1", "s2", "n") and "under 20 dB" in broken.change
    assert [c.label for c in steps] == ["keep-4", "keep-6"] and steps[-1].config.keep_fp32[-1] == "j"
    none, steps = layer_steps(groups[3:], BuildConfig("int8", "static"), "keep")
    assert none is None and [len(c.config.keep_fp32) for c in steps] == [1, 2, 3]


@pytest.mark.slow
def test_explain_names_the_layers_each_int8_engine_damages(bundles, tmp_path):
    """On the shared tiny bundle: every engine measured, the instrumented engines carry the untouched
    engines' error, the FP32 engine adds (next to) none, and the report is written."""
    import json



    bundle = bundles.copy(tmp_path / "bundle", *DEPLOYED)
    result = run_cli("explain", bundle, "--samples", "16")
    assert result.returncode == 0, result.stderr
    record = json.loads((bundle / "explain" / "layers.json").read_text())
    assert set(record["engines"]) == {"ort-fp32", "ort-int8", "openvino-int8"} and record["samples"] == 16
    for name, engine in record["engines"].items():
        assert engine["fidelity"]["same"], (name, engine["fidelity"])
        measured = [layer for layer in engine["layers"] if "local" in layer]
        assert len(measured) >= len(engine["layers"]) // 2, name
    fp32 = record["engines"]["ort-fp32"]["layers"]
    assert all(layer["local"]["exact"] or layer["local"]["sqnr_db"] > 90 for layer in fp32 if "local" in layer)
    for name in ("ort-int8", "openvino-int8"):  # INT8 (weights at least) adds error somewhere, and it is found
        layers = record["engines"][name]["layers"]
        worst = min((layer for layer in layers if "local" in layer), key=lambda layer: layer["local"]["sqnr_db"] or 1e9)
        assert worst["local"]["sqnr_db"] < 70, (name, worst)
        assert worst["module"] in result.stdout
        macs = [layer for layer in layers if layer["op"] in ("Conv", "Gemm")]
        assert all(layer["precision"] in ("int8", "fp32") for layer in macs), (name, macs)  # read back, matched
    report = (bundle / "explain" / "report.md").read_text()
    assert "## ort-int8" in report and "## Engines side by side" in report and (bundle / "explain" / "layer_error.png").is_file()


@pytest.mark.slow
def test_openvino_fallback_tries_the_ranked_layers_and_nncf_accuracy_control(tiny_checkpoint, tmp_path):
    """A budget no calibration meets: OpenVINO's fallback keeps the worst ranked layers in FP32
    (named in NNCF's ignored scope) and tries NNCF's accuracy control; of those within budget it
    takes the one computing most MACs in INT8, and records the chosen engine's per-layer picture."""
    import json

    t = tiny_checkpoint
    args = ("build", t["ckpt"], "--arch", t["arch"], "--calib", t["calib"], "--task", "regress", "--target",
            "openvino-int8", "--int8-scheme", "static")
    plain = run_cli(*args, "--max-accuracy-drop", "1e-6", "--no-recover", "--out", tmp_path / "plain")
    drop = json.loads((tmp_path / "plain" / "manifest.json").read_text())["targets"]["openvino-int8"]["gate"]["drop"]
    assert drop > 1e-6, plain.stderr
    explained = run_cli("explain", tmp_path / "plain", "--samples", "8")  # failed: its engine from the stage cache
    assert explained.returncode == 0 and "failed at build time" in explained.stdout, explained.stderr
    assert json.loads((tmp_path / "plain" / "explain" / "layers.json").read_text())["engines"]["openvino-int8"]["status"] == "failed"
    result = run_cli(*args, "--max-accuracy-drop", f"{0.3 * drop:.6g}", "--out", tmp_path / "b")
    entry = json.loads((tmp_path / "b" / "manifest.json").read_text())["targets"]["openvino-int8"]
    recovery = entry["recovery"]
    labels = [c["label"] for c in recovery["candidates"]]
    assert any(label.startswith("keep-") for label in labels) and "accuracy-control" in labels, (labels, result.stderr)
    assert recovery["ranked_layers"] > 0 and "layer_error" in recovery
    shares = recovery["int8_macs_pct"]
    if entry["status"] == "built" and recovery["chosen"] in shares:
        assert shares[recovery["chosen"]] == max(shares.values())
        kept = recovery["kept_fp32"]
        assert not kept or set(kept) <= set(entry["details"].get("ignored_scope", [])), (kept, entry["details"])
