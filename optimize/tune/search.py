"""Search the serving configuration of one built target for the highest throughput within a latency SLO.

Each candidate runs as the real server (``optimize serve`` in a process of its own, on loopback,
with its drift monitor: what is measured is what will be served), driven over the chosen protocol by the project's load engine: closed loops at rising concurrency,
each for ``window_s``, until the SLO's percentile passes the SLO or throughput stops growing. A
candidate's score is its highest throughput whose percentile met the SLO.

The search is coordinate-wise, in the order that matters most on a CPU: how the cores are split
between engine instances and their threads (instances x threads never exceeds the cores), then
the largest batch, then how long a part-full batch waits. Candidates are measured in that order
until ``time_budget_s`` is spent, the default configuration first; the best and the default are
then measured again, interleaved, so the gain reported is one of the same conditions.
"""

from __future__ import annotations

import dataclasses
import http.client
import itertools
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from optimize.bench.load import closed_loop
from optimize.bundle.folder import choose_target, read_manifest
from optimize.bundle.serving import ServingKnobs, write_serving
from optimize.deploy.perf_data import sample_order
from optimize.errors import BundleError, InputSpecError

LOG = logging.getLogger(__name__)
BATCHES = (1, 4, 8, 16, 32)
DELAYS_MS = (0.5, 1.0, 2.0, 5.0)
START_TIMEOUT_S = 120
GROWTH = 1.05  # a concurrency step must add this much throughput to climb further


@dataclasses.dataclass(frozen=True)
class TuneConfig:
    target: str | None = None
    slo_ms: float = 50.0
    percentile: float = 99.0
    protocol: str = "http"
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    window_s: float = 1.5
    time_budget_s: float = 180.0
    confirm_rounds: int = 2
    batches: tuple[int, ...] = BATCHES
    delays_ms: tuple[float, ...] = DELAYS_MS

    def check(self) -> None:
        if self.slo_ms <= 0 or not 0 < self.percentile < 100:
            raise InputSpecError("--latency-slo needs a positive time at a percentile between 0 and 100, e.g. p99=20ms")
        if not self.concurrency or min(self.concurrency) < 1:
            raise InputSpecError("--concurrency needs positive counts, e.g. 1,2,4,8,16")
        if self.window_s <= 0 or self.time_budget_s <= 0:
            raise InputSpecError("--window and --time-budget must be positive")


@dataclasses.dataclass
class Trial:
    knobs: ServingKnobs
    points: list[dict[str, Any]]  # per concurrency: throughput, p50/p99, errors
    start_s: float
    error: str | None = None

    def best(self, config: TuneConfig) -> dict[str, Any] | None:
        """The highest-throughput point whose percentile met the SLO, or None."""
        within = [p for p in self.points if p["tail_ms"] <= config.slo_ms and not p["errors"]]
        return max(within, key=lambda p: p["throughput_per_s"]) if within else None

    def score(self, config: TuneConfig) -> float:
        best = self.best(config)
        return best["throughput_per_s"] if best else 0.0

    def to_json(self, config: TuneConfig) -> dict[str, Any]:
        best = self.best(config)
        return {"knobs": self.knobs.to_json(), "label": self.knobs.label, "points": self.points,
                "start_s": self.start_s, "error": self.error, "throughput_per_s": self.score(config),
                "at_concurrency": best["concurrency"] if best else None,
                "tail_ms": best["tail_ms"] if best else None}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def knob_flags(knobs: ServingKnobs) -> list[str]:
    """``optimize serve`` flags for ``knobs`` (the tuned record itself ignored: ``--untuned``)."""
    flags = ["--instances", str(knobs.instances), "--max-batch", str(knobs.max_batch), "--max-delay-ms",
             str(knobs.max_delay_ms), "--untuned"]
    return flags + (["--threads", str(knobs.threads)] if knobs.threads else [])


