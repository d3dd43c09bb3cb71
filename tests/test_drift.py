"""Drift: the window test's false-alarm rate and power at every scale, the features, the accuracy
estimate, the profile, the server's series (exact exposition), the CLI."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading

import numpy as np
import pytest

from support import HALF_HELD_OUT, run_cli
from optimize.drift.accuracy import fit_calibration
from optimize.drift.features import Extractor, Feature
from optimize.drift.profile import Profile, profile_from_outputs
from optimize.drift.stats import WindowTest, plan_scales

CATEGORIES = np.array([0.3, 0.25, 0.2, 0.1, 0.08, 0.05, 0.02])

# 60 reference samples and windows of 10: a fast window alarms at 10 / (3 x 300) per window,
# often enough to see an alarm in a short test (the default, a false alarm per 20,000, is not).
SMALL_DRIFT = ("--drift-window", "10", "--drift-false-alarm-every", "300")


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


IMAGE_FEATURES = ["x[0].mean", "x[0].std", "x[1].mean", "x[1].std", "x.centroid_row", "x.centroid_col",
                  "x.sharpness", "x.layout0", "x.layout1", "x.layout2", "x.layout3"]


def test_extractor_profile_bins_and_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    extractor = Extractor.plan([{"name": "x", "shape": [-1, 2, 4, 4], "dtype": "float32"}],
                               [{"name": "logits", "shape": [-1, 5]}], "classify")
    assert extractor.names == IMAGE_FEATURES + ["inputs.non_finite", "logits.class", "logits.confidence",
                                                "logits.entropy", *[f"logits.p{k}" for k in range(5)]]
    x = rng.random((100, 2, 4, 4)).astype(np.float32)
    logits = rng.standard_normal((100, 5)).astype(np.float32)
    values = extractor.values({"x": x}, {"logits": logits})
    assert values.shape == (100, 20) and (values[:, 11] == 0).all()
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert np.allclose(values[:, 0], x[:, 0].mean(axis=(1, 2))) and (values[:, 12] == logits.argmax(1)).all()
    assert np.allclose(values[:, 15:], probs, atol=1e-6) and np.allclose(values[:, 13], probs.max(axis=1), atol=1e-6)
    found = extractor.features(values)
    assert found[11].kind == "categorical" and found[11].bins == 2
    profile = Profile("ort-fp32", extractor, found, np.zeros((0, 20), np.int64), None)
    profile.reference_bins = profile.bins(values)
    counts = np.bincount(profile.reference_bins[:, 0], minlength=8)
    assert found[0].bins == 8 and counts.min() >= 10  # quantile edges: about an eighth per bin
    profile.save(tmp_path)
    loaded = Profile.load(tmp_path, "ort-fp32")
    assert loaded.names == profile.names and (loaded.reference_bins == profile.reference_bins).all()
    assert (loaded.sample_bins({"x": x}, {"logits": logits}) == profile.reference_bins).all()


def test_any_float32_input_is_binned_without_warnings_and_non_finite_samples_are_a_feature():
    """perf_analyzer's default data: random bytes, so NaN, infinities and values near float32's limits."""
    import warnings

    rng = np.random.default_rng(4)
    extractor = Extractor.plan([{"name": "x", "shape": [-1, 3, 16, 16], "dtype": "float32"},
                                {"name": "t", "shape": [-1, 40], "dtype": "float32"}],
                               [{"name": "logits", "shape": [-1, 10]}], "classify")
    x = rng.random((50, 3, 16, 16)).astype(np.float32)
    t = rng.random((50, 40)).astype(np.float32)
    logits = rng.standard_normal((50, 10)).astype(np.float32)
    reference = extractor.values({"x": x, "t": t}, {"logits": logits})
    found = extractor.features(reference)
    profile = Profile("ort-fp32", extractor, found, np.zeros((0, reference.shape[1]), np.int64), None)
    noise = {"x": rng.integers(0, 256, (8, 3, 16, 16, 4), dtype=np.uint8).view(np.float32)[..., 0],
             "t": np.full((8, 40), np.finfo(np.float32).max, np.float32)}
    noise["t"][1::2] *= -1
    bad = np.full((8, 10), np.nan, np.float32)
    bad[:, 1] = np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        values = extractor.values(noise, {"logits": bad})
        bins = profile.bins(values)
    column = extractor.names.index("inputs.non_finite")
    assert np.isfinite(values).all() and values[:, column].tolist() == [
        float(not np.isfinite(noise["x"][i]).all()) for i in range(8)]
    assert bins.shape == (8, len(found)) and (bins[:, column] <= 1).all()


def test_layout_features_see_what_moves_and_blurs_where_channel_statistics_cannot():
    rng = np.random.default_rng(3)
    extractor = Extractor.plan([{"name": "x", "shape": [-1, 1, 8, 8], "dtype": "float32"}],
                               [{"name": "y", "shape": [-1, 1]}], "regress")
    names = extractor.names
    image = np.zeros((50, 1, 8, 8), np.float32)
    image[:, 0, 1:3, 1:3] = 1 + rng.random((50, 2, 2)) * 0.01  # a blob in the top-left corner
    moved = np.roll(image, (4, 4), axis=(2, 3))  # the same pixels, bottom-right
    blurred = np.zeros_like(image)
    blurred[:, 0, 0:4, 0:4] = 0.25  # the blob's mass spread over four times the area
    y = {"y": np.zeros((50, 1), np.float32)}
    base, shift = extractor.values({"x": image}, y), extractor.values({"x": moved}, y)
    column = {n: i for i, n in enumerate(names)}
    assert np.allclose(base[:, column["x[0].mean"]], shift[:, column["x[0].mean"]])
    assert np.allclose(base[:, column["x[0].std"]], shift[:, column["x[0].std"]])
    assert (shift[:, column["x.centroid_row"]] - base[:, column["x.centroid_row"]] > 0.5).all()
    assert (np.abs(shift[:, column["x.layout0"]] - base[:, column["x.layout0"]]) > 1e-3).all()
    soft = extractor.values({"x": blurred}, y)
    assert (soft[:, column["x.sharpness"]] < base[:, column["x.sharpness"]]).all()


def test_many_classes_are_grouped_and_their_spread_is_the_top_probabilities():
    extractor = Extractor.plan([{"name": "x", "shape": [-1, 4], "dtype": "float32"}],
                               [{"name": "logits", "shape": [-1, 1000]}], "classify")
    assert extractor.names[5:] == ["logits.class", "logits.confidence", "logits.entropy", "logits.top2",
                                   "logits.top3", "logits.top4", "logits.top5"]
    logits = np.zeros((2, 1000), np.float32)
    logits[0, 999], logits[1, 3] = 10, 10
    values = extractor.values({"x": np.zeros((2, 4), np.float32)}, {"logits": logits})
    assert values[:, 5].tolist() == [15, 0]  # 1000 classes in 16 ranges
    feature = extractor.features(values)[5]
    assert feature.kind == "categorical" and feature.bins == 16
    probs = np.ones((2, 1000), np.float32) / 1000
    assert extractor.values({"x": np.zeros((2, 4), np.float32)}, {"logits": probs})[0, 7] > 6.9  # entropy ln 1000


def test_scales_share_the_false_alarm_budget_and_long_ones_catch_what_the_fast_window_misses():
    scales = plan_scales(20)
    assert [(s.samples, s.step) for s in scales] == [(20, 20), (200, 20), (2000, 200)]
    assert sum(s.alpha / s.step for s in scales) == pytest.approx(1 / 20000)
    with pytest.raises(ValueError, match="not multiples"):
        plan_scales(20, (20, 150))
    rng = np.random.default_rng(4)
    test = WindowTest(features(), draw(rng, 1000))
    test.calibrate_scales(scales)
    subtle = CATEGORIES * np.array([0.6, 1, 1, 1.4, 1.4, 1.8, 2.0])
    subtle /= subtle.sum()

    def alarms(n, alpha, p, windows):
        return np.mean([test.test(test.counts(draw(rng, n, p)), n, alpha).alarm for _ in range(windows)])

    fast, long = scales[0], scales[2]
    assert alarms(fast.samples, fast.alpha, subtle, 300) < 0.05
    assert alarms(long.samples, long.alpha, subtle, 40) >= 0.9
    assert alarms(long.samples, long.alpha, CATEGORIES, 200) <= 0.02
    # A long window's counts are sums of fast windows: the same test whichever way they are made.
    parts = [test.counts(draw(rng, 20)) for _ in range(100)]
    summed = test.test(np.sum(parts, axis=0), 2000, long.alpha)
    assert summed.samples == 2000 and summed.p_values.shape == (2,)


def test_accuracy_estimate_is_calibrated_on_one_half_and_checked_on_the_other():
    rng = np.random.default_rng(5)
    n, classes = 600, 5
    labels = rng.integers(0, classes, n)
    logits = rng.standard_normal((n, classes)).astype(np.float32)
    logits[np.arange(n), labels] += 1.5  # right about two thirds of the time...
    logits *= 4  # ...and far more confident than that
    fitted = fit_calibration(logits, False, labels)
    check = fitted["check"]
    assert fitted["method"] == "thresholded-confidence" and fitted["temperature"] > 2
    assert check["estimate_error"] < 0.1 and check["raw_error"] > 0.15 and check["ece"] < check["ece_raw"]
    assert fit_calibration(logits, False, None)["reason"].startswith("no labels were given")
    assert "not class indices" in fit_calibration(logits, False, labels + 10)["reason"]
    assert "fewer than 40" in fit_calibration(logits[:30], False, labels[:30])["reason"]


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
