"""The reference models end to end (slow: minutes on two cores)."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support import ROOT, native_bf16, run_cli

pytestmark = pytest.mark.slow
CPU_TARGETS = ("ort-fp32", "ort-int8", "openvino-fp32", "openvino-int8")


def test_readme_demo_builds_all_cpu_targets_on_real_digits(digits_checkpoint, tmp_path):
    """The README's first command, minus the install (this interpreter already has it), the training
    (the run's digits checkpoint is the one it would make) and its benchmark's duration per point;
    then the README's walkthrough and every other block the docs mark runnable, in the same folder."""
    for name in ("digits.pt", "digits_calib.npz", "digits_test.npz"):
        shutil.copyfile(digits_checkpoint["folder"] / name, tmp_path / name)
    env = {**os.environ, "SKIP_INSTALL": "1", "PYTHON": sys.executable, "WORK": str(tmp_path), "BENCH_DURATION": "0.3s"}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    fp32 = manifest["targets"]["ort-fp32"]["accuracy"]["eval_fp32_torch"]["accuracy_pct"]
    assert fp32 > 95
    for name in CPU_TARGETS:
        entry = manifest["targets"][name]
        assert entry["status"] == "built", (name, entry.get("reason"))
        # digits CNN: labelled test accuracy within the default budget of 1 point of FP32 (the
        # trained model varies run to run; 0.5 was seen to fail at 0.56 for ort-int8).
        assert entry["accuracy"]["eval"]["accuracy_pct"] >= fp32 - 1.0, name
    assert "openvino-int8" in result.stdout and "labelled eval" in result.stdout
    assert not third_party_lines(result.stdout + result.stderr), third_party_lines(result.stdout + result.stderr)
    # It ends with the benchmark report, the winner and that the build recorded it.
    last = result.stdout.splitlines()[-2:]
    assert last[0].startswith("winner: ") and last[1].startswith("winner recorded: "), last
    report = json.loads((tmp_path / "bundle" / "bench" / "report.json").read_text())
    # torch-compile is measured beside them as the compiled-PyTorch baseline, and never wins;
    # openvino-bf16 is built where the CPU has BF16 natively (its flags say so), and only there
    bf16 = ("openvino-bf16",) if native_bf16() else ()
    assert set(report["engines"]) == {"torch-eager-fp32", "torch-compile", *CPU_TARGETS, *bf16}
    assert (manifest["targets"].get("openvino-bf16", {}).get("status") == "built") == bool(bf16)
    assert manifest_winner(tmp_path / "bundle") in CPU_TARGETS
    check_precision_read_back(manifest, result.stdout + result.stderr, (*CPU_TARGETS, *bf16, "torch-compile"))
    # Then the walkthrough: every block the README and the docs mark runnable, in the demo's folder.
    from support import RUNNABLE_BUDGET_S, run_blocks

    ran = run_blocks(tmp_path)
    assert any(": optimize build" in line for line in ran) and (tmp_path / "perf.json").is_file()
    slowest = sorted(ran.items(), key=lambda item: -item[1])[:3]
    assert sum(ran.values()) <= RUNNABLE_BUDGET_S, f"the runnable blocks took {sum(ran.values()):.0f} s: {slowest}"
    assert json.loads((tmp_path / "bundle" / "manifest.json").read_text())["winner"]["target"] in ("ort-fp32", "ort-int8")


def check_precision_read_back(manifest: dict, output: str, targets: tuple[str, ...]) -> None:
    """Every engine's precision is read back from the engine and agrees with its name everywhere: the
    same model's MACs in each, FP32 engines all FP32, BF16 engines BF16 (on a CPU with native BF16,
    where they are built), static INT8 mostly INT8, weight-only INT8 named for its float compute."""
    from optimize.targets.coverage import compute_precision

    coverage = {name: manifest["targets"][name]["coverage"] for name in targets}
    assert len({c["macs_total"] for c in coverage.values()}) == 1, {n: c["macs_total"] for n, c in coverage.items()}
    for name in targets:
        entry, read = manifest["targets"][name], coverage[name]
        scheme = entry["build_config"].get("int8_scheme")
        if entry["precision"] in ("fp32", "bf16"):
            assert read["macs_pct"] == {entry["precision"]: 100.0}, (name, read["macs_pct"])
        elif scheme == "weights":  # ONNX Runtime takes MatMul/Gemm weights only: the digits CNN's head, 0.3%
            assert read["weight_bytes"].get("int8", 0) > 0 and compute_precision(read) in ("fp32", "bf16"), (name, read)
            assert f"int8 weights, {compute_precision(read)} compute" in output
        else:  # static or dynamic: mostly INT8, unless the accuracy recovery kept layers in FP32
            kept = (entry.get("recovery") or {}).get("kept_fp32")
            assert read["macs"].get("int8", 0) > 0, (name, read["macs_pct"])
            assert kept or read["macs_pct"].get("int8", 0) > 50, (name, read["macs_pct"])
    torch_compile = manifest["targets"].get("torch-compile")
    if torch_compile is not None:
        assert f"building torch-compile ({torch_compile['precision']})" in output
        assert compute_precision(torch_compile["coverage"]) == torch_compile["precision"]


# What other libraries' console output looks like: Python's default logging format, a warning
# printed by ``warnings``, a progress bar (tqdm's, rich's), a carriage return redrawing a line.
THIRD_PARTY = re.compile(r"^(WARNING|INFO|DEBUG|ERROR|CRITICAL):|\w+Warning: |━|\d+%\|| it/s\]")


def third_party_lines(text: str) -> list[str]:
    """Lines of redirected console output that did not come from optimize's own console (a
    carriage return, a bar redrawing its line, counts as one)."""
    return [repr(line) for line in text.split("\n") if "\r" in line or THIRD_PARTY.search(line)]


def manifest_winner(bundle: Path) -> str:
    return json.loads((bundle / "manifest.json").read_text())["winner"]["target"]


def test_minilm_int8_keeps_embeddings(tmp_path):
    """The packaged all-MiniLM-L6-v2 folder as a user has it (a sentence-transformers model): every CPU
    target keeps its embeddings, and the served FP32 engine answers as sentence-transformers does."""
    pytest.importorskip("sentence_transformers")
    import numpy as np
    import tritonclient.http as triton_http
    from sentence_transformers import SentenceTransformer

    import models.minilm as minilm
    from support import Server

    np.savez(tmp_path / "text.npz", **minilm.tokenize(minilm.corpus()))
    out = tmp_path / "bundle"
    # torch-compile in BF16 where the CPU has it natively (it re-exports the program in BF16, which a
    # float32 cast recorded inside attention once broke); elsewhere it is FP32, measured in other tests.
    bf16 = ("torch-compile",) if native_bf16() else ()
    result = run_cli("build", minilm.model_dir(), "--calib", tmp_path / "text.npz",
                     "--target", ",".join((*CPU_TARGETS, *bf16)), "--name", "minilm", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["task"] == "embed" and manifest["model_kind"] == "transformer"
    assert manifest["outputs"][0]["name"] == "sentence_embedding"
    assert manifest["source"]["folder"]["sentence_transformers"] == {"mode": "mean", "normalize": True}
    for name in bf16:
        entry = manifest["targets"][name]
        assert entry["status"] == "built" and entry["precision"] == "bf16", (name, entry.get("reason"))
        assert entry["accuracy"]["held_out"]["mean_cosine"] >= 0.99
    check_precision_read_back(manifest, run_cli("inspect", out).stdout + result.stdout + result.stderr,
                              (*CPU_TARGETS, *bf16))
    for name in ("ort-int8", "openvino-int8"):
        held = manifest["targets"][name]["accuracy"]["held_out"]
        assert held["mean_cosine"] >= 0.99, name
        assert held["retrieval_agreement_pct"] >= 95, name
    asked = minilm.extra_corpus()[:6]
    want = SentenceTransformer(str(minilm.model_dir()), device="cpu").encode(asked)
    with Server(out, "--target", "ort-fp32") as server:
        client = triton_http.InferenceServerClient(server.url[len("http://"):])
        tensor = triton_http.InferInput("text", [len(asked), 1], "BYTES")
        tensor.set_data_from_numpy(np.asarray(asked, dtype=object).reshape(-1, 1))
        got = client.infer("minilm", [tensor]).as_numpy("sentence_embedding")
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() > 0.9999, cosine
    # The scheme is chosen by measurement on this CPU; weight-only INT8 on ONNX Runtime dequantizes
    # once at load (QDQ fusions off), not per run.
    record = manifest["targets"]["ort-int8"]
    assert record["scheme_choice"]["chosen"].split("+")[0] == record["build_config"]["int8_scheme"]
    if record["build_config"]["int8_scheme"] == "weights":
        assert record["runner_settings"]["session_config"] == {"session.disable_quant_qdq": "1"}


def test_digits_half_pruned_recovers_within_a_point_then_int8(digits_checkpoint, tmp_path):
    d = digits_checkpoint
    out = tmp_path / "bundle"
    result = run_cli("build", d["ckpt"], "--arch", "models.digits:DigitsNet",
                     "--calib", d["calib"], "--eval-data", d["test"],
                     "--prune", "0.5", "--target", "openvino-int8,ort-int8", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    stage = manifest["stages"]["prune"]
    fp32 = stage["accuracy"]["original"]["eval"]["accuracy_pct"]
    assert stage["macs_ratio"] >= 2 and stage["recovered"] and not stage["warnings"]
    assert stage["accuracy"]["pruned"]["eval"]["accuracy_pct"] < fp32 - 20  # pruning alone breaks it
    assert stage["accuracy"]["recovered"]["eval"]["accuracy_pct"] >= fp32 - 1.0
    for name in ("openvino-int8", "ort-int8"):
        assert manifest["targets"][name]["accuracy"]["eval"]["accuracy_pct"] >= fp32 - 1.5, name