class ServerUnderTest:
    """``optimize serve`` in a process of its own on loopback ports, ready when constructed; its
    stderr goes to a file (a pipe left unread would block a chatty server)."""

    def __init__(self, bundle: Path, target: str, *flags: str, protocol: str = "http"):
        self.port, self.grpc_port = free_port(), free_port()
        self.url, self.grpc_url = f"http://127.0.0.1:{self.port}", f"grpc://127.0.0.1:{self.grpc_port}"
        self.protocol = protocol
        started = time.perf_counter()
        self.log = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "optimize", "serve", str(bundle), "--target", target, "--host", "127.0.0.1",
             "--port", str(self.port), "--grpc-port", str(self.grpc_port), *flags],
            stdout=subprocess.DEVNULL, stderr=self.log, text=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.start_s = time.perf_counter() - started

    def stderr_text(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                lines = self.stderr_text().strip().splitlines()
                raise BundleError(f"the server did not start: {lines[-1] if lines else 'no output'}")
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                connection.request("GET", "/v2/health/ready")
                if connection.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise BundleError(f"the server did not become ready within {START_TIMEOUT_S} s")

    def client(self, model: str, inputs: list, outputs: list[str]):
        if self.protocol == "grpc":
            from optimize.bench.grpc_runner import GrpcRunner

            return GrpcRunner(f"127.0.0.1:{self.grpc_port}", model, inputs, outputs)
        from optimize.bench.http_runner import HttpRunner

        return HttpRunner(f"http://127.0.0.1:{self.port}", model, inputs, outputs)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def measure(bundle: Path, target: str, knobs: ServingKnobs, config: TuneConfig,
            feeds: list[dict[str, np.ndarray]], deadline: float | None = None) -> Trial:
    """One candidate: start it, climb the concurrency levels (sending ``feeds`` in turn), stop it."""
    manifest = read_manifest(bundle)
    try:
        server = ServerUnderTest(bundle, target, "--drain-delay", "0", "--log-level", "warning",
                                 *knob_flags(knobs), protocol=config.protocol)
    except BundleError as exc:
        return Trial(knobs, [], 0.0, str(exc))
    points: list[dict[str, Any]] = []
    try:
        client = server.client(manifest.model_name, list(manifest.inputs), manifest.output_names)
        try:
            flat, best = 0, 0.0
            turn = itertools.cycle(feeds)
            for concurrency in config.concurrency:
                loaded = closed_loop(lambda _: client.infer(next(turn)), concurrency, config.window_s)
                point = loaded.summary()
                tail = loaded.percentile_ms(config.percentile)
                points.append({"concurrency": concurrency, "throughput_per_s": point["throughput_items_per_s"],
                               "p50_ms": point["p50_ms"], "tail_ms": tail, "errors": point["errors"]})
                if tail > config.slo_ms or point["errors"]:
                    break
                flat = flat + 1 if point["throughput_items_per_s"] < GROWTH * best else 0
                best = max(best, point["throughput_items_per_s"])
                if flat >= 2 or (deadline is not None and time.monotonic() > deadline):
                    break  # two steps without gain: the server is at capacity
        finally:
            client.close()
    finally:
        server.stop()
    return Trial(knobs, points, server.start_s)


def layouts(cores: int) -> list[tuple[int, int]]:
    """(instances, threads per instance) that split the cores: powers of two, never more than the cores."""
    out, instances = [], 1
    while instances <= cores:
        out.append((instances, max(1, cores // instances)))
        instances *= 2
    if (1, 1) not in out and cores > 1:
        out.append((1, 1))
    return out


def tune(bundle: Path, config: TuneConfig, progress: Callable[[str], None] = LOG.info) -> dict[str, Any]:
    """Measure, choose, and record the winner in ``bundle/serving.json``; returns the record."""
    from optimize.cpu import detect

    config.check()
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    target = choose_target(manifest, config.target, bundle)
    held = np.load(bundle / "data" / "heldout.npz")
    order = sample_order(len(held[manifest.inputs[0].name]), 64)  # real samples in turn, as perf-data sends them
    feeds = [{s.name: np.ascontiguousarray(held[s.name][i:i + 1]) for s in manifest.inputs} for i in order]
    cpu = detect()
    profile = (manifest.record(target, bundle).details or {}).get("profile") or {}
    largest = min((int(shapes[2][0]) for shapes in profile.values()), default=max(config.batches))
    begin = time.monotonic()
    deadline = begin + config.time_budget_s
    trials: list[Trial] = []
    tried: set[ServingKnobs] = set()

    def run(knobs: ServingKnobs) -> Trial | None:
        if knobs in tried or (trials and time.monotonic() > deadline):
            return None
        tried.add(knobs)
        trial = measure(bundle, target, knobs, config, feeds, deadline)
        trials.append(trial)
        best = trial.best(config)
        progress(f"{knobs.label}: " + (trial.error or (
            f"{best['throughput_per_s']:.0f}/s at concurrency {best['concurrency']}, p{config.percentile:g} "
            f"{best['tail_ms']:.2f} ms" if best else f"no load met p{config.percentile:g} <= {config.slo_ms:g} ms")))
        return trial

    def leader() -> ServingKnobs:
        return max(trials, key=lambda t: t.score(config)).knobs

    default = ServingKnobs()
    run(default)
    for instances, threads in layouts(cpu.cores):
        run(dataclasses.replace(default, instances=instances, threads=threads))
    for batch in config.batches:
        if batch <= largest:
            run(dataclasses.replace(leader(), max_batch=batch))
    if leader().max_batch > 1:
        for delay in config.delays_ms:
            run(dataclasses.replace(leader(), max_delay_ms=delay))
    chosen = leader()
    searched_s = time.monotonic() - begin
    confirm = []
    if chosen != default:  # the same conditions for both: interleaved rounds
        for _ in range(config.confirm_rounds):
            for knobs in (default, chosen):
                confirm.append(measure(bundle, target, knobs, config, feeds))
    rounds = {label: [t.score(config) for t in confirm if t.knobs == knobs]
              for label, knobs in (("default", default), ("tuned", chosen))}
    candidate = chosen
    if confirm and np.median(rounds["tuned"]) <= np.median(rounds["default"]):
        progress(f"{chosen.label} did not beat the default when measured again "
                 f"({np.median(rounds['tuned']):.0f}/s against {np.median(rounds['default']):.0f}/s): keeping the default")
        chosen = default
    record = {
        "target": target, "knobs": chosen.to_json(), "label": chosen.label,
        "candidate": candidate.label, "kept_default": candidate != chosen,
        "slo": {"percentile": config.percentile, "ms": config.slo_ms}, "protocol": config.protocol,
        "concurrency": list(config.concurrency), "window_s": config.window_s,
        "measured_on": {**cpu.to_json(), "cores": cpu.cores}, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "search_s": round(searched_s, 1), "wall_s": round(time.monotonic() - begin, 1),
        "trials": [t.to_json(config) for t in trials],
        "confirm": {label: {"rounds": values, "median_per_s": float(np.median(values))}
                    for label, values in rounds.items() if values},
    }
    write_serving(bundle, record)
    return record
