"""Drift, the monitor: the server's series (exact exposition), the background monitor, the bundle's
profiles, the offline and fleet tests of the CLI, the rate-limited alarm log."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading

import numpy as np
import pytest

from support import HALF_HELD_OUT, run_cli
from optimize.drift.profile import profile_from_outputs

# 60 reference samples and windows of 10: a fast window alarms at 10 / (3 x 300) per window,
# often enough to see an alarm in a short test (the default, a false alarm per 20,000, is not).
SMALL_DRIFT = ("--drift-window", "10", "--drift-false-alarm-every", "300")


def small_profile(rng, n=200):
    """A classifier of two tabular columns and three classes, with labels: right about 80% of the time."""
    x = rng.standard_normal((n, 2)).astype(np.float32)
    labels = rng.integers(0, 3, n)
    logits = rng.standard_normal((n, 3)).astype(np.float32)
    logits[np.arange(n), labels] += 2.0
    profile = profile_from_outputs("ort-fp32", {"x": x}, {"logits": logits},
                                   [{"name": "x", "shape": [-1, 2], "dtype": "float32"}],
                                   [{"name": "logits", "shape": [-1, 3]}], "classify", labels=labels)
    return profile, x, logits


def family_text(text: str, name: str) -> str:
    """The HELP, TYPE and sample lines of one family in an exposition."""
    lines = text.splitlines()
    start = lines.index(next(line for line in lines if line.startswith(f"# HELP {name} ")))
    end = start + 2
    while end < len(lines) and not lines[end].startswith("#"):
        end += 1
    return "\n".join(lines[start:end]) + "\n"


def test_monitor_exposition_is_exact_and_an_alarm_names_its_scale(caplog):
    from prometheus_client import CollectorRegistry, generate_latest

    from serve.monitor import DriftMonitor

    profile, x, logits = small_profile(np.random.default_rng(6))
    assert profile.estimates_accuracy and 0.6 < profile.reference_accuracy < 0.95
    monitor = DriftMonitor(profile, "digits", "v1", window=5, scales=(5, 10), requests_per_false_alarm=1000,
                           accuracy_alert_drop=0.05)
    registry = CollectorRegistry()
    registry.register(monitor)
    monitor.observe({"x": x[:12]}, {"logits": logits[:12]})
    monitor.observe({"x": x[12:20]}, {"logits": logits[12:20]})
    text = generate_latest(registry).decode()
    correct = profile.expected_correct({"logits": logits[:20]})
    lab = 'model="digits",{}version="v1"'
    expected = {
        "drift_samples_total": ("counter", "Samples seen by the drift monitor.", [(lab.format(""), "20.0")]),
        "drift_windows_total": ("counter", "Complete windows tested, per scale (samples per window).",
                                [(lab.format('scale="5",'), "4.0"), (lab.format('scale="10",'), "3.0")]),
        "drift_window_step": ("gauge", "Samples between two tests of this scale.",
                              [(lab.format('scale="5",'), "5.0"), (lab.format('scale="10",'), "5.0")]),
        "drift_alpha": ("gauge", "False-alarm rate per test of this scale.",
                        [(lab.format('scale="5",'), "0.0025"), (lab.format('scale="10",'), "0.0025")]),
        "drift_requests_per_false_alarm": ("gauge", "Mean unshifted samples between false alarms, all scales "
                                           "together, the thresholds are set for.", [(lab.format(""), "1000.0")]),
        "drift_reference_accuracy": ("gauge", "Labelled accuracy of the reference (held-out data at build time).",
                                     [(lab.format(""), repr(profile.reference_accuracy))]),
        "drift_estimated_accuracy": ("gauge", "The scale's last window's accuracy estimated without labels "
                                     "(thresholded confidence).",
                                     [(lab.format('scale="5",'), repr(float(correct[15:20].mean()))),
                                      (lab.format('scale="10",'), repr(float(correct[10:20].mean())))]),
        "drift_expected_correct_total": ("counter", "Samples the thresholded confidence expects right (over "
                                         "drift_samples_total: the estimated accuracy).",
                                         [(lab.format(""), repr(float(correct.sum())))]),
        "drift_accuracy_alert_drop": ("gauge", "Estimated accuracy this far below the reference's fires the alert.",
                                      [(lab.format(""), "0.05")]),
    }
    for name, (kind, help_text, samples) in expected.items():
        family = name[:-len("_total")] if kind == "counter" else name
        body = "".join(f"{name}{{{labels}}} {value}\n" for labels, value in samples)
        assert family_text(text, name) == f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n{body}", family
    lines = text.splitlines()
    for family in ("drift_feature_p_value", "drift_feature_statistic", "drift_feature_alarms_total"):
        labels = {line.split("{")[1].split("}")[0] for line in lines if line.startswith(family + "{")}
        assert labels == {f'feature="{f}",model="digits",scale="{s}",version="v1"'
                          for s in (5, 10) for f in profile.names}, family
    assert sum(line.startswith("drift_bin_samples_total{") for line in lines) == sum(f.bins for f in profile.features)
    with caplog.at_level("WARNING", logger="optimize.drift"):
        monitor.observe({"x": x[:10] + 6.0}, {"logits": logits[:10]})
        monitor.flush()
    # Five samples cannot be extreme enough for a 0.25% false-alarm rate; ten can.
    assert "drift: the 10-sample window alarmed" in caplog.text and "strongest feature x[" in caplog.text


def test_the_background_monitor_exposes_what_the_inline_one_does_and_counts_what_it_drops():
    """The server's thread for large inputs: the same series as observing inline (a scrape waits for
    the backlog), plus ``drift_samples_dropped_total``, which counts batches beyond its backlog."""
    import threading

    from prometheus_client import CollectorRegistry, generate_latest

    from serve import monitor as served
    from serve.monitor import BackgroundMonitor, DriftMonitor

    profile, x, logits = small_profile(np.random.default_rng(6))
    texts = []
    for background in (False, True):
        inline = DriftMonitor(profile, "digits", "v1", window=5, scales=(5, 10), requests_per_false_alarm=1000)
        monitor = BackgroundMonitor(inline) if background else inline
        registry = CollectorRegistry()
        registry.register(monitor)
        for start in range(0, 40, 4):
            monitor.observe({"x": x[start:start + 4]}, {"logits": logits[start:start + 4]})
        texts.append(generate_latest(registry).decode())
        if background:
            monitor.close()
    dropped = 'drift_samples_dropped_total{model="digits",version="v1"} 0.0\n'
    assert dropped in texts[1] and texts[1].replace(family_text(texts[1], "drift_samples_dropped_total"), "") == texts[0]

    held = threading.Event()
    slow = DriftMonitor(profile, "digits", "v1", window=5, scales=(5,), requests_per_false_alarm=1000)
    real_observe = slow.observe
    slow.observe = lambda feeds, outputs: (held.wait(10), real_observe(feeds, outputs))
    behind = BackgroundMonitor(slow)
    for start in range(0, 5 * served.BACKLOG_WINDOWS + 20, 5):  # the thread is held: the backlog fills
        behind.observe({"x": x[start % 40:start % 40 + 5]}, {"logits": logits[start % 40:start % 40 + 5]})
    assert behind.dropped == 20
    held.set()
    assert behind.wait(10) and slow.samples == 5 * served.BACKLOG_WINDOWS
    behind.close()


@pytest.fixture(scope="module")
def bundle(bundles):
    return bundles.get(*HALF_HELD_OUT)


def test_build_writes_a_profile_per_target_and_the_cli_tests_files(bundle, tmp_path):
    manifest = json.loads((bundle / "manifest.json").read_text())
    # Readable by other users (a server in a container runs as its own user), as mkdir and open make them.
    assert bundle.stat().st_mode & 0o005 == 0o005 and (bundle / "manifest.json").stat().st_mode & 0o004
    entry = manifest["targets"]["ort-fp32"]["drift"]
    assert entry["profile"] == "drift/ort-fp32.json" and (bundle / entry["reference"]).is_file()
    assert entry["features"][:6] == ["x[0].mean", "x[0].std", "x[1].mean", "x[1].std", "x[2].mean", "x[2].std"]
    assert {"x.centroid_row", "x.sharpness", "output.class", "output.confidence", "output.entropy",
            "output.p0"} <= set(entry["features"])
    assert [s["samples"] for s in entry["scales"]] == [20, 200, 2000]
    assert entry["estimated_accuracy"] == {"method": None, "reason": "no labels were given with the held-out data "
                                                                     "(--calib) at build time: no estimated accuracy"}
    held = np.load(bundle / "data" / "heldout.npz")["x"]
    np.savez(tmp_path / "same.npz", x=held)
    np.savez(tmp_path / "bright.npz", x=held + 1.0)
    same = run_cli("drift", bundle, tmp_path / "same.npz", "--window", "10", "--json")
    assert same.returncode == 0, same.stderr
    report = json.loads(same.stdout)
    assert [(s["samples"], s["windows"]) for s in report["scales"]] == [(10, 6), (100, 0), (1000, 0)]
    assert not report["whole"]["alarm"] and report["estimated_accuracy"] is None
    bright = run_cli("drift", bundle, tmp_path / "bright.npz", "--window", "10")
    assert bright.returncode == 3, bright.stderr
    assert "DRIFT" in bright.stdout and "x[0].mean" in bright.stdout and "scale    10 (every 10)" in bright.stdout
    assert "estimated accuracy: none (no labels were given" in bright.stdout
    bad = run_cli("drift", bundle, tmp_path / "bright.npz", "--window", "10", "--scales", "10,25")
    assert bad.returncode == 2 and "not multiples of the fast window" in bad.stderr
    usage = run_cli("drift", bundle)
    assert usage.returncode == 2 and "exactly one of" in usage.stderr


@pytest.mark.service
def test_servers_export_drift_series_and_the_fleet_test_sums_them(bundle):
    from support import Server, http

    held = np.load(bundle / "data" / "heldout.npz")["x"]
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(Server(bundle, *SMALL_DRIFT)) for _ in range(2)]

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
        assert 'scale="10"' in windows[0] and windows[0].endswith(" 3.0") and alarms[0].endswith(" 1.0"), (windows, alarms)
        assert [w.rsplit(" ", 1)[1] for w in windows[1:]] == ["0.0", "0.0"]  # 30 samples: no window of 100 or 1000
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
        assert report["estimated_accuracy"] is None and report["no_estimate"].startswith("no labels were given")


def test_a_labelled_build_estimates_accuracy_and_an_older_profile_asks_for_a_rebuild(bundles, tiny_checkpoint,
                                                                                   tmp_path):
    # a copy: the test rewrites the profile
    bundle = bundles.copy(tmp_path / "bundle", *HALF_HELD_OUT, calib=tiny_checkpoint["calib_labelled"])
    estimate = json.loads((bundle / "manifest.json").read_text())["targets"]["ort-fp32"]["drift"]["estimated_accuracy"]
    assert estimate["method"] == "thresholded-confidence" and 0.6 <= estimate["reference_accuracy"] <= 0.95
    assert {"accuracy", "estimated", "raw_confidence", "ece", "ece_raw", "estimate_error"} <= set(estimate["check"])
    np.savez(tmp_path / "same.npz", x=np.load(bundle / "data" / "heldout.npz")["x"])
    scanned = run_cli("drift", bundle, tmp_path / "same.npz", "--window", "10", "--json")
    assert scanned.returncode == 0, scanned.stderr
    report = json.loads(scanned.stdout)
    assert report["reference_accuracy"] == estimate["reference_accuracy"]
    assert abs(report["estimated_accuracy"] - report["reference_accuracy"]) < 0.1  # its own reference
    printed = run_cli("drift", bundle, tmp_path / "same.npz", "--window", "10")
    assert "estimated accuracy" in printed.stdout and "(no labels; reference" in printed.stdout
    meta = bundle / "drift" / "ort-fp32.json"
    older = json.loads(meta.read_text())
    del older["version"]
    meta.write_text(json.dumps(older))
    refused = run_cli("drift", bundle, tmp_path / "same.npz")
    assert refused.returncode != 0 and "older version" in refused.stderr and "rebuild" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_a_flapping_window_is_logged_once_a_minute_and_counted_every_time(caplog, monkeypatch):
    from optimize.drift import stream
    from serve.monitor import DriftMonitor

    profile, x, logits = small_profile(np.random.default_rng(6))
    monitor = DriftMonitor(profile, "digits", "v1", window=10, scales=(10,), requests_per_false_alarm=1000,
                           accuracy_alert_drop=0.05)
    with caplog.at_level("INFO", logger="optimize.drift"):
        for _ in range(4):  # shifted, then the reference itself: alarm, clear, alarm, clear ...
            monitor.observe({"x": x[:10] + 6.0}, {"logits": logits[:10]})
            monitor.observe({"x": x[20:30]}, {"logits": logits[20:30]})
        monitor.flush()
    (state,) = monitor.scales
    assert state.alarms >= 3
    assert caplog.text.count("window alarmed") == 1 and caplog.text.count("back within the reference") == 1
    monkeypatch.setattr(stream, "LOG_EVERY_S", 0.0)
    caplog.clear()
    with caplog.at_level("INFO", logger="optimize.drift"):
        monitor.observe({"x": x[:10] + 6.0}, {"logits": logits[:10]})
        monitor.flush()
    assert "more alarm(s) of this scale in the last" in caplog.text, caplog.text
