"""Whole builds of a tiny CNN through the real CLI: bundle, manifest, cache, gate, atomicity."""

import json

import numpy as np
import pytest

from support import cpu_flags, native_bf16, run_cli

CPU_TARGETS = ("ort-fp32", "ort-int8", "openvino-fp32", "openvino-int8")


@pytest.fixture(scope="module")
def built(bundles, tiny_checkpoint):
    """Every CPU target by name (``all`` adds torch-compile's AOTInductor compile: the slow layer's demo)."""
    return bundles.get("--eval-data", tiny_checkpoint["eval"], "--target", ",".join(CPU_TARGETS))


def test_every_cpu_target_built_and_gated(built):
    out = built
    manifest = json.loads((out / "manifest.json").read_text())
    for name in CPU_TARGETS:
        entry = manifest["targets"][name]
        assert entry["status"] == "built", (name, entry.get("reason"))
        assert entry["size_bytes"] > 0 and (out / entry["folder"]).is_dir()
        assert entry["gate"]["passed"] and entry["runner_settings"]["backend"]
    assert manifest["task"] == "classify" and manifest["task_inferred"]
    assert manifest["inputs"][0]["shape"] == [-1, 3, 16, 16]
    assert manifest["stages"]["export"]["parity"]["output"]["max_abs_error"] < 1e-4
    for name in ("ort-int8", "openvino-int8"):  # no --int8-scheme: chosen by measurement, recorded
        entry = manifest["targets"][name]
        assert entry["build_config"]["int8_scheme"] == entry["scheme_choice"]["chosen"].split("+")[0]
    assert manifest["versions"]["onnxruntime"] and manifest["versions"]["openvino"]
    assert (out / "program.pt2").is_file() and (out / "model.onnx").is_file()
    held = np.load(out / "data" / "heldout.npz")
    reference = np.load(out / "data" / "reference.npz")
    assert len(held["x"]) == len(reference["output"]) == manifest["data"]["held_out_samples"]
    table = run_cli("inspect", out).stdout
    for name in CPU_TARGETS:
        assert name in table
    # What each engine computes in, read back from the engine, in MACs as it executes them: the tiny
    # CNN's (conv 55,296 + conv 73,728 + linear 80) where nothing is padded; ONNX Runtime's FP32
    # NCHWc layout pads the first convolution's 8 output channels to its block of 8 or 16. Its one
    # Linear layer (80 weights) leaves weight-only INT8 nothing to quantize.
    coverage = {name: manifest["targets"][name]["coverage"] for name in CPU_TARGETS}
    assert coverage["openvino-fp32"]["macs_total"] == coverage["openvino-int8"]["macs_total"] == 129_104, coverage
    assert coverage["ort-fp32"]["macs_total"] >= 129_104
    assert coverage["ort-fp32"]["macs_pct"] == coverage["openvino-fp32"]["macs_pct"] == {"fp32": 100.0}
    assert coverage["ort-fp32"]["kernels"] == "not reported" and "avx" in json.dumps(coverage["openvino-fp32"]["kernels"])
    assert "weights: no MatMul/Gemm weights to quantize" in manifest["targets"]["ort-int8"]["scheme_choice"]["not_built"]["weights"]
    for name in ("ort-int8", "openvino-int8"):
        if manifest["targets"][name]["build_config"]["int8_scheme"] == "static":
            assert coverage[name]["macs_pct"].get("int8", 0) > 50, (name, coverage[name])
            assert coverage[name]["macs_total"] == 129_104, (name, coverage[name])
            assert f"{coverage[name]['macs_pct']['int8']:.0f}% of MACs in INT8" in table
    assert "100% of MACs in FP32" in table and "read back from each engine" in table


def test_openvino_fp32_is_fp32_on_disk(built):
    import openvino as ov

    out = built
    model = ov.Core().read_model(str(out / "targets" / "openvino-fp32" / "model.xml"))
    types = {op.get_element_type().get_type_name() for op in model.get_ops() if op.get_type_name() == "Constant"}
    assert "f16" not in types and "f32" in types


def test_bundle_runner_matches_reference(built):
    from optimize.bundle import load_runner

    out = built
    held = np.load(out / "data" / "heldout.npz")
    reference = np.load(out / "data" / "reference.npz")["output"]
    runner = load_runner(out, "ort-fp32")
    got = runner.infer({"x": held["x"][:7]})["output"]
    assert got.shape == (7, 5) and np.allclose(got, reference[:7], atol=1e-4)
    assert runner.inputs[0].shape == (-1, 3, 16, 16)


