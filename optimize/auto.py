"""``--target auto`` and a latency SLO: build, then benchmark the bundle and pick the winner.

Choosing is a step after the build, above both the build and the benchmark: ``run_build`` knows
nothing of benchmarks, and ``bench_bundle`` nothing of builds. The CLI's ``optimize build`` and
the Python API call ``build_and_select``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from optimize.bench.load import LoadPlan
from optimize.bench.run import BenchConfig, bench_bundle
from optimize.build.pipeline import BuildResult, run_build
from optimize.build.plan import BuildPlan
from optimize.bundle.folder import read_manifest
from optimize.select import LoadSpec, Slo


@dataclasses.dataclass(frozen=True)
class Selection:
    """Pick the bundle's winner after the build: benchmark every built target at ``load`` (a short
    batch-1 run by default) and choose the fastest within the accuracy budget that meets ``slo``."""

    load: LoadSpec = LoadSpec("batch", 1.0)
    slo: Slo | None = None
    bench: BenchConfig | None = None  # None: a short batch-1 run, no cross-check
    progress: bool = True
    duration_s: float = 3.0  # per engine and round of that short run

    def bench_config(self) -> BenchConfig:
        if self.bench is not None:
            return self.bench
        plan = LoadPlan.for_duration(self.duration_s, batch_sizes=(1,), concurrency=(), rates=(), rate_fractions=())
        return BenchConfig(plan=plan, cross_check=False)

    def to_json(self) -> dict[str, Any]:
        return {"load": self.load.label, "slo": str(self.slo) if self.slo else None,
                "bench": self.bench_config().to_json()}


def names_auto(targets: tuple[str, ...]) -> bool:
    """Whether the target list asks for ``auto`` (alone, repeated or comma-separated)."""
    return any(part.strip() == "auto" for item in targets for part in item.split(","))


def selection_for(targets: tuple[str, ...], selection: Selection | None = None) -> Selection | None:
    """The selection to run after the build: the one given, or the default one for ``auto``."""
    if selection is not None:
        return selection
    return Selection() if names_auto(targets) else None


def build_and_select(plan: BuildPlan, selection: Selection | None = None) -> BuildResult:
    """``run_build``, then (for ``auto`` or a given ``selection``) benchmark the built targets and
    record the winner in the bundle; the result carries the report and the decision."""
    result = run_build(plan)
    chosen = selection_for(tuple(plan.targets), selection)
    if chosen is None or not result.manifest.built_targets():
        return result
    result.report, result.decision, result.report_folder = bench_bundle(
        result.bundle, chosen.bench_config(), chosen.slo, chosen.load, progress=chosen.progress, select=True)
    if result.decision is not None:
        result.manifest = read_manifest(result.bundle)
    return result
