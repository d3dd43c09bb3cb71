"""The reference profile of one target, made at build time and kept in the bundle.

``build_profile`` runs the held-out inputs through the target's own Runner (so an INT8 engine is
compared with INT8 outputs and quantization itself is never flagged), computes the features, sets
the bin edges from their quantiles and keeps every reference sample's bin indices: enough to
calibrate the window test for any window size, in the server or fleet-wide in ``optimize drift``.

For classifiers with labelled held-out data it also fits the confidence calibration that turns
the server's traffic into an estimated accuracy (``optimize.drift.accuracy``); without labels the
profile says there is no estimate.

Saved as ``drift/<target>.json`` (features, extractor spec, scales, calibration) and
``drift/<target>.npz`` (the reference's bin indices and, for embeddings, the mean embedding).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TYPE_CHECKING

import numpy as np

from optimize.drift.accuracy import expected_correct, fit_calibration, no_estimate
from optimize.drift.features import Extractor, Feature, looks_like_probabilities
from optimize.drift.stats import REQUESTS_PER_FALSE_ALARM, Scale, WindowTest, plan_scales
from optimize.errors import BundleError

if TYPE_CHECKING:
    from optimize.targets.base import Runner

DRIFT_DIR = "drift"
DEFAULT_WINDOW = 20
DEFAULT_ALPHA = 0.01  # a single test of a whole file or a fleet's summed window
PROFILE_VERSION = 2


@dataclasses.dataclass
class Profile:
    target: str
    extractor: Extractor
    features: list[Feature]
    reference_bins: np.ndarray  # (N, F) bin indices of the reference samples
    mean_embedding: np.ndarray | None
    window: int = DEFAULT_WINDOW
    alpha: float = DEFAULT_ALPHA
    scales: tuple[int, ...] = ()  # samples per window of each scale; () is window x 1, 10, 100
    requests_per_false_alarm: float = REQUESTS_PER_FALSE_ALARM
    calibration: dict[str, Any] = dataclasses.field(default_factory=lambda: no_estimate("not fitted"))
    _test: WindowTest | None = dataclasses.field(default=None, repr=False, compare=False)
    _edges: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)
    _categorical: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)
    _top: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    def bins(self, values: np.ndarray) -> np.ndarray:
        """(n, F) feature values to bin indices."""
        if self._edges is None:  # every feature's inner edges in one (F, E) array, padded with +inf
            widest = max([len(f.edges) for f in self.features] + [1])
            edges = np.full((len(self.features), widest), np.inf)
            for i, f in enumerate(self.features):
                edges[i, :len(f.edges)] = f.edges
            self._edges = edges
            self._categorical = np.array([f.kind == "categorical" for f in self.features])
            self._top = np.array([max(f.categories - 1, 0) for f in self.features])
        out = (values[:, :, None] >= self._edges[None]).sum(axis=2)  # searchsorted(side="right") per feature
        if self._categorical.any():
            out[:, self._categorical] = np.clip(values[:, self._categorical].astype(np.int64), 0,
                                                self._top[self._categorical])
        return out

    def sample_bins(self, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> np.ndarray:
        return self.bins(self.extractor.values(feeds, outputs, self.mean_embedding))

    def observed(self, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Bin indices and, with a calibration, each sample's expected correctness (else zeros),
        from one pass of the features (the estimate thresholds the entropy feature itself)."""
        values = self.extractor.values(feeds, outputs, self.mean_embedding)
        if not self.estimates_accuracy:
            return self.bins(values), np.zeros(len(values))
        entropy = self.names.index(f"{self.extractor.classes['name']}.entropy")
        return self.bins(values), (-values[:, entropy] > self.calibration["threshold"]).astype(np.float64)

    @property
    def estimates_accuracy(self) -> bool:
        return self.calibration.get("method") == "thresholded-confidence"

    @property
    def reference_accuracy(self) -> float | None:
        return self.calibration.get("reference_accuracy") if self.estimates_accuracy else None

    def expected_correct(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        """Per sample, 1 where the calibration expects the prediction to be right (the mean is the estimate)."""
        item = self.extractor.classes
        y = outputs[item["name"]]
        return expected_correct(y.reshape(len(y), -1).astype(np.float32, copy=False), item["probabilities"],
                                self.calibration["threshold"])

    def plan_scales(self, window: int | None = None, sizes: tuple[int, ...] | None = None,
                    requests_per_false_alarm: float | None = None) -> list[Scale]:
        window = int(window or self.window)
        stored = self.scales if window == self.window else ()  # another window: its own multiples
        return plan_scales(window, sizes or stored or None, requests_per_false_alarm or self.requests_per_false_alarm)

    def window_test(self, alpha: float | None = None) -> WindowTest:
        """The window test of this reference; one instance per profile, so its calibrations are reused."""
        if self._test is None:
            self._test = WindowTest(self.features, self.reference_bins, self.alpha)
        if alpha is not None and alpha != self._test.alpha:
            return WindowTest(self.features, self.reference_bins, alpha)
        return self._test

    def save(self, bundle: Path) -> dict[str, str]:
        folder = Path(bundle) / DRIFT_DIR
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"version": PROFILE_VERSION, "target": self.target, "extractor": self.extractor.spec,
                "features": [f.to_json() for f in self.features], "window": self.window, "alpha": self.alpha,
                "scales": [s.to_json() for s in self.plan_scales()],
                "requests_per_false_alarm": self.requests_per_false_alarm, "calibration": self.calibration,
                "reference_samples": int(len(self.reference_bins))}
        (folder / f"{self.target}.json").write_text(json.dumps(meta, indent=1) + "\n")
        arrays = {"reference_bins": self.reference_bins.astype(np.int16)}
        if self.mean_embedding is not None:
            arrays["mean_embedding"] = self.mean_embedding
        np.savez(folder / f"{self.target}.npz", **arrays)
        return {"profile": f"{DRIFT_DIR}/{self.target}.json", "reference": f"{DRIFT_DIR}/{self.target}.npz"}

    @classmethod
    def load(cls, bundle: Path, target: str) -> "Profile":
        folder = Path(bundle) / DRIFT_DIR
        meta_file, array_file = folder / f"{target}.json", folder / f"{target}.npz"
        if not meta_file.is_file() or not array_file.is_file():
            raise BundleError(f"bundle {bundle} has no drift profile for {target} ({meta_file} missing); "
                              f"rebuild it with this version")
        meta = json.loads(meta_file.read_text())
        if meta.get("version") != PROFILE_VERSION:
            raise BundleError(f"{meta_file} is a drift profile of an older version (no window scales, no whole "
                              f"output distribution); rebuild the bundle with this version")
        arrays = np.load(array_file)
        return cls(meta["target"], Extractor(meta["extractor"]), [Feature.from_json(f) for f in meta["features"]],
                   arrays["reference_bins"].astype(np.int64),
                   arrays["mean_embedding"] if "mean_embedding" in arrays.files else None,
                   int(meta["window"]), float(meta["alpha"]), tuple(s["samples"] for s in meta["scales"]),
                   float(meta["requests_per_false_alarm"]), meta["calibration"])


