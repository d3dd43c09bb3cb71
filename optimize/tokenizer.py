"""Text in, token arrays out: the tokenizer kept in a bundle, so a server can take strings.

``optimize build --tokenizer DIR`` checks that the model's inputs are token inputs the tokenizer
fills (``input_ids``, ``attention_mask``, ``token_type_ids``), that its vocabulary covers the ids
in the held-out data, and copies its ``tokenizer.json`` into the bundle; the manifest's ``text``
section records how to use it. ``TextEncoder`` (the ``tokenizers`` library, no PyTorch) turns a
list of strings into the model's feeds: truncated and padded to the length the model was built,
calibrated and validated at (so what is served is what was measured, whatever the model's pooling
does with padding, and every request batches with every other), with the pad id the tokenizer
declares.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from optimize.errors import BundleError, InputSpecError
from optimize.specs import TensorSpec

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


def text_section(tokenizer_path: Path, inputs: list[TensorSpec], held: dict[str, np.ndarray],
                 bundle: Path) -> dict[str, Any]:
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
    return {"input": TEXT_INPUT, "tokenizer": TOKENIZER_FILE, "max_length": int(held["input_ids"].shape[1]),
            "pad_id": _pad_id(tokenizer, file.parent),
            "fields": {s.name: FIELDS[s.name] for s in inputs}, "vocab_size": vocab}


class TextEncoder:
    """Strings to the model's token feeds, as the bundle's ``text`` section says."""

    def __init__(self, bundle: Path, section: dict[str, Any], inputs: list[TensorSpec]):
        self.section = section
        self.input = section["input"]
        self.max_length = int(section["max_length"])
        self.fields = dict(section["fields"])
        self.dtypes = {s.name: np.dtype(s.dtype) for s in inputs}
        file = Path(bundle) / section["tokenizer"]
        if not file.is_file():
            raise BundleError(f"bundle {bundle}: the manifest names {section['tokenizer']} but it is missing")
        self.tokenizer = _load(file, "bundle tokenizer")
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_length)

    @classmethod
    def from_manifest(cls, bundle: Path, manifest: Any) -> "TextEncoder | None":
        """The encoder of a bundle's ``Manifest`` with a ``text`` section, else None."""
        if not manifest.text:
            return None
        return cls(bundle, manifest.text, list(manifest.inputs))

    def encode(self, texts: list[str]) -> dict[str, np.ndarray]:
        encodings = self.tokenizer.encode_batch(list(texts))
        length = self.max_length
        out = {}
        for name, field in self.fields.items():
            fill = self.section["pad_id"] if field == "ids" else 0
            array = np.full((len(encodings), length), fill, dtype=self.dtypes[name])
            for row, encoding in enumerate(encodings):
                values = getattr(encoding, field)
                array[row, :len(values)] = values
            out[name] = array
        return out
