"""``optimize bench`` on a real tiny bundle, and the winner's selection."""

import json

import pytest

from support import SERVED, native_bf16, run_cli
from optimize.errors import InputSpecError
from optimize.select import LoadSpec, Slo, parse_duration, parse_load, parse_slo, select

# Rates named: the default (fractions of each engine's capacity) asks tens of thousands of requests a
# second of the tiny CNN, which a Python sender cannot keep up with; the README demo runs the default.
QUICK = ("--duration", "0.5s", "--batch-sizes", "1,4", "--concurrency", "1,2", "--rate", "50,100,200", "--rounds", "2")


@pytest.fixture(scope="module")
def bundle(bundles, tmp_path_factory):
    """The serving tests' bundle, copied: bench writes its report into the bundle."""
    return bundles.copy(tmp_path_factory.mktemp("bench") / "bundle", *SERVED)


def test_bench_measures_every_target_and_torch_and_picks_a_winner(bundle):
    result = run_cli("bench", bundle, *QUICK)
    assert result.returncode == 0, result.stderr
    report = json.loads((bundle / "bench" / "report.json").read_text())
    assert set(report["engines"]) == {"torch-eager-fp32", "ort-fp32", "openvino-fp32"}
    for name, engine in report["engines"].items():
        loads = [p["load"] for p in engine["points"]]
        assert loads[:4] == ["batch=1", "batch=4", "concurrency=1", "concurrency=2"], name
        assert engine["points"][0]["rounds"] == 2 and len(engine["points"][0]["round_p50_ms"]) == 2
        rates = [p for p in engine["points"] if p["kind"] == "rate"]
        assert len(rates) == 3 and rates[0]["offered_rate_per_s"] < rates[-1]["offered_rate_per_s"]
        for point in engine["points"]:
            assert 0 < point["p50_ms"] <= point["p90_ms"] <= point["p99_ms"] <= point["max_ms"]
    assert report["ratios_vs_torch"]["torch-eager-fp32"]["batch=1"] == pytest.approx(1.0)
    assert report["ratios_vs_torch"]["ort-fp32"]["batch=1"] > 0
    cross = report["cross_check"]["openvino-fp32"]
    assert cross["benchmark_app_p50_ms"] > 0 and cross["ours_over_benchmark_app"] > 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["winner"]["target"] in ("ort-fp32", "openvino-fp32")
    assert manifest["winner"]["load"] == "batch=1" and "fastest" in manifest["winner"]["reason"]
    markdown = (bundle / "bench" / "report.md").read_text()
    assert "## Winner" in markdown and "latency_vs_batch.png" in markdown
    assert (bundle / "bench" / "latency_vs_batch.png").stat().st_size > 1000
    assert f"winner: {manifest['winner']['reason']}" in result.stdout


def test_bench_slo_nobody_meets_exits_1_unless_allowed(bundle):
    args = ("bench", bundle, "--target", "ort-fp32", "--no-torch", "--no-cross-check", "--duration", "0.3s",
            "--batch-sizes", "1", "--concurrency", "1", "--rate", "20", "--load", "rate=20",
            "--latency-slo", "p99=0.001ms")
    failed = run_cli(*args)
    assert failed.returncode == 1 and "no target within the accuracy budget meets" in failed.stdout
    report = json.loads((bundle / "bench" / "report.json").read_text())
    assert [p["load"] for p in report["engines"]["ort-fp32"]["points"]] == ["batch=1", "concurrency=1", "rate=20"]
    assert run_cli(*args, "--allow-slo-miss").returncode == 0


