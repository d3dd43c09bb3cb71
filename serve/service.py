"""What the HTTP and gRPC front ends share: one model, its batching loop, metrics, statistics,
readiness and the drain on SIGTERM.

A front end only turns its wire format into an ``InferRequest`` and the outputs back into its
own; ``InferenceService.infer`` does the rest the same way for both: the model's input checks,
the queue (``Overloaded`` is a 503 / UNAVAILABLE), the engine, the metrics with a ``protocol``
label, the statistics extension and the drift monitor (fed by the batching loop).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Awaitable, Callable, TypeVar

import numpy as np

from optimize import __version__
from optimize.drift.features import non_finite_rows
from serve.batching import Batcher, Overloaded, Timing
from serve.metrics import ServerMetrics
from serve.model import ServedModel
from serve.protocol import InferRequest, ProtocolError
from serve.statistics import Stats

EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "statistics"]
LOG = logging.getLogger("serve")
Encoded = TypeVar("Encoded")


class InferenceService:
    """One served model behind any number of front ends."""

    def __init__(self, model: ServedModel, batcher: Batcher, metrics: ServerMetrics,
                 warmup: Callable[[], Awaitable[None]] | None = None, grace_s: float = 30.0):
        self.model = model
        self.batcher = batcher
        self.metrics = metrics
        self.warmup = warmup
        self.grace_s = grace_s
        self.ready = False
        self.draining = False  # after SIGTERM: answers still come, each front end tells clients to go
        self.stats = Stats()
        self.settings: dict[str, Any] = {}  # the engine's, for the start-up log
        self.precision_read = "not read"  # the engine's precision read back at start-up, for the log
        self.drift = "off"
        self._engine_errors: dict[str, int] = {}
        self._non_finite_said: set[str] = set()
        metrics.on_execution = lambda rows, timing: self.stats.executed(rows, timing) if self.ready else None

    # -- life cycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """The batching loop and the warm-up; readiness turns true after them."""
        self.batcher.start()
        if self.warmup is not None:
            await self.warmup()  # the first calls of an engine are slow: not on a user's request
        self.ready = True
        LOG.info("ready: serving %s version %s", self.model.name, self.model.version)

    async def stop(self) -> None:
        """Finish what is queued or running (at most ``grace_s``), then close the engines."""
        self.ready = False
        queued = self.batcher.queued + self.batcher.busy
        if queued:
            LOG.info("finishing %d queued or running request(s), at most %g s", queued, self.grace_s)
        if not await self.batcher.drain(self.grace_s):
            LOG.warning("stopped with %d request(s) unfinished after %g s", self.batcher.queued, self.grace_s)
        self.batcher.close()
        self._close_monitor()
        LOG.info("stopped: %s", self.stats.summary())

    def _close_monitor(self) -> None:
        monitor = self.metrics.monitor
        if monitor is not None and hasattr(monitor, "close"):  # the drift monitor's thread
            monitor.close()

    def abort(self) -> None:
        LOG.warning("stopped at once (second interrupt) with %d request(s) unfinished; %s",
                    self.batcher.queued + self.batcher.busy, self.stats.summary())
        self.batcher.close()
        self._close_monitor()

    # -- what both protocols describe ---------------------------------------------------------
    def server_metadata(self) -> dict[str, Any]:
        return {"name": "optimize", "version": __version__, "extensions": EXTENSIONS}

    def find_model(self, name: str, version: str = "") -> None:
        """A ``ProtocolError`` (404) unless ``name`` (and ``version``, when given) is what is served."""
        if name != self.model.name:
            raise ProtocolError(f"model '{name}' is not served here; this server serves '{self.model.name}' "
                                f"version {self.model.version}", 404)
        if version and version not in (self.model.version, self.model.content_hash):
            raise ProtocolError(f"model '{name}' has no version '{version}'; this server serves version "
                                f"{self.model.version}", 404)

    def config(self) -> dict[str, Any]:
        return self.model.config(self.batcher.config.to_json())

    def repository_index(self) -> list[dict[str, Any]]:
        """Triton's repository index: the one model served, its version and state."""
        return [{"name": self.model.name, "version": self.model.version,
                 "state": "READY" if self.ready else "UNAVAILABLE", "reason": "" if self.ready else "not ready"}]

    def statistics(self) -> dict[str, Any]:
        return self.stats.to_json(self.model.name, self.model.version)

    # -- inference ----------------------------------------------------------------------------
    async def infer(self, decode: Callable[[], Awaitable[InferRequest]],
                    encode: Callable[[InferRequest, dict[str, np.ndarray]], Encoded], protocol: str,
                    note: dict[str, Any] | None = None) -> Encoded:
        """Decode, check, queue, run and encode one request; every outcome is counted under
        ``protocol``. Raises ``ProtocolError`` with the status to answer."""
        started = time.perf_counter()
        note = {} if note is None else note
        outcome = "client_error"
        gauge = self.metrics.gauge_in_flight
        gauge.inc()
        timing, phases, request = Timing(), None, None
        try:
            request = await decode()
            feeds = self.model.check(request)
            note["rows"] = len(next(iter(feeds.values())))
            if request.truncated:
                note["text_truncated"] = request.truncated
                self.metrics.texts_truncated.inc(request.truncated)
            checked = time.perf_counter()
            try:
                outputs = await self.batcher.infer(feeds, timing)
            except Overloaded as exc:
                outcome = "rejected"
                raise ProtocolError(f"overloaded: {exc}; retry later", 503) from None
            except Exception as exc:  # the engine's fault, not the caller's: logged, answered 500
                outcome = "server_error"
                self._log_engine_error(exc)
                raise ProtocolError(f"the engine failed: {type(exc).__name__}: {str(exc)[:200]}", 500) from None
            answered = time.perf_counter()
            self._count_non_finite_outputs(outputs)
            encoded = encode(request, self.model.select_outputs(request, outputs))
            outcome = "ok"
            phases = {"queue": timing.queue_s, "compute_input": (checked - started) + timing.input_s,
                      "compute_infer": timing.infer_s,
                      "compute_output": timing.output_s + (time.perf_counter() - answered)}
            return encoded
        finally:
            if request is not None and request.non_finite:
                self._count_non_finite_inputs(request.non_finite, outcome)
                note["non_finite"] = request.non_finite
            gauge.dec()
            elapsed = time.perf_counter() - started
            self.metrics.finished(outcome, elapsed, protocol)
            self.stats.record(outcome, elapsed, note.get("rows", 0), phases)

    def _count_non_finite_inputs(self, samples: int, outcome: str) -> None:
        self.metrics.non_finite_inputs.inc(samples)
        if "input" not in self._non_finite_said:  # said once; the counter and the drift monitor keep count
            self._non_finite_said.add("input")
            LOG.warning("a request holds NaN or infinite input values (%s); such samples are counted in "
                        "inference_non_finite_samples_total{tensor=\"input\"} and watched by the drift monitor%s",
                        "refused" if outcome == "client_error" else "answered",
                        "" if self.model.reject_non_finite else "; --reject-non-finite refuses them")

    def _count_non_finite_outputs(self, outputs: dict[str, np.ndarray]) -> None:
        flags = [non_finite_rows(a) for a in outputs.values() if isinstance(a, np.ndarray)]
        samples = int(np.logical_or.reduce(flags).sum()) if flags else 0
        if not samples:
            return
        self.metrics.non_finite_outputs.inc(samples)
        if "output" not in self._non_finite_said:
            self._non_finite_said.add("output")
            LOG.warning("engine %s answered NaN or infinite values for %d sample(s) of a request; JSON answers carry "
                        "them as null (counted in the output's parameters.non_finite), binary ones as they are; "
                        "counted in inference_non_finite_samples_total{tensor=\"output\"}", self.model.target, samples)

    def _log_engine_error(self, exc: Exception) -> None:
        """The traceback of each distinct engine error once (a failing engine fails every request:
        the log must not drown), then a count of repeats every hundredth time."""
        key = f"{type(exc).__name__}: {exc}"
        seen = self._engine_errors.get(key, 0)
        self._engine_errors[key] = seen + 1
        if seen == 0:
            LOG.error("engine %s failed: %s", self.model.target, key, exc_info=exc)
        elif (seen + 1) % 100 == 0:
            LOG.error("engine %s failed %d times with: %s", self.model.target, seen + 1, key)

