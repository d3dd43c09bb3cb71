import time

from optimize.bench.measure import MeasureConfig, measure
from optimize import validate
import numpy as np


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
