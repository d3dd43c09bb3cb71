"""The HTTP side: Open Inference Protocol routes as a bare ASGI application.

No web framework sits between the socket server and these handlers: on a small model the
framework's own cost would be most of the latency. Routes (``{m}`` is the model name; every model
route also answers under ``/versions/{v}``):

    GET  /v2/health/live    /v2/health/ready    /v2    /metrics    /openapi.json
    GET  /v2/models/{m}     /v2/models/{m}/ready     /v2/models/{m}/config     /v2/models/{m}/stats
    POST /v2/models/{m}/infer

Caller mistakes are a 4xx with ``{"error": "..."}``; a full queue is a 503 at once.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import json
import logging
import time
from typing import Any, Awaitable, Callable

from optimize import __version__
from serve.batching import Batcher, Overloaded, Timing
from serve.metrics import CONTENT_TYPE, ServerMetrics
from serve.model import ServedModel
from serve.openapi import openapi
from serve.protocol import HEADER_LENGTH, ProtocolError, decode_request, encode_response

EXTENSIONS = ["binary_tensor_data", "model_configuration", "statistics"]
LOG = logging.getLogger("serve")
ACCESS = logging.getLogger("serve.access")  # JSON lines, one per request, with --access-log
JSON = b"application/json"


class Stats:
    """``/v2/models/{m}/stats`` as Triton's statistics extension defines it (durations cumulative, ns).

    ``inference_count`` counts rows (a batch-4 request adds 4), ``execution_count`` engine calls;
    ``inference_stats`` counts requests: ``success`` and ``fail`` end to end, ``queue`` waiting for
    an engine, ``compute_input`` decoding the request and stacking or padding the batch,
    ``compute_infer`` the engine call of its batch, ``compute_output`` cutting its rows out and
    encoding the response; ``batch_stats`` the same three per engine call, by batch size."""

    PHASES = ("queue", "compute_input", "compute_infer", "compute_output")

    def __init__(self) -> None:
        self.success = [0, 0]
        self.fail = [0, 0]
        self.phases = {name: [0, 0] for name in self.PHASES}
        self.batches: dict[int, dict[str, list[int]]] = {}
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self.outcomes: collections.Counter = collections.Counter()
        self.durations: collections.deque = collections.deque(maxlen=100_000)  # for the summary at exit

    def record(self, outcome: str, seconds: float, rows: int = 0, phases: dict[str, float] | None = None) -> None:
        ok = outcome == "ok"
        bucket = self.success if ok else self.fail
        bucket[0] += 1
        bucket[1] += int(seconds * 1e9)
        self.outcomes[outcome] += 1
        if ok:
            self.inference_count += rows
            for name, value in (phases or {}).items():
                self.phases[name][0] += 1
                self.phases[name][1] += int(value * 1e9)
            self.durations.append(seconds)
            self.last_inference_ms = int(time.time() * 1000)

    def executed(self, rows: int, timing: Any) -> None:
        self.execution_count += 1
        batch = self.batches.setdefault(rows, {name: [0, 0] for name in self.PHASES[1:]})
        for name, value in zip(self.PHASES[1:], (timing.input_s, timing.infer_s, timing.output_s)):
            batch[name][0] += 1
            batch[name][1] += int(value * 1e9)

    def to_json(self, name: str, version: str) -> dict[str, Any]:
        def duration(pair: list[int]) -> dict[str, int]:
            return {"count": pair[0], "ns": pair[1]}

        inference = {"success": duration(self.success), "fail": duration(self.fail),
                     **{n: duration(v) for n, v in self.phases.items()},
                     "cache_hit": duration([0, 0]), "cache_miss": duration([0, 0])}
        batches = [{"batch_size": size, **{n: duration(v) for n, v in phases.items()}}
                   for size, phases in sorted(self.batches.items())]
        return {"model_stats": [{"name": name, "version": version, "last_inference": self.last_inference_ms,
                                 "inference_count": self.inference_count, "execution_count": self.execution_count,
                                 "inference_stats": inference, "batch_stats": batches}]}

    def summary(self) -> str:
        """One line: requests by outcome and the answered requests' p50/p99."""
        total = sum(self.outcomes.values())
        parts = ", ".join(f"{n} {name}" for name, n in sorted(self.outcomes.items())) or "none"
        text = f"{total} inference request(s) ({parts})"
        if self.durations:
            ms = sorted(d * 1000 for d in self.durations)
            text += f"; answered p50 {ms[len(ms) // 2]:.2f} ms, p99 {ms[min(len(ms) - 1, int(len(ms) * 0.99))]:.2f} ms"
        return text


