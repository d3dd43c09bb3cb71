"""The search space: which values of pruning, target, INT8 scheme, calibration, weight scales and
threads a search may combine, and the one explicit build configuration each trial fixes.

A combination a backend cannot build (OpenVINO has no dynamic INT8, NNCF no entropy calibration)
is never proposed; a choice that does not apply (a calibration method for an FP32 engine) is left
out of the trial, so two proposals that build the same engine are the same trial.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from typing import Any

from optimize.errors import InputSpecError

INT8_SCHEMES = ("static", "dynamic", "weights")
CALIB_METHODS = ("minmax", "entropy", "percentile")
# Defaults per model family, as the issue of record states them: CNNs prune channels and vary the
# calibration of static INT8; transformers prune heads and vary the INT8 scheme.
FAMILY_DEFAULTS = {
    "cnn": {"prune": (0.0, 0.3, 0.5), "int8_scheme": ("static",), "calib_method": CALIB_METHODS},
    "transformer": {"prune": (0.0, 0.25), "int8_scheme": INT8_SCHEMES, "calib_method": ("minmax",)},
}


@dataclasses.dataclass(frozen=True)
class TrialConfig:
    """What one trial builds: every value explicit, the ones that do not apply None."""

    prune: float
    target: str
    int8_scheme: str | None
    calib_method: str | None
    per_channel: bool | None
    threads: int

    @property
    def key(self) -> str:
        """A short stable name: the same configuration is the same trial in every run of a search."""
        text = json.dumps(self.to_json(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def label(self) -> str:
        parts = [self.target, f"prune {self.prune:g}"]
        if self.int8_scheme:
            parts.append(self.int8_scheme)
        if self.calib_method:
            parts.append(self.calib_method)
        if self.per_channel is not None:
            parts.append("per-channel" if self.per_channel else "per-tensor")
        parts.append(f"{self.threads or 'all'} threads")
        return ", ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TrialConfig":
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """The values of each dimension; ``configs()`` lists every buildable combination once."""

    prune: tuple[float, ...]
    targets: tuple[str, ...]
    int8_scheme: tuple[str, ...]
    calib_method: tuple[str, ...]
    per_channel: tuple[bool, ...]
    threads: tuple[int, ...]

    def schemes_for(self, target: str) -> tuple[str, ...]:
        """The schemes of ``int8_scheme`` that ``target`` builds (none for a float target)."""
        from optimize.targets import registry

        if registry.get(target).precision != "int8":
            return ()
        return tuple(s for s in self.int8_scheme if s in registry.facts(target).int8_schemes)

    def methods_for(self, target: str) -> tuple[str, ...]:
        return tuple(m for m in self.calib_method if _buildable(target, "static", m))

    def trial(self, prune: float, target: str, scheme: str | None, method: str | None,
              per_channel: bool | None, threads: int) -> TrialConfig:
        """The canonical trial of one proposal: values that do not apply dropped."""
        if not self.schemes_for(target):
            scheme = method = per_channel = None
        elif scheme != "static":
            method = None
        return TrialConfig(float(prune), target, scheme, method, per_channel, int(threads))

    def configs(self) -> list[TrialConfig]:
        out: dict[str, TrialConfig] = {}
        for prune, target, threads in itertools.product(self.prune, self.targets, self.threads):
            schemes = self.schemes_for(target) or (None,)
            for scheme in schemes:
                methods = self.methods_for(target) if scheme == "static" else (None,)
                for method, per_channel in itertools.product(methods or (None,), self.per_channel):
                    if scheme == "static" and method is None:
                        continue  # no calibration method this target takes
                    config = self.trial(prune, target, scheme, method, per_channel, threads)
                    out.setdefault(config.key, config)
        return list(out.values())

    def optuna_space(self) -> "OptunaSpace":
        return OptunaSpace(self)

    def from_proposal(self, values: dict[str, Any]) -> TrialConfig:
        """The trial of an Optuna proposal (``optuna_space``'s parameter names)."""
        target = values["target"]
        return self.trial(values["prune"], target, values.get(f"int8_scheme[{target}]"),
                          values.get(f"calib_method[{target}]"), values.get("per_channel"), values["threads"])

    def to_proposal(self, config: TrialConfig) -> dict[str, Any]:
        """The Optuna proposal of a trial, ``from_proposal``'s inverse."""
        values = {"prune": config.prune, "target": config.target, "threads": config.threads,
                  f"int8_scheme[{config.target}]": config.int8_scheme,
                  f"calib_method[{config.target}]": config.calib_method, "per_channel": config.per_channel}
        return {k: v for k, v in values.items() if v is not None}

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class OptunaSpace:
    """A define-by-run space for Optuna (picklable: Ray Tune saves its searcher): a dimension is
    asked only where it applies, per target, so that every parameter keeps one set of choices."""

    space: SearchSpace

    def __call__(self, trial: Any) -> None:
        space = self.space
        trial.suggest_categorical("prune", list(space.prune))
        target = trial.suggest_categorical("target", list(space.targets))
        schemes = space.schemes_for(target)
        if schemes:
            scheme = trial.suggest_categorical(f"int8_scheme[{target}]", list(schemes))
            methods = space.methods_for(target)
            if scheme == "static" and methods:
                trial.suggest_categorical(f"calib_method[{target}]", list(methods))
            trial.suggest_categorical("per_channel", list(space.per_channel))
        trial.suggest_categorical("threads", list(space.threads))


def _buildable(target: str, scheme: str, method: str) -> bool:
    from optimize.errors import OptimizeError
    from optimize.targets import registry
    from optimize.targets.base import BuildConfig

    try:
        registry.facts(target).check_config(BuildConfig(precision="int8", int8_scheme=scheme, calib_method=method))
    except OptimizeError:
        return False
    return True


def _values(text: str | None, flag: str, parse: Any, allowed: tuple | None = None) -> tuple | None:
    if text is None:
        return None
    values = []
    for part in (p.strip() for p in text.split(",")):
        try:
            value = parse(part)
        except ValueError:
            hint = {"--prune": " (a share from 0 up to, not including, 1)", "--threads": " (a whole number)",
                    "--per-channel": " (true or false)"}.get(flag, "")
            raise InputSpecError(f"{flag} {text!r}: {part!r} is not a valid value{hint}") from None
        if allowed is not None and value not in allowed:
            raise InputSpecError(f"{flag} {text!r}: {part!r} is not one of {', '.join(map(str, allowed))}")
        if value not in values:
            values.append(value)
    if not values:
        raise InputSpecError(f"{flag} needs at least one value")
    return tuple(values)


def _boolean(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "yes", "1", "per-channel", "channel"):
        return True
    if lowered in ("false", "no", "0", "per-tensor", "tensor"):
        return False
    raise ValueError(text)


def _ratio(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise ValueError(text)
    return value


def default_targets() -> tuple[str, ...]:
    """Every target this machine builds that can win (no baselines, nothing emulated)."""
    from optimize.targets import registry

    return tuple(name for name, info in registry.TARGETS.items()
                 if not info.baseline and registry.unavailable_reason(name) is None)


def parse_space(model_kind: str, prune: str | None = None, targets: str | None = None,
                schemes: str | None = None, methods: str | None = None, per_channel: str | None = None,
                threads: str | None = None, default_threads: int = 0) -> SearchSpace:
    """The space from comma-separated flag values; a dimension not given takes the family default."""
    from optimize.targets import registry

    family = FAMILY_DEFAULTS["transformer" if model_kind == "transformer" else "cnn"]
    chosen_targets = _values(targets, "--target", str.strip) or default_targets()
    for name in chosen_targets:
        if name in registry.SPECIAL:
            raise InputSpecError(f"--target {targets!r}: list targets by name; 'all' and 'auto' are what a search replaces")
        registry.get(name)  # unknown: one line listing the names
        reason = registry.unavailable_reason(name)
        if reason:
            raise InputSpecError(f"--target {name} cannot be built here: {reason}")
    return SearchSpace(
        prune=_values(prune, "--prune", _ratio) or family["prune"], targets=chosen_targets,
        int8_scheme=_values(schemes, "--int8-scheme", str.strip, INT8_SCHEMES) or family["int8_scheme"],
        calib_method=_values(methods, "--calib-method", str.strip, CALIB_METHODS) or family["calib_method"],
        per_channel=_values(per_channel, "--per-channel", _boolean) or (True,),
        threads=_values(threads, "--threads", int) or (default_threads,))
