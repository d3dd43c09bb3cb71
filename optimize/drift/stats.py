"""The window test: per-feature chi-square on binned counts, a threshold with a stated false-alarm rate.

For a window of ``n`` samples, each feature's statistic is Pearson's chi-square of the window's
bin counts against the reference's bin frequencies (smoothed by half a count per bin). At windows
of 20 the chi-square distribution is a poor guide (two or three samples per bin), and the
reference itself is a sample with noise of its own, so nothing is taken from tables: the null
distribution is simulated by the bootstrap. Each simulated window pairs a resampled reference of
the reference's own size (its frequencies carry the same sampling noise the real reference does)
with a window of ``n`` rows drawn from the reference, both from the reference's empirical
distribution, whole rows at a time so the features keep their correlation. This gives each
feature's p-value: its statistic's rank among the simulated ones, and above the 50 largest of
them an exponential tail fitted to those 50 (peaks over threshold, as Knijnenburg et al. 2009 do
for permutation p-values), so that p-values far smaller than one over the number of simulated
windows are still ranked, each feature by its own tail. Across features, the min-p correction of
Westfall and Young: the window's p-value is the share of simulated windows whose smallest feature
p-value is at least as small. An alarm is raised when that is at most ``alpha``, so on unshifted
traffic at most ``alpha`` of windows alarm, whatever the number of features and their correlation
(a Bonferroni bound that does not pay for correlated features).

Several scales at once (``Scale``): the server tests a fast window (20 samples) and long ones
(200, 2,000), each with its own simulated null. A long window's simulated counts are sums of the
shorter scale's simulated windows (as the server builds a long window by summing fast windows'
counts), so calibrating 2,000-sample windows costs little more than 20-sample ones. Each scale gets
``alpha = step / (scales x requests_per_false_alarm)``, where ``step`` is how many samples pass
between its tests: on unshifted traffic the alarms of all scales together come once per
``requests_per_false_alarm`` samples on average. The simulation draws at least ``20 / alpha``
windows, so the threshold rests on some twenty simulated alarms.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator

import numpy as np

from optimize.drift.features import Feature

NULL_WINDOWS = 4000
DRAWS_PER_ALPHA = 20  # simulated windows per expected false alarm: at least 20 / alpha windows
REFERENCE_RESAMPLES = 1000  # resampled references, paired at random with simulated windows
POOL = 20000  # simulated windows kept to build the next scale's sums
CHUNK_ELEMENTS = 4_000_000
TAIL = 50  # largest simulated statistics per feature that the exponential tail is fitted to
REQUESTS_PER_FALSE_ALARM = 20000
ROUNDING = 1e-5  # relative: a live statistic and a simulated one computed in other float orders


@dataclasses.dataclass(frozen=True)
class Scale:
    """One window scale: ``samples`` per window, tested every ``step`` samples (sliding when
    ``step < samples``), at a false-alarm rate ``alpha`` per test."""

    samples: int
    step: int
    alpha: float

    def to_json(self) -> dict[str, Any]:
        return {"samples": self.samples, "step": self.step, "alpha": self.alpha}


def plan_scales(window: int, sizes: tuple[int, ...] | None = None,
                requests_per_false_alarm: float = REQUESTS_PER_FALSE_ALARM) -> list[Scale]:
    """The scales for a fast window of ``window`` samples: by default ``window``, 10x and 100x it.
    Up to 10 fast windows long, a scale is tested at every fast window (sliding); longer ones ten
    times per window. Each size must be a multiple of ``window``."""
    sizes = tuple(sorted(set(sizes or (window, 10 * window, 100 * window))))
    bad = [s for s in sizes if s % window or s < window]
    if bad:
        raise ValueError(f"drift scales {list(bad)} are not multiples of the fast window ({window} samples)")
    scales = []
    for size in sizes:
        step = window if size <= 10 * window else max(window, (size // 10) // window * window)
        scales.append(Scale(size, step, step / (len(sizes) * requests_per_false_alarm)))
    return scales


@dataclasses.dataclass(frozen=True)
class WindowResult:
    samples: int
    statistics: np.ndarray  # per feature
    p_values: np.ndarray  # per feature, unadjusted (from the fitted curve)
    p_value: float  # the window's, adjusted across features
    alarm: bool
    threshold: float  # the feature p-value at or below which the window alarms
    feature_alarms: np.ndarray  # per feature: passed the threshold

    def to_json(self, names: list[str]) -> dict[str, Any]:
        return {"samples": self.samples, "p_value": self.p_value, "alarm": self.alarm,
                "features": {n: {"statistic": float(s), "p_value": float(p)}
                             for n, s, p in zip(names, self.statistics, self.p_values)}}


@dataclasses.dataclass(frozen=True)
class Null:
    """A scale's simulated null: each feature's simulated statistics (sorted), an exponential tail
    fitted to its ``TAIL`` largest, and the sorted min-p of the simulated windows."""

    ranked: np.ndarray  # (F, W) simulated statistics, sorted per feature
    min_p: np.ndarray  # (W,) sorted
    threshold: float

    def __post_init__(self) -> None:
        total = self.ranked.shape[1]
        tail = min(TAIL, total - 1)
        start = self.ranked[:, total - tail - 1] if total > 1 else np.zeros(len(self.ranked))
        excess = (self.ranked[:, total - tail:] - start[:, None]).mean(axis=1) if tail > 0 else np.ones(len(start))
        object.__setattr__(self, "_tail", (tail, start, np.maximum(excess, 1e-9)))
        # One sorted row of all features (each shifted above the one before) for a single search.
        top = float(self.ranked.max()) + 1.0 if self.ranked.size else 1.0
        object.__setattr__(self, "_top", top)
        object.__setattr__(self, "_offsets", np.arange(len(self.ranked)) * top)
        object.__setattr__(self, "_flat", (self.ranked.astype(np.float64) + self._offsets[:, None]).ravel())
        object.__setattr__(self, "_row_ends", (np.arange(len(self.ranked)) + 1) * total)

    @classmethod
    def fit(cls, statistics: np.ndarray, alpha: float) -> "Null":
        ranked = np.ascontiguousarray(np.sort(statistics, axis=0).T)
        partial = cls(ranked, np.zeros(0), 0.0)
        min_p = np.sort(partial.p_values(statistics).min(axis=1))
        # The largest min-p at which at most alpha of simulated windows alarm.
        allowed = np.searchsorted(min_p, min_p, side="right") <= alpha * len(min_p)
        threshold = float(min_p[allowed].max()) if allowed.any() else float(min_p[0]) * 0.5
        return cls(ranked, min_p, threshold)

    def _at_least(self, statistics: np.ndarray) -> np.ndarray:
        total = self.ranked.shape[1]
        if statistics.ndim == 1:
            clipped = np.minimum(statistics, self._top - 0.5)  # beyond every simulated one: still in its row
            return self._row_ends - np.searchsorted(self._flat, clipped + self._offsets, side="left")
        return np.stack([total - np.searchsorted(self.ranked[f], statistics[..., f], side="left")
                         for f in range(len(self.ranked))], axis=-1)

    def p_values(self, statistics: np.ndarray) -> np.ndarray:
        """Per feature, the share of simulated statistics at least as large (with the +1 of a rank
        test); above the ``TAIL`` largest simulated ones, an exponential tail fitted to them (peaks
        over threshold), so p-values far below one over the simulated windows stay ranked."""
        total = self.ranked.shape[1]
        if total:  # within rounding of the largest simulated one is not beyond it (a constant feature's p is 1)
            largest = self.ranked[:, -1]
            statistics = np.where(statistics <= largest * (1 + ROUNDING), np.minimum(statistics, largest), statistics)
        p = (1 + self._at_least(statistics)) / (1 + total)
        tail, start, excess = self._tail
        above = statistics > start
        if not above.any():
            return p
        fitted = (tail / (1 + total)) * np.exp(-np.maximum(statistics - start, 0.0) / excess)
        return np.where(above, np.minimum(p, fitted), p)

    def window_p_value(self, smallest: float) -> float:
        return float((1 + np.searchsorted(self.min_p, smallest, side="right")) / (1 + len(self.min_p)))


class WindowTest:
    """The per-feature chi-square test of a window's bin counts against the reference, with the
    bootstrap null and min-p correction of the module docstring: ``test(counts, n)`` gives the
    window's p-values and whether it alarms at ``alpha``; ``threshold(n)`` the calibrated bound;
    ``calibrate_scales`` calibrates a chain of scales at once."""

    def __init__(self, features: list[Feature], reference_bins: np.ndarray, alpha: float = 0.01,
                 null_windows: int = NULL_WINDOWS, seed: int = 0):
        self.features = features
        self.alpha = float(alpha)
        self.reference_bins = np.asarray(reference_bins, dtype=np.int64)
        self.width = max(f.bins for f in features)
        self.valid = np.zeros((len(features), self.width), bool)
        for i, f in enumerate(features):
            self.valid[i, :f.bins] = True
        self.null_windows = null_windows
        self.seed = seed
        self.frequencies = self._frequencies(self.reference_bins)
        self._nulls: dict[tuple[int, float], Null] = {}
        self._expected: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._tables: np.ndarray | None = None

    def counts(self, bins: np.ndarray) -> np.ndarray:
        """(F, width) counts of an (n, F) array of bin indices."""
        flat = bins + np.arange(len(self.features)) * self.width
        return np.bincount(flat.ravel(), minlength=len(self.features) * self.width).reshape(len(self.features), -1)

    def _frequencies(self, bins: np.ndarray) -> np.ndarray:
        counts = self.counts(bins) + 0.5 * self.valid
        return (counts / counts.sum(axis=1, keepdims=True)).astype(np.float32)

    def statistics(self, counts: np.ndarray, n: int, frequencies: np.ndarray | None = None) -> np.ndarray:
        """Chi-square per feature; ``counts`` is (..., F, width)."""
        if frequencies is None:  # a live window: the reference's own expectation, kept per size
            if n not in self._expected:
                expected = np.float32(n) * self.frequencies
                self._expected[n] = (expected, np.where(self.valid, 1.0 / np.maximum(expected, 1e-30), 0.0))
            expected, inverse = self._expected[n]
            return ((counts - expected) ** 2 * inverse).sum(axis=-1)
        expected = np.float32(n) * frequencies
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(self.valid, (counts - expected) ** 2 / expected, 0.0)
        return terms.sum(axis=-1)

    def _windows(self, n: int, count: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
        """Simulated (c, F, width) counts of windows of ``n`` rows drawn from the reference."""
        size, features = len(self.reference_bins), len(self.features)
        chunk = max(1, CHUNK_ELEMENTS // (n * features))
        base = np.arange(features) * self.width
        for done in range(0, count, chunk):
            windows = min(chunk, count - done)
            offsets = (np.arange(windows) * features * self.width)[:, None, None]
            rows = self.reference_bins[rng.integers(0, size, size=(windows, n))] + base + offsets
            yield np.bincount(rows.ravel(), minlength=windows * features * self.width).reshape(
                windows, features, self.width).astype(np.int32)

    def _reference_tables(self) -> np.ndarray:
        """Bin frequencies of resampled references, each of the reference's own size (smoothed)."""
        if self._tables is None:
            rng = np.random.default_rng(self.seed + 1)
            tables = [chunk + 0.5 * self.valid for chunk in
                      self._windows(len(self.reference_bins), REFERENCE_RESAMPLES, rng)]
            counts = np.concatenate(tables)
            self._tables = (counts / counts.sum(axis=-1, keepdims=True)).astype(np.float32)
        return self._tables

    def _null(self, chunks: Iterator[np.ndarray], n: int, alpha: float, rng: np.random.Generator,
              keep: int) -> tuple[Null, np.ndarray]:
        """The null of simulated ``chunks``, and the first ``keep`` simulated windows' counts."""
        tables = self._reference_tables()
        simulated, kept, held = [], [], 0
        for counts in chunks:
            frequencies = tables[rng.integers(0, len(tables), size=len(counts))]
            simulated.append(self.statistics(counts, n, frequencies))
            if held < keep:
                kept.append(counts[:keep - held])
                held += len(kept[-1])
        null = Null.fit(np.concatenate(simulated), alpha)  # statistics (W, F)
        pool = np.concatenate(kept) if kept else np.zeros((0, len(self.features), self.width), np.int32)
        return null, pool

    def draws(self, alpha: float) -> int:
        return max(self.null_windows, math.ceil(DRAWS_PER_ALPHA / alpha))

    def calibrate_scales(self, scales: list[Scale]) -> None:
        """Simulate the null of every scale, a long one from sums of the one below it (once: a
        second monitor of the same reference reuses them)."""
        if all((s.samples, s.alpha) in self._nulls for s in scales):
            return
        pool, below = None, 0
        for scale in sorted(scales, key=lambda s: s.samples):
            rng = np.random.default_rng(self.seed + scale.samples)
            count = self.draws(scale.alpha)
            if pool is not None and len(pool) and scale.samples % below == 0:
                parts = scale.samples // below
                chunk = max(1, CHUNK_ELEMENTS // (parts * pool[0].size))
                source = pool

                def summed(source=source, parts=parts, chunk=chunk, rng=rng, count=count) -> Iterator[np.ndarray]:
                    for done in range(0, count, chunk):
                        yield source[rng.integers(0, len(source), size=(min(chunk, count - done), parts))].sum(axis=1)

                chunks = summed()
            else:
                chunks = self._windows(scale.samples, count, rng)
            null, pool = self._null(chunks, scale.samples, scale.alpha, rng, POOL)
            self._nulls[(scale.samples, scale.alpha)] = null
            below = scale.samples

    def calibrated(self, n: int, alpha: float | None = None) -> Null:
        alpha = self.alpha if alpha is None else float(alpha)
        key = (int(n), alpha)
        if key not in self._nulls:
            rng = np.random.default_rng(self.seed + int(n))
            self._nulls[key] = self._null(self._windows(int(n), self.draws(alpha), rng), int(n), alpha, rng, 0)[0]
        return self._nulls[key]

    def threshold(self, n: int, alpha: float | None = None) -> float:
        return self.calibrated(n, alpha).threshold

    def test(self, counts: np.ndarray, n: int, alpha: float | None = None) -> WindowResult:
        null = self.calibrated(n, alpha)
        statistics = self.statistics(counts, n)
        p_values = null.p_values(statistics)
        passed = p_values <= null.threshold
        return WindowResult(int(n), statistics, p_values, min(1.0, null.window_p_value(float(p_values.min()))),
                            bool(passed.any()), null.threshold, passed)
