"""Small ``transformers`` models trained on real data and saved as Hugging Face model folders, as
``save_pretrained`` writes them: what a user brings to ``optimize build DIR``.

- image classifiers (``vit``, ``deit``, ``convnextv2``, ``resnet``, ``mobilevit``: the transformers
  classes, from small configs) trained on scikit-learn's digits drawn as 32x32 RGB images; each
  folder holds ``preprocessor_config.json`` (resize, rescale and the [-1, 1] normalisation it was
  trained with) and ``id2label`` names the digits; beside them ``images/`` (the test split, one
  subfolder per label name) for ``--calib``.
- text classifiers (``bert``, ``distilbert``, ``roberta``; ``text`` is the BERT one) with the real
  all-MiniLM-L6-v2 tokenizer and vocabulary, trained to tell which standard-library package a
  docstring comes from; each folder holds the tokenizer; ``id2label`` names the packages; beside
  them ``text.npz`` (``input_ids``, ``attention_mask``, ``labels``: no ``token_type_ids``, which stays
  at its default).

    python -m models.hf_folders OUT_DIR [NAME ...]   # default: vit text; writes OUT_DIR/NAME/ and the data
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SEED = 0
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
IMAGE_SIZE = 32
TEXT_LENGTH = 48


def _train(model: torch.nn.Module, feeds: dict[str, np.ndarray], labels: np.ndarray, epochs: int, lr: float,
           batch: int = 32) -> None:
    torch.manual_seed(SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = np.random.default_rng(SEED)
    model.train()
    for _ in range(epochs):
        order = rng.permutation(len(labels))
        for start in range(0, len(order), batch):
            index = order[start:start + batch]
            out = model(**{k: torch.from_numpy(v[index]) for k, v in feeds.items()},
                        labels=torch.from_numpy(labels[index]))
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
    model.eval()


def digit_pictures() -> tuple[np.ndarray, np.ndarray]:
    """The digits as 32x32 RGB uint8 pictures (N, 32, 32, 3) and their labels."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    pictures = [np.asarray(Image.fromarray((image * 255 / 16).astype(np.uint8)).convert("RGB")
                           .resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)) for image in digits.images]
    return np.stack(pictures), digits.target.astype(np.int64)


def _image_model(arch: str, labels: dict[str, Any]) -> torch.nn.Module:
    import transformers as t

    if arch in ("vit", "deit"):
        kind = (t.ViTConfig, t.ViTForImageClassification) if arch == "vit" else (t.DeiTConfig, t.DeiTForImageClassification)
        return kind[1](kind[0](image_size=IMAGE_SIZE, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=3,
                               num_attention_heads=4, intermediate_size=128, **labels))
    if arch == "convnextv2":
        return t.ConvNextV2ForImageClassification(t.ConvNextV2Config(
            num_channels=3, patch_size=2, hidden_sizes=[24, 48, 96, 192], depths=[1, 1, 2, 1], image_size=IMAGE_SIZE,
            **labels))
    if arch == "resnet":
        return t.ResNetForImageClassification(t.ResNetConfig(
            num_channels=3, embedding_size=24, hidden_sizes=[24, 48, 96, 192], depths=[1, 1, 1, 1], layer_type="basic",
            downsample_in_first_stage=False, **labels))
    if arch == "mobilevit":
        return t.MobileViTForImageClassification(t.MobileViTConfig(
            num_channels=3, image_size=IMAGE_SIZE, patch_size=2, hidden_sizes=[48, 64, 80],
            neck_hidden_sizes=[8, 16, 24, 32, 48, 64, 160], num_attention_heads=4, **labels))
    raise KeyError(arch)


def _text_model(arch: str, vocab: int, labels: dict[str, Any]) -> torch.nn.Module:
    import transformers as t

    if arch == "bert":
        return t.BertForSequenceClassification(t.BertConfig(
            vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=128, **labels))
    if arch == "distilbert":
        return t.DistilBertForSequenceClassification(t.DistilBertConfig(
            vocab_size=vocab, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=128, **labels))
    if arch == "roberta":  # the tokenizer pads with id 0: RoBERTa's positions count from its pad id
        return t.RobertaForSequenceClassification(t.RobertaConfig(
            vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=TEXT_LENGTH + 2, pad_token_id=0, bos_token_id=101, eos_token_id=102, **labels))
    raise KeyError(arch)


IMAGE_ARCHS = ("vit", "deit", "convnextv2", "resnet", "mobilevit")
TEXT_ARCHS = ("bert", "distilbert", "roberta")
# The suite's two: ``vit`` (image) and ``text`` (the BERT classifier).
ALIASES = {"text": "bert"}


def _images(out: Path) -> dict[str, Any]:
    """The digits as pictures, the model's pixel values, and an image folder of the test split."""
    from PIL import Image

    pictures, labels = digit_pictures()
    pixels = ((pictures.astype(np.float32) / 255 - 0.5) / 0.5).transpose(0, 3, 1, 2).copy()
    order = np.random.default_rng(SEED).permutation(len(labels))
    train, test = order[:1400], order[1400:]
    images = out / "images"
    if not images.is_dir():
        for row in test:
            place = images / DIGIT_NAMES[labels[row]]
            place.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pictures[row]).save(place / f"{row}.png")
    return {"pixels": pixels, "labels": labels, "train": train, "test": test, "images": images}


