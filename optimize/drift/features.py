"""What the drift monitor watches: scalar features per sample, from the inputs and the outputs.

Each feature is one number per sample, cheap to compute on a batch:
- image-like inputs (N, C, H, W): per channel, the sample's mean and standard deviation; and, since
  those are blind to anything that moves pixels around (a rotation, a shear, an occlusion, a blur),
  features of the channel-mean image's layout: its intensity centroid (row, column), its sharpness
  (mean absolute difference between neighbouring pixels) and 4 fixed random projections of it
  pooled to at most 8 x 8;
- tabular inputs (N, F): each column (up to 16), else 8 fixed random projections;
- token inputs (N, L): the length (non-padding tokens) and the mean log token id (rare tokens
  and unusual words push it up);
- classifier outputs, the strongest signals of a shift ("Failing Loudly", Rabanser et al. 2019):
  the predicted class (categorical; more than 16 classes are grouped into 16 ranges), the
  confidence (top probability), the entropy, and the whole probability vector: each class's
  probability for up to 16 classes, else the 2nd to 5th largest probabilities;
- embedding outputs: the cosine to the reference's mean embedding, and 4 fixed random projections;
- regression outputs: each column (up to 8);
- whether the sample's inputs hold a NaN or an infinity (categorical; none in the reference, so one
  such sample in a window is a shift).

Any float32 input is taken without overflow or warnings: an input with non-finite values, or with
values so large that sums of squares could overflow float32, is computed in float64 with its NaN
and infinities as 0 (the non-finite feature says they were there).

Outputs that are already probabilities (non-negative rows summing to 1, seen on the reference) are
taken as such; others are logits and go through a softmax. Binned features use the reference's
quantiles as edges (8 bins, so each bin holds about an eighth of the reference); the class is its
own bin.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

BINS = 8
MAX_COLUMNS = 16
MAX_CLASS_BINS = 16
TOP_K = 5
PROJECTIONS = 4
POOLED = 8
SEED = 20240917
SAFE = 1e15  # inputs within this size keep float32: a sum of a million squares stays below float32's limit
NON_FINITE = "non_finite"


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


def arithmetic(x: np.ndarray) -> np.ndarray:
    """``x`` as the features compute in: float32 when every value is finite and within ``SAFE``,
    else float64 with NaN and infinities as 0."""
    if x.size and not (-SAFE < x.min() and x.max() < SAFE):  # NaN fails both comparisons
        with np.errstate(invalid="ignore", over="ignore"):
            return np.nan_to_num(x.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    return x.astype(np.float32, copy=False)


def non_finite_rows(x: np.ndarray) -> np.ndarray:
    """Per sample (first axis) of a float array, whether it holds a NaN or an infinity (bool)."""
    if x.dtype.kind != "f" or not x.size:
        return np.zeros(len(x), bool)
    return ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)


def probabilities(y: np.ndarray, already: bool, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities of (n, classes) outputs: logits through a softmax at ``temperature``, or
    probabilities as given (re-tempered through their logarithm when ``temperature`` is not 1)."""
    if already and temperature == 1.0:
        return y
    logits = np.log(np.maximum(y, 1e-12)) if already else y
    shifted = (logits - logits.max(axis=1, keepdims=True)) / np.float32(temperature)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)
    return probs


def looks_like_probabilities(y: np.ndarray) -> bool:
    flat = y.reshape(len(y), -1)
    return bool(len(flat)) and bool((flat >= 0).all()) and bool(np.allclose(flat.sum(axis=1), 1.0, atol=1e-3))


def _pool_edges(size: int) -> np.ndarray:
    return (np.arange(min(size, POOLED)) * size) // min(size, POOLED)


