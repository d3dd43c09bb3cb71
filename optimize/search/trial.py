"""One trial: build one explicit configuration through the shared stage cache, then benchmark it
alone on its node against torch eager measured in the same run.

Builds of several trials run side by side; a benchmark never shares its node with a build or
another benchmark: builds hold the node's lock shared, a benchmark holds it exclusively (a
reader-writer lock on a file in the node's temporary folder, so it holds across every process and
every search on that node). A finished trial leaves ``trials/<key>/record.json``; a later run of
the same search reads it back instead of building again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import platform
import tempfile
import time
import traceback
from pathlib import Path
import logging
from typing import TYPE_CHECKING, Any, Iterator

from optimize import atomic
from optimize.errors import OptimizeError
from optimize.search.space import TrialConfig

if TYPE_CHECKING:
    from optimize.bench.run import BenchConfig
    from optimize.build.plan import BuildPlan
    from optimize.bundle.manifest import TargetRecord
    from optimize.select import LoadSpec

RECORD = "record.json"
LOCK_NAME = "optimize-node-bench.lock"


@dataclasses.dataclass(frozen=True)
class TrialContext:
    """What every trial of one search shares: the build plan without the trial's choices, where the
    search keeps its state, and how a trial is benchmarked."""

    plan: BuildPlan
    search_dir: Path
    bench: BenchConfig
    load: LoadSpec
    workdir: str  # the driver's working directory: relative --arch modules resolve from it

    def folder(self, config: TrialConfig) -> Path:
        return self.search_dir / "trials" / config.key



@contextlib.contextmanager
def logged_to(path: Path) -> Iterator[None]:
    """The ``optimize`` loggers' records go to ``path`` (a trial's ``build.log``) for the block, and
    only there: a Ray worker's own handlers would forward every line of every trial to the driver."""
    handler = logging.FileHandler(path, mode="w")
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("optimize")
    previous = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous[0])
        logger.propagate = previous[1]
        handler.close()


@contextlib.contextmanager
def node_lock(exclusive: bool) -> Iterator[float]:
    """Hold this node's benchmark lock (shared for a build, exclusive for a benchmark); yields the
    seconds waited for it."""
    path = Path(tempfile.gettempdir()) / LOCK_NAME
    start = time.perf_counter()
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield time.perf_counter() - start
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_record(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return None  # absent, or cut off by a crash: the trial runs again


def node_info() -> dict[str, Any]:
    from optimize.cpu import detect

    node_id = None
    with contextlib.suppress(Exception):  # outside Ray (a test calling run_trial directly)
        import ray

        if ray.is_initialized():
            node_id = ray.get_runtime_context().get_node_id()
    cpu = detect()
    return {"id": node_id, "host": platform.node(), "cpu": cpu.model, "cores": cpu.cores}


def trial_plan(context: TrialContext, config: TrialConfig) -> BuildPlan:
    """The build plan of one trial: one target, every INT8 choice fixed, the build's own scheme
    search and recovery off, the search's shared stage cache."""
    from optimize.passes.prune import PruneConfig

    base = context.plan
    quant = dataclasses.replace(base.quant, int8_scheme=config.int8_scheme,
                                calib_method=config.calib_method or base.quant.calib_method,
                                per_channel=base.quant.per_channel if config.per_channel is None else config.per_channel,
                                recover_accuracy=False)
    prune = None
    if config.prune > 0:
        prune = dataclasses.replace(base.prune, ratio=config.prune) if base.prune else PruneConfig(ratio=config.prune)
    return dataclasses.replace(base, out=context.folder(config) / "bundle", targets=(config.target,), quant=quant,
                               prune=prune, runner=dataclasses.replace(base.runner, threads=config.threads),
                               cache_dir=base.cache_dir or context.search_dir / "cache")


def run_trial(context: TrialContext, config: TrialConfig) -> dict[str, Any]:
    """Build, validate and benchmark ``config``; the record (also written to ``record.json``).
    A failure (gate breached, export or backend error) is a record with ``status: failed`` and the
    reason; a Ctrl-C leaves no record, so the trial runs again next time."""
    folder = context.folder(config)
    previous = read_record(folder)
    if previous is not None:
        return {**previous, "reused": True}
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        if context.workdir:
            os.chdir(context.workdir)
    record: dict[str, Any] = {"key": config.key, "config": config.to_json(), "label": config.label,
                              "node": node_info(), "reused": False}
    try:
        with logged_to(folder / "build.log"):
            record.update(_build_and_bench(context, config, folder))
    except OptimizeError as exc:
        record.update(status="failed", reason=str(exc))
    except Exception as exc:  # a backend's bug fails this trial, not the search; its traceback is kept
        with open(folder / "build.log", "a") as again:
            again.write(traceback.format_exc())
        record.update(status="failed", reason=f"internal error: {type(exc).__name__}: {exc} (see build.log)")
    atomic.write_json(folder / RECORD, record)
    return record


def _build_and_bench(context: TrialContext, config: TrialConfig, folder: Path) -> dict[str, Any]:
    from optimize.bench.run import plan_with_load, run_bench
    from optimize.build.pipeline import run_build

    plan = trial_plan(context, config)
    out: dict[str, Any] = {"bundle": str(Path("trials") / config.key / "bundle")}
    with node_lock(exclusive=False) as waited:
        start = time.time()
        result = run_build(plan)
        out["build"] = {"start": start, "end": time.time(), "waited_s": round(waited, 3)}
    entry = result.manifest.targets[config.target]
    out["build_time_s"] = entry.build_time_s
    out["accuracy"] = _accuracy(entry)
    if not entry.built:
        return {**out, "status": "failed", "reason": entry.reason or entry.status}
    out["size_bytes"] = entry.size_bytes
    bench = dataclasses.replace(context.bench, plan=plan_with_load(context.bench.plan, context.load),
                                targets=(config.target,))
    with node_lock(exclusive=True) as waited:
        start = time.time()
        report = run_bench(result.bundle, bench, progress=False)
        out["bench"] = {"start": start, "end": time.time(), "waited_s": round(waited, 3)}
    if report["interrupted"]:
        raise KeyboardInterrupt
    from optimize.bench.report import write_report

    write_report(result.bundle, report)
    point = next(p for p in report["engines"][config.target]["points"] if p["load"] == context.load.label)
    torch = report["engines"].get("torch-eager-fp32")
    torch_point = next((p for p in torch["points"] if p["load"] == context.load.label), None) if torch else None
    out.update(status="ok", reason=None, load=context.load.label,
               latency_ms={k: point[f"{k}_ms"] for k in ("p50", "p90", "p95", "p99")},
               round_p50_ms=point["round_p50_ms"], spread_pct=point["spread_pct"],
               throughput_items_per_s=point["throughput_items_per_s"],
               torch_p50_ms=torch_point["p50_ms"] if torch_point else None,
               speedup_vs_torch=report["ratios_vs_torch"].get(config.target, {}).get(context.load.label))
    return out


def _accuracy(entry: TargetRecord) -> dict[str, Any] | None:
    gate = entry.gate or {}
    if "drop" not in gate:
        return None
    return {"metric": gate.get("metric"), "drop": gate["drop"], "interval": gate.get("interval"),
            "max_drop": gate.get("budget"), "passed": gate.get("passed"), "figures": entry.accuracy}
