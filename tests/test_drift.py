"""Drift, the statistics: the window test's false-alarm rate and power at every scale, the features,
the accuracy estimate, the profile (``test_drift_monitor.py``: the server's monitor and the CLI)."""

from __future__ import annotations

import numpy as np
import pytest

from optimize.drift.accuracy import fit_calibration
from optimize.drift.features import Extractor, Feature
from optimize.drift.profile import Profile
from optimize.drift.stats import WindowTest, plan_scales

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
