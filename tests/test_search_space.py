"""The search space and the frontier, without running a trial."""

from __future__ import annotations

import dataclasses

import pytest

from optimize.search import frontier
from optimize.search.space import SearchSpace, parse_space
from optimize.select import Slo

CPU_TARGETS = ("ort-fp32", "ort-int8", "openvino-fp32", "openvino-int8")


def space(**values) -> SearchSpace:
    defaults = dict(prune=(0.0,), targets=CPU_TARGETS, int8_scheme=("static", "dynamic", "weights"),
                    calib_method=("minmax", "entropy", "percentile"), per_channel=(True,), threads=(0,))
    return SearchSpace(**{**defaults, **values})


def test_configs_leave_out_what_a_backend_cannot_build_and_what_does_not_apply():
    configs = space().configs()
    labels = {c.label for c in configs}
    assert not any(c.target == "openvino-int8" and c.int8_scheme == "dynamic" for c in configs)
    assert not any(c.target == "openvino-int8" and c.calib_method == "entropy" for c in configs)
    assert all(c.int8_scheme is None and c.calib_method is None and c.per_channel is None
               for c in configs if c.target.endswith("fp32"))
    assert all(c.calib_method is None for c in configs if c.int8_scheme in ("dynamic", "weights"))
    # ort-int8: 3 static calibrations + dynamic + weights; openvino-int8: 2 static + weights; 2 fp32
    assert len(configs) == len(labels) == 5 + 3 + 2


def test_same_engine_same_trial():
    one = space().trial(0, "ort-fp32", "static", "entropy", False, 0)
    other = space().trial(0, "ort-fp32", "weights", None, True, 0)
    assert one == other and one.key == other.key
    assert space().trial(0.3, "ort-fp32", None, None, None, 0).key != one.key


def test_family_defaults():
    from optimize.search.space import default_targets

    cnn = parse_space("cnn", targets="ort-int8,ort-fp32")
    assert cnn.prune == (0.0, 0.3, 0.5) and cnn.int8_scheme == ("static",)
    assert cnn.calib_method == ("minmax", "entropy", "percentile")
    text = parse_space("transformer", targets="ort-int8")
    assert text.prune == (0.0, 0.25) and text.int8_scheme == ("static", "dynamic", "weights")
    assert set(parse_space("cnn").targets) == set(default_targets())
    assert "torch-compile" not in default_targets()


@pytest.mark.parametrize("flags, message", [
    ({"prune": "0,1.5"}, "--prune"),
    ({"targets": "all"}, "list targets by name"),
    ({"targets": "ort-int9"}, "unknown target"),
    ({"targets": "trt-int8"}, "cannot be built here"),
    ({"schemes": "static,fp4"}, "--int8-scheme"),
    ({"threads": "two"}, "--threads"),
    ({"per_channel": "maybe"}, "--per-channel"),
])
def test_bad_values_are_one_line(flags, message):
    from optimize.errors import OptimizeError

    with pytest.raises(OptimizeError, match=message):
        parse_space("cnn", **flags)


def test_optuna_proposals_are_buildable_trials():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    searched = space(prune=(0.0, 0.5))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    valid = {c.key for c in searched.configs()}
    seen = set()
    define = searched.optuna_space()
    for _ in range(60):
        trial = study.ask()
        define(trial)
        config = searched.from_proposal(trial.params)
        assert config.key in valid, config
        seen.add(config.key)
        study.tell(trial, 0.0)
    assert len(seen) > len(valid) // 2  # the sampler reaches most of the space


def record(key: str, p50: float, drop: float, size: int = 1000, spread: float = 2.0, status: str = "ok") -> dict:
    return {"key": key, "label": key, "status": status, "config": {"target": "ort-int8"},
            "latency_ms": {"p50": p50, "p90": p50 * 1.1, "p95": p50 * 1.2, "p99": p50 * 1.5},
            "spread_pct": spread, "size_bytes": size, "accuracy": {"drop": drop}}


