"""Load models: a batch-size sweep, a closed loop at fixed concurrency, an open loop at a request rate.

Every load drives a ``send(batch_size)`` callable that blocks until the answer is back, so the same
loads run against an in-process ``Runner`` or, with an HTTP client as ``send``, a running server.

Open loop: requests are scheduled in advance (Poisson or constant arrivals) and each latency is
measured from its *scheduled* time, so a stalled system is charged for the wait instead of being
flattered by a load generator that slowed down with it (coordinated omission). A request that
could not even be issued on time (every sender busy) is counted as a late send; requests still
unanswered when the drain time runs out are counted as unfinished, with the drain time as a lower
bound of their latency.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

from optimize.bench.measure import MeasureConfig, measure

Send = Callable[[int], Any]
LATE_SEND_S = 0.005  # issued more than this after its scheduled time: a late send


@dataclasses.dataclass
class LoadPoint:
    """The latencies of one load (``kind`` batch | concurrency | rate, at ``value``)."""

    kind: str
    value: float
    latencies_s: list[float]
    wall_s: float
    items_per_request: int = 1
    window_medians_s: list[float] = dataclasses.field(default_factory=list)
    stable: bool = True
    errors: int = 0
    late_sends: int = 0
    unfinished: int = 0
    scheduled: int = 0
    round_medians_s: list[float] = dataclasses.field(default_factory=list)
    # each round's tail percentiles (q -> seconds), so tails and the median come from the same rounds
    round_tails_s: dict[float, list[float]] = dataclasses.field(default_factory=dict)

    @property
    def label(self) -> str:
        unit = {"batch": "batch", "concurrency": "concurrency", "rate": "rate"}[self.kind]
        return f"{unit}={self.value:g}"

    def percentile_ms(self, q: float) -> float:
        if q == 50 and len(self.round_medians_s) > 1:  # the median round: one disturbed round cannot move it
            return float(np.median(self.round_medians_s) * 1000)
        if q in self.round_tails_s:  # likewise the tails: never under the median a rerun would see
            return float(np.median(self.round_tails_s[q]) * 1000)
        return float(np.percentile(self.latencies_s, q) * 1000) if self.latencies_s else float("nan")

    def summary(self) -> dict[str, Any]:
        done = len(self.latencies_s) - self.unfinished  # unanswered requests carry a lower bound only
        # Spread: across rounds where there were several (what a rerun would see), else across windows.
        medians = np.asarray(self.round_medians_s if len(self.round_medians_s) > 1 else self.window_medians_s)
        spread = float((medians.max() - medians.min()) / np.median(medians) * 100) if len(medians) > 1 else 0.0
        out = {"load": self.label, "kind": self.kind, "value": self.value,
               "p50_ms": self.percentile_ms(50), "p90_ms": self.percentile_ms(90),
               "p95_ms": self.percentile_ms(95), "p99_ms": self.percentile_ms(99),
               "max_ms": float(max(self.latencies_s) * 1000) if self.latencies_s else float("nan"),
               "requests": done, "items_per_request": self.items_per_request,
               "throughput_items_per_s": done * self.items_per_request / self.wall_s if self.wall_s else 0.0,
               "requests_per_s": done / self.wall_s if self.wall_s else 0.0,
               "window_p50_ms": [m * 1000 for m in self.window_medians_s], "spread_pct": spread,
               "round_p50_ms": [m * 1000 for m in self.round_medians_s], "rounds": max(1, len(self.round_medians_s)),
               "stable": self.stable, "errors": self.errors}
        if self.kind == "rate":
            out.update(offered_rate_per_s=self.value, scheduled=self.scheduled, late_sends=self.late_sends,
                       late_send_pct=self.late_sends / self.scheduled * 100 if self.scheduled else 0.0,
                       unfinished=self.unfinished)
        return out


def merge_rounds(rounds: list[LoadPoint]) -> LoadPoint:
    """One load measured in several rounds: every sample kept, p50 the median of the rounds' p50s."""
    first = rounds[0]
    if len(rounds) == 1:
        return first
    return dataclasses.replace(
        first, latencies_s=[s for r in rounds for s in r.latencies_s], wall_s=sum(r.wall_s for r in rounds),
        window_medians_s=[m for r in rounds for m in r.window_medians_s],
        stable=all(r.stable for r in rounds), errors=sum(r.errors for r in rounds),
        round_medians_s=[float(np.median(r.latencies_s)) if r.latencies_s else float("nan") for r in rounds],
        round_tails_s={q: [float(np.percentile(r.latencies_s, q)) if r.latencies_s else float("nan") for r in rounds]
                       for q in (90, 95, 99)})


