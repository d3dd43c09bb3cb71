"""Drift: the window test's false-alarm rate and power, the profile, the server's series, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import build_tiny, run_cli
from optimize.drift.features import Extractor, Feature
from optimize.drift.profile import Profile
from optimize.drift.stats import WindowTest

CATEGORIES = np.array([0.3, 0.25, 0.2, 0.1, 0.08, 0.05, 0.02])


def draw(rng, n, p=CATEGORIES):
    """Two correlated features: a category and a noisy copy of it."""
    first = rng.choice(len(p), size=n, p=p)
    second = np.where(rng.random(n) < 0.7, first, rng.integers(0, len(p), n))
    return np.stack([first, second], axis=1)


def features():
    return [Feature("a", "categorical", categories=7), Feature("b", "categorical", categories=7)]


@pytest.mark.parametrize("window", [20, 200])
def test_false_alarm_rate_holds_over_reference_draws_and_shifts_are_caught(window):
    rng = np.random.default_rng(0)
    rates = []
    for _ in range(3):  # three reference draws of 250, as small as a held-out set gets
        test = WindowTest(features(), draw(rng, 250), alpha=0.01, null_windows=2000)
        alarms = [test.test(test.counts(draw(rng, window)), window).alarm for _ in range(600)]
        rates.append(np.mean(alarms))
    assert np.mean(rates) <= 0.02 and max(rates) <= 0.04, rates
    shifted = CATEGORIES[::-1]
    caught = [test.test(test.counts(draw(rng, window, shifted)), window).alarm for _ in range(200)]
    assert np.mean(caught) >= 0.9


def test_result_reports_per_feature_and_adjusted_p_values():
    rng = np.random.default_rng(1)
    test = WindowTest(features(), draw(rng, 300), alpha=0.05, null_windows=1000)
    counts = test.counts(np.full((20, 2), 6))  # every sample in the rarest category
    result = test.test(counts, 20)
    assert result.alarm and result.p_value < 0.01 and result.p_values.shape == (2,)
    assert result.p_values.min() <= result.threshold < 0.05
    assert set(result.to_json(["a", "b"])["features"]) == {"a", "b"}


def test_extractor_profile_bins_and_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    extractor = Extractor.plan([{"name": "x", "shape": [-1, 2, 4, 4], "dtype": "float32"}],
                               [{"name": "logits", "shape": [-1, 5]}], "classify")
    assert extractor.names == ["x[0].mean", "x[0].std", "x[1].mean", "x[1].std", "logits.class", "logits.confidence"]
    x = rng.random((100, 2, 4, 4)).astype(np.float32)
    logits = rng.standard_normal((100, 5)).astype(np.float32)
    values = extractor.values({"x": x}, {"logits": logits})
    assert values.shape == (100, 6)
    assert np.allclose(values[:, 0], x[:, 0].mean(axis=(1, 2))) and (values[:, 4] == logits.argmax(1)).all()
    found = extractor.features(values)
    profile = Profile("ort-fp32", extractor, found, np.zeros((0, 6), np.int64), None)
    profile.reference_bins = profile.bins(values)
    counts = np.bincount(profile.reference_bins[:, 0], minlength=8)
    assert found[0].bins == 8 and counts.min() >= 10  # quantile edges: about an eighth per bin
    profile.save(tmp_path)
    loaded = Profile.load(tmp_path, "ort-fp32")
    assert loaded.names == profile.names and (loaded.reference_bins == profile.reference_bins).all()
    assert (loaded.sample_bins({"x": x}, {"logits": logits}) == profile.reference_bins).all()


def test_token_and_embedding_features():
    extractor = Extractor.plan([{"name": "input_ids", "shape": [-1, -1], "dtype": "int64"},
                                {"name": "attention_mask", "shape": [-1, -1], "dtype": "int64"}],
                               [{"name": "embedding", "shape": [-1, 16]}], "embed")
    assert extractor.names[:2] == ["input_ids.length", "input_ids.log_id"]
    assert extractor.names[2:] == ["embedding.cosine_to_mean"] + [f"embedding.proj{i}" for i in range(4)]
    ids = np.array([[101, 2000, 102, 0], [101, 102, 0, 0]])
    values = extractor.values({"input_ids": ids, "attention_mask": (ids > 0).astype(np.int64)},
                              {"embedding": np.ones((2, 16), np.float32)}, np.ones(16, np.float32) / 4)
    assert values[:, 0].tolist() == [3, 2] and values[0, 2] == pytest.approx(1.0)


@pytest.fixture(scope="module")
def bundle(tiny_checkpoint, tmp_path_factory):
    return build_tiny(tiny_checkpoint, tmp_path_factory.mktemp("drift") / "bundle", "--held-out", "0.5",
                      "--target", "ort-fp32")


def test_build_writes_a_profile_per_target_and_the_cli_tests_files(bundle, tmp_path):
    manifest = json.loads((bundle / "manifest.json").read_text())
    # Readable by other users (a server in a container runs as its own user), as mkdir and open make them.
    assert bundle.stat().st_mode & 0o005 == 0o005 and (bundle / "manifest.json").stat().st_mode & 0o004
    entry = manifest["targets"]["ort-fp32"]["drift"]
    assert entry["profile"] == "drift/ort-fp32.json" and (bundle / entry["reference"]).is_file()
    assert entry["features"] == ["x[0].mean", "x[0].std", "x[1].mean", "x[1].std", "x[2].mean", "x[2].std",
                                 "output.class", "output.confidence"]
    held = np.load(bundle / "data" / "heldout.npz")["x"]
    np.savez(tmp_path / "same.npz", x=held)
    np.savez(tmp_path / "bright.npz", x=held + 1.0)
    same = run_cli("drift", bundle, tmp_path / "same.npz", "--window", "10", "--json")
    assert same.returncode == 0, same.stderr
    report = json.loads(same.stdout)
    assert report["windows"] == 6 and not report["whole"]["alarm"]
    bright = run_cli("drift", bundle, tmp_path / "bright.npz", "--window", "10")
    assert bright.returncode == 3, bright.stderr
    assert "DRIFT" in bright.stdout and "x[0].mean" in bright.stdout
    usage = run_cli("drift", bundle)
    assert usage.returncode == 2 and "exactly one of" in usage.stderr


@pytest.mark.service
def test_servers_export_drift_series_and_the_fleet_test_sums_them(bundle):
    from test_serve import Server, http

    held = np.load(bundle / "data" / "heldout.npz")["x"]
    servers = [Server(bundle, "--drift-window", "10"), Server(bundle, "--drift-window", "10")]
    try:
        def send(server, x):
            body = json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                           "data": x.reshape(-1).tolist()}]}).encode()
            assert http("POST", server.url + "/v2/models/tiny/infer", body)[0] == 200

        for i in range(20):  # two windows of unshifted samples on the first server
            send(servers[0], held[i:i + 1])
        send(servers[0], held[:5] + 3.0)  # one window of shifted samples, in requests of 5 rows
        send(servers[0], held[5:10] + 3.0)
        text = http("GET", servers[0].url + "/metrics")[1].decode()
        assert 'drift_windows_total{model="tiny"' in text and 'drift_samples_total{model="tiny"' in text
        windows = [line for line in text.splitlines() if line.startswith("drift_windows_total")]
        alarms = [line for line in text.splitlines() if line.startswith("drift_alarms_total")]
        assert windows[0].endswith(" 3.0") and alarms[0].endswith(" 1.0"), (windows, alarms)
        assert any(line.startswith("drift_feature_p_value{") and 'feature="x[0].mean"' in line for line in text.splitlines())
        assert "drift_bin_samples_total" in text and "drift_threshold" in text

        # Fleet: traffic to both replicas while optimize drift reads both /metrics.
        stop = threading.Event()

        def traffic():
            i = 0
            while not stop.is_set():
                for server in servers:
                    send(server, held[i % len(held):i % len(held) + 1] + 3.0)
                i += 1

        sender = threading.Thread(target=traffic, daemon=True)
        sender.start()
        try:
            fleet = subprocess.run([sys.executable, "-m", "optimize", "drift", str(bundle), "--metrics", servers[0].url,
                                    "--metrics", servers[1].url, "--interval", "3s", "--json"],
                                   capture_output=True, text=True, timeout=120)
        finally:
            stop.set()
            sender.join()
        assert fleet.returncode == 3, fleet.stderr
        report = json.loads(fleet.stdout)
        assert report["samples"] >= 10 and report["whole"]["alarm"] and "2 replica(s)" in report["source"]
    finally:
        for server in servers:
            server.stop()
