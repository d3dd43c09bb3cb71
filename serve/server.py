"""Putting a bundle behind the HTTP and gRPC endpoints: engines, batching, metrics, warm-up,
graceful stop.

``ServeConfig`` holds every choice; ``create_service`` builds the ``InferenceService`` both front
ends share (tests drive it in process), ``serve`` runs uvicorn (HTTP) and grpcio's asyncio server
(gRPC) on one event loop. On SIGTERM readiness (HTTP's and the gRPC health service's) turns false
at once; requests are still answered for ``drain_delay_s`` (load balancers take seconds to
notice), HTTP ones with ``Connection: close`` so that keep-alive clients reconnect elsewhere; then
both listeners close (gRPC clients get GOAWAY; an idle HTTP connection is closed between
requests), queued and running requests complete, and the process exits within ``grace_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import socket
import time
from pathlib import Path
from typing import Iterator, TYPE_CHECKING

import numpy as np
import uvicorn

from optimize.bundle.folder import version_number, choose_target, load_runner, read_manifest, text_encoder
from optimize.bundle.table import precision_text
from optimize.drift.profile import DRIFT_DIR, Profile
from optimize.errors import BundleError
from optimize.inputs.tokenizer import pad_values
from serve.app import InferenceApp
from serve.batching import Batcher, BatchingConfig
from serve.metrics import ServerMetrics
from serve.model import ServedModel, content_hash, output_labels
from serve.closing import refuse_queued
from serve.monitor import BackgroundMonitor, DriftMonitor
from serve.service import InferenceService

if TYPE_CHECKING:
    from optimize.bundle.manifest import Manifest

LOG = logging.getLogger("serve")
WARMUP_CALLS = 3
SPIN_BELOW_S = 0.002  # engines faster than this keep ONNX Runtime's threads spinning between calls
SETTLE_S = 0.25  # between closing the HTTP listener and closing idle connections
BACKGROUND_ROW_BYTES = 64 << 10  # inputs of a sample at least this large are watched on the monitor's thread


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    bundle: Path
    target: str | None = None  # None: the bundle's winner, else its first built target
    model_name: str | None = None
    host: str = "0.0.0.0"
    port: int | None = 8000  # HTTP; None: no HTTP front end
    grpc_port: int | None = 8001  # None: no gRPC front end
    batching: BatchingConfig = BatchingConfig()
    max_body_bytes: int = 64 << 20
    drain_delay_s: float = 5.0
    grace_s: float = 30.0
    drift: bool = True
    drift_window: int | None = None  # None: the profile's (20 samples)
    drift_scales: tuple[int, ...] | None = None  # None: the profile's (window x 1, 10, 100)
    drift_false_alarm_every: float | None = None  # None: the profile's (20,000 requests)
    drift_accuracy_drop: float = 0.05
    access_log: bool = False  # one JSON line per request on the serve.access logger
    reselect: bool = False  # time the built targets on this CPU and serve the fastest within budget
    reject_non_finite: bool = False  # a NaN or infinity in an input: 400 (default: answered and counted)
    threads: int = 0  # threads per engine instance; 0: the build's setting


def create_service(config: ServeConfig) -> InferenceService:
    """One target of ``config.bundle`` ready to serve: engines loaded and timed, the batching loop,
    metrics and the drift monitor wired; warm-up runs at ``start()``, before readiness."""
    bundle = Path(config.bundle)
    manifest = read_manifest(bundle)
    if config.reselect:
        from serve.reselect import reselect

        if config.target:
            raise BundleError(f"--reselect chooses the target by measurement; drop --target {config.target}")
        target, record = reselect(bundle, manifest)
        LOG.info("--reselect on %s: %s (%s)", record["cpu"], record["reason"], ", ".join(
            f"{n} {t['p50_ms']:.3g} ms" for n, t in sorted(record["timings"].items(), key=lambda x: x[1]["p50_ms"])))
    else:
        target = choose_target(manifest, config.target, bundle)
    inputs = list(manifest.inputs)
    held = np.load(bundle / "data" / "heldout.npz")
    warmup = {s.name: np.ascontiguousarray(held[s.name][:1]) for s in inputs}
    model = ServedModel(config.model_name or manifest.model_name, version_number(manifest, target), target,
                        precision_text(manifest.record(target, bundle)), inputs, manifest.outputs,
                        config.batching.max_batch, text_encoder(bundle, manifest), output_labels(bundle, manifest),
                        content_hash(bundle, manifest, target), config.reject_non_finite)
    metrics = ServerMetrics(model.name, model.version, target, model.precision, bundle.name,
                            config.batching.queue_capacity, content=model.content_hash)
    drift_off = "off"
    if config.drift and (bundle / DRIFT_DIR / f"{target}.json").is_file():
        try:
            profile = Profile.load(bundle, target)
        except BundleError as exc:  # an older bundle is served as it is, without the monitor
            LOG.warning("drift monitoring is off: %s", exc)
            drift_off = "off (the bundle's drift profile is of an older version; rebuild to monitor)"
        else:
            monitor = DriftMonitor(profile, model.name, model.version, config.drift_window, config.drift_scales,
                                   config.drift_false_alarm_every, config.drift_accuracy_drop)
            # Large inputs (images) on a thread of their own: binning them would hold up answers. Small
            # ones inline: a thread's wake-ups would cost the request path more than the binning does.
            metrics.attach(BackgroundMonitor(monitor) if _row_bytes(inputs) >= BACKGROUND_ROW_BYTES else monitor)
    runners = _load_runners(bundle, target, max(1, config.batching.instances), warmup, config.threads)  # the batcher closes them
    batcher = Batcher(runners, config.batching, metrics, pad_values(manifest.text) if manifest.text else None)

    async def warm() -> None:
        monitor, metrics.monitor = metrics.monitor, None  # warm-up is not traffic to watch
        try:
            for _ in range(WARMUP_CALLS * len(runners)):
                await asyncio.gather(*(batcher.infer(dict(warmup)) for _ in runners))
        finally:
            metrics.monitor = monitor

    app = InferenceService(model, batcher, metrics, warm, config.grace_s)
    app.settings = runners[0].settings
    app.precision_read = check_precision(manifest.record(target, bundle).coverage, runners[0], warmup, target)
    app.drift = drift_off if metrics.monitor is None else "windows of " + ", ".join(
        f"{s.scale.samples} every {s.scale.step}" for s in metrics.monitor.scales) + (
        f" samples, a false alarm per {metrics.monitor.requests_per_false_alarm:g} on average; estimated accuracy "
        + ("on" if metrics.monitor.estimates else f"off ({metrics.monitor.profile.calibration['reason']})"))
    return app


def _row_bytes(inputs: list) -> int:
    """Bytes of one sample's inputs (axes of any size counted as 1)."""
    return sum(int(np.prod([d if d > 0 else 1 for d in s.shape[1:]])) * np.dtype(s.dtype).itemsize for s in inputs)


