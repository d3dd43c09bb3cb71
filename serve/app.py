"""The HTTP front end: Open Inference Protocol routes as a bare ASGI application.

No web framework sits between the socket server and these handlers: on a small model the
framework's own cost would be most of the latency. Routes (``{m}`` is the model name; every model
route also answers under ``/versions/{v}``):

    GET  /v2/health/live    /v2/health/ready    /v2    /metrics    /openapi.json
    GET  /v2/models/{m}     /v2/models/{m}/ready     /v2/models/{m}/config     /v2/models/{m}/stats
    GET  /v2/models/stats   (every model's statistics, as Triton answers)
    POST /v2/models/{m}/infer    /v2/repository/index

Caller mistakes are a 4xx with ``{"error": "..."}`` (a 405 names the allowed method in ``Allow``);
a full queue is a 503 at once. While the server drains, every answer carries ``Connection: close``,
so keep-alive clients reconnect elsewhere and a connection closes only between requests.
"""

from __future__ import annotations

import datetime
import json
import logging
import time
from typing import Any, Awaitable, Callable

from serve.metrics import CONTENT_TYPE
from serve.openapi import openapi
from serve.protocol import HEADER_LENGTH, ProtocolError, decode_request, encode_response
from serve.service import InferenceService

LOG = logging.getLogger("serve")
ACCESS = logging.getLogger("serve.access")  # JSON lines, one per request, with --access-log
JSON = b"application/json"
BINARY = b"application/octet-stream"
SERVER_ROUTES = {"/v2/health/live": "GET", "/v2/health/ready": "GET", "/v2": "GET", "/metrics": "GET",
                 "/openapi.json": "GET", "/v2/models/stats": "GET", "/v2/repository/index": "POST"}
MODEL_ROUTES = ("", "/ready", "/config", "/stats")


class InferenceApp:
    """ASGI callable: HTTP in front of an ``InferenceService``."""

    def __init__(self, service: InferenceService, max_body_bytes: int = 64 << 20, access_log: bool = False):
        self.service = service
        self.model = service.model
        self.access_log = access_log
        self.max_body_bytes = max_body_bytes
        self._openapi = json.dumps(openapi(service.model)).encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        method, path = scope["method"], scope["path"].rstrip("/") or "/"
        note: dict[str, Any] = {}
        if self.access_log:
            send = _status_recorder(send, note)
        if self.service.draining:
            send = _closing(send)
        try:
            tail, allowed = self._route(path)
            if method != allowed:
                raise ProtocolError(f"{method} {path} is not allowed; this route takes {allowed}", 405,
                                    {"Allow": allowed})
            if path == "/v2/repository/index":  # Triton's repository extension: what is served, and its state
                await self._index(receive, dict(scope["headers"]), send)
            elif allowed == "POST":
                await self._infer(scope, receive, send, note)
            else:
                await self._get(path, tail, send)
        except ProtocolError as exc:
            await _respond(send, exc.status, _error(str(exc)), extra=exc.headers)
        finally:
            if self.access_log:
                self._log_access(scope, method, path, started, note)

    def _route(self, path: str) -> tuple[str | None, str]:
        """The route under the model's prefix (``None`` for a server route) and the method it takes;
        a ``ProtocolError`` (404) for anything else, naming the model when it is the wrong one."""
        if path in SERVER_ROUTES:
            return None, SERVER_ROUTES[path]
        if not path.startswith("/v2/models/"):
            raise ProtocolError(f"{path} is not a route of this server", 404)
        parts = path[len("/v2/models/"):].split("/")
        name, version, rest = parts[0], "", parts[1:]
        if len(rest) >= 2 and rest[0] == "versions":
            version, rest = rest[1], rest[2:]
        tail = "/" + "/".join(rest) if rest else ""
        if tail not in MODEL_ROUTES and tail != "/infer":
            raise ProtocolError(f"{path} is not a route of this server", 404)
        self.service.find_model(name, version)
        return tail, "POST" if tail == "/infer" else "GET"

    def _log_access(self, scope: dict, method: str, path: str, started: float, note: dict[str, Any]) -> None:
        """One JSON line per request on the ``serve.access`` logger."""
        client = scope.get("client") or ("", 0)
        line = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
                "client": client[0], "method": method, "route": path, "status": note.get("status", 0),
                "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                **{k: note[k] for k in ("rows", "text_truncated", "non_finite") if k in note}}
        ACCESS.info(json.dumps(line, separators=(",", ":")))

    async def _get(self, path: str, tail: str | None, send: Callable) -> None:
        service = self.service
        if path == "/v2/health/live":
            await _respond(send, 200, b'{"live":true}')
        elif path == "/v2/health/ready":
            await _respond(send, 200 if service.ready else 503, json.dumps({"ready": service.ready}).encode())
        elif path == "/v2":
            await _respond(send, 200, json.dumps(service.server_metadata()).encode())
        elif path == "/metrics":
            await _respond(send, 200, service.metrics.render(), CONTENT_TYPE.encode())
        elif path == "/openapi.json":
            await _respond(send, 200, self._openapi)
        else:
            if tail == "":
                await _respond(send, 200, json.dumps(service.model.metadata()).encode())
            elif tail == "/ready":
                await _respond(send, 200 if service.ready else 503, json.dumps({"ready": service.ready}).encode())
            elif tail == "/config":
                await _respond(send, 200, json.dumps(service.config()).encode())
            else:
                await _respond(send, 200, json.dumps(service.statistics()).encode())

    async def _index(self, receive: Callable, headers: dict[bytes, bytes], send: Callable) -> None:
        body = await _read_body(receive, headers, 1 << 16)
        ready = False
        if body.strip():
            try:
                asked = json.loads(body)
            except ValueError:
                raise ProtocolError("the repository index request is not valid JSON") from None
            if not isinstance(asked, dict) or not isinstance(asked.get("ready", False), bool):
                raise ProtocolError('the repository index request must be a JSON object like {"ready": true}')
            ready = asked.get("ready", False)
        models = [m for m in self.service.repository_index() if not ready or m["state"] == "READY"]
        await _respond(send, 200, json.dumps(models).encode())

    async def _infer(self, scope: dict, receive: Callable, send: Callable, note: dict[str, Any]) -> None:
        headers = dict(scope["headers"])

        async def decode():
            body = await _read_body(receive, headers, self.max_body_bytes)
            length = headers.get(HEADER_LENGTH.encode())
            return decode_request(body, length.decode() if length is not None else None)

        def encode(request, outputs):
            return encode_response(self.model.name, self.model.version, request, outputs)

        body, extra = await self.service.infer(decode, encode, "http", note)
        await _respond(send, 200, body, BINARY if extra else JSON, extra)  # binary outputs: not JSON, as Triton says


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


def _closing(send: Callable[[dict], Awaitable[None]]) -> Callable[[dict], Awaitable[None]]:
    """Every answer says ``Connection: close`` (uvicorn then closes after sending it)."""
    async def closing(message: dict) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message["headers"], (b"connection", b"close")]
        await send(message)
    return closing


async def _respond(send: Callable[[dict], Awaitable[None]], status: int, body: bytes,
                   content_type: bytes = JSON, extra: dict[str, str] | None = None) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    for key, value in (extra or {}).items():
        headers.append((key.lower().encode(), value.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
