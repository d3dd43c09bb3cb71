"""The INT8 scheme chosen by measurement on this CPU, reused on a rebuild, and ``serve --reselect``."""

from __future__ import annotations

import json

import pytest

from optimize.bench.measure import faster
from optimize.build.scheme_choice import choose
from support import DEPLOYED, build_tiny, run_cli


def timing(*rounds: float) -> dict:
    return {"p50_ms": sorted(rounds)[len(rounds) // 2], "p50_ms_per_round": list(rounds)}


def test_a_tie_within_the_spread_goes_to_the_more_accurate():
    clearly = [("static", (0.5, 0.0), timing(1.0, 1.0, 1.1, 1.0, 1.0)),
               ("weights", (0.0, 0.0), timing(2.0, 2.1, 2.0, 2.0, 2.2))]
    assert choose(clearly)[0] == "static"  # twice as fast in every round
    noisy = [("static", (0.5, 0.0), timing(1.0, 1.3, 0.9, 1.2, 1.0)),
             ("weights", (0.0, 0.0), timing(1.05, 1.0, 1.2, 1.0, 1.1))]
    label, reason = choose(noisy)
    assert label == "weights" and "within the measured spread" in reason
    assert not faster(timing(1.0, 1.0, 1.0), timing(1.01, 1.01, 1.01))  # 1%: under the least tie


@pytest.fixture(scope="module")
def chosen(bundles):
    out = bundles.get(*DEPLOYED)
    return out, json.loads((out / "manifest.json").read_text())


@pytest.mark.parametrize("target, schemes", [("ort-int8", {"static", "dynamic"}),
                                             ("openvino-int8", {"static", "weights"})])
def test_the_chosen_scheme_is_the_fastest_recorded_one_that_passed(chosen, target, schemes):
    _, manifest = chosen
    record = manifest["targets"][target]
    choice = record["scheme_choice"]
    by_scheme = {c["scheme"]: c for c in choice["candidates"]}
    assert set(by_scheme) == schemes
    if target == "ort-int8":  # the tiny CNN's one Linear layer is too small for weight-only INT8
        assert choice["not_built"]["weights"].startswith("weights: no MatMul/Gemm weights to quantize")
    for c in by_scheme.values():
        assert len(c["p50_ms_per_round"]) == choice["rounds"] >= 3 and c["p50_ms"] > 0 and c["spread_pct"] >= 0
        assert c["selection_drop"] is not None and c["build_time_s"] is not None
    winner = by_scheme[choice["chosen"]]
    assert winner["within_budget"] and record["build_config"]["int8_scheme"] == choice["chosen"]
    assert record["details"]["scheme"] == choice["chosen"]
    # Each scheme's share of MACs in INT8 is read back; a winner that computes mostly in float says so.
    assert all(c["int8_macs_pct"] > 0 for s, c in by_scheme.items() if s != "weights"), by_scheme
    if choice["chosen"] != "weights" and winner["int8_macs_pct"] < 50:
        assert "of its MACs in INT8, the rest in float" in choice["reason"]
    # No other passing scheme is faster beyond the measured spread.
    assert not [c for c in by_scheme.values() if c["within_budget"] and faster(c, winner)]
    assert choice["search_time_s"] >= 0 and choice["reason"]


def test_a_rebuild_on_the_same_cpu_reuses_the_recorded_choice(chosen, tiny_checkpoint, tmp_path):
    out, first = chosen
    result = run_cli("build", tiny_checkpoint["ckpt"], "--arch", tiny_checkpoint["arch"], "--calib",
                     tiny_checkpoint["calib"], "--name", "tiny", "--out", tmp_path / "again", *DEPLOYED)
    out = tmp_path / "again"
    assert result.returncode == 0, result.stderr
    again = json.loads((out / "manifest.json").read_text())["targets"]["ort-int8"]["scheme_choice"]
    assert again["timing_reused"] is True
    assert again["chosen"] == first["targets"]["ort-int8"]["scheme_choice"]["chosen"]
    assert [c["p50_ms_per_round"] for c in again["candidates"]] == \
        [c["p50_ms_per_round"] for c in first["targets"]["ort-int8"]["scheme_choice"]["candidates"]]


def test_an_explicit_scheme_is_respected(tiny_checkpoint, tmp_path):
    out = build_tiny(tiny_checkpoint, tmp_path / "b", "--target", "ort-int8", "--int8-scheme", "dynamic")
    record = json.loads((out / "manifest.json").read_text())["targets"]["ort-int8"]
    assert "scheme_choice" not in record and record["build_config"]["int8_scheme"] == "dynamic"


def test_reselect_serves_the_fastest_gated_target_here(chosen, caplog):
    import logging

    from optimize.bundle import read_manifest
    from serve.reselect import candidates, reselect
    from serve.server import ServeConfig, create_service

    out, manifest = chosen
    names = candidates(read_manifest(out))
    assert set(names) == {n for n, t in manifest["targets"].items() if t["status"] == "built" and t["gate"]["passed"]}
    target, record = reselect(out, read_manifest(out))
    assert set(record["timings"]) == set(names) and target in names
    assert not [n for n in names if faster(record["timings"][n], record["timings"][target])]
    with caplog.at_level(logging.INFO, logger="serve"):
        app = create_service(ServeConfig(out, reselect=True))
    app.batcher.close()
    assert app.model.target in names
    assert any("--reselect on" in r.getMessage() for r in caplog.records)


def test_reselect_with_a_target_is_a_one_line_error(chosen):
    out, _ = chosen
    result = run_cli("serve", out, "--reselect", "--target", "ort-int8", "--port", "1")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--reselect chooses the target by measurement" in result.stderr