def _load_runners(bundle: Path, target: str, count: int, warmup: dict[str, np.ndarray], threads: int = 0) -> list:
    """Engine instances. ONNX Runtime's threads stop spinning when a call returns: the spin would
    take a core from answering the request just computed (0.5 ms for ResNet-18 here). Stopping it
    costs a thread wake at the start of the next call, which a tiny model's call (well under a
    millisecond) cannot afford, so those keep spinning. On any failure the engines opened are closed."""
    runners: list = []
    given = {"threads": threads} if threads else {}
    try:
        for _ in range(count):
            runners.append(load_runner(bundle, target, idle_spin=False, **given))
        times = []
        for _ in range(WARMUP_CALLS):
            start = time.perf_counter()
            runners[0].infer(warmup)
            times.append(time.perf_counter() - start)
        if min(times) < SPIN_BELOW_S:
            while runners:
                runners.pop().close()
            for _ in range(count):
                runners.append(load_runner(bundle, target, **given))
        return runners
    except BaseException:
        for runner in runners:
            runner.close()
        raise


def check_precision(recorded: dict | None, runner, sample: dict[str, np.ndarray], target: str) -> str:
    """The engine's precision read back here, in words; a warning when it differs from what the
    manifest recorded at build time (a bundle moved to a CPU that runs another precision)."""
    from optimize.targets.coverage import brief, differences

    try:
        found = runner.coverage(sample)
    except Exception as exc:  # a reader meeting an engine it does not know: said, and serving goes on
        LOG.warning("%s: the engine's precision could not be read back here: %s: %s", target, type(exc).__name__, exc)
        return "not read"
    now = found.to_json() if found is not None else None
    changed = differences(recorded, now)
    if changed:
        LOG.warning("%s runs in another precision on this machine than its manifest records: %s; its accuracy "
                    "was gated on the recorded one (rebuild the bundle here to gate what runs)", target, changed)
    return brief(now) if now and now.get("macs_pct") else "not reported by this backend"


def _warn_if_measured_elsewhere(manifest: Manifest, target: str) -> None:
    """Say so when the winner was measured on a CPU that differs from this one in what decides speed."""
    from optimize.cpu import detect, differences

    winner = manifest.winner or {}
    recorded = winner.get("measured_on") or manifest.machine
    changed = differences(recorded, detect())
    if changed:
        what = "the winner" if winner.get("target") == target else "this bundle"
        LOG.warning("%s was measured on %s and this CPU (%s) differs: %s; it may not be the fastest target here "
                    "(optimize serve --reselect serves the fastest here)", what, recorded.get("cpu"),
                    detect().model, "; ".join(changed))