def test_inspect_prints_the_table(built):
    out = built
    result = run_cli("inspect", out)
    assert result.returncode == 0
    assert "openvino-int8" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["machine"]["isa"]) <= cpu_flags() | {"neon", "dotprod", "fp16"}
    assert manifest["machine"]["native_bf16"] == native_bf16()
    assert f"built   on {manifest['machine']['cpu']}" in result.stdout


def test_rerun_reuses_the_cache_and_a_changed_flag_rebuilds_only_that(tiny_checkpoint, tmp_path, private_cache):
    t = tiny_checkpoint
    out = tmp_path / "b"
    flags = ("build", t["ckpt"], "--arch", t["arch"], "--calib", t["calib"], "--eval-data", t["eval"],
             "--target", "ort-int8", "--int8-scheme", "static", "--out", out)
    assert run_cli(*flags).returncode == 0
    before = {p.name for p in private_cache.iterdir()}
    again = run_cli(*flags)
    assert again.returncode == 0
    assert {p.name for p in private_cache.iterdir()} == before  # nothing rebuilt, and the build says so
    assert f"stage cache {private_cache}: 2 reused (export, target-ort-int8), 0 built" in again.stderr
    result = run_cli(*flags, "--calib-method", "percentile")
    assert result.returncode == 0, result.stderr
    assert f"stage cache {private_cache}: 1 reused (export), 1 built" in result.stderr
    new = {p.name for p in private_cache.iterdir()} - before
    assert len(new) == 1 and next(iter(new)).startswith("target-ort-int8-")
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["targets"]) == ["ort-int8"]
    assert manifest["targets"]["ort-int8"]["build_config"]["calib_method"] == "percentile"


