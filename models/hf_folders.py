"""Small ``transformers`` models trained on real data and saved as Hugging Face model folders, as
``save_pretrained`` writes them: what a user brings to ``optimize build DIR``.

- ``vit``: a ViT image classifier (``ViTForImageClassification``, from a small ``ViTConfig``) trained
  on scikit-learn's digits drawn as 32x32 RGB images; the folder holds ``preprocessor_config.json``
  (resize, rescale and the [-1, 1] normalisation it was trained with) and ``id2label`` names the
  digits; beside it an image folder (one subfolder per label name) for ``--calib``.
- ``text``: a BERT text classifier (``BertForSequenceClassification``, small config, the real
  all-MiniLM-L6-v2 tokenizer and vocabulary) trained to tell which standard-library package a
  docstring comes from; the folder holds the tokenizer; ``id2label`` names the packages; beside it
  ``text.npz`` (``input_ids``, ``attention_mask``, ``labels``: no ``token_type_ids``, which stays at
  its default).

    python -m models.hf_folders OUT_DIR [vit] [text]   # writes OUT_DIR/NAME/ and its data
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

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


def vit(out: Path, epochs: int = 12) -> dict:
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(SEED)
    config = ViTConfig(image_size=IMAGE_SIZE, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=3,
                       num_attention_heads=4, intermediate_size=128, id2label=dict(enumerate(DIGIT_NAMES)),
                       label2id={n: i for i, n in enumerate(DIGIT_NAMES)})
    model = ViTForImageClassification(config)
    pictures, labels = digit_pictures()
    pixels = ((pictures.astype(np.float32) / 255 - 0.5) / 0.5).transpose(0, 3, 1, 2).copy()
    order = np.random.default_rng(SEED).permutation(len(labels))
    train, test = order[:1400], order[1400:]
    _train(model, {"pixel_values": pixels[train]}, labels[train], epochs, 2e-3)
    with torch.no_grad():
        accuracy = float((model(pixel_values=torch.from_numpy(pixels[test])).logits.argmax(1).numpy()
                          == labels[test]).mean())
    folder = out / "vit"
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "do_resize": True,
        "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "resample": 2, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5]}, indent=1))
    images = out / "vit_images"
    for row in test:
        place = images / DIGIT_NAMES[labels[row]]
        place.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pictures[row]).save(place / f"{row}.png")
    np.savez(out / "vit_pixels.npz", pixel_values=pixels[test], labels=labels[test])
    return {"model": str(folder), "images": str(images), "test_accuracy": accuracy}


def text(out: Path, epochs: int = 6) -> dict:
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from models.minilm import model_dir
    from models.zoo_data import DOC_PACKAGES, _docstrings

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir()))
    texts, labels = _docstrings()
    encoded = tokenizer([" ".join(t.split()) for t in texts], padding="max_length", truncation=True,
                        max_length=TEXT_LENGTH, return_tensors="np")
    feeds = {"input_ids": encoded["input_ids"].astype(np.int64),
             "attention_mask": encoded["attention_mask"].astype(np.int64)}
    torch.manual_seed(SEED)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=128,
                        id2label=dict(enumerate(DOC_PACKAGES)), label2id={n: i for i, n in enumerate(DOC_PACKAGES)})
    model = BertForSequenceClassification(config)
    order = np.random.default_rng(SEED).permutation(len(labels))
    cut = int(len(order) * 0.8)
    train, test = order[:cut], order[cut:]
    _train(model, {k: v[train] for k, v in feeds.items()}, labels[train], epochs, 2e-3)
    with torch.no_grad():
        logits = model(**{k: torch.from_numpy(v[test]) for k, v in feeds.items()}).logits
    accuracy = float((logits.argmax(1).numpy() == labels[test]).mean())
    folder = out / "text"
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copyfile(model_dir() / name, folder / name)
    np.savez(out / "text.npz", **{k: v[test] for k, v in feeds.items()}, labels=labels[test])
    (out / "text_samples.json").write_text(json.dumps(
        [{"text": " ".join(texts[i].split())[:200], "label": DOC_PACKAGES[labels[i]]} for i in test[:16]], indent=1))
    return {"model": str(folder), "data": str(out / "text.npz"), "test_accuracy": accuracy, "classes": len(DOC_PACKAGES)}


MAKERS = {"vit": vit, "text": text}


def make(out: str | Path, names: tuple[str, ...] = tuple(MAKERS)) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return {name: MAKERS[name](out) for name in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("names", nargs="*", help=f"any of {', '.join(MAKERS)} (default: all)")
    args = parser.parse_args()
    print(json.dumps(make(args.out_dir, tuple(args.names) or tuple(MAKERS)), indent=1))


if __name__ == "__main__":
    main()