@dataclasses.dataclass(frozen=True)
class LoadPlan:
    """Which loads to run. ``rates=()`` with ``rate_fractions`` derives rates from measured capacity.

    The batch sweep and the closed loops run in ``rounds`` rounds, every engine in turn within a
    round, so a disturbance on a shared machine hits one round of every engine alike instead of all
    of one engine; their p50 is the median round. Each closed-loop round runs ``duration_s / rounds``.
    """

    batch_sizes: tuple[int, ...] = (1, 8, 32)
    concurrency: tuple[int, ...] = (1, 4)
    rates: tuple[float, ...] = ()
    rate_fractions: tuple[float, ...] = (0.5, 0.9, 1.5)
    duration_s: float = 4.0
    rounds: int = 3
    arrivals: str = "poisson"  # poisson | constant
    max_in_flight: int = 64
    seed: int = 0
    measure: MeasureConfig = MeasureConfig(window_s=0.5, stable_windows=3, max_windows=10, time_limit_s=8.0)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def for_duration(cls, duration_s: float, **fields: Any) -> "LoadPlan":
        """A plan whose batch sweep scales with ``duration_s`` as the loops do: windows of up to an
        eighth of it, at most twice it per point (the defaults at 4 s), so a short run is short."""
        measure = dataclasses.replace(cls.measure, window_s=min(cls.measure.window_s, duration_s / 8),
                                      warmup_s=min(MeasureConfig.warmup_s, duration_s / 4),
                                      time_limit_s=min(cls.measure.time_limit_s, 2 * duration_s))
        return cls(duration_s=duration_s, measure=measure, **fields)


def _windows(finish_times: list[float], latencies: list[float], start: float, wall: float,
             count: int = 4) -> list[float]:
    """Median latency of each equal slice of the run, by completion time."""
    if not latencies:
        return []
    edges = np.linspace(start, start + wall, count + 1)
    finish = np.asarray(finish_times)
    values = np.asarray(latencies)
    medians = []
    for low, high in zip(edges[:-1], edges[1:]):
        chosen = values[(finish >= low) & (finish <= high)]
        if len(chosen):
            medians.append(float(np.median(chosen)))
    return medians


def _stable(medians: list[float], tolerance: float) -> bool:
    if len(medians) < 3:
        return False
    recent = np.asarray(medians[-3:])
    return bool(recent.max() - recent.min() <= tolerance * np.median(recent))


def batch_point(send: Send, batch: int, config: MeasureConfig,
                clock: Callable[[], float] = time.perf_counter) -> LoadPoint:
    """One caller, back to back, at ``batch`` samples per request, until stable."""
    result = measure(lambda: send(batch), config, items_per_call=batch, clock=clock)
    return LoadPoint("batch", batch, result.samples_s, sum(result.samples_s), batch,
                     result.window_medians_s, result.stable)


