"""The zoo's data: real data that ships in packages, split into train and test (see ``models.zoo``).

scikit-learn's digits (as images, rows, a 1-D signal and foreground masks), wine, diabetes and
breast cancer sets, and the standard library's docstrings as token ids.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from models.zoo_nets import MAX_TOKENS, VOCAB

SEED = 0
TEST_SHARE = 0.3


@dataclasses.dataclass
class ZooData:
    """Inputs by name and targets (class indices, values, or per-pixel classes), train and test."""

    train: dict[str, np.ndarray]
    train_y: np.ndarray
    test: dict[str, np.ndarray]
    test_y: np.ndarray


def _split(count: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(SEED).permutation(count)
    cut = int(round(count * (1 - TEST_SHARE)))
    return np.sort(order[:cut]), np.sort(order[cut:])


def _make(arrays: dict[str, np.ndarray], targets: np.ndarray) -> ZooData:
    train, test = _split(len(targets))
    return ZooData({k: v[train] for k, v in arrays.items()}, targets[train],
                   {k: v[test] for k, v in arrays.items()}, targets[test])


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


def digit_images() -> ZooData:
    images, labels = _digits()
    return _make({"x": images[:, None]}, labels)


def digit_rows() -> ZooData:
    images, labels = _digits()
    return _make({"x": images}, labels)


def digit_signal() -> ZooData:
    images, labels = _digits()
    return _make({"x": images.reshape(len(images), 1, 64)}, labels)


def digit_masks() -> ZooData:
    images, _ = _digits()
    return _make({"x": images[:, None]}, (images > 0.3).astype(np.int64))


def _standardised(x: np.ndarray) -> np.ndarray:
    return ((x - x.mean(0)) / np.maximum(x.std(0), 1e-8)).astype(np.float32)


def wine() -> ZooData:
    from sklearn.datasets import load_wine

    data = load_wine()
    return _make({"x": _standardised(data.data)}, data.target.astype(np.int64))


def diabetes() -> ZooData:
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    target = ((data.target - data.target.mean()) / data.target.std()).astype(np.float32)
    return _make({"x": _standardised(data.data)}, target[:, None])


def breast_cancer() -> ZooData:
    """The 'mean' features and the rest (less 'worst area', which the second output predicts)."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = _standardised(data.data)
    names = list(data.feature_names)
    target_column = names.index("worst area")
    rest = [i for i in range(10, 30) if i != target_column]
    value = x[:, target_column:target_column + 1]
    return _make({"left": x[:, :10], "right": x[:, rest]}, np.concatenate([data.target[:, None], value], 1))


DOC_PACKAGES = ("email", "http", "xml", "unittest", "asyncio", "logging", "multiprocessing", "importlib")


def _docstrings() -> tuple[list[str], np.ndarray]:
    import importlib
    import pkgutil

    texts, labels = [], []
    for label, package in enumerate(DOC_PACKAGES):
        root = importlib.import_module(package)
        modules = [root]
        for info in pkgutil.walk_packages(root.__path__, package + "."):
            if "__main__" in info.name or ".test" in info.name:
                continue
            try:
                modules.append(importlib.import_module(info.name))
            except Exception:  # a platform-specific module: its docstrings are simply not in the corpus
                continue
        seen = set()
        for module in modules:
            for obj in vars(module).values():
                if not str(getattr(obj, "__module__", "")).startswith(package):
                    continue
                members = [obj, *vars(obj).values()] if isinstance(obj, type) else [obj]
                for member in members:
                    doc = getattr(member, "__doc__", None)
                    if isinstance(doc, str) and len(doc.split()) >= 4 and id(member) not in seen:
                        seen.add(id(member))
                        texts.append(doc)
                        labels.append(label)
    return texts, np.asarray(labels, np.int64)


def _token_ids(text: str) -> list[int]:
    words = "".join(c.lower() if c.isalnum() else " " for c in text).split()
    return [1 + zlib.crc32(w.encode()) % (VOCAB - 1) for w in words][:MAX_TOKENS]


def docstrings() -> ZooData:
    """Which standard-library package a docstring comes from, from its first 32 words (hashed ids)."""
    texts, labels = _docstrings()
    ids = np.zeros((len(texts), MAX_TOKENS), np.int64)
    mask = np.zeros_like(ids)
    for row, text in enumerate(texts):
        tokens = _token_ids(text) or [1]
        ids[row, :len(tokens)] = tokens
        mask[row, :len(tokens)] = 1
    return _make({"input_ids": ids, "attention_mask": mask}, labels)
