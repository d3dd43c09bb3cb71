"""Text in, token arrays out: the tokenizer kept in a bundle, so a server can take strings.

``optimize build --tokenizer DIR`` checks that the model's inputs are token inputs the tokenizer
fills (``input_ids``, ``attention_mask``, ``token_type_ids``), that its vocabulary covers the ids
in the held-out data, and copies its ``tokenizer.json`` into the bundle; the manifest's ``text``
section records how to use it. ``TextEncoder`` (the ``tokenizers`` library, no PyTorch) turns a
list of strings into the model's feeds, padded to the longest text of the call with the pad id
the tokenizer declares, and cut at the serving length: ``--max-sequence-length``, else the
model's own limit where its files tell it (``sentence_bert_config.json``'s ``max_seq_length``,
``tokenizer_config.json``'s ``model_max_length``, ``tokenizer.json``'s truncation), never beyond
its position embeddings. Every cut is counted, so a server can say so.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, TYPE_CHECKING

import numpy as np

from optimize.errors import BundleError, InputSpecError
from optimize.inputs.specs import TensorSpec

if TYPE_CHECKING:
    import torch

TOKENIZER_FILE = "tokenizer/tokenizer.json"
TEXT_INPUT = "text"
# Model input name -> what the tokenizer's encoding gives for it.
FIELDS = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
PAD_TOKENS = ("[PAD]", "<pad>", "<|pad|>", "<unk>")


def _tokenizer_file(path: Path) -> Path:
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise InputSpecError(f"--tokenizer {path}: no tokenizer.json there (a Hugging Face fast tokenizer "
                             f"file, or the folder holding it)")
    return file


def _load(file: Path, what: str) -> Any:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise InputSpecError("text input needs the 'tokenizers' package: pip install tokenizers") from None
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # the library raises a bare Exception for a malformed file
        raise InputSpecError(f"{what} {file} is not a readable tokenizer.json: {exc}") from None


def _pad_id(tokenizer: Any, folder: Path) -> int:
    config = folder / "tokenizer_config.json"
    names = list(PAD_TOKENS)
    if config.is_file():
        pad = json.loads(config.read_text()).get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        if isinstance(pad, str):
            names.insert(0, pad)
    padding = tokenizer.padding
    if padding and isinstance(padding.get("pad_id"), int):
        return padding["pad_id"]
    for name in names:
        token = tokenizer.token_to_id(name)
        if token is not None:
            return int(token)
    return 0


LENGTH_FILES = (("sentence_bert_config.json", "max_seq_length"), ("tokenizer_config.json", "model_max_length"))
UNSET_LENGTH = 100_000  # transformers writes a huge model_max_length when none is known


def position_limit(module: torch.nn.Module) -> int | None:
    """The most positions the model embeds (``max_position_embeddings``), where it says; less the
    offset of models whose positions count from after the pad id (RoBERTa and its kin: their
    position embedding table has a ``padding_idx``, and position ``padding_idx + 1`` is the first)."""
    offset = 0
    for name, child in module.named_modules():
        if "position" in name and type(child).__name__ == "Embedding" and child.padding_idx is not None:
            offset = int(child.padding_idx) + 1
            break
    for child in module.modules():
        config = getattr(child, "config", None)
        limit = getattr(config, "max_position_embeddings", None)
        if isinstance(limit, int) and limit > 0:
            return limit - offset
    for name, child in module.named_modules():
        if "position" in name and type(child).__name__ == "Embedding":
            return int(child.num_embeddings) - offset
    return None


def serving_length(tokenizer_path: Path, module: torch.nn.Module, override: int | None,
                   calibration_length: int) -> tuple[int, str]:
    """(the longest token sequence served, where that number comes from)."""
    limit = position_limit(module)
    if override is not None:
        if override < 2:
            raise InputSpecError(f"--max-sequence-length {override} must be at least 2")
        if limit is not None and override > limit:
            raise InputSpecError(f"--max-sequence-length {override} is beyond the model's {limit} position "
                                 f"embeddings")
        return override, "--max-sequence-length"
    file = _tokenizer_file(Path(tokenizer_path))
    found: tuple[int, str] | None = None
    for name, key in LENGTH_FILES:
        path = file.parent / name
        value = json.loads(path.read_text()).get(key) if path.is_file() else None
        if isinstance(value, int) and 0 < value < UNSET_LENGTH:
            found = (value, f"{name} {key}")
            break
    if found is None:
        truncation = json.loads(file.read_text()).get("truncation") or {}
        if isinstance(truncation.get("max_length"), int):
            found = (truncation["max_length"], "tokenizer.json truncation")
    if found is None and limit is not None:
        found = (limit, "the model's position embeddings")
    if found is None:
        return calibration_length, "the calibration data (neither tokenizer nor model states a maximum)"
    if limit is not None and found[0] > limit:
        return limit, f"the model's position embeddings (the tokenizer's {found[1]} says {found[0]})"
    return found


def text_section(tokenizer_path: Path, inputs: list[TensorSpec], held: dict[str, np.ndarray],
                 bundle: Path, max_length: int | None = None, max_length_source: str = "") -> dict[str, Any]:
    """Check the tokenizer against the model, copy it into ``bundle``, return the manifest's ``text``."""
    tokenizer_path = Path(tokenizer_path)
    file = _tokenizer_file(tokenizer_path)
    unknown = [s.name for s in inputs if s.name not in FIELDS]
    if unknown or "input_ids" not in {s.name for s in inputs}:
        raise InputSpecError(f"--tokenizer: the model's inputs {[s.name for s in inputs]} are not token inputs a "
                             f"tokenizer fills (input_ids, and optionally attention_mask and token_type_ids)"
                             + (f"; unknown: {unknown}" if unknown else ""))
    bad = [s.name for s in inputs if len(s.shape) != 2 or not np.issubdtype(np.dtype(s.dtype), np.integer)]
    if bad:
        raise InputSpecError(f"--tokenizer: input(s) {bad} must be 2-D integer tensors (batch x sequence)")
    tokenizer = _load(file, "--tokenizer")
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    highest = int(held["input_ids"].max())
    if highest >= vocab:
        raise InputSpecError(f"--tokenizer {file}: its vocabulary has {vocab} tokens but the data holds token id "
                             f"{highest}: not the tokenizer this model was trained with")
    target = bundle / TOKENIZER_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(file, target)
    calibration_length = int(held["input_ids"].shape[1])
    return {"input": TEXT_INPUT, "tokenizer": TOKENIZER_FILE, "max_length": int(max_length or calibration_length),
            "max_length_source": max_length_source or "the calibration data", "calibration_length": calibration_length,
            "padding": "longest", "pad_id": _pad_id(tokenizer, file.parent),
            "fields": {s.name: FIELDS[s.name] for s in inputs}, "vocab_size": vocab}


