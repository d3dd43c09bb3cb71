import time

import numpy as np
import pytest

from optimize import validate
from optimize.bench.measure import MeasureConfig, measure


def test_measure_collects_windows_and_percentiles():
    config = MeasureConfig(warmup_iterations=2, warmup_s=0.0, window_s=0.05, stable_windows=3,
                           tolerance=0.5, max_windows=6, time_limit_s=5)
    result = measure(lambda: time.sleep(0.002), config)
    summary = result.summary()
    assert summary["windows"] >= 3 and summary["iterations"] >= 15
    assert 2.0 <= summary["p50_ms"] <= summary["p90_ms"] <= summary["p99_ms"] <= summary["max_ms"]
    assert len(summary["window_p50_ms"]) == summary["windows"]


def test_gate_units_per_task():
    ref = np.eye(4)[[0, 1, 2, 3, 0]] * 5
    cand = ref.copy()
    cand[4] = np.eye(4)[1] * 5  # one of five predictions changes
    m = validate.metrics("classify", ref, cand, labels=np.array([0, 1, 2, 3, 0]))
    assert m["top1_agreement_pct"] == 80.0 and m["accuracy_pct"] == 80.0
    base = validate.metrics("classify", ref, ref, labels=np.array([0, 1, 2, 3, 0]))
    assert not validate.gate("classify", m, base, 1.0).passed
    assert validate.gate("classify", m, base, 20.0).passed
    emb = np.random.default_rng(0).standard_normal((10, 8))
    e = validate.metrics("embed", emb, emb + 1e-3)
    assert e["mean_cosine"] > 0.999 and e["retrieval_agreement_pct"] == 100.0
    assert validate.gate("embed", e, None, 1.0).passed


def test_embeddings_need_their_nearest_neighbours_too():
    """Cosine 0.995 and a tenth of the nearest neighbours changed fails; so few samples that nearest
    neighbours say little are judged on cosine alone; a wider budget lowers the floor."""
    reordered = {"mean_cosine": 0.995, "min_cosine": 0.98, "retrieval_agreement_pct": 90.0, "retrieval_samples": 100}
    verdict = validate.gate("embed", reordered, None, 1.0)
    assert not verdict.passed and "retrieval agreement 90.0% is under 95%" in verdict.message
    assert validate.gate("embed", {**reordered, "retrieval_samples": 20}, None, 1.0).passed
    assert validate.gate("embed", reordered, None, 2.0).passed  # floor 90%
    assert validate.gate("embed", {**reordered, "retrieval_agreement_pct": 96.0}, None, 1.0).passed


def test_the_gate_reports_its_noise_and_keeps_its_verdict():
    """269 held-out samples, 3 disagreements: a drop of 1.12 points fails a 1-point budget as before,
    and the interval says one sample either way could have flipped it."""
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((269, 10))
    candidate = reference.copy()
    candidate[:3] = np.roll(candidate[:3], 1, axis=1)
    point = validate.gate("classify", validate.metrics("classify", reference, candidate), None, 1.0)
    verdict = validate.with_interval(point, validate.drop_interval("classify", reference, candidate, None, False), 269)
    assert verdict.passed is point.passed is False and verdict.drop == pytest.approx(300 / 269)
    low, high = verdict.interval
    assert low < 1.0 < high and verdict.straddles and verdict.more_samples > 269
    assert "straddles the budget: about" in verdict.message and verdict.to_json()["straddles_budget"]
    # Far inside the budget there is nothing to settle; labelled drops are paired per sample.
    labels = reference.argmax(1)
    same = validate.drop_interval("classify", reference, reference, labels, True)
    assert same[0] < 0 < same[1] < 1.5  # no sample changed, and 269 samples still bound the drop only to 1.4
    big = np.tile(reference, (10, 1))
    clear = validate.with_interval(validate.gate("classify", {"top1_agreement_pct": 100.0}, None, 1.0),
                                   validate.drop_interval("classify", big, big, np.tile(labels, 10), True), 2690)
    assert not clear.straddles and clear.more_samples is None and clear.interval[1] < 0.2
    low, high = validate.wilson_interval(0, 100)
    assert low == 0.0 and 3.0 < high < 4.0  # 0 of 100 still allows up to about 3.7%
