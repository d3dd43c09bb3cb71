"""``optimize search``: many explicit builds as trials, run by Ray Tune, proposed by Optuna (or a
grid when the space is small), and the frontier they draw.

The search keeps its state in ``OUT.search/`` beside the winning bundle: ``search.json`` (what was
asked, the MLflow runs), ``study.db`` (Optuna's study, SQLite), ``trials/<key>/`` (each trial's
bundle, build log and record), ``cache/`` (the stage cache every trial shares, so a pruned and
recovered model is made once), ``ray/`` (Ray Tune's experiment folder), ``trials.json`` and
``report.md``. Run again with the same arguments, it reloads the study and reuses every finished
trial; writing the winner's bundle to OUT never touches it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from optimize import atomic
from optimize.errors import InputSpecError, OptimizeError
from optimize.build.plan import BuildPlan
from optimize.search.plan import GRID_LIMIT, SearchPlan
from optimize.search.space import SearchSpace, TrialConfig
from optimize.search.trial import TrialContext, read_record, run_trial

log = logging.getLogger(__name__)

OBJECT_STORE_BYTES = 256 << 20  # trials pass records, not arrays: a small object store is plenty
FAILED_LATENCY_MS = 1e6  # what Optuna is told of a trial with no latency (failed before its benchmark)
FAILED_DROP = 1e6
STATE = "search.json"


class SearchExtraMissing(OptimizeError):
    """Ray Tune, Optuna or MLflow is not installed."""


@dataclasses.dataclass
class SearchResult:
    search_dir: Path
    records: list[dict[str, Any]]
    front: list[dict[str, Any]]
    winner: dict[str, Any]
    bundle: Path | None
    summary: dict[str, Any]


def ray_environment(address: str | None) -> None:
    """Settings Ray reads when it is first imported. A cluster started with `ray start` takes a token
    by default, and a driver sends the one it has only when told to (RAY_AUTH_MODE=token)."""
    if address and (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                    or (Path.home() / ".ray" / "auth_token").exists()):
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def require_extras() -> None:
    missing = [name for name, module in (("ray[tune]", "ray.tune"), ("optuna", "optuna"))
               if not _importable(module)]
    if missing:
        raise SearchExtraMissing(f"optimize search needs {' and '.join(missing)}: pip install 'optimize[search]'")


def _importable(module: str) -> bool:
    import importlib

    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


def model_family(plan: BuildPlan) -> str:
    """Load the model and its data once before any trial (a mistake in them is one line here, not
    one failed trial each); ``cnn`` or ``transformer``, which picks the space's defaults."""
    from optimize.build.prepare import prepare

    prepared = prepare(plan.source, plan.data, plan.task, plan.strict)
    log.info(f"model: {prepared.model_kind}, task {prepared.task}, {len(prepared.held_out)} held-out samples")
    return prepared.model_kind


def _trainable(proposal: dict[str, Any], context: TrialContext, space: SearchSpace) -> None:
    """One Ray Tune trial: the proposal as an explicit trial, run, its objectives reported."""
    from ray import tune

    config = TrialConfig.from_json(proposal["trial"]) if "trial" in proposal else space.from_proposal(proposal)
    record = run_trial(context, config)
    drop, latency = objectives(record)
    tune.report({"accuracy_drop": drop, "latency_ms": latency, "ok": record["status"] == "ok",
                 "trial_key": config.key})


def objectives(record: dict[str, Any]) -> tuple[float, float]:
    """What Optuna is told of a finished trial: its accuracy drop and latency, the worst values for
    what a failed trial did not measure."""
    drop = (record.get("accuracy") or {}).get("drop")
    latency = (record.get("latency_ms") or {}).get("p50")
    return (FAILED_DROP if drop is None else float(drop), FAILED_LATENCY_MS if latency is None else float(latency))


def sync_study(storage: Any, space: SearchSpace, records: list[dict[str, Any]]) -> int:
    """Bring a reloaded study up to the trials on disk: a trial whose record was written as Ctrl-C
    came, before Ray Tune told the searcher, is added as complete, and the trials the interrupted
    run left running are closed as failed (the sampler would otherwise wait on them). Returns how
    many trials were added."""
    import optuna

    study = optuna.create_study(storage=storage, study_name="search", directions=["minimize", "minimize"],
                                load_if_exists=True)
    known = set()
    for trial in study.get_trials(deepcopy=False):
        if trial.state == optuna.trial.TrialState.COMPLETE:
            known.add(space.from_proposal(trial.params).key)
        elif trial.state == optuna.trial.TrialState.RUNNING:
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    added = 0
    for record in records:
        config = TrialConfig.from_json(record["config"])
        if config.key in known:
            continue
        fixed = optuna.trial.FixedTrial(space.to_proposal(config))
        space.optuna_space()(fixed)
        study.add_trial(optuna.trial.create_trial(params=fixed.params, distributions=fixed.distributions,
                                                  values=list(objectives(record))))
        added += 1
    return added


