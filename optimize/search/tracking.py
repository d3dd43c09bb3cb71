"""MLflow records: a parent run per search with a child run per trial, and a run per ``optimize
build`` or ``optimize bench`` when asked.

A trial's run holds its whole build configuration as parameters, its accuracy and latency figures,
size and build time as metrics, the code fingerprint, library versions, node, CPU, status and reason
as tags, and the trial's manifest and the search report as artifacts. The URI is a tracking server
(``http://...``), or ``file:`` / ``sqlite:`` for local use; ``MLFLOW_TRACKING_URI`` when no flag
is given.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, TYPE_CHECKING

from optimize.errors import OptimizeError

if TYPE_CHECKING:
    from optimize.build.pipeline import BuildResult
    from optimize.search.plan import SearchPlan

log = logging.getLogger(__name__)

EXPERIMENT = "optimize"


class TrackingError(OptimizeError):
    """The MLflow tracking server cannot be reached or refused a write."""


def tracking_uri(flag: str | None) -> str | None:
    return flag or os.environ.get("MLFLOW_TRACKING_URI") or None


def client(uri: str) -> Any:
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise OptimizeError("--mlflow needs MLflow: pip install 'optimize[search]'") from None
    return MlflowClient(tracking_uri=uri)


def artifact_location(uri: str, out: Path) -> str | None:
    """Where a new experiment keeps its artifacts. A database store used directly has no artifact
    store of its own, and MLflow's default is ``./mlruns`` of whatever folder the command runs in:
    for a SQLite file, a folder beside it (``runs/mlflow.db`` -> ``runs/mlflow-artifacts/``); for
    another database, ``out``'s ``mlflow-artifacts/``. A tracking server (``http:``) and a file
    store keep their own (None)."""
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme == "sqlite" and ":///" in uri:
        path = uri.split(":///", 1)[1].split("?", 1)[0]
        if path and path != ":memory:":
            db = Path(path).resolve()
            return (db.parent / f"{db.stem}-artifacts").as_uri()
    if scheme in ("sqlite", "postgresql", "mysql", "mssql"):
        return (Path(out).resolve() / "mlflow-artifacts").as_uri()
    return None


def experiment_id(mlflow: Any, out: Path, name: str = EXPERIMENT) -> str:
    """The experiment's id, created with ``artifact_location`` when new; an existing one whose
    artifacts land in the current folder is said."""
    try:
        found = mlflow.get_experiment_by_name(name)
        if found is None:
            return mlflow.create_experiment(name, artifact_location=artifact_location(mlflow.tracking_uri, out))
    except Exception as exc:  # the server's own exception types vary with the store
        raise TrackingError(f"MLflow at {mlflow.tracking_uri}: {type(exc).__name__}: {str(exc)[:200]}; "
                            f"is the tracking server running?") from exc
    location = found.artifact_location or ""
    if "://" not in location and not Path(location.removeprefix("file:")).is_absolute():
        log.warning("MLflow experiment '%s' at %s keeps its artifacts in '%s', relative to the folder a command "
                    "runs in (set when it was created); give it an absolute location or use a new store",
                    name, mlflow.tracking_uri, location)
    return found.experiment_id


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested config as ``a.b.c`` parameters (MLflow keeps parameters flat and as text)."""
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
    else:
        out[prefix.rstrip(".")] = json.dumps(data) if isinstance(data, (list, tuple)) else str(data)
    return out


def _key(name: str) -> str:
    """A parameter or metric name MLflow accepts (letters, digits, _ - . / and spaces; 250 at most)."""
    return re.sub(r"[^\w\-. /]", "_", name)[:250]


