"""Bad input as a new user would give it: one clear line, non-zero exit, no bundle left behind."""

import numpy as np
import pytest
import torch

from support import run_cli, run_process
from support import WritesAFile


def _no_leftovers(folder, name="b"):
    return [p.name for p in folder.iterdir() if p.name.startswith((name, f".{name}"))
            and not p.name.endswith(".cache")]


def _one_line_error(result):
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode != 0
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.mark.parametrize("flags, says", [
    (("--recover-time", "abc"), "--recover-time 'abc' is not a duration"),
    (("--recover-time", "0"), "must be positive"),
    (("--recover-steps", "-1"), "--recover-steps -1 must be 0 or more"),
])
def test_bad_recovery_bounds(tiny_checkpoint, tmp_path, flags, says):
    t = tiny_checkpoint
    line = _one_line_error(run_cli("build", t["ckpt"], "--arch", t["arch"], "--calib", t["calib"], "--prune", "0.5",
                                   *flags, "--target", "ort-fp32", "--out", tmp_path / "b"))
    assert says in line and not (tmp_path / "b").exists()


def test_missing_checkpoint(tmp_path):
    """The user-mistake family through a real process: what the console shows and the exit status."""
    line = _one_line_error(run_process("build", tmp_path / "missing.pt", "--out", tmp_path / "b"))
    assert "does not exist" in line
    assert _no_leftovers(tmp_path) == []


