"""A search's plan: the build every trial starts from, the space, and how trials are measured."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from optimize.bench.run import BenchConfig
from optimize.build.plan import BuildPlan
from optimize.search.space import SearchSpace
from optimize.select import LoadSpec, Slo

GRID_LIMIT = 32  # a space this small (or asked for in full) is run as a grid


@dataclasses.dataclass(frozen=True)
class SearchPlan:
    """A search: the build plan every trial starts from (its ``out`` is where the winner goes), the
    space, how many trials for how long, and how trials are measured and judged."""

    plan: BuildPlan
    space: SearchSpace
    load: LoadSpec
    bench: BenchConfig
    slo: Slo | None = None
    trials: int | None = None  # None: the whole space when it is small, else GRID_LIMIT Optuna trials
    time_budget_s: float | None = None
    parallel: int | None = None  # trials at once (None: one per CPU of the Ray cluster)
    ray_address: str | None = None
    mlflow_uri: str | None = None
    seed: int = 0
    budget_disabled: bool = False  # speed only: every trial passes the accuracy gate (said in the report)

    @property
    def search_dir(self) -> Path:
        out = Path(self.plan.out)
        return out.with_name(out.name + ".search")

    def identity(self) -> str:
        """What must match for a rerun to reuse this search's trials: everything but the trial
        count, the time budget, the parallelism and where trials run."""
        plan = dataclasses.replace(self.plan, out=Path("OUT"))
        data = {"plan": plan.to_json(), "space": self.space.to_json(), "load": self.load.label,
                "bench": self.bench.to_json(), "seed": self.seed}
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
