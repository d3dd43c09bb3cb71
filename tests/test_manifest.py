"""The typed manifest: a bundle written before it (schema 1, committed in tests/fixtures/v1_bundle)
reads, round-trips unchanged, and is served, benchmarked and exported as it is."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from optimize.bundle import choose_target, load_runner, read_manifest
from optimize.errors import BundleError
from optimize.bundle.manifest import Manifest, TargetRecord

V1 = Path(__file__).parent / "fixtures" / "v1_bundle"


@pytest.fixture
def v1(tmp_path) -> Path:
    """A copy of the committed schema-1 bundle (tests must not write into the repository)."""
    return Path(shutil.copytree(V1, tmp_path / "bundle"))


def test_a_v1_manifest_reads_and_writes_back_the_same_json():
    data = json.loads((V1 / "manifest.json").read_text())
    manifest = Manifest.from_json(data)
    assert manifest.schema_version == 1 and manifest.model_name == "tiny"
    assert manifest.built_targets() == ["ort-fp32", "openvino-fp32"]
    assert manifest.inputs[0].name == "x" and manifest.inputs[0].shape == (-1, 3, 16, 16)
    assert manifest.record("ort-fp32").folder == "targets/ort-fp32" and manifest.winner_target is None
    assert manifest.to_json() == data


def test_unknown_keys_survive_and_a_newer_schema_is_refused():
    data = json.loads((V1 / "manifest.json").read_text())
    data["from_the_future"] = {"kept": True}
    data["targets"]["ort-fp32"]["new_field"] = 3
    again = Manifest.from_json(data).to_json()
    assert again["from_the_future"] == {"kept": True} and again["targets"]["ort-fp32"]["new_field"] == 3
    with pytest.raises(BundleError, match="schema version 9"):
        Manifest.from_json({**data, "schema_version": 9})
    with pytest.raises(BundleError, match="not a complete manifest"):
        Manifest.from_json({"schema_version": 1, "model_name": "x"})


def test_record_of_a_target_that_is_not_built_names_what_is():
    manifest = read_manifest(V1)
    with pytest.raises(BundleError, match="target ort-int8 is not built .*built: ort-fp32, openvino-fp32"):
        manifest.record("ort-int8", V1)
    failed = TargetRecord.from_json({"status": "failed", "precision": "int8", "folder": "t", "reason": "why"})
    assert not failed.built and failed.to_json() == {"status": "failed", "precision": "int8", "folder": "t",
                                                     "reason": "why"}


def test_a_v1_bundle_runs_and_matches_its_reference_outputs():
    manifest = read_manifest(V1)
    held = np.load(V1 / "data" / "heldout.npz")["x"]
    reference = np.load(V1 / "data" / "reference.npz")["output"]
    for target in manifest.built_targets():
        with load_runner(V1, target) as runner:
            got = runner.infer({"x": held})["output"]
        np.testing.assert_allclose(got, reference, atol=1e-4, rtol=1e-4)
    assert choose_target(manifest, None, V1) == "ort-fp32"


@pytest.mark.service
def test_a_v1_bundle_is_served_benchmarked_and_exported_unchanged(v1, tmp_path):
    from support import Server, http, infer_body, run_cli

    before = (v1 / "manifest.json").read_text()
    with Server(v1, "--target", "openvino-fp32") as server:
        x = np.load(v1 / "data" / "heldout.npz")["x"][:2]
        status, body, _ = http("POST", server.url + "/v2/models/tiny/infer", infer_body(x))
        assert status == 200, body
        metadata = json.loads(http("GET", server.url + "/v2/models/tiny")[1])
        assert metadata["platform"] == "openvino-fp32"
    assert (v1 / "manifest.json").read_text() == before
    result = run_cli("export", "triton", v1, tmp_path / "repo", "--target", "ort-fp32")
    assert result.returncode == 0, result.stderr
    assert list((tmp_path / "repo" / "tiny").glob("*/model.onnx"))  # a v1 manifest has its time: a version
    result = run_cli("bench", v1, "--no-cross-check", "--batch-sizes", "1", "--concurrency", "1", "--rate", "20",
                     "--duration", "0.3s", "--rounds", "1")
    assert result.returncode == 0, result.stderr
    assert read_manifest(v1).winner_target in ("ort-fp32", "openvino-fp32")