def _class_features(name: str, classes: int) -> list[str]:
    probs = ([f"{name}.p{k}" for k in range(classes)] if classes <= MAX_COLUMNS
             else [f"{name}.top{k}" for k in range(2, TOP_K + 1)])
    return [f"{name}.class", f"{name}.confidence", f"{name}.entropy", *probs]


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
            width = {"projections": 8, "embedding": PROJECTIONS, "spatial": PROJECTIONS}.get(item["method"])
            if width:
                matrix = rng.standard_normal((item["width"], width))
                self.projections[item["name"]] = (matrix / np.linalg.norm(matrix, axis=0)).astype(np.float32)
        self.names = [n for item in spec["inputs"] + spec["outputs"] for n in item["features"]]
        self._matrices: dict[str, np.ndarray] = {}

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
                if len(shape) == 4 and shape[2] > 1 and shape[3] > 1:
                    pooled = min(shape[2], POOLED) * min(shape[3], POOLED)
                    spec["inputs"].append({"name": s["name"], "method": "spatial", "height": shape[2],
                                           "width": pooled, "columns": shape[3],
                                           "features": [f"{s['name']}.{f}" for f in ("centroid_row", "centroid_col",
                                                                                      "sharpness")]
                                           + [f"{s['name']}.layout{i}" for i in range(PROJECTIONS)]})
            elif len(shape) == 2 and shape[1] > 0:
                if shape[1] <= MAX_COLUMNS:
                    spec["inputs"].append({"name": s["name"], "method": "columns",
                                           "features": [f"{s['name']}[{i}]" for i in range(shape[1])]})
                else:
                    spec["inputs"].append({"name": s["name"], "method": "projections", "width": shape[1],
                                           "features": [f"{s['name']}.proj{i}" for i in range(8)]})
        if any(np.dtype(s["dtype"]).kind == "f" for s in inputs):
            spec["inputs"].append({"name": NON_FINITE, "method": NON_FINITE, "features": [f"inputs.{NON_FINITE}"]})
        for o in outputs[:1]:  # the first output carries the prediction
            width = int(np.prod(o["shape"][1:])) if len(o["shape"]) > 1 else 1
            if task == "classify" and width >= 2:
                spec["outputs"].append({"name": o["name"], "method": "classes", "classes": width,
                                        "probabilities": False, "features": _class_features(o["name"], width)})
            elif task == "embed" and width >= 2:
                spec["outputs"].append({"name": o["name"], "method": "embedding", "width": width,
                                        "features": [f"{o['name']}.cosine_to_mean"]
                                        + [f"{o['name']}.proj{i}" for i in range(PROJECTIONS)]})
            else:
                spec["outputs"].append({"name": o["name"], "method": "columns", "width": min(width, 8),
                                        "features": [f"{o['name']}[{i}]" for i in range(min(width, 8))]})
        return cls(spec)

    @property
    def classes(self) -> dict[str, Any] | None:
        """The classifier output's spec item, if the first output is one."""
        return next((o for o in self.spec["outputs"] if o["method"] == "classes"), None)

    def _weights(self, item: dict[str, Any]) -> np.ndarray:
        """(H*W, 3 [+ 4]) columns: row position, column position, one (the centroid's sums), and,
        for an image small enough to need no pooling, the layout projections: one matmul for all."""
        key = item["name"]
        if key not in self._matrices:
            height, width = item["height"], item["columns"]
            rows, cols = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
            columns = [rows.ravel(), cols.ravel(), np.ones(height * width)]
            if height <= POOLED and width <= POOLED:
                columns += list(self.projections[key].T)
            self._matrices[key] = np.stack(columns, axis=1).astype(np.float32)
        return self._matrices[key]

    def _spatial(self, item: dict[str, Any], x: np.ndarray) -> list[np.ndarray]:
        # Sums and one matmul, not ``mean``: numpy's mean costs several times a sum on windows this small.
        n, height, width = len(x), item["height"], item["columns"]
        image = x.reshape(n, -1, height, width)
        image = image[:, 0] if image.shape[1] == 1 else image.sum(axis=1) / image.dtype.type(image.shape[1])
        flat = image.reshape(n, -1)
        low = flat.min(axis=1)
        weights = self._weights(item)
        sums = (flat - low[:, None]) @ weights  # weighted row, column, total [, layout of the shifted image]
        total = np.maximum(sums[:, 2], 1e-12)
        down = np.abs(image[:, 1:] - image[:, :-1]).reshape(n, -1).sum(axis=1) / ((height - 1) * width)
        across = np.abs(image[:, :, 1:] - image[:, :, :-1]).reshape(n, -1).sum(axis=1) / (height * (width - 1))
        if weights.shape[1] > 3:  # layout of the image itself: add back the shift
            layout = sums[:, 3:] + low[:, None] * weights[:, 3:].sum(axis=0)
        else:
            pooled = np.add.reduceat(np.add.reduceat(image, _pool_edges(height), axis=1),
                                     _pool_edges(width), axis=2).reshape(n, -1)
            layout = pooled @ self.projections[item["name"]]
        return [sums[:, 0] / total, sums[:, 1] / total, down + across, *layout.T]

    @staticmethod
    def _moments(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation over the last axis, from sums."""
        size = flat.shape[-1]
        mean = flat.sum(axis=-1) / size
        return mean, np.sqrt(np.maximum((flat * flat).sum(axis=-1) / size - mean * mean, 0.0))

    def values(self, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray],
               mean_embedding: np.ndarray | None = None) -> np.ndarray:
        columns: list[np.ndarray] = []
        safe: dict[str, np.ndarray] = {}
        for item in self.spec["inputs"]:
            if item["method"] == NON_FINITE:
                flags = [non_finite_rows(x) for x in feeds.values()]
                columns.append(np.logical_or.reduce(flags).astype(np.float32))
                continue
            x = feeds[item["name"]]
            n = len(x)
            if item["method"] == "tokens":
                real = x != self.spec["pad_id"]
                if "attention_mask" in feeds:
                    real = feeds["attention_mask"].astype(bool)
                length = real.sum(axis=1)
                logs = np.log1p(np.maximum(x, 0).astype(np.float32))
                columns += [length.astype(np.float32), (logs * real).sum(axis=1) / np.maximum(length, 1)]
                continue
            if item["name"] not in safe:
                safe[item["name"]] = arithmetic(x)
            x = safe[item["name"]]
            if item["method"] == "channels":
                mean, std = self._moments(x.reshape(n, item["channels"], -1))
                for c in range(item["channels"]):
                    columns += [mean[:, c], std[:, c]]
            elif item["method"] == "spatial":
                columns += self._spatial(item, x)
            elif item["method"] == "global":
                columns += list(self._moments(x.reshape(n, -1)))
            elif item["method"] == "columns":
                columns += list(x.T)
            else:
                columns += list((x.reshape(n, -1) @ self.projections[item["name"]]).T)
        for item in self.spec["outputs"]:
            y = arithmetic(outputs[item["name"]].reshape(len(outputs[item["name"]]), -1))
            if item["method"] == "classes":
                probs = probabilities(y, item["probabilities"])
                predicted = probs.argmax(axis=1)
                groups = min(item["classes"], MAX_CLASS_BINS)
                entropy = -(probs * np.log(np.maximum(probs, 1e-12))).sum(axis=1)
                if item["classes"] <= MAX_COLUMNS:
                    spread = list(probs.T)
                else:
                    top = -np.partition(-probs, TOP_K - 1, axis=1)[:, :TOP_K]
                    spread = list(np.sort(top, axis=1)[:, ::-1][:, 1:].T)
                columns += [(predicted * groups // item["classes"]).astype(np.float32), probs.max(axis=1), entropy,
                            *spread]
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
            if name.endswith(".class") and self.classes is not None:
                out.append(Feature(name, "categorical", categories=min(self.classes["classes"], MAX_CLASS_BINS)))
                continue
            if name == f"inputs.{NON_FINITE}":
                out.append(Feature(name, "categorical", categories=2))
                continue
            column = reference_values[:, i]
            edges = np.unique(np.quantile(column, np.arange(1, BINS) / BINS))
            out.append(Feature(name, "binned", tuple(float(e) for e in edges)))
        return out
