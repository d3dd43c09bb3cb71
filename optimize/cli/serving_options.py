"""The serving flags' defaults from a bundle's tuned configuration (``serving.json``), for
``optimize serve`` and the Triton and Kubernetes exports: a flag given on the command line wins."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

KNOBS = ("max_batch", "max_delay_ms", "instances", "threads")


def tuned_values(bundle: Path, target: str | None, values: dict[str, Any]) -> tuple[dict[str, Any], dict | None]:
    """``values`` (click parameter name -> value) with each knob the user did not give replaced by
    the tuned one, when the bundle was tuned for the target chosen; and the tuned record (or None)."""
    from optimize.bundle.folder import choose_target, read_manifest
    from optimize.bundle.serving import read_serving

    record = read_serving(bundle) if (Path(bundle) / "manifest.json").is_file() else None
    if record is None or record.get("target") != choose_target(read_manifest(bundle), target, bundle):
        return values, None
    source = click.get_current_context().get_parameter_source
    out = dict(values)
    for name in KNOBS:
        if name in values and source(name) is click.core.ParameterSource.DEFAULT:
            out[name] = record["knobs"][name]
    return out, record


def given(values: dict[str, Any]) -> list[str]:
    """The knobs among ``values`` given on the command line."""
    source = click.get_current_context().get_parameter_source
    return sorted(n for n in values if n in KNOBS and source(n) is not click.core.ParameterSource.DEFAULT)
