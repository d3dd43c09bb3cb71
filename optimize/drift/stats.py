"""The window test: per-feature chi-square on binned counts, a threshold with a stated false-alarm rate.

For a window of ``n`` samples, each feature's statistic is Pearson's chi-square of the window's
bin counts against the reference's bin frequencies (smoothed by half a count per bin). At windows
of 20 the chi-square distribution is a poor guide (two or three samples per bin), and the
reference itself is a sample with noise of its own, so nothing is taken from tables: the null
distribution is simulated by the bootstrap. Each simulated window pairs a resampled reference of
the reference's own size (its frequencies carry the same sampling noise the real reference does)
with a window of ``n`` rows drawn from the reference, both from the reference's empirical
distribution, whole rows at a time so the features keep their correlation. This gives each
feature's p-value (its statistic's rank among the simulated ones) and, across features, the min-p
correction of Westfall and Young: the window's p-value is the share of simulated windows whose
smallest feature p-value is at least as small. An alarm is raised when that is at most ``alpha``,
so on unshifted traffic at most ``alpha`` of windows alarm, whatever the number of features and
their correlation (a Bonferroni bound that does not pay for correlated features).
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from typing import Any

import numpy as np

from optimize.drift.features import Feature

NULL_WINDOWS = 4000
CHUNK_ELEMENTS = 4_000_000


@dataclasses.dataclass(frozen=True)
class WindowResult:
    samples: int
    statistics: np.ndarray  # per feature
    p_values: np.ndarray  # per feature, unadjusted
    p_value: float  # the window's, adjusted across features
    alarm: bool
    threshold: float

    def to_json(self, names: list[str]) -> dict[str, Any]:
        return {"samples": self.samples, "p_value": self.p_value, "alarm": self.alarm,
                "features": {n: {"statistic": float(s), "p_value": float(p)}
                             for n, s, p in zip(names, self.statistics, self.p_values)}}


class WindowTest:
    """The per-feature chi-square test of a window's bin counts against the reference, with the
    bootstrap null and min-p correction of the module docstring: ``test(counts, n)`` gives the
    window's p-values and whether it alarms at ``alpha``; ``threshold(n)`` the calibrated bound."""

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
        self._calibrated = lru_cache(maxsize=8)(self._calibrate)

    def counts(self, bins: np.ndarray) -> np.ndarray:
        """(F, width) counts of an (n, F) array of bin indices."""
        flat = bins + np.arange(len(self.features)) * self.width
        return np.bincount(flat.ravel(), minlength=len(self.features) * self.width).reshape(len(self.features), -1)

    def _frequencies(self, bins: np.ndarray) -> np.ndarray:
        counts = self.counts(bins) + 0.5 * self.valid
        return counts / counts.sum(axis=1, keepdims=True)

    def statistics(self, counts: np.ndarray, n: int, frequencies: np.ndarray | None = None) -> np.ndarray:
        """Chi-square per feature; ``counts`` is (..., F, width)."""
        expected = n * (self.frequencies if frequencies is None else frequencies)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(self.valid, (counts - expected) ** 2 / expected, 0.0)
        return terms.sum(axis=-1)

    def _calibrate(self, n: int) -> tuple[np.ndarray, np.ndarray, float]:
        """Simulated null statistics (sorted per feature), min-p values (sorted) and the threshold."""
        rng = np.random.default_rng(self.seed)
        size, features = len(self.reference_bins), len(self.features)
        chunk = max(1, CHUNK_ELEMENTS // ((n + size) * features))  # windows per step, bounding memory
        simulated = []
        for done in range(0, self.null_windows, chunk):
            windows = min(chunk, self.null_windows - done)
            offsets = (np.arange(windows) * features * self.width)[:, None, None]
            base = np.arange(features) * self.width
            reference = self.reference_bins[rng.integers(0, size, size=(windows, size))] + base + offsets
            window = self.reference_bins[rng.integers(0, size, size=(windows, n))] + base + offsets
            shape = (windows, features, self.width)
            ref_counts = np.bincount(reference.ravel(), minlength=windows * features * self.width).reshape(shape)
            counts = np.bincount(window.ravel(), minlength=windows * features * self.width).reshape(shape)
            smoothed = ref_counts + 0.5 * self.valid
            frequencies = smoothed / smoothed.sum(axis=-1, keepdims=True)
            simulated.append(self.statistics(counts, n, frequencies))
        null = np.concatenate(simulated)  # (W, F)
        ranked = np.sort(null, axis=0)
        min_p = np.sort(self._p_values(ranked, null).min(axis=1))
        # The largest min-p at which at most alpha of simulated windows alarm (ties included).
        allowed = np.searchsorted(min_p, min_p, side="right") <= self.alpha * len(min_p)
        threshold = float(min_p[allowed].max()) if allowed.any() else 0.0
        return ranked, min_p, threshold

    @staticmethod
    def _p_values(ranked: np.ndarray, statistics: np.ndarray) -> np.ndarray:
        """Share of simulated statistics at least as large, per feature (with the +1 of a rank test)."""
        total = len(ranked)
        at_least = np.stack([total - np.searchsorted(ranked[:, f], statistics[..., f], side="left")
                             for f in range(ranked.shape[1])], axis=-1)
        return (1 + at_least) / (1 + total)

    def threshold(self, n: int) -> float:
        return self._calibrated(int(n))[2]

    def test(self, counts: np.ndarray, n: int) -> WindowResult:
        ranked, min_p, threshold = self._calibrated(int(n))
        statistics = self.statistics(counts, n)
        p_values = self._p_values(ranked, statistics)
        smallest = float(p_values.min())
        p_window = float((1 + np.searchsorted(min_p, smallest, side="right")) / (1 + len(min_p)))
        return WindowResult(int(n), statistics, p_values, min(1.0, p_window), smallest <= threshold, threshold)
