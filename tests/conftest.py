"""Fixtures every test module shares, built once per run.

- One place for threads and spinning: the suite runs one test at a time on a small machine, often
  beside servers it started. Engines take one thread and do not spin between calls; torch keeps its
  own setting (``support.run_cli`` restores it after each command).
- One stage cache for the run (``OPTIMIZE_CACHE_DIR``): bundles that share stages build them once.
  A test that asserts cache hits, misses or resume passes a private ``--cache-dir``.
- ``bundles``: tiny-CNN bundles keyed by the flags that make them, built through the CLI in process.
  They are shared and read-only; a test that writes into one (``bench``, ``--reselect``) asks for
  ``bundles.copy``. The run ends with a check that no shared bundle was changed.
- The reference checkpoints (the tiny CNN, the digits CNN) are made once.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from support import SERVED, SLOW, TINY, Server, load_tiny, run_cli

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.update({"OPTIMIZE_THREADS": "1", "OPTIMIZE_SPIN": "0"})
# What one test may take before it is stopped as hung (pytest-timeout), by layer.
TIMEOUTS_S = {"slow": 1200, "service": 600}
DEFAULT_TIMEOUT_S = 300


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("timeout") is None:
            limit = max([s for m, s in TIMEOUTS_S.items() if item.get_closest_marker(m)], default=DEFAULT_TIMEOUT_S)
            item.add_marker(pytest.mark.timeout(limit))


# Every process this run starts from the test process (directly or through the code under test),
# by program: Python's audit event for subprocess.Popen sees them all.
PROCESSES: dict[str, int] = {}


def _count_process(event: str, args: tuple) -> None:
    if event == "subprocess.Popen":
        argv = [str(a) for a in (args[1] or [args[0]])] if isinstance(args[1], (list, tuple)) else [str(args[1])]
        name = os.path.basename(argv[0])
        if name.startswith("python") and len(argv) > 2 and argv[1] in ("-m", "-c"):
            name = f"python -m {argv[2]}" if argv[1] == "-m" else "python -c"
        PROCESSES[name] = PROCESSES.get(name, 0) + 1


sys.addaudithook(_count_process)


def pytest_terminal_summary(terminalreporter):
    from support import COMMANDS_IN_PROCESS, SERVERS_STARTED

    write = terminalreporter.write_line
    write(f"optimize commands in process: {sum(COMMANDS_IN_PROCESS.values())} "
          f"({', '.join(f'{k} {v}' for k, v in sorted(COMMANDS_IN_PROCESS.items()))})")
    write(f"processes started: {sum(PROCESSES.values())} "
          f"({', '.join(f'{k} {v}' for k, v in sorted(PROCESSES.items(), key=lambda kv: -kv[1]))}); "
          f"optimize servers among them: {SERVERS_STARTED[0]}")


# Processes that session-scoped fixtures keep for the whole run (not left over by a module), and the
# helpers a library starts once for the life of the test process (multiprocessing's tracker).
SESSION_PROCESSES: set[int] = set()
PROCESS_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def _children() -> dict[int, str]:
    """This process's living children: pid -> command line (from /proc)."""
    found = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
            if fields.get("PPid", "").strip() == str(os.getpid()) and not fields.get("State", "").strip().startswith("Z"):
                found[int(status.parent.name)] = (status.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue  # it ended while being read
    return found


@pytest.fixture(scope="module", autouse=True)
def no_process_left_behind():
    """Every process a module starts is stopped by the end of the module, on every path."""
    before = set(_children())
    yield
    deadline = time.monotonic() + 10
    while True:
        left = {pid: cmd for pid, cmd in _children().items()
                if pid not in before | SESSION_PROCESSES and not any(helper in cmd for helper in PROCESS_HELPERS)}
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left running (now killed): {left}"


@pytest.fixture(scope="session", autouse=True)
def shared_cache(tmp_path_factory) -> Path:
    """The run's stage cache, shared by every build that does not name its own."""
    folder = tmp_path_factory.mktemp("stage-cache")
    os.environ["OPTIMIZE_CACHE_DIR"] = str(folder)
    yield folder
    os.environ.pop("OPTIMIZE_CACHE_DIR", None)


@pytest.fixture
def private_cache(tmp_path, monkeypatch) -> Path:
    """A stage cache of this test's own (for tests that count hits, misses or resumes)."""
    folder = tmp_path / "private-cache"
    monkeypatch.setenv("OPTIMIZE_CACHE_DIR", str(folder))
    return folder


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


@pytest.fixture(scope="session")
def digits_checkpoint(tmp_path_factory) -> dict:
    """The real digits CNN, trained once per run on scikit-learn's digits, with its data files."""
    from models.digits import make_checkpoint

    folder = tmp_path_factory.mktemp("digits")
    summary = make_checkpoint(folder)
    test = np.load(folder / "digits_test.npz")
    return {"folder": folder, "ckpt": folder / "digits.pt", "calib": folder / "digits_calib.npz",
            "test": folder / "digits_test.npz", "x": np.load(folder / "digits_calib.npz")["x"],
            "test_x": test["x"], "labels": test["labels"], "summary": summary}


def _tree_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


class Bundles:
    """Bundles of the tiny CNN (model name ``tiny``), one per set of flags, built on first use."""

    def __init__(self, root: Path, checkpoint: dict):
        self.root, self.checkpoint = root, checkpoint
        self.built: dict[tuple[str, ...], tuple[Path, str]] = {}

    def get(self, *flags, calib: Path | None = None, model: str = "tiny") -> Path:
        """The bundle ``optimize build`` makes with ``flags`` (calibration data and ``--name tiny``
        added unless given). Shared: do not write into it."""
        t = self.checkpoint
        args = tuple(map(str, flags))
        key = (model, str(calib), *args)
        if key not in self.built:
            out = self.root / str(len(self.built)) / "bundle"
            source = ("--arch", t["arch"]) if model == "tiny" else ()
            data = () if "--calib" in args or "--input-shape" in args else ("--calib", calib or t["calib"])
            name = () if "--name" in args else ("--name", "tiny")
            result = run_cli("build", t["ckpt"] if model == "tiny" else model, *source, *data, *name, "--out", out, *args)
            assert result.returncode == 0, result.stderr
            self.built[key] = (out, _tree_hash(out))
        return self.built[key][0]

    def copy(self, destination: Path, *flags, **kwargs) -> Path:
        """A private copy of ``get(*flags)`` at ``destination``, to write into."""
        shutil.copytree(self.get(*flags, **kwargs), destination)
        return destination

    def check_unchanged(self) -> list[str]:
        return [str(out) for out, digest in self.built.values() if _tree_hash(out) != digest]


@pytest.fixture(scope="session")
def bundles(tiny_checkpoint, tmp_path_factory):
    shared = Bundles(tmp_path_factory.mktemp("bundles"), tiny_checkpoint)
    yield shared
    changed = shared.check_unchanged()
    assert not changed, f"a test wrote into shared bundles {changed}: use bundles.copy"


@pytest.fixture(scope="session")
def slow_bundle(bundles) -> Path:
    """The tiny CNN on 3x192x192 inputs: each engine call takes milliseconds, long enough to queue behind."""
    return bundles.get(*SLOW)


@pytest.fixture(scope="session")
def server(bundles):
    """One ``optimize serve`` of the ``SERVED`` bundle (ort-fp32, 1 MB bodies) for the tests that only
    talk to it; a test that stops, overloads or reconfigures a server starts its own."""
    with Server(bundles.get(*SERVED), "--target", "ort-fp32", "--max-body-mb", "1") as running:
        SESSION_PROCESSES.add(running.process.pid)
        yield running
