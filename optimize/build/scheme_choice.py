"""The INT8 scheme chosen by measurement on the CPU at hand, not by model family.

When ``--int8-scheme`` is not given and the backend offers more than one scheme (ONNX Runtime:
static, dynamic, weights; OpenVINO: static, weights), every scheme is built through the stage
cache and judged on the selection split, then all of them are timed with the measuring engine
(``optimize.bench.measure``) at batch 1, interleaved in rounds. The fastest within budget is kept;
one that is faster only within the measured spread (the paired per-round ratios) loses to a more
accurate one. A faster scheme that breached the budget gets the backend's own recovery (sensitive
layers kept in FP32) when the backend has one for it, and is kept if it then passes and is still
faster. The chosen engine is gated on the held-out data like any other.

The timing is a cached stage of its own, keyed by the CPU's identity (model, instruction sets,
cores), the engines' cache keys and the runner settings: a rebuild on the same CPU reuses the
recorded choice, so builds stay reproducible; on another CPU it is measured again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from optimize.bench.measure import BRIEF, COMPARISON_ROUNDS, faster, round_medians
from optimize.bundle.cache import Stage, StageCache
from optimize.targets.candidates import Candidate, Judged
from optimize.errors import BuildError, OptimizeError
from optimize.targets.base import Backend, BuildConfig, RecoveryContext, RunnerConfig
from optimize.targets.coverage import problem

log = logging.getLogger(__name__)

MIN_RECOVERY_S = 20.0  # the least time a faster scheme's recovery gets
TIMING_STAGE = Stage("scheme-timing", ("optimize.build.scheme_choice", "optimize.bench.measure", "optimize.targets.candidates", "optimize.targets.layer_error", "optimize.targets.coverage",
                                      "optimize.targets.base", "optimize.inputs.specs", "optimize.errors", "optimize.cpu"),
                     packages=("onnxruntime", "openvino"))


@dataclasses.dataclass(frozen=True)
class TimingConfig:
    """What keys a timing: the engines (label and cache folder, which holds their key), the CPU,
    the runner settings and how it is measured."""

    engines: tuple[tuple[str, str], ...]
    cpu: str
    isa: tuple[str, ...]
    cores: int
    runner: RunnerConfig
    rounds: int = COMPARISON_ROUNDS
    batch: int = 1

    def to_json(self) -> dict[str, Any]:
        return {"engines": [list(e) for e in self.engines], "cpu": self.cpu, "isa": list(self.isa),
                "cores": self.cores, "runner": self.runner.to_json(), "rounds": self.rounds, "batch": self.batch,
                "timing": dataclasses.asdict(BRIEF)}


def offered_schemes(backend: Backend, has_calibration: bool) -> list[str]:
    """The schemes to try, in the backend's order (static needs calibration data)."""
    return [s for s in backend.int8_schemes if s != "static" or has_calibration]


def time_engines(backend: Backend, folders: dict[str, Path], runner_config: RunnerConfig,
                 feeds: dict[str, np.ndarray], cache: StageCache) -> tuple[dict[str, dict[str, Any]], bool]:
    """Per engine label: p50 per round, their median and spread; and whether it was reused from the
    cache (the same engines timed before on this CPU)."""
    from optimize.cpu import detect

    cpu = detect()
    # The engines are timed in interleaved rounds: a session whose threads spin after its call
    # would take cores from the next engine's call and skew the comparison.
    runner_config = dataclasses.replace(runner_config, idle_spin=False)
    config = TimingConfig(tuple((label, folder.name) for label, folder in folders.items()), cpu.model, cpu.isa,
                          cpu.cores, runner_config)

    def produce(folder: Path) -> dict[str, Any]:
        with contextlib.ExitStack() as stack:
            runners = {label: stack.enter_context(backend.runner(path, runner_config)) for label, path in folders.items()}
            calls = {label: (lambda r=runner: r.infer(feeds)) for label, runner in runners.items()}
            return {"timings": round_medians(calls, COMPARISON_ROUNDS, BRIEF)}

    hits = len(cache.hits)
    _, result = cache.run(TIMING_STAGE, {label: folder.name for label, folder in folders.items()}, config, produce,
                          label=f"scheme-timing-{backend.name}")
    return result["timings"], len(cache.hits) > hits