def test_a_cache_dir_that_cannot_be_written(tiny_checkpoint, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    line = _one_line_error(run_cli("build", tiny_checkpoint["ckpt"], "--arch", tiny_checkpoint["arch"],
                                   "--input-shape", "1x3x16x16", "--cache-dir", tmp_path / "file" / "cache",
                                   "--out", tmp_path / "b"))
    assert "the stage cache" in line and "cannot be written" in line and "--cache-dir" in line
    assert _no_leftovers(tmp_path) == []


def test_corrupt_checkpoint(tmp_path):
    (tmp_path / "c.pt").write_bytes(b"\x00garbage" * 10)
    line = _one_line_error(run_cli("build", tmp_path / "c.pt", "--arch", "tests/tiny_models.py:tiny_cnn",
                                   "--input-shape", "1x3x16x16", "--out", tmp_path / "b"))
    assert "corrupt" in line
    assert _no_leftovers(tmp_path) == []


def test_wrong_arch(tiny_checkpoint, tmp_path):
    line = _one_line_error(run_cli("build", tiny_checkpoint["ckpt"], "--arch", "tests/tiny_models.py:TwoInputs",
                                   "--input-shape", "1x3x16x16", "--out", tmp_path / "b"))
    assert "does not fit --arch" in line and "missing keys" in line
    assert _no_leftovers(tmp_path) == []


def test_wrong_shape(tiny_checkpoint, tmp_path):
    np.savez(tmp_path / "wrong.npz", x=np.zeros((20, 3, 16), np.float32))
    line = _one_line_error(run_cli("build", tiny_checkpoint["ckpt"], "--arch", tiny_checkpoint["arch"],
                                   "--calib", tmp_path / "wrong.npz", "--input-shape", "1x3x16x16",
                                   "--out", tmp_path / "b"))
    assert "has shape (20, 3, 16) but the model expects (N, 3, 16, 16)" in line
    assert _no_leftovers(tmp_path) == []


def test_empty_calibration_folder(tiny_checkpoint, tmp_path):
    (tmp_path / "images").mkdir()
    line = _one_line_error(run_cli("build", tiny_checkpoint["ckpt"], "--arch", tiny_checkpoint["arch"],
                                   "--calib", tmp_path / "images", "--input-shape", "1x3x16x16",
                                   "--out", tmp_path / "b"))
    assert "contains no images" in line
    assert _no_leftovers(tmp_path) == []


def test_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned.txt"
    torch.save({"w": WritesAFile(marker)}, tmp_path / "evil.pt")
    line = _one_line_error(run_cli("build", tmp_path / "evil.pt", "--arch", "tests/tiny_models.py:tiny_cnn",
                                   "--input-shape", "1x3x16x16", "--out", tmp_path / "b"))
    assert "--trust-checkpoint" in line
    assert not marker.exists()
    assert _no_leftovers(tmp_path) == []


def test_unknown_target_and_not_a_bundle(tmp_path):
    line = _one_line_error(run_cli("build", tmp_path / "x.pt", "--target", "tpu-int4", "--out", tmp_path / "b"))
    assert "unknown target 'tpu-int4'" in line
    line = _one_line_error(run_cli("inspect", tmp_path))
    assert "is not a bundle" in line
    line = _one_line_error(run_cli("explain", tmp_path))
    assert "is not a bundle" in line


def test_explicit_unavailable_target_exits_nonzero(tiny_checkpoint, tmp_path):
    result = run_cli("build", tiny_checkpoint["ckpt"], "--arch", tiny_checkpoint["arch"],
                     "--input-shape", "1x3x16x16", "--target", "trt-fp16", "--out", tmp_path / "b")
    assert result.returncode == 1
    assert "unavailable: no NVIDIA GPU" in result.stdout


def test_failed_build_keeps_the_previous_bundle(tiny_checkpoint, tmp_path):
    t = tiny_checkpoint
    out = tmp_path / "b"
    assert run_cli("build", t["ckpt"], "--arch", t["arch"], "--input-shape", "1x3x16x16",
                   "--target", "ort-fp32", "--out", out).returncode == 0
    before = (out / "manifest.json").read_text()
    np.savez(tmp_path / "wrong.npz", x=np.zeros((20, 3, 8, 8), np.float32))
    _one_line_error(run_cli("build", t["ckpt"], "--arch", t["arch"], "--calib", tmp_path / "wrong.npz",
                            "--input-shape", "1x3x16x16", "--out", out))
    assert (out / "manifest.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_debug_prints_the_chained_cause_of_a_one_line_error(tmp_path):
    """A corrupt checkpoint is the user's mistake: one line by default; with ``--debug`` (or
    ``OPTIMIZE_DEBUG=1``) the traceback and the library error it came from are printed too."""
    import os
    import subprocess
    import sys

    (tmp_path / "c.pt").write_bytes(b"PK\x03\x04 a truncated zip archive")
    args = ["build", str(tmp_path / "c.pt"), "--arch", "tests/tiny_models.py:tiny_cnn", "--input-shape", "1x3x16x16",
            "--out", str(tmp_path / "b")]
    quiet = run_cli(*args)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    loud = run_cli("--debug", *args)
    assert loud.returncode == 2 and "Traceback" in loud.stderr and "CheckpointError" in loud.stderr
    assert "The above exception was the direct cause" in loud.stderr  # the library's own error, chained
    assert loud.stderr.rstrip().splitlines()[-1] == _one_line_error(quiet)
    env = {**os.environ, "OPTIMIZE_DEBUG": "1"}
    by_env = subprocess.run([sys.executable, "-m", "optimize", *args], capture_output=True, text=True, env=env,
                            timeout=300)
    assert by_env.returncode == 2 and "CheckpointError" in by_env.stderr


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["building torch-compile", "task: "])
def test_ctrl_c_at_any_stage_keeps_the_previous_bundle(tiny_checkpoint, tmp_path, stage):
    """SIGINT to the whole process group, as a terminal sends it, while the torch-compile target
    compiles (a C++ compiler runs) or while the data is prepared: exit 130, the old bundle as it was,
    no staging folder."""
    import os
    import signal
    import subprocess
    import sys

    from support import wait_for

    t = tiny_checkpoint
    out = tmp_path / "b"
    flags = ("--arch", t["arch"], "--calib", t["calib"], "--no-cache", "--out", out)
    assert run_cli("build", t["ckpt"], *flags, "--target", "ort-fp32").returncode == 0
    before = (out / "manifest.json").read_bytes()
    log = tmp_path / "build.log"
    with open(log, "w") as sink:
        process = subprocess.Popen([sys.executable, "-m", "optimize", "build", t["ckpt"], *map(str, flags),
                                    "--target", "torch-compile,ort-fp32"], stdout=sink, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        wait_for(lambda: stage in log.read_text(), 300, f"the build to reach '{stage}'")
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=120) == 130, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
    text = log.read_text()
    assert "Traceback" not in text and "interrupted: stopped" in text
    assert (out / "manifest.json").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_a_killed_builds_staging_folder_is_removed_by_the_next_build_and_a_live_one_is_not(tiny_checkpoint, tmp_path):
    """``kill -9`` leaves ``.b.tmp-*`` beside the bundle; the next build removes it once its process is
    gone. A folder whose process still runs, or that another host made, is never touched."""
    import json
    import os
    import signal
    import socket
    import subprocess
    import sys

    from support import wait_for
    from optimize.atomic import OWNER_FILE

    t = tiny_checkpoint
    flags = ("--arch", t["arch"], "--calib", t["calib"], "--no-cache", "--target", "ort-fp32", "--out", tmp_path / "b")
    killed = subprocess.Popen([sys.executable, "-m", "optimize", "build", str(t["ckpt"]), *map(str, flags)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staged = wait_for(lambda: [p for p in tmp_path.glob(".b.tmp-*") if (p / OWNER_FILE).is_file()], 120,
                      "the build's staging folder")
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait(timeout=30)
    assert staged[0].is_dir()  # what kill -9 leaves
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        others = []
        for name, record in (("live", {"pid": live.pid, "host": socket.gethostname()}),
                             ("remote", {"pid": killed.pid, "host": "another-host"})):
            folder = tmp_path / f".b.tmp-{name}"
            folder.mkdir()
            (folder / OWNER_FILE).write_text(json.dumps(record))
            others.append(folder)
        result = run_cli("build", t["ckpt"], *flags)
        assert result.returncode == 0, result.stderr
        assert f"removed {staged[0].name}, the staging folder of a build (pid {killed.pid})" in result.stderr
        assert not staged[0].exists() and all(folder.is_dir() for folder in others)
        assert not (tmp_path / "b" / OWNER_FILE).exists()
    finally:
        live.kill()
        live.wait()