def _state(plan: SearchPlan) -> dict[str, Any]:
    """The search folder's ``search.json``: created, or checked to be this same search."""
    folder = plan.search_dir
    path = folder / STATE
    identity = plan.identity()
    if path.exists():
        state = json.loads(path.read_text())
        if state.get("identity") != identity:
            raise InputSpecError(f"{folder} holds a search with other arguments (model, data, space, load or "
                                 f"bench settings); pass --fresh to start it over, or another --out")
        finished = len([p for p in (folder / "trials").glob("*/record.json")])
        log.info(f"resuming the search in {folder}: {finished} finished trial(s) are reused")
        return state
    folder.mkdir(parents=True, exist_ok=True)
    state = {"identity": identity, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "mlflow": {}}
    atomic.write_json(path, state)
    return state


def _absolute(plan: BuildPlan) -> BuildPlan:
    """Every path of the plan absolute: trials run in other processes (and folders)."""
    def absolute(value: Any) -> Any:
        if value is None or (isinstance(value, str) and ":" in value and not Path(value).exists()):
            return value  # module:function data sources stay as given
        return str(Path(value).resolve())

    data = dataclasses.replace(plan.data, calib=absolute(plan.data.calib), eval_data=absolute(plan.data.eval_data),
                               train_data=absolute(plan.data.train_data), tokenizer=absolute(plan.data.tokenizer))
    source = dataclasses.replace(plan.source, checkpoint=Path(plan.source.checkpoint).resolve())
    return dataclasses.replace(plan, source=source, data=data, out=Path(plan.out).resolve())


def _init_ray(plan: SearchPlan) -> None:
    import ray

    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")  # trials resolve paths from the driver's folder
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")  # Ctrl-C stops the search here, at once
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)
    if ray.is_initialized():
        return
    if plan.ray_address:
        try:
            ray.init(address=plan.ray_address, log_to_driver=False, logging_level="ERROR",
                     runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}})
        except (ConnectionError, RuntimeError) as exc:
            raise InputSpecError(f"cannot reach the Ray cluster at --ray-address {plan.ray_address} "
                                 f"({str(exc).splitlines()[0][:200]}); is `ray start --head` running there, and with token "
                                 f"authentication, is its token in RAY_AUTH_TOKEN or ~/.ray/auth_token?") from None
        log.info(f"Ray: the cluster at {plan.ray_address}, {ray.cluster_resources().get('CPU', 0):g} CPUs")
    else:
        # address="local": a new instance even when this machine records another (`ray start`'s file)
        ray.init(address="local", num_cpus=os.cpu_count() or 1, object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False,
                 log_to_driver=False, logging_level="ERROR")
        log.info(f"Ray: a local instance, {os.cpu_count()} CPUs, object store {OBJECT_STORE_BYTES >> 20} MB")


def run_search(plan: SearchPlan, fresh: bool = False) -> SearchResult:
    """Run (or resume) the search, then write the report and the winner's bundle."""
    ray_environment(plan.ray_address)
    require_extras()
    plan = dataclasses.replace(plan, plan=_absolute(plan.plan))
    folder = plan.search_dir
    if fresh and folder.exists():
        shutil.rmtree(folder)
    state = _state(plan)
    configs = plan.space.configs()
    if not configs:
        raise InputSpecError("the search space is empty: no target takes the schemes and calibration methods given")
    context = TrialContext(plan.plan, folder, plan.bench, plan.load, os.getcwd())
    done = {c.key for c in configs if read_record(context.folder(c)) is not None}
    grid = plan.trials is None and len(configs) <= GRID_LIMIT or (plan.trials or 0) >= len(configs)
    wanted = len(configs) if grid else (plan.trials or GRID_LIMIT)
    log.info(f"search space: {len(configs)} configuration(s); "
        + ("all of them, as a grid" if grid else f"{wanted} trial(s) proposed by Optuna (TPE, seed {plan.seed})")
        + (f", within {plan.time_budget_s:g} s" if plan.time_budget_s else ""))
    started = time.time()
    interrupted = False
    try:
        todo = [c for c in configs if c.key not in done] if grid else None
        remaining = max(0, wanted - len(done)) if not grid else len(todo)
        if remaining:
            _init_ray(plan)
            interrupted = _tune(plan, context, todo, remaining)
        else:
            log.info("every trial of this search is finished already")
    finally:
        records = _records(folder, configs)
        if plan.mlflow_uri:
            from optimize.search.tracking import log_search

            log_search(plan, state, records)
            atomic.write_json(folder / STATE, state)
        with contextlib.suppress(Exception):
            import ray

            if ray.is_initialized() and not plan.ray_address:
                ray.shutdown()
    if interrupted:
        raise KeyboardInterrupt
    result = _finish(plan, records, time.time() - started)
    if plan.mlflow_uri:
        from optimize.search.tracking import log_report

        log_report(plan, state, [folder / "report.md", folder / "frontier.png", folder / "trials.json"])
    return result


