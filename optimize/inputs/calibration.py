"""Calibration and evaluation data: one contract for every backend.

Every source becomes ``Samples``: named arrays sharing a first (sample) axis, optional labels,
and a hash of the content. Quantizers consume ``Samples.batches()``, an iterable of
``{input_name: ndarray}``; nothing else reads the user's files.

Sources:
- ``.npy``: one array, fed to the model's only input.
- ``.npz``: arrays named after the model's inputs; ``labels`` (or ``label``, ``y``, ``targets``)
  holds labels. A file with one non-label array feeds a one-input model whatever its key.
- a folder of images (PNG/JPEG/BMP): resized and normalised as ``ImageOptions`` says; images
  in class sub-folders get the sorted folder index as their label.
- ``module:function`` or ``path/to/file.py:function``: a callable returning an iterable of
  ``{input_name: array}`` batches (a ``labels`` entry is taken as labels).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Iterator

import numpy as np

from optimize.errors import CalibrationError
from optimize.inputs.specs import TensorSpec

LABEL_KEYS = ("labels", "label", "y", "targets")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}


@dataclasses.dataclass(frozen=True)
class ImageOptions:
    """How a folder of images becomes a float32 NCHW batch: resize, scale to [0,1], normalise."""

    size: tuple[int, int] | None = None  # (height, width); default: the model's input shape
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    grayscale: bool = False
    stated: tuple[str, ...] = ()  # which of size, mean and std the user gave (the rest may come from a model folder)

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "stated"}


@dataclasses.dataclass
class Samples:
    """Named arrays with a shared first axis; optional labels; a content hash."""

    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    source: str = ""
    classes: list[str] | None = None  # an image folder's class folder names, in label order

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    @property
    def sha256(self) -> str:
        digest = hashlib.sha256()
        for name in sorted(self.arrays):
            array = np.ascontiguousarray(self.arrays[name])
            digest.update(name.encode() + str(array.dtype).encode() + str(array.shape).encode())
            digest.update(array.tobytes())
        if self.labels is not None:
            digest.update(np.ascontiguousarray(self.labels).tobytes())
        return digest.hexdigest()

    def take(self, index: np.ndarray) -> "Samples":
        labels = None if self.labels is None else self.labels[index]
        return Samples({k: v[index] for k, v in self.arrays.items()}, labels, self.source)

    def split(self, held_out_fraction: float, seed: int = 0,
              max_held_out: int | None = None) -> tuple["Samples", "Samples"]:
        """Deterministic split into (calibration, held-out) parts."""
        count = len(self)
        held = int(round(count * held_out_fraction))
        if max_held_out is not None:
            held = min(held, max_held_out)
        if held < 1 or count - held < 1:
            raise CalibrationError(
                f"calibration data {self.source} has {count} samples: too few to hold out "
                f"{held_out_fraction:.0%} for the accuracy gate and keep some for calibration")
        order = np.random.default_rng(seed).permutation(count)
        return self.take(np.sort(order[held:])), self.take(np.sort(order[:held]))

    def batches(self, batch_size: int = 1) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(self), batch_size):
            yield {k: v[start:start + batch_size] for k, v in self.arrays.items()}

    def conform(self, specs: list[TensorSpec]) -> "Samples":
        """Check names, ranks and fixed dims against the model's inputs; cast dtypes."""
        names = [s.name for s in specs]
        self.arrays = match_arrays(self.arrays, names, names, DataOrigin(self.source))
        for spec in specs:
            array = self.arrays[spec.name]
            spec.check(array, f"data {self.source}")
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                bad = int((~np.isfinite(array)).any(axis=tuple(range(1, array.ndim))).sum()) if array.ndim > 1 else 1
                raise CalibrationError(f"data {self.source}: input '{spec.name}' holds NaN or infinite values in "
                                       f"{bad} sample(s): clean or drop them")
        # In the model's argument order: engines and PyTorch are fed positionally.
        self.arrays = {s.name: self.arrays[s.name].astype(s.dtype, copy=False) for s in specs}
        return self


@dataclasses.dataclass(frozen=True)
class DataOrigin:
    """Where the arrays came from, for the likely fix: a file, an image folder, or --input-shape."""

    where: str
    kind: str = "file"  # file | images | input-shape
    grayscale: bool = False


def match_arrays(arrays: dict[str, np.ndarray], names: list[str], required: list[str],
                 origin: DataOrigin) -> dict[str, np.ndarray]:
    """The data's arrays keyed and ordered by the model's input names; one line for what does not match."""
    signature = f"forward({', '.join(names)})"
    if len(arrays) == 1 and len(required) <= 1 and names and names[0] not in arrays:
        return {names[0]: next(iter(arrays.values()))}
    matched = {n: arrays[n] for n in names if n in arrays}
    extra = [k for k in arrays if k not in matched]
    missing = [n for n in required if n not in matched]
    if missing and not matched and origin.kind == "file":
        raise CalibrationError(f"data {origin.where} has arrays {sorted(arrays)}, none named after the inputs of "
                           f"the model's {signature}: name each array after its input (labels go under 'labels')")
    if missing:
        fix = (f"repeat --input-shape for each, e.g. {missing[0]}:1xDIMS[:dtype]" if origin.kind == "input-shape"
               else f"add an array named '{missing[0]}'")
        raise CalibrationError(f"{origin.where} has no data for input(s) {missing} of the model's {signature}: {fix}")
    if extra:
        raise CalibrationError(f"data {origin.where} has arrays {extra} that are not inputs of the model's {signature}; "
                           f"labels go under the key 'labels'")
    return matched


