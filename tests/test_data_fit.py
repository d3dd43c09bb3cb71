"""The user's data against the model, before any stage: each mistake is one line and exit 2, with no
bundle written; casts and conversions that are safe are made with a note; a model at chance level
on its labelled data is said out loud (``--strict`` stops)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from support import TINY, run_cli
from optimize import validate
from optimize.build import fit
from optimize.errors import CalibrationError

DIGITS = ("--arch", "models.digits:DigitsNet", "--target", "ort-fp32", "--no-cache")
TWO = ("--arch", f"{TINY}:TwoInputs", "--target", "ort-fp32", "--no-cache")


@pytest.fixture(scope="module")
def digits(digits_checkpoint, tmp_path_factory):
    """The run's real digits CNN with its [0, 1] data, and its test split as a PNG folder."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("digits-png")
    d = digits_checkpoint
    for i, (image, label) in enumerate(zip(d["test_x"][:200], d["labels"][:200])):
        (folder / "png" / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray((image[0] * 255).astype(np.uint8)).save(folder / "png" / str(label) / f"{i}.png")
    return {**d, "png": folder / "png"}


@pytest.fixture(scope="module")
def two_inputs(tmp_path_factory):
    import torch

    from support import load_tiny

    folder = tmp_path_factory.mktemp("two")
    torch.save(load_tiny().TwoInputs().state_dict(), folder / "two.pt")
    return folder / "two.pt"


def _error(result) -> str:
    """The one line printed for a user's mistake; exit 2, no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def _save(tmp_path, name, **arrays):
    np.savez(tmp_path / name, **arrays)
    return tmp_path / name


# (case, how the data is made from the digits fixture, extra flags, what the line must say)
DIGITS_MISTAKES = [
    ("no channel axis", lambda d: {"x": d["x"][:, 0]}, (),
     "the channel axis is missing: give (N, 1, ...) data"),
    ("channels last", lambda d: {"x": d["x"].transpose(0, 2, 3, 1)}, (),
     "the data looks channels-last (N, ..., 1): transpose it to channels-first"),
    ("three channels for a one-channel model", lambda d: {"x": np.repeat(d["x"], 3, 1)}, (),
     "the model takes 1 channel(s) on axis 1 and the data has 3"),
    ("integer pixels", lambda d: {"x": (d["x"] * 16).astype(np.int64)}, (),
     "input 'x' is int64 but the model computes in floats"),
    ("two arrays, neither named after the input", lambda d: {"a": d["x"], "b": d["x"]}, (),
     "has arrays ['a', 'b'], none named after the inputs of the model's forward(x)"),
    ("an extra array", lambda d: {"x": d["x"], "mask": d["x"]}, (),
     "has arrays ['mask'] that are not inputs of the model's forward(x)"),
    ("rank 5", lambda d: {"x": d["x"][:, None]}, (), "Conv2d takes rank-4 batches (N, C, ...); input 'x' has rank 5"),
    ("NaN pixels", lambda d: {"x": np.where(np.arange(len(d["x"]))[:, None, None, None] < 3, np.nan, d["x"])}, (),
     "input 'x' holds NaN or infinite values in 3 sample(s)"),
    ("fractional labels", lambda d: {"x": d["x"][:100], "labels": np.linspace(0, 9, 100)}, (),
     "hold fractional values (e.g. 0.0909091): classification labels are integer class indices"),
    ("negative labels", lambda d: {"x": d["x"][:100], "labels": np.full(100, -100)}, (),
     "hold negative values (min -100): class indices start at 0"),
    ("labels beyond the classes", lambda d: {"x": d["x"][:100], "labels": np.arange(100) % 10 + 1}, (),
     "go up to 10 but the model has 10 outputs (classes 0..9): are the labels 1-based"),
    ("soft labels", lambda d: {"x": d["x"][:100], "labels": np.full((100, 10), 0.1)}, (),
     "are (100, 10) rows that are not one-hot"),
    ("labels of the wrong length", lambda d: {"x": d["x"][:100], "labels": np.zeros(90, np.int64)}, (),
     "90 labels for 100 samples"),
]


@pytest.mark.parametrize("case,make,flags,expected", DIGITS_MISTAKES, ids=[c[0] for c in DIGITS_MISTAKES])
def test_data_that_does_not_fit_is_one_line(digits, tmp_path, case, make, flags, expected):
    data = _save(tmp_path, "data.npz", **make(digits))
    line = _error(run_cli("build", digits["ckpt"], *DIGITS, "--calib", data, *flags, "--out", tmp_path / "b"))
    assert expected in line, line
    assert not (tmp_path / "b").exists()


def test_shape_and_folder_mistakes_name_the_flag_that_fixes_them(digits, tmp_path):
    line = _error(run_cli("build", digits["ckpt"], *DIGITS, "--input-shape", "1x3x8x8", "--out", tmp_path / "b"))
    assert "Likely fix: the model takes 1 channel(s): --input-shape 1x1x8x8" in line
    line = _error(run_cli("build", digits["ckpt"], *DIGITS, "--calib", digits["png"], "--image-size", "8x8",
                          "--out", tmp_path / "b"))
    assert "the model wants (N, 1, H, W) float from its first layer Conv2d" in line
    assert line.endswith("Likely fix: the model takes one channel: pass --grayscale")
    line = _error(run_cli("build", digits["ckpt"], *DIGITS, "--calib", digits["calib"],
                          "--eval-data", _save(tmp_path, "e.npz", x=digits["test_x"]), "--out", tmp_path / "b"))
    assert "--eval-data" in line and "has no 'labels' array" in line
    assert not (tmp_path / "b").exists()


def test_two_input_mistakes(two_inputs, tmp_path):
    rng = np.random.default_rng(0)
    left, right = rng.standard_normal((60, 4)).astype("f4"), rng.standard_normal((60, 6)).astype("f4")
    line = _error(run_cli("build", two_inputs, *TWO, "--calib", _save(tmp_path, "m.npz", left=left),
                          "--out", tmp_path / "b"))
    assert line == ("error: m.npz has no data for input(s) ['right'] of the model's forward(left, right): "
                    "add an array named 'right'").replace("m.npz", str(tmp_path / "m.npz"))
    line = _error(run_cli("build", two_inputs, *TWO, "--calib", _save(tmp_path, "c.npz", left=left[:, :3], right=right),
                          "--out", tmp_path / "b"))
    assert "input 'left' (N, 3) float32, input 'right' (N, 6) float32" in line
    assert "a Linear layer wants 4 features and got 3" in line
    line = _error(run_cli("build", two_inputs, *TWO, "--input-shape", "left:1x4", "--out", tmp_path / "b"))
    assert "repeat --input-shape for each, e.g. right:1xDIMS[:dtype]" in line
    assert not (tmp_path / "b").exists()
    # Arrays in another order than forward's arguments are fed by name, not by position.
    result = run_cli("build", two_inputs, *TWO, "--calib", _save(tmp_path, "r.npz", right=right, left=left),
                     "--out", tmp_path / "b")
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_safe_conversions_are_made_with_a_note(digits, tmp_path):
    calib = _save(tmp_path, "f64.npz", x=digits["x"].astype(np.float64))
    onehot = _save(tmp_path, "onehot.npz", x=digits["test_x"], labels=np.eye(10)[digits["labels"]])
    result = run_cli("build", digits["ckpt"], *DIGITS, "--calib", calib, "--eval-data", onehot, "--out", tmp_path / "b")
    assert result.returncode == 0, result.stderr
    assert f"note: input 'x' from {calib} is float64: cast to float32, the model's parameter dtype" in result.stderr
    assert f"note: labels in {onehot} are one-hot: taken as class indices (argmax)" in result.stderr
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["inputs"][0]["dtype"] == "float32"
    assert manifest["targets"]["ort-fp32"]["accuracy"]["eval"]["accuracy_pct"] > 90
    assert manifest["data"]["chance_level"]["at_chance"] is False and "warnings" not in manifest


@pytest.mark.slow
def test_chance_level_on_a_wrong_mean_and_std_of_images(digits, tmp_path):
    flags = ("--calib", digits["png"], "--image-size", "8x8", "--grayscale")
    right = run_cli("build", digits["ckpt"], *DIGITS, *flags, "--mean", "0", "--std", "1", "--out", tmp_path / "ok")
    assert right.returncode == 0 and "within chance" not in right.stderr + right.stdout, right.stderr
    # Pixels in [0, 1] taken as if standardised around 2: [-2, -1] (the checkpoint scores 7.5% on it)
    wrong = run_cli("build", digits["ckpt"], *DIGITS, *flags, "--mean", "2", "--std", "1", "--out", tmp_path / "b")
    assert wrong.returncode == 0, wrong.stderr
    warning = next(ln for ln in wrong.stderr.splitlines() if ln.startswith("warning:"))
    assert "the FP32 model itself scores" in warning and "within chance" in warning
    assert "image folder read as grayscale, resized to 8x8, scaled to [0, 1], then mean 2 and std 1" in warning
    assert warning in wrong.stdout  # the build table repeats it
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["data"]["chance_level"]["at_chance"] is True
    assert manifest["warnings"] == [warning.removeprefix("warning: ")]
    strict = run_cli("build", digits["ckpt"], *DIGITS, *flags, "--mean", "2", "--std", "1", "--strict",
                     "--out", tmp_path / "s")
    assert "within chance" in _error(strict) and not (tmp_path / "s").exists()


@pytest.mark.slow
def test_chance_level_on_unstandardised_tabular_features(tmp_path):
    """A classifier trained on standardised features, given the raw ones (a missing mean/std)."""
    import torch
    from sklearn.datasets import load_breast_cancer

    from support import load_tiny

    data = load_breast_cancer()
    x, y = data.data.astype(np.float32), data.target
    scaled = (x - x.mean(0)) / x.std(0)
    torch.manual_seed(0)
    model = load_tiny().TabularMLP(x.shape[1], 2)
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(scaled)), torch.from_numpy(y))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.save(model.eval().state_dict(), tmp_path / "mlp.pt")
    flags = ("--arch", f"{TINY}:TabularMLP", "--target", "ort-fp32", "--no-cache")
    good = run_cli("build", tmp_path / "mlp.pt", *flags, "--calib", _save(tmp_path, "s.npz", features=scaled, labels=y),
                   "--out", tmp_path / "ok")
    assert good.returncode == 0 and "within chance" not in good.stderr, good.stderr
    raw = run_cli("build", tmp_path / "mlp.pt", *flags, "--calib", _save(tmp_path, "r.npz", features=x, labels=y),
                  "--out", tmp_path / "b")
    assert raw.returncode == 0, raw.stderr
    assert "within chance" in raw.stderr and "arrays fed as given ('features' in [0, " in raw.stderr


def test_class_labels_unit():
    notes: list[str] = []
    assert fit.class_labels(np.array([[0, 1], [1, 0]]), 2, "d", notes).tolist() == [1, 0] and notes
    assert fit.class_labels(np.array([1.0, 0.0]), 2, "d", []).dtype == np.int64
    assert fit.class_labels(np.array([[1], [0]]), 2, "d", []).tolist() == [1, 0]
    with pytest.raises(CalibrationError, match="3 columns but the model has 2 classes"):
        fit.class_labels(np.eye(3), 2, "d", [])


def test_chance_level_bound():
    # 10 balanced classes, 500 samples: guessing scores 10%, and up to 13% in 97.5% of draws.
    assert validate.binomial_upper(500, 0.1) == 64
    logits = np.eye(10)[np.arange(500) % 10]
    labels = np.arange(500) % 10
    assert not validate.chance_level(logits, labels, "d").at_chance
    guessing = validate.chance_level(np.eye(10)[np.zeros(500, int)], labels, "d")
    assert guessing.at_chance and guessing.chance_pct == pytest.approx(10.0)
    # The majority share is chance too: always answering the majority class of a 90/10 split.
    skewed = np.where(np.arange(500) < 450, 0, 1)
    assert validate.chance_level(np.eye(2)[np.zeros(500, int)], skewed, "d").at_chance