def closed_loop(send: Send, concurrency: int, duration_s: float, tolerance: float = 0.10,
                stop: threading.Event | None = None) -> LoadPoint:
    """``concurrency`` callers, each sending its next request as soon as the last is answered."""
    stop = stop or threading.Event()
    lock = threading.Lock()
    latencies: list[float] = []
    finishes: list[float] = []
    errors = [0]
    warm_until = time.perf_counter() + min(0.5, duration_s / 4)
    end = warm_until + duration_s

    def caller() -> None:
        while not stop.is_set():
            begin = time.perf_counter()
            if begin >= end:
                return
            try:
                send(1)
            except Exception:
                with lock:
                    errors[0] += 1
                continue
            done = time.perf_counter()
            if begin >= warm_until:
                with lock:
                    latencies.append(done - begin)
                    finishes.append(done)

    threads = [threading.Thread(target=caller, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = max(time.perf_counter(), end) - warm_until if not stop.is_set() else time.perf_counter() - warm_until
    medians = _windows(finishes, latencies, warm_until, wall)
    return LoadPoint("concurrency", concurrency, latencies, wall, 1, medians, _stable(medians, tolerance),
                     errors=errors[0])


def arrival_times(rate: float, duration_s: float, arrivals: str, seed: int) -> np.ndarray:
    """Scheduled send times (seconds from the start) for an open loop."""
    if arrivals == "constant":
        return np.arange(int(rate * duration_s)) / rate
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=int(rate * duration_s * 1.5) + 16)
    times = np.cumsum(gaps) - gaps[0]
    return times[times < duration_s]


def _wait_until(due: float) -> None:
    """Sleep until shortly before ``due``, then spin: sleep alone overshoots by up to a millisecond."""
    pause = due - time.perf_counter()
    if pause > 0.001:
        time.sleep(pause - 0.0007)
    while time.perf_counter() < due:
        pass


def open_loop(send: Send, rate: float, duration_s: float, arrivals: str = "poisson", seed: int = 0,
              max_in_flight: int = 64, drain_s: float | None = None, tolerance: float = 0.10,
              stop: threading.Event | None = None) -> LoadPoint:
    """Requests at ``rate`` per second, sent on schedule whatever the answers do."""
    stop = stop or threading.Event()
    schedule = arrival_times(rate, duration_s, arrivals, seed)
    lock = threading.Lock()
    latencies: list[float] = []
    finishes: list[float] = []
    counts = {"late": 0, "errors": 0}
    pool = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="open-loop")
    start = time.perf_counter() + 0.05

    def job(due: float) -> None:
        issued = time.perf_counter()
        try:
            send(1)
        except Exception:
            with lock:
                counts["errors"] += 1
            return
        done = time.perf_counter()
        with lock:
            if issued - due > LATE_SEND_S:
                counts["late"] += 1
            latencies.append(done - due)  # from the scheduled time: waiting counts
            finishes.append(done)

    submitted = 0
    try:
        for offset in schedule:
            if stop.is_set():
                break
            due = start + float(offset)
            _wait_until(due)
            pool.submit(job, due)
            submitted += 1
        deadline = time.perf_counter() + (drain_s if drain_s is not None else max(2.0, duration_s))
        while time.perf_counter() < deadline:
            with lock:
                finished = len(latencies) + counts["errors"]
            if finished >= submitted or stop.is_set():
                break
            time.sleep(0.01)
    finally:
        # Requests never started are dropped; those running finish in the background.
        pool.shutdown(wait=False, cancel_futures=True)
    with lock:
        done_latencies, done_finishes = list(latencies), list(finishes)
        late, errors = counts["late"], counts["errors"]
    unfinished = submitted - len(done_latencies) - errors
    # Unanswered requests waited at least until now: count them at that bound, not as absent.
    now = time.perf_counter()
    unanswered = sorted(now - (start + float(o)) for o in schedule[:submitted])[-unfinished:] if unfinished > 0 else []
    all_latencies = done_latencies + unanswered
    wall = max(max(done_finishes, default=now) - start, min(duration_s, now - start))
    medians = _windows(done_finishes, done_latencies, start, wall)
    return LoadPoint("rate", rate, all_latencies, max(wall, 1e-9), 1, medians, _stable(medians, tolerance),
                     errors=errors, late_sends=late + max(unfinished, 0), unfinished=max(unfinished, 0),
                     scheduled=submitted)