def load_samples(source: str, image_options: ImageOptions | None = None,
                 input_shape: tuple[int, ...] | None = None) -> Samples:
    """Read calibration or evaluation data from a file, a folder or a callable."""
    path = Path(source)
    if path.is_dir():
        return _load_images(path, image_options or ImageOptions(), input_shape)
    if path.suffix in (".npz", ".npy"):
        if not path.exists():
            raise CalibrationError(f"data file {path} does not exist")
        return _load_numpy(path)
    if ":" in source and not path.exists():
        return _load_callable(source)
    if not path.exists():
        raise CalibrationError(f"data {source} does not exist (give .npy, .npz, a folder of "
                               f"images, or module:function)")
    raise CalibrationError(f"data {source}: unsupported format; give .npy, .npz, a folder of "
                           f"images, or module:function")


def _load_numpy(path: Path) -> Samples:
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise CalibrationError(f"data file {path} is corrupt or not a NumPy file ({exc})") from exc
    if isinstance(loaded, np.ndarray):
        arrays, labels = {"input": loaded}, None
    else:
        with loaded:
            arrays = {k: loaded[k] for k in loaded.files}
        label_key = next((k for k in LABEL_KEYS if k in arrays), None)
        labels = arrays.pop(label_key) if label_key else None
    return _checked(Samples(arrays, labels, str(path)))


def _checked(samples: Samples) -> Samples:
    if not samples.arrays:
        raise CalibrationError(f"data {samples.source} holds no input arrays")
    counts = {k: (len(v) if v.ndim else 0) for k, v in samples.arrays.items()}
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise CalibrationError(
            f"data {samples.source}: arrays must share their first (sample) axis; got {counts}")
    if samples.labels is not None and len(samples.labels) != len(samples):
        raise CalibrationError(
            f"data {samples.source}: {len(samples.labels)} labels for {len(samples)} samples")
    return samples


def _load_images(folder: Path, options: ImageOptions, input_shape: tuple[int, ...] | None) -> Samples:
    try:
        from PIL import Image
    except ImportError as exc:
        raise CalibrationError("reading a folder of images needs Pillow: pip install 'optimize[images]'") from exc
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CalibrationError(
            f"image folder {folder} contains no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    size = options.size
    if size is None:
        if not input_shape or len(input_shape) != 4:
            raise CalibrationError(
                f"image folder {folder}: give --image-size HxW or an NCHW --input-shape")
        size = (input_shape[2], input_shape[3])
    classes = sorted({p.parent.relative_to(folder).as_posix() for p in files})
    labelled = len(classes) > 1 or classes != ["."]
    arrays, labels = [], []
    mean = np.asarray(options.mean, np.float32)
    std = np.asarray(options.std, np.float32)
    for path in files:
        try:
            with Image.open(path) as image:
                image = image.convert("L" if options.grayscale else "RGB")
                image = image.resize((size[1], size[0]), Image.BILINEAR)
                pixels = np.asarray(image, np.float32) / 255.0
        except OSError as exc:
            raise CalibrationError(f"image {path} cannot be read ({exc})") from exc
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        channels = pixels.shape[2]
        pixels = (pixels - mean[:channels]) / std[:channels]
        arrays.append(pixels.transpose(2, 0, 1))
        labels.append(classes.index(path.parent.relative_to(folder).as_posix()))
    return Samples({"input": np.stack(arrays).astype(np.float32)},
                   np.asarray(labels) if labelled else None, str(folder), classes if labelled else None)


def _load_callable(source: str) -> Samples:
    from optimize.errors import CheckpointError
    from optimize.inputs.factory import resolve_factory

    try:
        function = resolve_factory(source)
    except CheckpointError as exc:
        raise CalibrationError(str(exc).replace("--arch", "data")) from exc
    chunks: dict[str, list[np.ndarray]] = {}
    labels: list[np.ndarray] = []
    for batch in function():
        if not isinstance(batch, dict):
            raise CalibrationError(f"data {source} must yield dicts of arrays, got {type(batch).__name__}")
        for key, value in batch.items():
            value = np.asarray(value)
            if key in LABEL_KEYS:
                labels.append(value)
            else:
                chunks.setdefault(key, []).append(value)
    if not chunks:
        raise CalibrationError(f"data {source} yielded no batches")
    try:
        arrays = {k: np.concatenate(v) for k, v in chunks.items()}
    except ValueError as exc:
        raise CalibrationError(f"data {source}: batches differ in shape beyond the batch axis ({exc})") from exc
    return _checked(Samples(arrays, np.concatenate(labels) if labels else None, source))
