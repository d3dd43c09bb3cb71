from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "tiny_models.py"
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run the real ``optimize`` console entry point in a subprocess."""
    return subprocess.run([sys.executable, "-m", "optimize", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def wait_for(condition: Callable[[], object], timeout_s: float, what: str, every_s: float = 0.05):
    """Poll ``condition`` until it returns something true (returned); fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(every_s)


def build_tiny(checkpoint: dict, out: Path, *flags: str, calib: Path | None = None) -> Path:
    """``optimize build`` of the tiny CNN (calibration data, model name ``tiny``) into ``out``."""
    result = run_cli("build", checkpoint["ckpt"], "--arch", checkpoint["arch"], "--calib", calib or checkpoint["calib"],
                     "--name", "tiny", "--out", out, *flags)
    assert result.returncode == 0, result.stderr
    return out


def load_tiny():
    """``tests/tiny_models.py`` as a module, loaded from its path as ``--arch`` loads it."""
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("tiny_models", TINY)
    tiny = module_from_spec(spec)
    spec.loader.exec_module(tiny)
    return tiny


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> dict:
    import torch

    tiny = load_tiny()
    folder = tmp_path_factory.mktemp("tiny")
    model = tiny.tiny_cnn()
    torch.save(model.state_dict(), folder / "tiny.pt")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        labels = model(torch.from_numpy(x)).argmax(1).numpy()
    np.savez(folder / "calib.npz", x=x)
    np.savez(folder / "eval.npz", x=x[:40], labels=labels[:40])
    wrong = np.arange(len(labels)) % 5 == 0  # a model right 80% of the time, for the accuracy estimate
    np.savez(folder / "calib_labelled.npz", x=x, labels=np.where(wrong, (labels + 1) % 5, labels))
    return {"folder": folder, "ckpt": folder / "tiny.pt", "calib": folder / "calib.npz",
            "calib_labelled": folder / "calib_labelled.npz",
            "eval": folder / "eval.npz", "arch": f"{TINY}:tiny_cnn", "module": tiny, "model": model}
