"""Held-out samples as Triton perf_analyzer's ``--input-data`` JSON, so a load test sends real
inputs instead of perf_analyzer's default random bytes (about one float32 in 256 of those is NaN
or inf, and one buffer is sent with every request).

Each sample is one entry of ``data``: per input its raw bytes in base64 (exact, and a quarter of
the size of decimal text) and its shape without the batch axis, as perf_analyzer expects for a
model with ``max_batch_size`` > 0. perf_analyzer cycles through the entries in order, so they are
drawn across the whole held-out set in a fixed random order (``sample_order``): the first rows of
a held-out split can be all of a few classes, which the server's drift monitor would rightly call
a shift. A text
model (served with one BYTES input) gets its held-out token ids decoded back into strings with the
bundle's tokenizer, so the server's tokenizer runs as it does for real traffic.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np

from optimize import atomic
from optimize.bundle.folder import read_manifest, text_encoder
from optimize.errors import BundleError, InputSpecError


def sample_order(available: int, rows: int) -> np.ndarray:
    """The held-out rows written, in the order written: a seeded permutation's first ``rows``."""
    return np.random.default_rng(0).permutation(available)[:rows]


def perf_data(bundle: Path, rows: int = 64) -> dict:
    """``{"data": [...]}`` with the first ``rows`` held-out samples of ``bundle`` (all of them when fewer)."""
    if rows < 1:
        raise InputSpecError(f"--rows {rows} must be at least 1")
    manifest = read_manifest(bundle)
    path = Path(bundle) / "data" / "heldout.npz"
    if not path.is_file():
        raise BundleError(f"{path} is missing: the bundle holds no held-out samples to send (rebuild it)")
    held = np.load(path)
    names = [s.name for s in manifest.inputs]
    missing = [n for n in names if n not in held.files]
    if missing:
        raise BundleError(f"{path} lacks the model's input(s) {missing}: the bundle is damaged (rebuild it)")
    order = sample_order(len(held[names[0]]), rows)
    encoder = text_encoder(bundle, manifest)
    if encoder is not None:
        ids = held[next(n for n, f in encoder.fields.items() if f == "ids")][order]
        texts = encoder.tokenizer.decode_batch([row.tolist() for row in ids], skip_special_tokens=True)
        return {"data": [{encoder.input: {"content": [t], "shape": [1]}} for t in texts]}
    data = []
    for i in order:
        entry = {}
        for name in names:
            sample = np.ascontiguousarray(held[name][i])
            if sample.dtype.byteorder == ">":
                sample = sample.astype(sample.dtype.newbyteorder("<"))
            entry[name] = {"b64": base64.b64encode(sample.tobytes()).decode("ascii"), "shape": list(sample.shape)}
        data.append(entry)
    return {"data": data}


def write_perf_data(bundle: Path, out: Path, rows: int = 64) -> int:
    """Write ``perf_data(bundle, rows)`` to ``out`` (atomically); returns the number of samples."""
    document = perf_data(bundle, rows)
    atomic.write_text(Path(out), json.dumps(document))
    return len(document["data"])