def test_a_bundle_without_cache_dir_keeps_its_cache_beside_it(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.delenv("OPTIMIZE_CACHE_DIR")
    t = tiny_checkpoint
    result = run_cli("build", t["ckpt"], "--arch", t["arch"], "--input-shape", "1x3x16x16", "--target", "ort-fp32",
                     "--out", tmp_path / "b")
    assert result.returncode == 0, result.stderr
    assert any(p.name.startswith("export-") for p in (tmp_path / "b.cache").iterdir())


def test_gate_failure_fails_that_target_and_exits_nonzero(tiny_checkpoint, tmp_path):
    t = tiny_checkpoint
    out = tmp_path / "b"
    result = run_cli("build", t["ckpt"], "--arch", t["arch"], "--calib", t["calib"], "--task", "regress",
                     "--max-accuracy-drop", "2e-5", "--no-recover", "--target", "ort-fp32,ort-int8",
                     "--int8-scheme", "static", "--out", out)
    assert result.returncode == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["targets"]["ort-fp32"]["status"] == "built"
    assert manifest["targets"]["ort-int8"]["status"] == "failed"
    assert "accuracy gate: max abs error drop" in manifest["targets"]["ort-int8"]["reason"]


def test_two_named_inputs_from_input_shape(tmp_path):
    import torch

    from tiny_models import TwoInputs

    torch.save(TwoInputs().state_dict(), tmp_path / "two.pt")
    result = run_cli("build", tmp_path / "two.pt", "--arch", "tests/tiny_models.py:TwoInputs",
                     "--input-shape", "left:1x4", "--input-shape", "right:1x6", "--target", "ort-fp32",
                     "--out", tmp_path / "b")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert [i["name"] for i in manifest["inputs"]] == ["left", "right"]
    assert manifest["task"] == "regress"
    assert "random inputs" in manifest["data"]["notes"][0]


@pytest.mark.parametrize("target", ["ort-int8", "openvino-int8"])
def test_int8_recovery_when_the_budget_is_breached(tiny_checkpoint, tmp_path, target):
    t = tiny_checkpoint
    out = tmp_path / "b"
    args = ("build", t["ckpt"], "--arch", t["arch"], "--calib", t["calib"], "--task", "regress", "--target", target,
            "--int8-scheme", "static")
    plain = run_cli(*args, "--max-accuracy-drop", "1e-6", "--no-recover", "--out", tmp_path / "plain")
    drop = json.loads((tmp_path / "plain" / "manifest.json").read_text())["targets"][target]["gate"]["drop"]
    assert drop > 1e-6, plain.stderr  # a budget 10% under this engine's own error: it must recover
    result = run_cli(*args, "--max-accuracy-drop", f"{0.9 * drop:.6g}", "--out", out)
    entry = json.loads((out / "manifest.json").read_text())["targets"][target]
    recovery = entry["recovery"]
    assert "calibration variants" in recovery["method"], result.stderr
    labels = [c["label"] for c in recovery["candidates"]]
    assert labels[0] == "first" and any(label.startswith(("calib-", "keep-")) for label in labels[1:])
    picture = recovery["layer_error"]  # the chosen engine's per-layer error, kept in the manifest
    assert picture["fidelity"]["same"] and any("local" in layer for layer in picture["layers"])
    chosen = next(c for c in recovery["candidates"] if c["label"] == recovery["chosen"])
    assert recovery["reason"] and chosen["change"] == recovery["chosen_change"]
    assert entry["status"] == "built" and entry["gate"]["passed"], result.stderr
    assert "candidate " in result.stderr and "chose " in result.stderr
    if recovery["chosen"].startswith("keep-"):
        assert recovery["kept_fp32"] == entry["build_config"]["keep_fp32"]


@pytest.mark.slow
def test_python_api_auto_builds_benchmarks_and_picks_the_winner_like_the_cli(tiny_checkpoint, tmp_path, caplog):
    """``build_and_select`` with no CLI: the build, then the selection benchmarks and records a winner;
    ``bench_bundle`` then re-measures through the API and records its own decision. The library
    logs its progress (``optimize.*`` loggers) and prints nothing."""
    import dataclasses
    import logging

    from optimize.auto import Selection, build_and_select, selection_for
    from optimize.bench.load import LoadPlan
    from optimize.bench.run import BenchConfig, bench_bundle
    from optimize.build.plan import BuildPlan, DataConfig, QuantConfig, SourceConfig
    from optimize.bundle import read_manifest
    from optimize.select import LoadSpec, parse_slo

    t = tiny_checkpoint
    quick = BenchConfig(plan=LoadPlan.for_duration(0.3, batch_sizes=(1,), concurrency=(), rates=(), rate_fractions=(),
                                                   rounds=1), torch_baseline=False, cross_check=False)
    plan = BuildPlan(source=SourceConfig(t["ckpt"], t["arch"]), out=tmp_path / "api", targets=("ort-fp32", "ort-int8"),
                     data=DataConfig(calib=str(t["calib"])), quant=QuantConfig(), use_cache=False)
    with caplog.at_level(logging.INFO, logger="optimize"):
        result = build_and_select(plan, Selection(LoadSpec("batch", 1), parse_slo("p99=1s"), bench=quick,
                                                  progress=False))
    said = [r.getMessage() for r in caplog.records if r.name.startswith("optimize.")]
    assert result.manifest.built_targets() == ["ort-fp32", "ort-int8"] and not result.failed
    assert result.decision["target"] in ("ort-fp32", "ort-int8") and result.decision["met"]
    assert read_manifest(result.bundle).winner_target == result.decision["target"]
    assert (result.report_folder / "report.json").is_file() and any("measuring" in line for line in said)
    assert any(line.startswith("loaded ") for line in said) and any("ort-int8: built" in line for line in said)
    quick = dataclasses.replace(quick, targets=("ort-int8",))
    report, decision, _ = bench_bundle(result.bundle, quick, None, LoadSpec("batch", 1), progress=False)
    assert set(report["engines"]) == {"ort-int8"} and decision["target"] == "ort-int8"
    winner = result.decision["target"]
    assert read_manifest(result.bundle).winner_target == winner and not report["winner_applied"]  # a subset
    report, decision, _ = bench_bundle(result.bundle, quick, None, LoadSpec("batch", 1), progress=False, select=True)
    assert read_manifest(result.bundle).winner_target == "ort-int8" and report["winner_applied"]
    # "auto" in the targets alone selects too, with the default selection (the CLI's --target auto
    # builds and selects in test_bench).
    assert selection_for(("auto",)) == Selection() and selection_for(("ort-fp32,auto",)) == Selection()
    assert selection_for(("all",)) is None


def test_an_unknown_target_fails_before_anything_is_written(tiny_checkpoint, tmp_path):
    from optimize.errors import OptimizeError
    from optimize.build.pipeline import run_build
    from optimize.build.plan import BuildPlan, SourceConfig

    t = tiny_checkpoint
    with pytest.raises(OptimizeError, match="unknown target 'tpu-int4'"):
        run_build(BuildPlan(source=SourceConfig(t["ckpt"], t["arch"]), out=tmp_path / "b", targets=("tpu-int4",)))
    assert not (tmp_path / "b").exists() and list(tmp_path.iterdir()) == []