def _tune(plan: SearchPlan, context: TrialContext, todo: list[TrialConfig] | None, samples: int) -> bool:
    """Run the trials under Ray Tune; True when stopped by Ctrl-C."""
    import ray
    from ray import tune

    # A worker keeps its imports (torch, the backends) from one trial to the next: reuse_actors.
    trainable = tune.with_resources(tune.with_parameters(_trainable, context=context, space=plan.space), {"cpu": 1})
    parallel = plan.parallel or max(1, int(ray.cluster_resources().get("CPU", 1)))
    if todo is not None:
        param_space = {"trial": tune.grid_search([c.to_json() for c in todo])}
        tune_config = tune.TuneConfig(num_samples=1, max_concurrent_trials=parallel,
                                      time_budget_s=plan.time_budget_s, reuse_actors=True)
    else:
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        storage = optuna.storages.RDBStorage(f"sqlite:///{context.search_dir / 'study.db'}")
        added = sync_study(storage, plan.space, _records(context.search_dir, plan.space.configs()))
        if added:
            log.info(f"{added} finished trial(s) the study had not been told of are added to it")
        searcher = OptunaSearch(space=plan.space.optuna_space(), metric=["accuracy_drop", "latency_ms"],
                                mode=["min", "min"], sampler=optuna.samplers.TPESampler(seed=plan.seed),
                                study_name="search", storage=storage)
        param_space = None
        tune_config = tune.TuneConfig(search_alg=searcher, num_samples=samples, max_concurrent_trials=parallel,
                                      time_budget_s=plan.time_budget_s, reuse_actors=True)
    log.info(f"running {samples} trial(s), up to {parallel} at once (benchmarks one at a time per node)")
    run_config = tune.RunConfig(storage_path=str(context.search_dir / "ray"), name="tune", verbose=0,
                                log_to_file=True, failure_config=tune.FailureConfig(max_failures=0))
    tuner = tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)
    previous = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        tuner.fit()
    except KeyboardInterrupt:
        log.info("interrupted: finished trials are kept; run the same command again to continue the search")
        return True
    finally:
        signal.signal(signal.SIGINT, previous)
    return False


def _records(folder: Path, configs: list[TrialConfig]) -> list[dict[str, Any]]:
    """Every finished trial of this space, in the space's order."""
    out = []
    for config in configs:
        record = read_record(folder / "trials" / config.key)
        if record is not None:
            out.append(record)
    return out


def parallel_builds(records: list[dict[str, Any]]) -> int:
    """The most builds that ran at the same time (from the trials' build intervals)."""
    events = sorted([(r["build"]["start"], 1) for r in records if r.get("build") and not r.get("reused")]
                    + [(r["build"]["end"], -1) for r in records if r.get("build") and not r.get("reused")])
    running = most = 0
    for _, step in events:
        running += step
        most = max(most, running)
    return most


def _finish(plan: SearchPlan, records: list[dict[str, Any]], wall_s: float) -> SearchResult:
    from optimize.search import frontier
    from optimize.search.report import write_report, write_winner

    folder = plan.search_dir
    max_drop = None if plan.budget_disabled else resolved_budget(plan, records)
    kept = frontier.front(records, plan.slo)
    winner = frontier.choose(records, plan.slo, max_drop)
    fresh = [r for r in records if not r.get("reused")]
    busy = sum((r["build"]["end"] - r["build"]["start"]) + ((r.get("bench") or {}).get("end", 0)
                                                             - (r.get("bench") or {}).get("start", 0))
               for r in fresh if r.get("build"))
    summary = {"trials": len(records), "measured": len(frontier.measured(records)),
               "failed": len([r for r in records if r["status"] != "ok"]), "wall_s": round(wall_s, 1),
               "trial_time_s": round(busy, 1), "parallel_builds": parallel_builds(records),
               "budget_disabled": plan.budget_disabled, "max_accuracy_drop": max_drop,
               "slo": str(plan.slo) if plan.slo else None, "load": plan.load.label}
    atomic.write_json(folder / "trials.json", {"summary": summary, "winner": winner,
                                                "front": [r["key"] for r in kept], "trials": records})
    report = write_report(plan, records, kept, winner, summary)
    log.info(f"{summary['trials']} trial(s): {summary['measured']} measured, {summary['failed']} failed; "
        f"frontier: {len(kept)}; report: {report}")
    bundle = None
    if winner["key"] is not None:
        bundle = write_winner(plan, next(r for r in records if r["key"] == winner["key"]), winner, report)
        log.info(f"winner: {winner['reason']}")
        log.info(f"bundle: {bundle}")
    else:
        log.info(f"no winner: {winner['reason']}")
    return SearchResult(folder, records, kept, winner, bundle, summary)


def resolved_budget(plan: SearchPlan, records: list[dict[str, Any]]) -> float | None:
    """The accuracy budget trials were gated on: the plan's, or the task's default the builds chose."""
    if plan.plan.max_accuracy_drop is not None:
        return plan.plan.max_accuracy_drop
    return next(((r.get("accuracy") or {}).get("max_drop") for r in records
                 if (r.get("accuracy") or {}).get("max_drop") is not None), None)
