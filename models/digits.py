"""A small CNN trained on scikit-learn's real handwritten digits (8x8 grey images, 10 classes).

``python -m models.digits OUT_DIR`` trains it in seconds and writes:
- ``digits.pt``: the state_dict (load with ``--arch models.digits:DigitsNet``),
- ``digits_calib.npz``: unlabelled training images (key ``x``) for calibration,
- ``digits_test.npz``: the held-back labelled test images (keys ``x``, ``labels``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

TEST_FRACTION = 0.3
SEED = 0


class DigitsNet(nn.Module):
    """Three conv blocks and a linear head; input (N, 1, 8, 8) scaled to [0, 1]."""

    def __init__(self, width: int = 32, classes: int = 10):
        super().__init__()
        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
        self.features = nn.Sequential(block(1, width), block(width, 2 * width), nn.MaxPool2d(2),
                                      block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1))
        self.classifier = nn.Linear(4 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The real digits, scaled to [0, 1], split deterministically into train and test."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)[:, None]
    labels = data.target.astype(np.int64)
    order = np.random.default_rng(SEED).permutation(len(images))
    test = int(len(images) * TEST_FRACTION)
    test_idx, train_idx = np.sort(order[:test]), np.sort(order[test:])
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]


def train(model: nn.Module, images: np.ndarray, labels: np.ndarray, epochs: int = 30,
          seed: int = SEED) -> nn.Module:
    torch.manual_seed(seed)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=epochs * ((len(x) + 63) // 64))
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            # Small shifts make the model robust enough to be worth pruning and quantizing.
            batch = torch.roll(x[idx], shifts=tuple(np.random.randint(-1, 2, size=2)), dims=(2, 3))
            loss = nn.functional.cross_entropy(model(batch), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    with torch.no_grad():
        predicted = model(torch.from_numpy(images)).argmax(1).numpy()
    return float((predicted == labels).mean() * 100)


def make_checkpoint(out_dir: str | Path, epochs: int = 30) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.random.seed(SEED)
    train_x, train_y, test_x, test_y = digits_split()
    torch.manual_seed(SEED)  # the initial weights too: the same checkpoint whatever ran before in the process
    model = train(DigitsNet(), train_x, train_y, epochs)
    torch.save(model.state_dict(), out / "digits.pt")
    np.savez(out / "digits_calib.npz", x=train_x)
    np.savez(out / "digits_test.npz", x=test_x, labels=test_y)
    summary = {"train_samples": len(train_x), "test_samples": len(test_x),
               "test_accuracy": accuracy(model, test_x, test_y)}
    (out / "digits.json").write_text(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    print(json.dumps(make_checkpoint(args.out_dir, args.epochs)))


if __name__ == "__main__":
    main()
