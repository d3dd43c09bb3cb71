"""The drift test over a stream of served samples: fast windows of bin counts, summed into every scale.

Every engine batch is kept (a reference to its arrays, nothing copied) until a fast window's worth
of samples has arrived (20 by default); then the features and bins of all of them are computed at
once (``Profile.sample_bins``: a few vectorised numpy operations whose fixed cost is shared by the
window's requests) and the fast window's bin counts are stored. Longer scales (200 and 2,000
samples by default) are sums of the last fast windows' counts, so no raw input is kept beyond one
fast window. Each scale is tested every ``step`` samples (``Scale``; sliding for the long ones) with
the threshold calibrated for its size when the monitor is made; all scales together alarm once per
``requests_per_false_alarm`` samples of unshifted traffic on average. An alarm, and its end, are
logged with the scale. The server's monitor (``serve.monitor``) and ``optimize drift`` both use it.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np

from optimize.drift.profile import Profile
from optimize.drift.stats import Scale, WindowResult

log = logging.getLogger("optimize.drift")
LOG_EVERY_S = 60.0  # per scale, at most one alarm line this often: a flapping window must not flood the log
FLUSH_BYTES = 1 << 20  # pending input bytes that are binned at once, without waiting for a full window


@dataclasses.dataclass
class ScaleState:
    scale: Scale
    features: int
    windows: int = 0
    alarms: int = 0
    alarming: bool = False
    estimate: float | None = None
    last: WindowResult | None = None
    first_alarm: int | None = None  # samples seen when the first alarm was raised
    logged_at: float | None = None  # when an alarm of this scale was last logged (time.monotonic)
    unlogged: int = 0  # alarms raised since then and not logged (counted in the metrics all the same)
    alarm_logged: bool = False  # the alarm going on now was logged: its end is logged too

    def __post_init__(self) -> None:
        self.feature_alarms = np.zeros(self.features, np.int64)


class StreamMonitor:
    """Watches a stream against its reference ``Profile``: ``observe`` keeps each engine batch,
    every ``window`` samples are binned into a fast window, and every scale is tested on the sum of
    its last fast windows (``scales`` holds each one's counts, last result and estimate)."""

    def __init__(self, profile: Profile, window: int | None = None, scales: tuple[int, ...] | None = None,
                 requests_per_false_alarm: float | None = None):
        self.profile = profile
        self.window = int(window or profile.window)
        self.scales = [ScaleState(s, len(profile.features))
                       for s in profile.plan_scales(self.window, scales, requests_per_false_alarm)]
        self.requests_per_false_alarm = float(requests_per_false_alarm or profile.requests_per_false_alarm)
        self.test = profile.window_test()
        self.test.calibrate_scales([s.scale for s in self.scales])  # now, not on the first full window
        features = len(profile.features)
        self.current = np.zeros((features, self.test.width), np.int64)
        self.current_correct = 0.0
        self.filled = 0
        self.pieces = max(s.scale.samples for s in self.scales) // self.window
        self.history = np.zeros((self.pieces, features, self.test.width), np.int32)
        self.history_correct = np.zeros(self.pieces)
        self.closed = 0  # fast windows closed
        self.cumulative = np.zeros((features, self.test.width), np.int64)
        self.samples = 0
        self.correct_total = 0.0
        self.estimates = profile.estimates_accuracy
        spec = profile.extractor.spec
        self._inputs = [i["name"] for i in spec["inputs"]] + (["attention_mask"] if any(
            i["method"] == "tokens" for i in spec["inputs"]) else [])
        self._outputs = [o["name"] for o in spec["outputs"]]
        self._pending: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = []
        self._pending_rows = 0
        self._pending_bytes = 0

    def observe(self, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        kept = {n: feeds[n] for n in self._inputs if n in feeds}
        self._pending.append((kept, {n: outputs[n] for n in self._outputs}))
        self._pending_rows += len(next(iter(outputs.values())))
        self._pending_bytes += sum(a.nbytes for a in kept.values())
        # Small inputs are binned a window at a time (per-call overhead dominates); large ones as
        # they come, so the work is spread over the requests instead of landing on one.
        if self.filled + self._pending_rows >= self.window or self._pending_bytes >= FLUSH_BYTES:
            self.flush()

    def _binned(self, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return self.profile.observed(feeds, outputs)

    def flush(self) -> None:
        """Bin every kept sample, closing each fast window that fills."""
        if not self._pending:
            return
        pending, self._pending, self._pending_rows, self._pending_bytes = self._pending, [], 0, 0
        try:
            feeds = {n: np.concatenate([f[n] for f, _ in pending]) for n in pending[0][0]}
            outputs = {n: np.concatenate([o[n] for _, o in pending]) for n in pending[0][1]}
            bins, correct = self._binned(feeds, outputs)
        except ValueError:  # batches of different shapes (token inputs of several lengths): one at a time
            parts = [self._binned(f, o) for f, o in pending]
            bins, correct = np.concatenate([b for b, _ in parts]), np.concatenate([c for _, c in parts])
        start = 0
        while start < len(bins):
            take = min(len(bins) - start, self.window - self.filled)
            counts = self.test.counts(bins[start:start + take])
            self.current += counts
            self.cumulative += counts
            self.current_correct += float(correct[start:start + take].sum())
            self.filled += take
            start += take
            if self.filled == self.window:
                self._close_window()
        self.samples += len(bins)
        self.correct_total += float(correct.sum())

    def _close_window(self) -> None:
        slot = self.closed % self.pieces
        self.history[slot] = self.current
        self.history_correct[slot] = self.current_correct
        self.closed += 1
        self.current[:] = 0
        self.current_correct = 0.0
        self.filled = 0
        for state in self.scales:
            parts, every = state.scale.samples // self.window, state.scale.step // self.window
            if self.closed >= parts and (self.closed - parts) % every == 0:
                last = np.arange(self.closed - parts, self.closed) % self.pieces
                self._test_scale(state, self.history[last].sum(axis=0), float(self.history_correct[last].sum()))

    def _test_scale(self, state: ScaleState, counts: np.ndarray, correct: float) -> None:
        n = state.scale.samples
        result = self.test.test(counts, n, state.scale.alpha)
        state.windows += 1
        state.alarms += int(result.alarm)
        if result.alarm and state.first_alarm is None:
            state.first_alarm = self.closed * self.window
        state.feature_alarms += result.feature_alarms
        state.last = result
        state.estimate = correct / n if self.estimates else None
        if result.alarm != state.alarming:
            state.alarming = result.alarm
            now = time.monotonic()
            if result.alarm and state.logged_at is not None and now - state.logged_at < LOG_EVERY_S:
                state.unlogged += 1
                state.alarm_logged = False
            elif result.alarm:
                strongest = int(np.argmin(result.p_values))
                estimate = (f"; estimated accuracy {state.estimate:.1%} against {self.profile.reference_accuracy:.1%} "
                            f"on the reference" if state.estimate is not None else "")
                more = (f"; {state.unlogged} more alarm(s) of this scale in the last {now - state.logged_at:.0f} s "
                        f"were counted, not logged" if state.unlogged else "")
                log.warning("drift: the %d-sample window alarmed (p %.2g adjusted across features; strongest "
                            "feature %s, p %.2g)%s%s", n, result.p_value, self.profile.names[strongest],
                            result.p_values[strongest], estimate, more)
                state.logged_at, state.unlogged, state.alarm_logged = now, 0, True
            elif state.alarm_logged:
                log.info("drift: the %d-sample window is back within the reference", n)
                state.alarm_logged = False