class InferenceApp:
    """ASGI callable serving one model through a ``Batcher``."""

    def __init__(self, model: ServedModel, batcher: Batcher, metrics: ServerMetrics,
                 max_body_bytes: int = 64 << 20, warmup: Callable[[], Awaitable[None]] | None = None,
                 grace_s: float = 30.0, access_log: bool = False):
        self.model = model
        self.access_log = access_log
        self.warmup = warmup
        self.grace_s = grace_s
        self.batcher = batcher
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.ready = False
        self.stats = Stats()
        self._engine_errors: dict[str, int] = {}
        self.settings: dict[str, Any] = {}  # the engine's, for the start-up log
        self.drift = "off"
        self._openapi = json.dumps(openapi(model)).encode()
        metrics.on_execution = lambda rows, timing: self.stats.executed(rows, timing) if self.ready else None
        prefix = f"/v2/models/{model.name}"
        self._model_prefixes = (prefix, f"{prefix}/versions/{model.version}")

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        method, path = scope["method"], scope["path"].rstrip("/") or "/"
        note: dict[str, Any] = {}
        if self.access_log:
            send = _status_recorder(send, note)
        try:
            if method == "POST" and path.endswith("/infer"):
                await self._infer(scope, receive, send, path, started, note)
                return
            if method != "GET":
                raise ProtocolError(f"{method} {path} is not a route of this server", 405)
            await self._get(path, send)
        except ProtocolError as exc:
            await _respond(send, exc.status, _error(str(exc)))
        finally:
            if self.access_log:
                self._log_access(scope, method, path, started, note)

    def _log_access(self, scope: dict, method: str, path: str, started: float, note: dict[str, Any]) -> None:
        """One JSON line per request on the ``serve.access`` logger."""
        client = scope.get("client") or ("", 0)
        line = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
                "client": client[0], "method": method, "route": path, "status": note.get("status", 0),
                "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                **{k: note[k] for k in ("rows", "text_truncated") if k in note}}
        ACCESS.info(json.dumps(line, separators=(",", ":")))

    async def _get(self, path: str, send: Callable) -> None:
        if path == "/v2/health/live":
            await _respond(send, 200, b'{"live":true}')
        elif path == "/v2/health/ready":
            await _respond(send, 200 if self.ready else 503, json.dumps({"ready": self.ready}).encode())
        elif path == "/v2":
            body = {"name": "optimize", "version": __version__, "extensions": EXTENSIONS}
            await _respond(send, 200, json.dumps(body).encode())
        elif path == "/metrics":
            await _respond(send, 200, self.metrics.render(), CONTENT_TYPE.encode())
        elif path == "/openapi.json":
            await _respond(send, 200, self._openapi)
        else:
            route = self._model_route(path)
            if route == "":
                await _respond(send, 200, json.dumps(self.model.metadata()).encode())
            elif route == "/ready":
                await _respond(send, 200 if self.ready else 503, json.dumps({"ready": self.ready}).encode())
            elif route == "/config":
                await _respond(send, 200, json.dumps(self.model.config(self.batcher.config.to_json())).encode())
            elif route == "/stats":
                await _respond(send, 200, json.dumps(self._stats()).encode())
            else:
                raise ProtocolError(f"GET {path} is not a route of this server", 404)

    def _model_route(self, path: str) -> str:
        for prefix in sorted(self._model_prefixes, key=len, reverse=True):
            if path == prefix or path.startswith(prefix + "/"):
                return path[len(prefix):]
        if path.startswith("/v2/models/"):
            name = path[len("/v2/models/"):].split("/")[0]
            raise ProtocolError(f"model '{name}' is not served here; this server serves '{self.model.name}' "
                                f"version {self.model.version}", 404)
        raise ProtocolError(f"{path} is not a route of this server", 404)

    async def _infer(self, scope: dict, receive: Callable, send: Callable, path: str, started: float,
                     note: dict[str, Any]) -> None:
        outcome = "client_error"
        gauge = self.metrics.gauge_in_flight
        gauge.inc()
        timing, phases = Timing(), None
        try:
            if self._model_route(path[:-len("/infer")]) != "":
                raise ProtocolError(f"POST {path} is not a route of this server", 404)
            headers = dict(scope["headers"])
            body = await _read_body(receive, headers, self.max_body_bytes)
            length = headers.get(HEADER_LENGTH.encode())
            request = decode_request(body, length.decode() if length is not None else None)
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
            body, extra = encode_response(self.model.name, self.model.version, request,
                                          self.model.select_outputs(request, outputs))
            outcome = "ok"
            phases = {"queue": timing.queue_s, "compute_input": (checked - started) + timing.input_s,
                      "compute_infer": timing.infer_s,
                      "compute_output": timing.output_s + (time.perf_counter() - answered)}
            await _respond(send, 200, body, JSON, extra)
        except ProtocolError as exc:
            await _respond(send, exc.status, _error(str(exc)))
        finally:
            gauge.dec()
            elapsed = time.perf_counter() - started
            self.metrics.finished(outcome, elapsed)
            self.stats.record(outcome, elapsed, note.get("rows", 0), phases)

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

    def _stats(self) -> dict[str, Any]:
        return self.stats.to_json(self.model.name, self.model.version)

    async def _lifespan(self, receive: Callable, send: Callable) -> None:
        try:
            await self._lifespan_events(receive, send)
        except asyncio.CancelledError:  # a second Ctrl-C: the socket server stops at once
            LOG.warning("stopped at once (second interrupt) with %d request(s) unfinished; %s",
                        self.batcher.queued + self.batcher.busy, self.stats.summary())
            self.batcher.close()

    async def _lifespan_events(self, receive: Callable, send: Callable) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.batcher.start()
                if self.warmup is not None:
                    await self.warmup()  # the first calls of an engine are slow: not on a user's request
                self.ready = True
                LOG.info("ready: serving %s version %s", self.model.name, self.model.version)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.ready = False
                queued = self.batcher.queued + self.batcher.busy
                if queued:
                    LOG.info("finishing %d queued or running request(s), at most %g s", queued, self.grace_s)
                drained = await self.batcher.drain(self.grace_s)
                if not drained:
                    LOG.warning("stopped with %d request(s) unfinished after %g s", self.batcher.queued, self.grace_s)
                self.batcher.close()
                LOG.info("stopped: %s", self.stats.summary())
                await send({"type": "lifespan.shutdown.complete"})
                return


def _status_recorder(send: Callable[[dict], Awaitable[None]], note: dict[str, Any]) -> Callable[[dict], Awaitable[None]]:
    async def recording(message: dict) -> None:
        if message["type"] == "http.response.start":
            note["status"] = message["status"]
        await send(message)
    return recording


async def _read_body(receive: Callable, headers: dict[bytes, bytes], limit: int) -> bytes:
    declared = headers.get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ProtocolError(f"the body of {int(declared)} bytes is larger than the limit of {limit}", 413)
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ProtocolError("the client went away before the body was complete", 400)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ProtocolError(f"the body is larger than the limit of {limit} bytes", 413)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _error(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


async def _respond(send: Callable[[dict], Awaitable[None]], status: int, body: bytes,
                   content_type: bytes = JSON, extra: dict[str, str] | None = None) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    for key, value in (extra or {}).items():
        headers.append((key.lower().encode(), value.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