def _log_batch(mlflow: Any, run_id: str, params: dict[str, str], metrics: dict[str, float],
               tags: dict[str, str]) -> None:
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    params = {_key(k): v[:6000] for k, v in params.items()}
    metric_list = [Metric(_key(k), float(v), now, 0) for k, v in metrics.items() if v is not None]
    param_list = [Param(k, v) for k, v in params.items()]
    tag_list = [RunTag(k, str(v)[:5000]) for k, v in tags.items() if v is not None]
    for start in range(0, max(len(param_list), 1), 100):  # MLflow takes at most 100 parameters a batch
        mlflow.log_batch(run_id, metrics=metric_list if start == 0 else [], params=param_list[start:start + 100],
                         tags=tag_list if start == 0 else [])


def manifest_tags(manifest: dict[str, Any]) -> dict[str, str]:
    versions = manifest.get("versions") or {}
    machine = manifest.get("machine") or {}
    tags = {f"version.{k}": v for k, v in versions.items()}
    tags.update({"code_fingerprint": versions.get("optimize_code"), "cpu": machine.get("cpu"),
                 "cores": machine.get("cores"), "isa": machine.get("isa")})
    return tags


def trial_metrics(record: dict[str, Any]) -> dict[str, float]:
    accuracy = record.get("accuracy") or {}
    metrics: dict[str, Any] = {"accuracy_drop": accuracy.get("drop"), "size_bytes": record.get("size_bytes"),
                               "build_time_s": record.get("build_time_s"), "spread_pct": record.get("spread_pct"),
                               "throughput_items_per_s": record.get("throughput_items_per_s"),
                               "speedup_vs_torch": record.get("speedup_vs_torch"),
                               "torch_p50_ms": record.get("torch_p50_ms")}
    for key, value in (record.get("latency_ms") or {}).items():
        metrics[f"latency_{key}_ms"] = value
    for key, value in (accuracy.get("figures") or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[f"accuracy.{key}"] = value
    return {k: v for k, v in metrics.items() if v is not None}


def log_search(plan: SearchPlan, state: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """The parent run (created once, reused on resume) and a child run for every trial not yet
    logged; run ids are kept in ``state['mlflow']``."""
    uri = plan.mlflow_uri
    mlflow = client(uri)
    runs = state.setdefault("mlflow", {})
    if runs.get("uri") != uri:
        runs.clear()
        runs["uri"] = uri
    experiment = experiment_id(mlflow, Path(plan.plan.out))
    try:
        parent = runs.get("parent")
        if parent is None:
            run = mlflow.create_run(experiment, run_name=f"search {Path(plan.plan.out).name}",
                                    tags={"optimize.kind": "search", "optimize.search": str(plan.search_dir)})
            parent = runs["parent"] = run.info.run_id
            _log_batch(mlflow, parent, flatten({"space": plan.space.to_json(), "load": plan.load.label,
                                                "slo": str(plan.slo) if plan.slo else None,
                                                "plan": plan.plan.to_json()}), {},
                       {"identity": plan.identity()})
        children = runs.setdefault("trials", {})
        for record in records:
            if record["key"] in children:
                continue
            children[record["key"]] = _log_trial(mlflow, experiment, parent, plan, record)
        mlflow.log_metric(parent, "trials", len(records))
        mlflow.log_metric(parent, "trials_failed", len([r for r in records if r["status"] != "ok"]))
    except OptimizeError:
        raise
    except Exception as exc:
        raise TrackingError(f"MLflow at {uri}: {type(exc).__name__}: {str(exc)[:200]}") from exc
    log.info(f"MLflow: {len(records)} trial run(s) under parent run {parent} at {uri}")


def log_report(plan: SearchPlan, state: dict[str, Any], files: list[Path]) -> None:
    """The search's report, plot and trials.json as artifacts of its parent run."""
    parent = (state.get("mlflow") or {}).get("parent")
    if parent is None:
        return
    mlflow = client(plan.mlflow_uri)
    try:
        for path in files:
            if Path(path).exists():
                mlflow.log_artifact(parent, str(path))
    except Exception as exc:
        raise TrackingError(f"MLflow at {plan.mlflow_uri}: {type(exc).__name__}: {str(exc)[:200]}") from exc


def _log_trial(mlflow: Any, experiment: str, parent: str, plan: SearchPlan, record: dict[str, Any]) -> str:
    manifest_path = plan.search_dir / record["bundle"] / "manifest.json" if record.get("bundle") else None
    manifest = json.loads(manifest_path.read_text()) if manifest_path and manifest_path.exists() else {}
    status = record["status"]
    run = mlflow.create_run(experiment, run_name=record["label"],
                            tags={"mlflow.parentRunId": parent, "optimize.kind": "trial", "trial": record["key"]})
    run_id = run.info.run_id
    params = flatten({"trial": record["config"], "build": manifest.get("plan") or plan.plan.to_json()})
    node = record.get("node") or {}
    tags = {**manifest_tags(manifest), "status": status, "reason": record.get("reason"), "node": node.get("id"),
            "host": node.get("host"), "node_cpu": node.get("cpu")}
    _log_batch(mlflow, run_id, params, trial_metrics(record), tags)
    with tempfile.TemporaryDirectory() as scratch:
        record_file = Path(scratch) / "record.json"
        record_file.write_text(json.dumps(record, indent=2, default=str))
        mlflow.log_artifact(run_id, str(record_file))
        if manifest_path and manifest_path.exists():
            mlflow.log_artifact(run_id, str(manifest_path))
        log = plan.search_dir / "trials" / record["key"] / "build.log"
        if log.exists():
            mlflow.log_artifact(run_id, str(log))
    mlflow.set_terminated(run_id, "FINISHED" if status == "ok" else "FAILED")
    return run_id


def log_bundle_run(uri: str, kind: str, bundle: Path, metrics: dict[str, float], artifacts: list[Path]) -> str:
    """One run for an ``optimize build`` or ``optimize bench`` of ``bundle``."""
    mlflow = client(uri)
    experiment = experiment_id(mlflow, Path(bundle))
    manifest_path = Path(bundle) / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    try:
        run = mlflow.create_run(experiment, run_name=f"{kind} {Path(bundle).name}",
                                tags={"optimize.kind": kind, "bundle": str(Path(bundle).resolve())})
        run_id = run.info.run_id
        _log_batch(mlflow, run_id, flatten({"build": manifest.get("plan") or {}}), metrics, manifest_tags(manifest))
        for path in [manifest_path, *artifacts]:
            if Path(path).exists():
                mlflow.log_artifact(run_id, str(path))
        mlflow.set_terminated(run_id, "FINISHED")
    except Exception as exc:
        raise TrackingError(f"MLflow at {uri}: {type(exc).__name__}: {str(exc)[:200]}") from exc
    log.info(f"MLflow: run {run_id} at {uri}")
    return run_id


def log_build(uri: str, result: BuildResult) -> str:
    """An ``optimize build``: every target's size, build time and accuracy drop, and the winner's
    latency when one was chosen."""
    metrics: dict[str, float] = {}
    for name, record in result.manifest.targets.items():
        for key, value in (("size_bytes", record.size_bytes), ("build_time_s", record.build_time_s),
                           ("accuracy_drop", (record.gate or {}).get("drop"))):
            if value is not None:
                metrics[f"{name}.{key}"] = value
    artifacts = [result.report_folder / "report.md"] if result.report_folder else []
    return log_bundle_run(uri, "build", result.bundle, metrics, artifacts)


def log_bench(uri: str, bundle: Path, report: dict[str, Any], folder: Path) -> str:
    """An ``optimize bench``: each engine's percentiles and throughput at each load measured."""
    metrics: dict[str, float] = {}
    for name, engine in report["engines"].items():
        for point in engine["points"]:
            for key in ("p50_ms", "p99_ms", "throughput_items_per_s", "spread_pct"):
                metrics[f"{name}.{point['load']}.{key}"] = point[key]
    return log_bundle_run(uri, "bench", bundle, metrics, [folder / "report.md", folder / "report.json"])