def serve(config: ServeConfig) -> None:
    """Run until SIGTERM or Ctrl-C, then drain and stop."""
    import uvloop

    if config.port is None and config.grpc_port is None:
        raise BundleError("both front ends are off: give --http-port or --grpc-port")
    service = create_service(config)
    model, batching = service.model, config.batching
    where = [f"http://{config.host}:{config.port}" if config.port is not None else "",
             f"grpc://{config.host}:{config.grpc_port}" if config.grpc_port is not None else ""]
    LOG.info("serving %s version %s from %s: target %s (%s) on %s", model.name, model.version,
             config.bundle, model.target, model.precision, " and ".join(w for w in where if w))
    LOG.info("engine: %s", ", ".join(f"{k}={v}" for k, v in service.settings.items()))
    LOG.info("precision read back from the engine: %s", service.precision_read)
    LOG.info("batching: up to %d rows, wait %g ms, queue %d, %d instance(s); drift: %s", batching.max_batch,
             batching.max_delay_s * 1000, batching.queue_capacity, batching.instances, service.drift)
    if model.text is not None:
        LOG.info("text: input '%s', tokenizer %s, up to %d tokens (%s), longer texts cut and counted",
                 model.text.input, model.text.section["tokenizer"], model.text.max_length,
                 model.text.section.get("max_length_source", "the built length"))
    LOG.info("access log: %s; NaN or infinite inputs: %s", "JSON lines on stderr" if config.access_log else
             "off (--access-log)", "refused (400)" if config.reject_non_finite else
             "answered and counted (--reject-non-finite refuses them)")
    if not config.reselect:
        _warn_if_measured_elsewhere(read_manifest(Path(config.bundle)), model.target)
    uvloop.run(_serve(service, config))


async def _serve(service: InferenceService, config: ServeConfig) -> None:
    from serve.grpc_server import GrpcFrontEnd

    loop = asyncio.get_running_loop()
    stop, force = asyncio.Event(), asyncio.Event()
    signals: list[int] = []
    http = grpc = http_task = None
    if config.port is not None:
        http = _Uvicorn(uvicorn.Config(
            InferenceApp(service, config.max_body_bytes, config.access_log), host=config.host, port=config.port,
            log_level="warning", timeout_graceful_shutdown=int(config.grace_s), access_log=False, lifespan="off",
            http="httptools", loop="none"))
    if config.grpc_port is not None:
        try:
            grpc = GrpcFrontEnd(service, config.host, config.grpc_port, config.max_body_bytes)
        except (OSError, RuntimeError) as exc:
            raise BundleError(f"cannot listen for gRPC on {config.host}:{config.grpc_port} ({exc}); another server "
                              f"may hold the port: pick one with --grpc-port, or --no-grpc") from None

    def on_signal(sig: int) -> None:
        signals.append(sig)
        if len(signals) > 1:  # a second Ctrl-C: stop waiting (during the drain delay) or stop at once
            if sig == signal.SIGINT:
                (force if stop.is_set() else stop).set()
            return
        service.ready = False  # load balancers stop sending; requests in the meantime are still answered
        if sig == signal.SIGTERM and config.drain_delay_s > 0:
            service.draining = True
            LOG.info("SIGTERM: readiness false; still serving for %g s, then draining", config.drain_delay_s)
            loop.call_later(config.drain_delay_s, stop.set)
            if grpc is not None:
                loop.create_task(grpc.serving(False))
        else:
            stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    listener = _listen(config.host, config.port) if http is not None else None  # a busy port is one line
    if grpc is not None:
        await grpc.start()
    if http is not None:
        http_task = loop.create_task(http.serve(sockets=[listener]))
        while not http.started:
            await asyncio.sleep(0.01)
    await service.start()
    if grpc is not None:
        await grpc.serving(True)
    await stop.wait()
    service.ready, service.draining = False, True
    closing = []
    if grpc is not None:
        await grpc.serving(False)
        closing.append(loop.create_task(grpc.stop(config.grace_s)))  # GOAWAY; running RPCs finish
    if http is not None:
        # The listener first: connections accepted just before it closed get to send their request
        # (answered with Connection: close) before uvicorn closes what is idle; those still in the
        # kernel's accept queue are answered 503 from a duplicate of the socket, not reset.
        queued = loop.create_task(refuse_queued(listener.dup(), SETTLE_S))
        for server in http.servers:
            server.close()
        await asyncio.sleep(SETTLE_S)
        LOG.info("answered %d connection(s) from the accept queue with 503", await queued)
        idle = sum(getattr(c, "cycle", None) is None for c in http.server_state.connections)
        LOG.info("HTTP listener closed; closing %d idle connection(s), %d answering", idle,
                 len(http.server_state.connections) - idle)
        http.should_exit = True  # uvicorn closes idle connections, lets running requests answer
        closing.append(http_task)
    if closing:
        forced = loop.create_task(force.wait())
        await asyncio.wait([*closing, forced], return_when=asyncio.FIRST_COMPLETED)
        if force.is_set():
            if http is not None:
                http.force_exit = True
            service.abort()
            return
        await asyncio.wait(closing)
        forced.cancel()
    await service.stop()


def _listen(host: str, port: int) -> socket.socket:
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        raise BundleError(f"cannot listen for HTTP on {host}:{port} ({exc.strerror}); another server may hold the "
                          f"port: pick one with --http-port") from None
    listener.listen(2048)
    return listener


class _Uvicorn(uvicorn.Server):
    """uvicorn's server without its own signal handling (``serve`` owns SIGTERM for both front ends)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