def choose(passing: list[tuple[str, tuple[float, float], dict[str, Any]]]) -> tuple[str, str]:
    """(label, reason) among (label, (drop, finer error), timing): the fastest, or within its spread
    the most accurate."""
    fastest = min(passing, key=lambda p: p[2]["p50_ms"])
    tied = [p for p in passing if not faster(fastest[2], p[2])]
    chosen = min(tied, key=lambda p: (*p[1], p[2]["p50_ms"]))
    reason = (f"the fastest within budget: p50 {chosen[2]['p50_ms']:.3g} ms at batch 1"
              if chosen is fastest else
              f"within the measured spread of the fastest ({fastest[0]}, p50 {fastest[2]['p50_ms']:.3g} ms) and "
              f"more accurate (drop {chosen[1][0]:.3g}, error {chosen[1][1]:.3g} against {fastest[1][0]:.3g}, "
              f"{fastest[1][1]:.3g}): p50 {chosen[2]['p50_ms']:.3g} ms")
    return chosen[0], reason


def accuracy_key(judged: Judged) -> tuple[float, float]:
    """What "more accurate" compares: the gate's drop, then the finer error the metrics give (a
    classifier's max abs error, where agreement ties at whole samples)."""
    metrics = judged.selection["metrics"]
    return judged.drop, float(metrics.get("max_abs_error", 0.0)) if judged.selection["gate"]["metric"] != "max abs error" else 0.0


@dataclasses.dataclass
class SchemeChoice:
    """What ``search`` returns: the chosen engine's manifest fields (None: none within budget; the
    caller builds and recovers the default scheme) and the manifest's ``scheme_choice`` record."""

    fields: dict[str, Any] | None
    record: dict[str, Any]
    config: BuildConfig  # the chosen scheme's, or when none passed the one to build and recover


