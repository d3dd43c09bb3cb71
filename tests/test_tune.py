"""``optimize tune``: the real server measured per configuration; the choice recorded beside the
manifest (no new model version), used by ``optimize serve`` and carried by the Triton export."""

from __future__ import annotations

import json

import pytest

from support import SERVED, Server, http, run_cli

pytestmark = pytest.mark.service


def test_tune_records_a_measured_configuration_that_serve_and_the_triton_export_use(bundles, tmp_path):
    from optimize.bundle.folder import read_manifest, version_number
    from optimize.cpu import detect

    bundle = bundles.copy(tmp_path / "bundle", *SERVED)
    version = version_number(read_manifest(bundle), "ort-fp32")
    result = run_cli("tune", bundle, "--target", "ort-fp32", "--latency-slo", "p99=500ms", "--concurrency", "1,4",
                     "--window", "0.4s", "--time-budget", "6s", "--max-batch", "1,8", "--max-delay-ms", "1",
                     "--confirm-rounds", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((bundle / "serving.json").read_text())
    assert record["target"] == "ort-fp32" and record["measured_on"]["cores"] == detect().cores
    trials = record["trials"]
    assert len(trials) >= 2 and trials[0]["knobs"] == {"instances": 1, "threads": 0, "max_batch": 8,
                                                       "max_delay_ms": 0.0}
    assert all(p["throughput_per_s"] > 0 and p["tail_ms"] > 0 for t in trials for p in t["points"])
    best = max(trials, key=lambda t: t["throughput_per_s"])
    if record["knobs"] != trials[0]["knobs"]:  # a change of configuration was measured again against the default
        assert best["knobs"] == record["knobs"] and set(record["confirm"]) == {"default", "tuned"}
    assert (bundle / "tune.md").read_text().startswith("# Serving configuration of ort-fp32")
    knobs = record["knobs"]

    exported = run_cli("export", "triton", bundle, tmp_path / "repo", "--target", "ort-fp32")
    assert exported.returncode == 0, exported.stderr
    config = (tmp_path / "repo" / "tiny" / "config.pbtxt").read_text()
    assert f"max_batch_size: {knobs['max_batch']}\n" in config and f"count: {knobs['instances']}\n" in config
    assert f"max_queue_delay_microseconds: {int(knobs['max_delay_ms'] * 1000)}\n" in config
    assert (tmp_path / "repo" / "tiny" / version).is_dir()  # tuning made no new version

    record["measured_on"]["cores"] = detect().cores + 62  # as if tuned on a bigger machine
    (bundle / "serving.json").write_text(json.dumps(record))
    with Server(bundle, "--target", "ort-fp32", "--no-grpc") as server:
        meta = json.loads(http("GET", server.url + "/v2/models/tiny")[1])
        served = json.loads(http("GET", server.url + "/v2/models/tiny/config")[1])
        server.stop()
    log = server.process.stderr.read()
    assert meta["versions"] == [version]
    assert served["max_batch_size"] == knobs["max_batch"] and served["instance_group"][0]["count"] == knobs["instances"]
    assert "serving configuration tuned by optimize tune on" in log and record["label"] in log
    assert f"{detect().cores + 62} cores there, {detect().cores} here" in log
