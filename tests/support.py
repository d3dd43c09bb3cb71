"""What the tests share besides fixtures: the CLI in process and as a process, real servers as
context managers, HTTP on loopback, polling, and the CPU's raw flags.

Fixtures live in ``conftest.py``; test modules import helpers from here, never from each other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "tiny_models.py"


# --- the CLI ---------------------------------------------------------------------------------------

# What a run costs, printed at its end (conftest): commands run in process, by command, and the
# servers started; processes are counted by conftest's audit hook.
COMMANDS_IN_PROCESS: dict[str, int] = {}
SERVERS_STARTED = [0]


@dataclasses.dataclass
class CliResult:
    """What a run of ``optimize`` left: its exit code and both streams (as ``subprocess`` gives them)."""

    returncode: int
    stdout: str
    stderr: str


def run_cli(*args, cwd: Path | None = None) -> CliResult:
    """``optimize ARGS`` in this process through click's runner: the console script's own entry,
    exit code and streams, without starting an interpreter and importing torch again.

    A bug's traceback is appended to ``stderr``, as the console would print it. What a command may
    change in the process (environment, the root and ``optimize`` loggers' handlers, torch's thread
    count, the working folder) is put back afterwards, so one test's command cannot change the next test's."""
    from click.testing import CliRunner

    from optimize.cli import main

    command = next((str(a) for a in args if not str(a).startswith("-")), "")
    COMMANDS_IN_PROCESS[command] = COMMANDS_IN_PROCESS.get(command, 0) + 1
    environ, handlers = dict(os.environ), list(logging.getLogger().handlers)
    ours = logging.getLogger("optimize")  # the console the command installs is the command's
    our_handlers, our_level, our_propagate = list(ours.handlers), ours.level, ours.propagate
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    try:
        with contextlib.chdir(cwd or os.getcwd()):
            result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)
    finally:
        os.environ.clear()
        os.environ.update(environ)
        logging.getLogger().handlers[:] = handlers
        ours.handlers[:], ours.level, ours.propagate = our_handlers, our_level, our_propagate
        if threads is not None:
            torch.set_num_threads(threads)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "Traceback (most recent call last):\n" + "".join(traceback.format_exception(*result.exc_info)[1:])
    return CliResult(result.exit_code, result.stdout, stderr)


def run_process(*args, cwd: Path | None = None, env: dict | None = None, timeout: int = 600) -> CliResult:
    """``python -m optimize ARGS`` as a real process: for what only a process shows (exit codes
    through the interpreter, signals, the console's own output, environment read at start)."""
    done = subprocess.run([sys.executable, "-m", "optimize", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return CliResult(done.returncode, done.stdout, done.stderr)


def build_tiny(checkpoint: dict, out: Path, *flags: str, calib: Path | None = None) -> Path:
    """``optimize build`` of the tiny CNN into ``out`` (a bundle of the test's own)."""
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



def one_line_error(result: CliResult, exit_code: int | None = None) -> str:
    """The single ``error:`` line a user's mistake prints: non-zero exit, no traceback."""
    assert result.returncode != 0 if exit_code is None else result.returncode == exit_code, \
        (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


# --- waiting and processes --------------------------------------------------------------------------

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


def stop_process(process: subprocess.Popen, sig: int = signal.SIGINT, timeout_s: float = 60) -> None:
    """Ask a process to stop with ``sig``; kill it if it has not within ``timeout_s``."""
    if process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)


# --- HTTP on loopback -------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None):
    """(status, body, headers) of one request; an HTTP error status is returned, not raised."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read(), dict(error.headers)


def wait_ready(process: subprocess.Popen, url: str, what: str, timeout_s: float = 60,
               on_failure: Callable[[], None] | None = None) -> None:
    """Poll ``url`` until it answers 200; fail with the process's output if it exits first.
    ``on_failure`` (stopping the process) runs before the failure is raised, Ctrl-C included."""
    try:
        _poll_ready(process, url, what, timeout_s)
    except BaseException:
        if on_failure is not None:
            on_failure()
        raise


def _poll_ready(process: subprocess.Popen, url: str, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            stream = process.stderr or process.stdout
            raise AssertionError(f"{what} exited: {stream.read() if stream else process.returncode}")
        try:
            if http("GET", url)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{what} did not become ready within {timeout_s:g} s")


def infer_body(x: np.ndarray, name: str = "x", datatype: str = "FP32") -> bytes:
    return json.dumps({"inputs": [{"name": name, "shape": list(x.shape), "datatype": datatype,
                                   "data": x.reshape(-1).tolist()}]}).encode()


def binary_body(x: np.ndarray, name: str = "x", datatype: str = "FP32") -> tuple[bytes, dict]:
    """A request with the binary tensor extension: (body, headers)."""
    header = json.dumps({"inputs": [{"name": name, "shape": list(x.shape), "datatype": datatype,
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "outputs": [{"name": "output", "parameters": {"binary_data": True}}]}).encode()
    return header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


# The bundles the serving tests share (``bundles.get(*SERVED)``): two engines to choose between, and
# one on 3x192x192 inputs whose every engine call takes milliseconds, long enough to queue behind.
SERVED = ("--target", "ort-fp32,openvino-fp32")
SLOW = ("--input-shape", "1x3x192x192", "--target", "openvino-fp32")
# FP32 and both INT8 targets, each INT8 scheme chosen by measurement: for exports and the scheme choice.
DEPLOYED = ("--target", "ort-fp32,ort-int8,openvino-int8")
# Half the data held out: 60 reference samples for the drift profile (with labelled calibration data
# too, for the accuracy estimate).
HALF_HELD_OUT = ("--held-out", "0.5", "--target", "ort-fp32")

# The server runs with torch unimportable: serving needs only the engine's backend.
NO_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "nncf", "onnxscript", "sklearn"}:
            raise ImportError(f"{name} is not available when serving")
sys.meta_path.insert(0, Block())
from optimize.cli import main
sys.exit(main())
"""


class Server:
    """``optimize serve BUNDLE ARGS`` as a real process on free loopback ports, ready when made.

    A context manager: leaving the block stops it (SIGINT, then a kill if it hangs) on every path.
    ``stop`` may be called before to read its output."""

    def __init__(self, bundle, *args):
        SERVERS_STARTED[0] += 1
        self.port, self.grpc_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        self.process = subprocess.Popen([sys.executable, "-c", NO_TORCH, "serve", str(bundle), "--host", "127.0.0.1",
                                         "--port", str(self.port), "--grpc-port", str(self.grpc_port),
                                         *map(str, args)],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_ready(self.process, self.url + "/v2/health/ready", "server", on_failure=self.stop)

    def stop(self) -> None:
        stop_process(self.process)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# --- Triton's model configuration -------------------------------------------------------------------

def triton_proto():
    """Triton's model_config_pb2, loaded from tritonclient without its gRPC client."""
    import importlib.util

    import tritonclient

    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_pbtxt(text: str):
    from google.protobuf import text_format

    return text_format.Parse(text, triton_proto().ModelConfig())



# --- a payload ----------------------------------------------------------------------------------------

class WritesAFile:
    """Unpickling this runs ``open(path, 'w')``: a real code-execution payload."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


# --- the CPU at hand, from its raw flags ------------------------------------------------------------

def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The first processor's flags (x86 ``flags``, ARM ``Features``) as /proc/cpuinfo lists them.

    Tests derive what the product should do on this CPU from these, not from ``optimize.cpu``:
    a test that asks the code what the code should do cannot fail."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.is_file() else ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return set(value.split())
    return set()


def native_bf16(flags: set[str] | None = None) -> bool:
    """BF16 arithmetic in hardware: AVX-512 BF16 or AMX-BF16 on x86, the BF16 extension on ARM."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def int8_dot(flags: set[str] | None = None) -> bool:
    """INT8 dot-product instructions: VNNI (AVX-512 or AVX), AMX-INT8, ARM dotprod or i8mm."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm"})


RUNNABLE = re.compile(r"<!-- runnable -->\s*```bash\n(.*?)```", re.S)


def runnable_blocks() -> list[tuple[str, str]]:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [(str(page.relative_to(ROOT)), block) for page in pages for block in RUNNABLE.findall(page.read_text())]


# What the runnable blocks may add to the full suite, together (the README's docs section says so).
RUNNABLE_BUDGET_S = 120.0


def run_blocks(work: Path) -> dict[str, float]:
    """Every marked block with ``demo-output`` as ``work``, each ``optimize`` line in process; a
    ``python -m models.X OUT`` line is skipped where OUT already holds that model (as demo.sh does).
    Returns each line run and its seconds."""
    ran = {}
    for page, block in runnable_blocks():
        for line in [ln.strip() for ln in block.splitlines() if ln.strip() and not ln.startswith("#")]:
            args = [a.replace("demo-output", str(work)) for a in shlex.split(line)]
            if args[:2] == ["python", "-m"]:
                assert any(Path(args[3]).iterdir()), f"{page}: {line} would train what the demo trained"
                continue
            start = time.perf_counter()
            result = run_cli(*args[1:])
            assert result.returncode == 0, f"{page}: {line}\n{result.stderr[-3000:]}"
            ran[f"{page}: {line}"] = time.perf_counter() - start
    return ran
