"""Dynamic batching: one loop per process groups queued requests and feeds N engine instances.

A request waits in a bounded queue. Whenever an engine instance is free, the loop takes the oldest
request and every queued request whose inputs stack with it (same dtypes and non-batch shapes;
token inputs of any length, padded to the longest of the batch), up to ``max_batch`` rows, and runs them as one batch in a worker thread, off the event loop. An idle
server therefore dispatches a lone request at once; under load, batches form from what queued up
while the engines were busy, and ``max_delay_s`` may hold a part-full batch a little longer for
company. Requests that carry their own batch dimension count as that many rows. A full queue
rejects at once (``Overloaded``), it never blocks the caller.

Some calls run on the event loop itself instead of a worker thread, because the hop to a thread
and back costs 0.2-0.5 ms of thread wake-ups on a small virtual machine:
- an engine whose calls take well under a millisecond, always (the hop would cost more than the call);
- a single engine instance with nothing else queued, when its calls take under ``INLINE_IDLE_BELOW_S``
  and requests arrive less often than a call lasts (a closed loop of one client, sparse traffic).
  A request that arrives meanwhile had to wait for that one engine anyway; health checks,
  scrapes and 503s wait at most one such call. Under concurrent load the call goes to a thread:
  requests arriving meanwhile are then decoded and queued while it runs, and batch together
  (gRPC hands a request to the loop only after it runs, so a blocked loop left its batches at
  about one row).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from optimize.targets.base import Runner


# Engine calls shorter than this run on the event loop itself (blocking it for at most this long).
INLINE_BELOW_S = 0.0005
# ... and calls shorter than this when the server is idle and has one engine instance.
INLINE_IDLE_BELOW_S = 0.03


class Overloaded(Exception):
    """The queue is full: answer 503 now rather than wait."""


@dataclasses.dataclass(frozen=True)
class BatchingConfig:
    max_batch: int = 8
    max_delay_s: float = 0.0
    queue_capacity: int = 64  # requests waiting, not counting those running
    instances: int = 1

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class _Item:
    feeds: dict[str, np.ndarray]
    rows: int
    signature: tuple
    future: asyncio.Future
    queued_at: float
    timing: "Timing | None" = None


class BatchObserver:
    """What the batcher reports (the metrics implement it); the default ignores everything."""

    def queued(self, seconds: float) -> None: ...

    def computed(self, seconds: float, rows: int) -> None: ...

    def served(self, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None: ...

    def executed(self, rows: int, timing: "Timing") -> None:
        """One engine call of ``rows`` rows, with the batch's input, infer and output seconds."""


@dataclasses.dataclass
class Timing:
    """Where one request's (or one batch's) time went, in seconds, as Triton's statistics split it:
    waiting for an engine, preparing the batch's inputs (stacking, padding), the engine call, and
    cutting the request's rows out of the batch's outputs."""

    queue_s: float = 0.0
    input_s: float = 0.0
    infer_s: float = 0.0
    output_s: float = 0.0
    batch_rows: int = 0


