"""``openvino-bf16``: built and gated where the CPU runs BF16 natively, unavailable with the reason elsewhere."""

from __future__ import annotations

import json

import numpy as np
import pytest

from optimize.cpu import detect
from support import native_bf16, run_cli
from optimize.targets import registry
from optimize.targets.base import BuildConfig, BuildInputs
from support import parse_pbtxt

NATIVE = native_bf16()  # from /proc/cpuinfo's flags, not from the code under test


def test_availability_follows_the_cpu(tiny_checkpoint, tmp_path):
    reason = registry.unavailable_reason("openvino-bf16")
    t = tiny_checkpoint
    result = run_cli("build", t["ckpt"], "--arch", t["arch"], "--calib", t["calib"], "--target", "openvino-bf16",
                     "--out", tmp_path / "b")
    entry = json.loads((tmp_path / "b" / "manifest.json").read_text())["targets"]["openvino-bf16"]
    if NATIVE:
        assert reason is None and entry["status"] == "built", entry
        assert entry["runner_settings"]["INFERENCE_PRECISION_HINT"] == "bf16" and entry["gate"]["passed"]
        assert result.returncode == 0, result.stderr
    else:
        assert "has no native BF16" in reason and detect().model in reason
        assert entry["status"] == "unavailable" and entry["reason"] == reason
        assert result.returncode == 1 and "no native BF16" in result.stdout + result.stderr


def test_the_engine_records_its_precision_and_never_runs_fp32_under_a_bf16_name(tmp_path):
    import torch

    from optimize.errors import TargetUnavailable
    from optimize.targets import openvino as ov_target

    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU()).eval()
    torch.onnx.export(model, (torch.zeros(2, 6),), str(tmp_path / "m.onnx"), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    engine = ov_target.BACKEND.build(BuildInputs(tmp_path / "m.onnx"), BuildConfig("bf16"), None, tmp_path / "e")
    assert engine.details["inference_precision"] == "bf16" and "runtime.json" in engine.files
    assert ov_target.BACKEND.triton_parameters(tmp_path / "e") == {"HINT_BF16": "YES"}
    if NATIVE:
        with ov_target.BACKEND.runner(tmp_path / "e") as runner:
            assert "bf16" in runner.settings["INFERENCE_PRECISION_HINT"]
            x = np.ones((2, 6), np.float32)
            assert np.allclose(runner.infer({"x": x})["y"], model(torch.from_numpy(x)).detach().numpy(), atol=0.05)
    else:
        with pytest.raises(TargetUnavailable, match=r"runs the bf16 engine in f32 on this CPU .*CPU capabilities"):
            ov_target.BACKEND.runner(tmp_path / "e")


def test_the_triton_config_carries_the_bf16_hint():
    from optimize.deploy.triton import model_config, to_pbtxt

    tensors = [{"name": "x", "datatype": "FP32", "shape": [-1, 6]}]
    config = model_config("m", "openvino-bf16", 8, tensors, [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
                          parameters={"HINT_BF16": "YES"})
    parsed = parse_pbtxt(to_pbtxt(config))
    assert parsed.backend == "openvino" and parsed.parameters["HINT_BF16"].string_value == "YES"


def test_torch_compile_measures_in_bf16_only_where_it_is_native():
    from pathlib import Path

    from optimize.cpu import parse_cpuinfo
    from optimize.targets.torch_compile import cpu_precision

    fixtures = Path(__file__).parent / "fixtures" / "cpuinfo"
    read = lambda name, arch="x86_64": parse_cpuinfo((fixtures / f"{name}.txt").read_text(), arch)  # noqa: E731
    assert cpu_precision(read("intel_sapphire_rapids_amx")) == "bf16"
    assert cpu_precision(read("arm_graviton3", "aarch64")) == "bf16"
    assert cpu_precision(read("amd_epyc_avx2")) == "fp32" and cpu_precision(read("intel_icelake_vnni")) == "fp32"
    assert cpu_precision() == ("bf16" if NATIVE else "fp32")