def test_faster_only_beyond_the_spread_of_both():
    a, b = record("a", 1.00, 0), record("b", 1.05, 0, spread=10)  # b's spread is 0.105 ms
    assert not frontier.faster(a, b, None)
    assert frontier.faster(a, record("c", 1.2, 0, spread=10), None)
    assert frontier.faster(a, record("d", 1.05, 0, spread=1), None)


def test_front_and_winner():
    records = [record("fast-lossy", 1.0, 2.0), record("slow-exact", 3.0, 0.0), record("dominated", 3.5, 0.5),
               record("tie-better", 1.01, 0.5), record("failed", 0.5, 0.0, status="failed"),
               record("big", 1.0, 2.0, size=5000)]
    kept = {r["key"] for r in frontier.front(records, None)}
    assert kept == {"tie-better", "slow-exact"}  # fast-lossy is no faster than tie-better beyond the noise
    assert frontier.choose(records, None, 1.0)["key"] == "tie-better"
    assert frontier.choose(records, None, 0.1)["key"] == "slow-exact"
    slo = Slo(99, 2.0)  # p99: slow-exact 4.5 ms misses it
    assert frontier.choose(records, slo, 0.1)["key"] is None
    assert "meets p99 <= 2 ms" in frontier.choose(records, slo, 0.1)["reason"]
    assert frontier.choose(records, None, None)["key"] == "tie-better"


def test_a_rerun_with_other_arguments_is_refused(tmp_path, caplog):
    from optimize.bench.run import BenchConfig
    from optimize.errors import OptimizeError
    from optimize.build.plan import BuildPlan, SourceConfig
    from optimize.search.plan import SearchPlan
    from optimize.search.runner import _state
    from optimize.select import LoadSpec

    plan = SearchPlan(plan=BuildPlan(source=SourceConfig(tmp_path / "m.pt"), out=tmp_path / "best"),
                      space=space(), load=LoadSpec("batch", 1), bench=BenchConfig())
    caplog.set_level("INFO", logger="optimize")
    first = _state(plan)
    assert (tmp_path / "best.search" / "search.json").is_file() and not caplog.records
    assert _state(dataclasses.replace(plan, trials=5, parallel=1)) == first  # same search
    assert "resuming the search" in caplog.records[0].getMessage()
    other = dataclasses.replace(plan, space=space(prune=(0.0, 0.5)))
    with pytest.raises(OptimizeError, match="holds a search with other arguments.*--fresh"):
        _state(other)


def test_a_reloaded_study_learns_the_trials_on_disk(tmp_path):
    # Ctrl-C can come after a trial wrote its record and before Ray Tune told the searcher: the
    # study is brought up to the records on its next run, and what was left running is closed.
    optuna = pytest.importorskip("optuna")
    from optimize.search.runner import FAILED_LATENCY_MS, sync_study

    searched = space()
    configs = searched.configs()
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=storage, study_name="search", directions=["minimize", "minimize"])
    told = study.ask()
    searched.optuna_space()(told)
    study.tell(told, [0.0, 1.0])
    study.ask()  # running when the search stopped
    told_key = searched.from_proposal(told.params).key
    # Four records the study was not told of (the sampler's first proposal is random: leave it out,
    # so which configurations are new does not depend on it).
    untold = [c for c in configs if c.key != told_key][:4]
    records = [{"config": c.to_json(), "accuracy": {"drop": 0.01}, "latency_ms": {"p50": 2.0}} for c in untold[:3]]
    records.append({"config": untold[3].to_json(), "status": "failed"})
    assert sync_study(storage, searched, records) == 4
    assert sync_study(storage, searched, records) == 0  # nothing twice
    trials = optuna.load_study(study_name="search", storage=storage).get_trials()
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert {searched.from_proposal(t.params).key for t in complete} == {c.key for c in untold} | {told_key}
    assert [t.state for t in trials].count(optuna.trial.TrialState.RUNNING) == 0
    failed = next(t for t in complete if searched.from_proposal(t.params).key == untold[3].key)
    assert failed.values[1] == FAILED_LATENCY_MS
