"""What the drift monitor watches: a few scalar features per sample, from the inputs and the outputs.

Each feature is one number per sample, cheap to compute on a batch:
- image-like inputs (N, C, ...): per channel, the sample's mean and standard deviation;
- tabular inputs (N, F): each column (up to 16), else 8 fixed random projections;
- token inputs (N, L): the length (non-padding tokens) and the mean log token id (rare tokens
  and unusual words push it up);
- classifier outputs: the predicted class (categorical) and the confidence (top softmax
  probability), the strongest signals of a shift;
- embedding outputs: the cosine to the reference's mean embedding, and 4 fixed random projections;
- regression outputs: each column (up to 8).

Binned features use the reference's quantiles as edges (8 bins, so each bin holds about an eighth
of the reference); the class is its own bin.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

BINS = 8
MAX_COLUMNS = 16
PROJECTIONS = 4
SEED = 20240917


@dataclasses.dataclass(frozen=True)
class Feature:
    name: str
    kind: str  # "binned" | "categorical"
    edges: tuple[float, ...] = ()  # inner bin edges (binned)
    categories: int = 0

    @property
    def bins(self) -> int:
        return self.categories if self.kind == "categorical" else len(self.edges) + 1

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "edges": list(self.edges), "categories": self.categories}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Feature":
        return cls(data["name"], data["kind"], tuple(data["edges"]), int(data["categories"]))


def _softmax_top(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)
    return probs.argmax(axis=1), probs.max(axis=1)


class Extractor:
    """Turns a batch of feeds and outputs into an (N, F) array of feature values.

    ``spec`` is JSON (kept in the profile) so the server rebuilds the same extractor; the random
    projections come from a fixed seed and the stored shapes.
    """

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        rng = np.random.default_rng(SEED)
        self.projections: dict[str, np.ndarray] = {}
        for item in spec["inputs"] + spec["outputs"]:
            if item["method"] in ("projections", "embedding"):
                matrix = rng.standard_normal((item["width"], PROJECTIONS if item["method"] == "embedding" else 8))
                self.projections[item["name"]] = (matrix / np.linalg.norm(matrix, axis=0)).astype(np.float32)
        self.names = [n for item in spec["inputs"] + spec["outputs"] for n in item["features"]]

    @classmethod
    def plan(cls, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]], task: str,
             pad_id: int = 0) -> "Extractor":
        """Choose the features from the model's input and output specs (JSON dicts: name, shape, dtype)."""
        spec: dict[str, Any] = {"inputs": [], "outputs": [], "task": task, "pad_id": pad_id}
        names = {s["name"] for s in inputs}
        for s in inputs:
            shape, integer = list(s["shape"]), np.issubdtype(np.dtype(s["dtype"]), np.integer)
            if integer and len(shape) == 2:
                if s["name"] == "input_ids" or "attention_mask" not in names:
                    spec["inputs"].append({"name": s["name"], "method": "tokens",
                                           "features": [f"{s['name']}.length", f"{s['name']}.log_id"]})
            elif len(shape) >= 3:
                channels = shape[1]
                if channels <= 0 or channels > MAX_COLUMNS:
                    spec["inputs"].append({"name": s["name"], "method": "global",
                                           "features": [f"{s['name']}.mean", f"{s['name']}.std"]})
                else:
                    spec["inputs"].append({"name": s["name"], "method": "channels", "channels": channels,
                                           "features": [f"{s['name']}[{c}].{stat}" for c in range(channels)
                                                        for stat in ("mean", "std")]})
            elif len(shape) == 2 and shape[1] > 0:
                if shape[1] <= MAX_COLUMNS:
                    spec["inputs"].append({"name": s["name"], "method": "columns",
                                           "features": [f"{s['name']}[{i}]" for i in range(shape[1])]})
                else:
                    spec["inputs"].append({"name": s["name"], "method": "projections", "width": shape[1],
                                           "features": [f"{s['name']}.proj{i}" for i in range(8)]})
        for o in outputs[:1]:  # the first output carries the prediction
            width = int(np.prod(o["shape"][1:])) if len(o["shape"]) > 1 else 1
            if task == "classify" and width >= 2:
                spec["outputs"].append({"name": o["name"], "method": "classes", "classes": width,
                                        "features": [f"{o['name']}.class", f"{o['name']}.confidence"]})
            elif task == "embed" and width >= 2:
                spec["outputs"].append({"name": o["name"], "method": "embedding", "width": width,
                                        "features": [f"{o['name']}.cosine_to_mean"]
                                        + [f"{o['name']}.proj{i}" for i in range(PROJECTIONS)]})
            else:
                spec["outputs"].append({"name": o["name"], "method": "columns", "width": min(width, 8),
                                        "features": [f"{o['name']}[{i}]" for i in range(min(width, 8))]})
        return cls(spec)

    def values(self, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray],
               mean_embedding: np.ndarray | None = None) -> np.ndarray:
        columns: list[np.ndarray] = []
        for item in self.spec["inputs"]:
            x = feeds[item["name"]]
            n = len(x)
            if item["method"] == "tokens":
                real = x != self.spec["pad_id"]
                if "attention_mask" in feeds:
                    real = feeds["attention_mask"].astype(bool)
                length = real.sum(axis=1)
                logs = np.log1p(np.maximum(x, 0).astype(np.float32))
                columns += [length.astype(np.float32), (logs * real).sum(axis=1) / np.maximum(length, 1)]
            elif item["method"] == "channels":
                flat = x.reshape(n, item["channels"], -1).astype(np.float32, copy=False)
                stats = np.stack([flat.mean(axis=2), flat.std(axis=2)], axis=2)  # (n, C, 2)
                columns += list(stats.reshape(n, -1).T)
            elif item["method"] == "global":
                flat = x.reshape(n, -1).astype(np.float32, copy=False)
                columns += [flat.mean(axis=1), flat.std(axis=1)]
            elif item["method"] == "columns":
                columns += list(x.astype(np.float32, copy=False).T)
            else:
                columns += list((x.reshape(n, -1).astype(np.float32) @ self.projections[item["name"]]).T)
        for item in self.spec["outputs"]:
            y = outputs[item["name"]].reshape(len(outputs[item["name"]]), -1).astype(np.float32, copy=False)
            if item["method"] == "classes":
                predicted, confidence = _softmax_top(y)
                columns += [predicted.astype(np.float32), confidence]
            elif item["method"] == "embedding":
                unit = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
                mean = mean_embedding if mean_embedding is not None else np.zeros(y.shape[1], np.float32)
                columns += [unit @ mean] + list((unit @ self.projections[item["name"]]).T)
            else:
                columns += list(y[:, :item["width"]].T)
        return np.stack(columns, axis=1) if columns else np.zeros((0, 0), np.float32)

    def features(self, reference_values: np.ndarray) -> list[Feature]:
        """Bin edges from the reference's own quantiles (categorical for the predicted class)."""
        out = []
        for i, name in enumerate(self.names):
            if name.endswith(".class"):
                classes = next(o["classes"] for o in self.spec["outputs"] if o["method"] == "classes")
                out.append(Feature(name, "categorical", categories=classes))
                continue
            column = reference_values[:, i]
            edges = np.unique(np.quantile(column, np.arange(1, BINS) / BINS))
            out.append(Feature(name, "binned", tuple(float(e) for e in edges)))
        return out