def test_bench_usage_errors_are_one_line(bundle, tmp_path):
    for args, message in [((tmp_path / "nothing",), "does not exist"),
                          ((bundle, "--target", "trt-int8"), "not built in this bundle"),
                          ((bundle, "--latency-slo", "fast"), "must look like p99=20ms"),
                          ((bundle, "--batch-sizes", "1,x"), "comma-separated numbers"),
                          ((bundle, "--duration", "-3s"), "positive time")]:
        result = run_cli("bench", *args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_parsers():
    assert parse_slo("p99=20ms") == Slo(99, 20.0) and parse_slo("p50<0.5s") == Slo(50, 500.0)
    assert parse_load("rate=100") == LoadSpec("rate", 100.0)
    assert parse_duration("2m") == 120 and parse_duration("500ms") == 0.5
    for bad in ("p42=1ms", "99=1ms"):
        with pytest.raises(InputSpecError):
            parse_slo(bad)
    with pytest.raises(InputSpecError):
        parse_load("qps=5")


def _point(load, p99, throughput=100.0):
    return {"load": load, "p50_ms": p99 / 2, "p99_ms": p99, "throughput_items_per_s": throughput}


def test_selection_prefers_fastest_within_budget_and_slo():
    from optimize.bundle.manifest import Manifest, TargetRecord

    records = {"a": {"status": "built", "gate": {"passed": True, "drop": 0.1}},
               "b": {"status": "built", "gate": {"passed": False, "drop": 3.0, "message": "drop 3 exceeds 1"}},
               "c": {"status": "built", "gate": {"passed": True, "drop": 0.5}},
               "d": {"status": "unavailable", "reason": "no GPU"}}
    manifest = Manifest("m", "classify", [], [], {n: TargetRecord.from_json({"precision": "fp32", "folder": f"targets/{n}",
                                                                            **r}) for n, r in records.items()})
    report = {"engines": {"a": {"points": [_point("batch=1", 12.0)]}, "b": {"points": [_point("batch=1", 2.0)]},
                          "c": {"points": [_point("batch=1", 8.0)]}}}
    decision = select(manifest, report, Slo(99, 10.0), LoadSpec("batch", 1))
    assert decision["target"] == "c" and decision["met"]
    verdicts = {c["target"]: c for c in decision["candidates"]}
    assert "outside the accuracy budget" in verdicts["b"]["reason"]  # fastest, but not accurate enough
    assert "misses" in verdicts["a"]["reason"] and "not built" in verdicts["d"]["reason"]
    assert select(manifest, report, None, LoadSpec("batch", 1))["target"] == "c"
    missed = select(manifest, report, Slo(99, 5.0), LoadSpec("batch", 1))
    assert missed["target"] is None and missed["fastest_within_budget"] == "c"
    assert "not measured" in {c["target"]: c for c in select(manifest, report, None, LoadSpec("rate", 50))["candidates"]}["a"]["reason"]


@pytest.mark.slow
def test_build_target_auto_benchmarks_and_records_the_winner(tiny_checkpoint, tmp_path):
    t = tiny_checkpoint
    out = tmp_path / "auto"
    result = run_cli("build", t["ckpt"], "--arch", t["arch"], "--calib", t["calib"], "--target", "auto",
                     "--latency-slo", "p99=1s", "--max-accuracy-drop", "1%", "--bench-duration", "0.5s", "--out", out)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    winner = manifest["winner"]
    assert winner["met"] and winner["slo"] == "p99 <= 1000 ms" and winner["load"] == "batch=1"
    assert manifest["targets"][winner["target"]]["gate"]["passed"]
    assert {c["target"] for c in winner["candidates"]} == set(manifest["targets"])
    assert manifest["plan"]["max_accuracy_drop"] == 1.0
    assert json.loads((out / "bench" / "report.json").read_text())["config"]["plan"]["duration_s"] == 0.5
    assert (out / "bench" / "report.md").is_file() and f"winner: {winner['reason']}\nwinner recorded: {winner['target']}" in result.stdout
    # torch-compile is built and measured as the baseline it is, never picked
    baseline = {c["target"]: c for c in winner["candidates"]}["torch-compile"]
    assert manifest["targets"]["torch-compile"]["status"] == "built" and winner["target"] != "torch-compile"
    assert baseline["baseline"] and "never picked" in baseline["reason"] and baseline["latency_ms"] > 0
    # in BF16 where this CPU has it natively, recorded on the target (the name stays)
    precision = "bf16" if native_bf16() else "fp32"
    assert manifest["targets"]["torch-compile"]["precision"] == precision
    assert manifest["targets"]["torch-compile"]["runner_settings"]["precision"] == precision


def test_ctrl_c_keeps_what_was_measured(bundle):
    import os
    import re
    import signal
    import subprocess
    import sys

    # PYTHONFAULTHANDLER: if it does not stop, SIGABRT prints where every thread of it was
    process = subprocess.Popen([sys.executable, "-m", "optimize", "bench", str(bundle), "--no-cross-check",
                                "--batch-sizes", "1", "--concurrency", "1,2,3,4", "--duration", "5s"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    report = bundle / "bench" / "report.json"
    before = report.stat().st_mtime if report.exists() else 0
    for line in process.stderr:  # redirected, a line per load measured; past three loads the
        done = re.search(r"measured .* \((\d+)/\d+\)", line)  # fourth, a 5 s closed loop, is running
        if done and int(done.group(1)) >= 3:
            break
    process.send_signal(signal.SIGINT)
    try:
        stdout, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        stdout, stderr = process.communicate(timeout=30)
        raise AssertionError(f"bench did not stop within 60 s of SIGINT; where it was:\n{stderr[-6000:]}") from None
    assert process.returncode == 130, stderr[-2000:]
    assert "interrupted: keeping what was measured" in stderr and "Traceback" not in stderr
    data = json.loads(report.read_text())
    assert report.stat().st_mtime > before and data["interrupted"]
    assert data["engines"] and all(e["points"] for e in data["engines"].values())


def _served(bundle):
    """(the target ``optimize serve`` would serve, the version it would answer as, its content hash)."""
    from optimize.bundle import choose_target, read_manifest
    from optimize.bundle.folder import version_number
    from serve.model import content_hash

    manifest = read_manifest(bundle)
    target = choose_target(manifest, None, bundle)
    return target, version_number(manifest, target), content_hash(bundle, manifest, target)


@pytest.mark.slow
def test_bench_changes_the_winner_only_when_asked(tiny_checkpoint, tmp_path):
    t = tiny_checkpoint
    out = tmp_path / "b"
    built = run_cli("build", t["ckpt"], "--arch", t["arch"], "--calib", t["calib"], "--target",
                    "ort-fp32,openvino-fp32", "--latency-slo", "p99=1000ms", "--bench-duration", "0.3s", "--out", out)
    assert built.returncode == 0, built.stderr
    winner, version, _ = _served(out)
    other = ({"ort-fp32", "openvino-fp32"} - {winner}).pop()
    quick = ("--no-torch", "--no-cross-check", "--duration", "0.3s", "--batch-sizes", "1", "--concurrency", "1",
             "--rate", "20")
    subset = run_cli("bench", out, "--target", other, *quick)
    assert subset.returncode == 0, subset.stderr
    assert f"winner unchanged: {winner} (this run did not measure {winner}; pass --select" in subset.stdout, subset.stdout
    missed = run_cli("bench", out, *quick, "--latency-slo", "p99=0.001ms", "--allow-slo-miss")
    assert missed.returncode == 0 and f"winner unchanged: {winner} (no target qualified in this run" in missed.stdout
    other_load = run_cli("bench", out, *quick, "--load", "concurrency=1")
    assert "differ from those the winner was chosen by (batch=1, p99 <= 1000 ms)" in other_load.stdout
    assert _served(out)[:2] == (winner, version)  # benchmark results were added; what is served did not move
    report = json.loads((out / "bench" / "report.json").read_text())
    assert report["winner_applied"] is False and report["winner"]["load"] == "concurrency=1"
    chosen = run_cli("bench", out, "--target", other, *quick, "--select")
    assert chosen.returncode == 0 and f"winner recorded: {other} (was {winner})" in chosen.stdout
    assert _served(out)[0] == other and _served(out)[1] != version


@pytest.mark.slow
def test_the_version_grows_per_build_and_the_content_hash_moves_with_the_engine(tiny_checkpoint, tmp_path):
    import torch

    t = tiny_checkpoint
    flags = ("--arch", t["arch"], "--calib", t["calib"], "--target", "ort-fp32")
    assert run_cli("build", t["ckpt"], *flags, "--out", tmp_path / "a").returncode == 0
    assert run_cli("build", t["ckpt"], *flags, "--out", tmp_path / "a2").returncode == 0
    # Another build of the same model: a later (larger) decimal version, the same engine, the same content hash.
    assert (tmp_path / "a" / "manifest.json").read_bytes() != (tmp_path / "a2" / "manifest.json").read_bytes()
    (target, first, content), (target2, second, content2) = _served(tmp_path / "a"), _served(tmp_path / "a2")
    assert target == target2 and content == content2 and int(second) > int(first) and str(int(first)) == first
    state = torch.load(t["ckpt"])
    state["head.bias"] = state["head.bias"] + 0.5
    torch.save(state, tmp_path / "changed.pt")
    assert run_cli("build", tmp_path / "changed.pt", *flags, "--out", tmp_path / "c").returncode == 0
    assert _served(tmp_path / "c")[2] != content