def build_profile(target: str, runner: Runner, held: dict[str, np.ndarray], inputs: list[dict[str, Any]],
                  outputs: list[dict[str, Any]], task: str, pad_id: int = 0, batch_size: int = 32,
                  labels: np.ndarray | None = None) -> Profile:
    """The reference profile of ``target`` from the held-out inputs, through its own Runner."""
    count = len(next(iter(held.values())))
    results: list[dict[str, np.ndarray]] = []
    for start in range(0, count, batch_size):
        batch = {s["name"]: np.ascontiguousarray(held[s["name"]][start:start + batch_size]) for s in inputs}
        results.append(runner.infer(batch))
    produced = {name: np.concatenate([r[name] for r in results]) for name in results[0]}
    return profile_from_outputs(target, {s["name"]: held[s["name"]] for s in inputs}, produced, inputs, outputs,
                                task, pad_id, labels)


def profile_from_outputs(target: str, feeds: dict[str, np.ndarray], produced: dict[str, np.ndarray],
                         inputs: list[dict[str, Any]], outputs: list[dict[str, Any]], task: str, pad_id: int = 0,
                         labels: np.ndarray | None = None) -> Profile:
    """The reference profile of held-out ``feeds`` and the target's outputs for them."""
    extractor = Extractor.plan(inputs, outputs, task, pad_id)
    count = len(next(iter(feeds.values())))
    mean_embedding = None
    first = produced[extractor.spec["outputs"][0]["name"]].reshape(count, -1).astype(np.float32)
    if any(o["method"] == "embedding" for o in extractor.spec["outputs"]):
        unit = first / np.maximum(np.linalg.norm(first, axis=1, keepdims=True), 1e-12)
        mean = unit.mean(axis=0)
        mean_embedding = (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)
    calibration = no_estimate("not a classifier: no estimated accuracy")
    if extractor.classes is not None:
        extractor.classes["probabilities"] = looks_like_probabilities(first)
        calibration = fit_calibration(first, extractor.classes["probabilities"], labels)
    values = extractor.values(feeds, produced, mean_embedding)
    features = extractor.features(values)
    profile = Profile(target, extractor, features, np.zeros((0, len(features)), np.int64), mean_embedding,
                      calibration=calibration)
    profile.reference_bins = profile.bins(values)
    return profile