class Batcher:
    """``await batcher.infer(feeds)`` -> outputs for exactly those rows."""

    def __init__(self, runners: list[Any], config: BatchingConfig, observer: BatchObserver | None = None,
                 pad: dict[str, int] | None = None):
        self.config = config
        # Token inputs batch across lengths: each padded to the longest of its batch with this value.
        self._pad = dict(pad or {})
        self._runners = runners
        self._observer = observer or BatchObserver()
        self._pending: collections.deque[_Item] = collections.deque()
        self._free: asyncio.Queue | None = None
        self._wake: asyncio.Event | None = None
        self._pool = ThreadPoolExecutor(max_workers=len(runners), thread_name_prefix="engine")
        self._task: asyncio.Task | None = None
        self._running = 0
        self._typical_compute_s = 1.0  # moving average of engine time per call; starts "slow"
        self._typical_gap_s = 1.0  # moving average of the time between two requests' arrivals
        self._last_arrival = 0.0

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def busy(self) -> int:
        return self._running

    def start(self) -> None:
        self._free = asyncio.Queue()
        for runner in self._runners:
            self._free.put_nowait(runner)
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def infer(self, feeds: dict[str, np.ndarray], timing: Timing | None = None) -> dict[str, np.ndarray]:
        """The outputs for exactly these rows; ``timing``, when given, is filled in."""
        if len(self._pending) >= self.config.queue_capacity:
            raise Overloaded(f"the queue is full ({self.config.queue_capacity} requests waiting)")
        rows = len(next(iter(feeds.values())))
        signature = tuple((name, array.dtype.str, array.shape[2:] if name in self._pad else array.shape[1:])
                          for name, array in sorted(feeds.items()))
        future = asyncio.get_running_loop().create_future()
        now = time.perf_counter()
        self._typical_gap_s = 0.8 * self._typical_gap_s + 0.2 * (now - self._last_arrival)
        self._last_arrival = now
        self._pending.append(_Item(feeds, rows, signature, future, now, timing))
        self._wake.set()
        return await future

    def _take_batch(self) -> list[_Item]:
        first = self._pending.popleft()
        batch, rows, keep = [first], first.rows, collections.deque()
        while self._pending and rows < self.config.max_batch:
            item = self._pending.popleft()
            if item.signature == first.signature and rows + item.rows <= self.config.max_batch:
                batch.append(item)
                rows += item.rows
            else:
                keep.append(item)
        self._pending.extendleft(reversed(keep))
        return batch

    async def _loop(self) -> None:
        while True:
            while not self._pending:
                self._wake.clear()
                await self._wake.wait()
            runner = await self._free.get()
            if self.config.max_delay_s > 0 and self._running > 0:
                rows = sum(i.rows for i in self._pending)
                deadline = self._pending[0].queued_at + self.config.max_delay_s
                while rows < self.config.max_batch and time.perf_counter() < deadline:
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), deadline - time.perf_counter())
                    except asyncio.TimeoutError:
                        break
                    rows = sum(i.rows for i in self._pending)
            if not self._pending:
                self._free.put_nowait(runner)
                continue
            batch = self._take_batch()
            self._running += 1
            asyncio.get_running_loop().create_task(self._run(runner, batch))

    async def _run(self, runner: Runner, batch: list[_Item]) -> None:
        started = time.perf_counter()
        for item in batch:
            self._observer.queued(started - item.queued_at)
        try:
            feeds = batch[0].feeds if len(batch) == 1 else {
                name: np.concatenate(self._padded([item.feeds[name] for item in batch], self._pad.get(name)))
                for name in batch[0].feeds}
            prepared = time.perf_counter()
            if self._inline():
                outputs = runner.infer(feeds)
            else:
                outputs = await asyncio.get_running_loop().run_in_executor(self._pool, runner.infer, feeds)
            computed = time.perf_counter()
            elapsed = computed - prepared
            self._typical_compute_s = 0.8 * self._typical_compute_s + 0.2 * elapsed
            rows = sum(i.rows for i in batch)
            self._observer.computed(elapsed, rows)
            self._observer.served(feeds, outputs)
            offset, results = 0, []
            for item in batch:
                results.append({k: v[offset:offset + item.rows] for k, v in outputs.items()})
                offset += item.rows
            timing = Timing(0.0, prepared - started, elapsed, time.perf_counter() - computed, rows)
            self._observer.executed(rows, timing)
            for item, result in zip(batch, results):
                if item.timing is not None:
                    item.timing.queue_s = started - item.queued_at
                    item.timing.input_s, item.timing.infer_s = timing.input_s, timing.infer_s
                    item.timing.output_s, item.timing.batch_rows = timing.output_s, rows
                if not item.future.done():
                    item.future.set_result(result)
        except Exception as exc:  # the engine failed: every request of the batch gets the error
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
        finally:
            self._running -= 1
            self._free.put_nowait(runner)
            self._wake.set()

    @staticmethod
    def _padded(arrays: list[np.ndarray], value: int | None) -> list[np.ndarray]:
        if value is None:
            return arrays
        longest = max(a.shape[1] for a in arrays)
        return [a if a.shape[1] == longest else
                np.pad(a, [(0, 0), (0, longest - a.shape[1])] + [(0, 0)] * (a.ndim - 2), constant_values=value)
                for a in arrays]

    def _inline(self) -> bool:
        typical = self._typical_compute_s
        return typical < INLINE_BELOW_S or (typical < INLINE_IDLE_BELOW_S and len(self._runners) == 1
                                            and not self._pending and self._typical_gap_s > typical)

    async def drain(self, timeout_s: float) -> bool:
        """Wait until nothing is queued or running; False if ``timeout_s`` ran out first."""
        deadline = time.perf_counter() + timeout_s
        while (self._pending or self._running) and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        return not (self._pending or self._running)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
        for runner in self._runners:
            runner.close()