def image_folder(arch: str, out: Path, epochs: int = 12, data: dict[str, Any] | None = None) -> dict:
    """A trained image classifier saved as ``out/<arch>``, with its preprocessor_config.json."""
    data = data or _images(out)
    torch.manual_seed(SEED)
    model = _image_model(arch, {"id2label": dict(enumerate(DIGIT_NAMES)),
                                "label2id": {n: i for i, n in enumerate(DIGIT_NAMES)}})
    pixels, labels, train, test = data["pixels"], data["labels"], data["train"], data["test"]
    _train(model, {"pixel_values": pixels[train]}, labels[train], epochs, 2e-3)
    with torch.no_grad():
        accuracy = float((model(pixel_values=torch.from_numpy(pixels[test])).logits.argmax(1).numpy()
                          == labels[test]).mean())
    folder = out / arch
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "do_resize": True,
        "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "resample": 2, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5]}, indent=1))
    return {"model": str(folder), "data": str(data["images"]), "test_accuracy": accuracy, "kind": "image",
            "class": type(model).__name__}


def _texts(out: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from models.minilm import model_dir
    from models.zoo_data import DOC_PACKAGES, _docstrings

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir()))
    texts, labels = _docstrings()
    encoded = tokenizer([" ".join(t.split()) for t in texts], padding="max_length", truncation=True,
                        max_length=TEXT_LENGTH, return_tensors="np")
    feeds = {"input_ids": encoded["input_ids"].astype(np.int64),
             "attention_mask": encoded["attention_mask"].astype(np.int64)}
    order = np.random.default_rng(SEED).permutation(len(labels))
    cut = int(len(order) * 0.8)
    train, test = order[:cut], order[cut:]
    if not (out / "text.npz").is_file():
        np.savez(out / "text.npz", **{k: v[test] for k, v in feeds.items()}, labels=labels[test])
        (out / "text_samples.json").write_text(json.dumps(
            [{"text": " ".join(texts[i].split())[:200], "label": DOC_PACKAGES[labels[i]]} for i in test[:16]],
            indent=1))
    return {"feeds": feeds, "labels": labels, "train": train, "test": test, "vocab": tokenizer.vocab_size,
            "packages": DOC_PACKAGES, "tokenizer_dir": model_dir()}


def text_folder(arch: str, out: Path, epochs: int = 6, data: dict[str, Any] | None = None,
                name: str | None = None) -> dict:
    """A trained text classifier saved as ``out/<name or arch>``, with the tokenizer inside."""
    data = data or _texts(out)
    torch.manual_seed(SEED)
    packages = data["packages"]
    model = _text_model(arch, data["vocab"], {"id2label": dict(enumerate(packages)),
                                              "label2id": {n: i for i, n in enumerate(packages)}})
    feeds, labels, train, test = data["feeds"], data["labels"], data["train"], data["test"]
    _train(model, {k: v[train] for k, v in feeds.items()}, labels[train], epochs, 2e-3)
    with torch.no_grad():
        logits = model(**{k: torch.from_numpy(v[test]) for k, v in feeds.items()}).logits
    accuracy = float((logits.argmax(1).numpy() == labels[test]).mean())
    folder = out / (name or arch)
    model.save_pretrained(folder)
    for file in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copyfile(data["tokenizer_dir"] / file, folder / file)
    return {"model": str(folder), "data": str(out / "text.npz"), "test_accuracy": accuracy, "kind": "text",
            "class": type(model).__name__, "classes": len(packages)}


def make(out: str | Path, names: tuple[str, ...] = ("vit", "text"), epochs: int | None = None) -> dict:
    """Each named folder (an architecture of ``IMAGE_ARCHS`` or ``TEXT_ARCHS``, or ``text``: the BERT
    classifier) trained and saved under ``out``, with the shared data beside them; ``epochs`` (None:
    each kind's default) shortens training where only the folder matters, not the model's quality."""
    more = {} if epochs is None else {"epochs": epochs}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    made, images, texts = {}, None, None
    for name in names:
        arch = ALIASES.get(name, name)
        if arch in IMAGE_ARCHS:
            images = images or _images(out)
            made[name] = image_folder(arch, out, data=images, **more)
        elif arch in TEXT_ARCHS:
            texts = texts or _texts(out)
            made[name] = text_folder(arch, out, data=texts, name=name, **more)
        else:
            raise KeyError(f"{name}: not one of {', '.join(IMAGE_ARCHS + TEXT_ARCHS)}, text")
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("names", nargs="*", help=f"any of {', '.join(IMAGE_ARCHS + TEXT_ARCHS)} (default: vit, text)")
    args = parser.parse_args()
    print(json.dumps(make(args.out_dir, tuple(args.names) or ("vit", "text")), indent=1))


if __name__ == "__main__":
    main()