def search(backend: Backend, context: RecoveryContext, schemes: list[str], runner_config: RunnerConfig,
           feeds: dict[str, np.ndarray], cache: StageCache, recover_accuracy: bool,
           recoverable: Callable[[str], bool]) -> SchemeChoice:
    """Build, judge and time every scheme; recover the fastest failing one when it could win."""
    start = time.monotonic()
    judged: dict[str, Judged] = {}
    not_built: dict[str, str] = {}
    int8_macs: dict[str, float | None] = {}  # each scheme's share of MACs computed in INT8, read back
    for scheme in schemes:
        config = dataclasses.replace(context.config, int8_scheme=scheme)
        try:
            folder, result = context.build(config, None)
        except OptimizeError as exc:  # e.g. a quantizer that refuses the graph: the other schemes still count
            not_built[scheme] = str(exc)
            log.info(f"  scheme {scheme}: not built: {exc}")
            continue
        read = context.coverage(folder) if context.coverage else None
        mismatch = problem("int8", scheme, read)
        counts = (read or {}).get("macs") or {}
        int8_macs[scheme] = 100.0 * counts.get("int8", 0) / sum(counts.values()) if sum(counts.values()) else None
        if mismatch:  # e.g. a static graph whose every quantized op runs in float: not an INT8 candidate
            not_built[scheme] = f"precision read back from the engine: {mismatch}"
            log.info(f"  scheme {scheme}: not a candidate: {not_built[scheme]}")
            continue
        judged[scheme] = Judged(Candidate(scheme, config, f"{scheme} INT8"), folder, result, context.select(folder))
    if not judged:
        raise BuildError("; ".join(f"{s} INT8: {reason}" for s, reason in not_built.items()))
    timings, reused = time_engines(backend, {s: j.folder for s, j in judged.items()}, runner_config, feeds, cache)
    for scheme, j in judged.items():
        log.info(f"  scheme {scheme}: {j.selection['gate']['message'].split(' (95%')[0]} on the {context.selection_name}; "
            f"p50 {timings[scheme]['p50_ms']:.3g} ms (spread {timings[scheme]['spread_pct']:.0f}%)")
    passing = [(s, accuracy_key(j), timings[s]) for s, j in judged.items() if j.passed]
    chosen, reason = choose(passing) if passing else (None, f"no scheme within budget on the {context.selection_name}")
    if chosen == "weights" and len(passing) == 1 and len(schemes) > 1:
        reason = (f"weight-only INT8 (INT8 weights, float compute): no scheme that computes in INT8 passed; "
                  f"p50 {timings[chosen]['p50_ms']:.3g} ms at batch 1")
    elif chosen is not None and chosen != "weights" and int8_macs.get(chosen) is not None and int8_macs[chosen] < 50:
        reason += (f"; it computes {int8_macs[chosen]:.2g}% of its MACs in INT8, the rest in float "
                   f"(read back from the engine)")
    recovered_fields, recovered_from = None, None
    contenders = [(s, accuracy_key(j), timings[s]) for s, j in judged.items()
                  if not j.passed and recover_accuracy and recoverable(s)
                  and (chosen is None or faster(timings[s], timings[chosen]))]
    if contenders:  # the fastest, or within its spread the closest to the budget (the cheapest to recover)
        scheme, _ = choose(contenders)
        log.info(f"  {scheme} is faster{' than ' + chosen if chosen else ''} but over budget: recovering its accuracy")
        # Half as long again as building, judging and timing every scheme took, whatever the
        # recovery would want: the choice stays a bounded share of the build.
        budget = max(MIN_RECOVERY_S, (time.monotonic() - start) / 2)
        fields = backend.recover(dataclasses.replace(context, config=judged[scheme].candidate.config,
                                                     built=judged[scheme].folder, budget_s=budget))
        if fields is not None and fields["gate"]["passed"]:
            folder = Path(fields["cache_folder"])
            label = f"{scheme}+recovered"
            both = {label: folder, **({chosen: judged[chosen].folder} if chosen else {})}
            extra, _ = time_engines(backend, both, runner_config, feeds, cache)
            if chosen is None or faster(extra[label], extra[chosen]):
                timings[label] = extra[label]
                reason = (f"{scheme} with its recovery ({fields['recovery'].get('chosen_change')}) is within budget and "
                          f"faster than every scheme that passed as built: p50 {extra[label]['p50_ms']:.3g} ms")
                chosen, recovered_fields, recovered_from = label, fields, scheme
            else:
                timings[label] = extra[label]
                reason += f"; {scheme} recovered ({extra[label]['p50_ms']:.3g} ms) was no faster"
    elapsed = time.monotonic() - start
    record = {
        "method": f"every scheme built, judged on the {context.selection_name} and timed at batch 1 in interleaved rounds",
        "data": context.selection_name, "rounds": COMPARISON_ROUNDS, "timing_reused": reused,
        "candidates": [{"scheme": s, "build_time_s": j.result.get("build_time_s"),
                        "selection_drop": j.selection["gate"]["drop"],
                        "selection_interval": j.selection["gate"]["interval"], "within_budget": j.passed,
                        "metrics": j.selection["metrics"], "int8_macs_pct": int8_macs.get(s), **timings[s]}
                       for s, j in judged.items()],
        "not_built": not_built, "chosen": chosen, "reason": reason, "search_time_s": round(elapsed, 2)}
    if recovered_from is not None:
        record["recovered"] = {"scheme": recovered_from, **timings[chosen]}
    log.info(f"  scheme chosen: {chosen or 'none'}: {reason} ({elapsed:.0f} s for {len(judged)} schemes)")
    if recovered_fields is not None:
        return SchemeChoice(recovered_fields, record, judged[recovered_from].candidate.config)
    if chosen is None:  # the first scheme the backend can recover, else its first, recovered or failed by the caller
        fallback = next((s for s in judged if recoverable(s)), next(iter(judged)))
        return SchemeChoice(None, record, judged[fallback].candidate.config)
    j = judged[chosen]
    evaluation, settings = context.evaluate(j.folder)
    return SchemeChoice({**j.result, **evaluation, "cache_folder": str(j.folder), "runner_settings": settings},
                        record, j.candidate.config)