def pad_values(section: dict[str, Any]) -> dict[str, int]:
    """What each token input is padded with: the pad id for ids, 0 for masks and type ids."""
    return {name: (section["pad_id"] if field == "ids" else 0) for name, field in section["fields"].items()}


def long_samples(arrays: dict[str, np.ndarray], length: int, rows: int = 16) -> dict[str, np.ndarray]:
    """Held-out token rows made ``length`` long: each row's real tokens repeated, every position attended.

    What the gate checks engines at beside the calibration length (the longest a server passes on)."""
    ids = arrays["input_ids"][:rows]
    mask = arrays.get("attention_mask")
    out = {name: np.zeros((len(ids), length), array.dtype) for name, array in arrays.items()}
    for row in range(len(ids)):
        real = ids[row][mask[row][:ids.shape[1]] > 0] if mask is not None else ids[row]
        out["input_ids"][row] = np.resize(real if len(real) else ids[row], length)
    if "attention_mask" in out:
        out["attention_mask"][:] = 1
    return out


class TextEncoder:
    """Strings to the model's token feeds, as the bundle's ``text`` section says."""

    def __init__(self, bundle: Path, section: dict[str, Any], inputs: list[TensorSpec]):
        self.section = section
        self.input = section["input"]
        self.max_length = int(section["max_length"])
        self.fixed = section.get("padding") != "longest"  # bundles of schema 1 pad to the built length
        self.fields = dict(section["fields"])
        self.pads = pad_values(section)
        self.dtypes = {s.name: np.dtype(s.dtype) for s in inputs}
        file = Path(bundle) / section["tokenizer"]
        if not file.is_file():
            raise BundleError(f"bundle {bundle}: the manifest names {section['tokenizer']} but it is missing")
        self.tokenizer = _load(file, "bundle tokenizer")
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_length)

    def encode(self, texts: list[str]) -> dict[str, np.ndarray]:
        return self.encode_counted(texts)[0]

    def encode_counted(self, texts: list[str]) -> tuple[dict[str, np.ndarray], int]:
        """(the feeds, how many texts were cut at ``max_length``)."""
        encodings = self.tokenizer.encode_batch(list(texts))
        truncated = sum(1 for e in encodings if e.overflowing)
        length = self.max_length if self.fixed else max([len(e.ids) for e in encodings] + [1])
        out = {}
        for name, field in self.fields.items():
            array = np.full((len(encodings), length), self.pads[name], dtype=self.dtypes[name])
            for row, encoding in enumerate(encodings):
                values = getattr(encoding, field)
                array[row, :len(values)] = values
            out[name] = array
        return out, truncated
