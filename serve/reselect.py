"""``optimize serve --reselect``: on a CPU other than the one the winner was measured on, time the
bundle's built targets briefly here and serve the fastest that passed the accuracy gate.

Every built, gated, deployable target is opened and timed at batch 1 on a held-out sample with the
measuring engine, interleaved in rounds (``optimize.bench.measure.round_medians``). The bundle's
winner is kept unless another target is faster by more than the measured spread (the paired
per-round ratios, as the build's scheme choice compares). Nothing in the bundle is written: the
choice and its numbers are logged.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, TYPE_CHECKING

import numpy as np

from optimize.bench.measure import BRIEF, COMPARISON_ROUNDS, faster, round_medians
from optimize.bundle.folder import load_runner
from optimize.errors import BundleError
from optimize.targets import registry

if TYPE_CHECKING:
    from optimize.bundle.manifest import Manifest



def candidates(manifest: Manifest) -> list[str]:
    """Built targets within the accuracy budget that the serving image can run (no baselines)."""
    return [name for name, record in manifest.targets.items()
            if record.built and record.gate_passed
            and not (name in registry.TARGETS and registry.TARGETS[name].baseline)
            and not registry.unavailable_reason(name)]


def reselect(bundle: Path, manifest: Manifest) -> tuple[str, dict[str, Any]]:
    """(target to serve, the record: every candidate's timing on this CPU, the choice and why)."""
    from optimize.cpu import detect

    names = candidates(manifest)
    if not names:
        raise BundleError(f"--reselect: bundle {bundle} has no built target within its accuracy budget to choose from")
    held = np.load(bundle / "data" / "heldout.npz")
    feeds = {s.name: np.ascontiguousarray(held[s.name][:1]) for s in manifest.inputs}
    with contextlib.ExitStack() as stack:
        runners = {name: stack.enter_context(load_runner(bundle, name)) for name in names}
        timings = round_medians({n: (lambda r=r: r.infer(feeds)) for n, r in runners.items()}, COMPARISON_ROUNDS, BRIEF)
    fastest = min(names, key=lambda n: timings[n]["p50_ms"])
    winner = manifest.winner_target
    if winner in timings and winner != fastest and not faster(timings[fastest], timings[winner]):
        chosen, reason = winner, (f"the bundle's winner, within the measured spread of the fastest here "
                                  f"({fastest}, p50 {timings[fastest]['p50_ms']:.3g} ms)")
    else:
        chosen = fastest
        reason = "the fastest here" + ("" if winner in (None, fastest) else f"; the bundle's winner was {winner}")
    return chosen, {"cpu": detect().summary(), "timings": timings, "chosen": chosen,
                    "reason": f"{chosen}: {reason}: p50 {timings[chosen]['p50_ms']:.3g} ms at batch 1"}
