"""Triton's own load generator, perf_analyzer, unchanged against ``optimize serve`` over HTTP and
gRPC: it finds the model by name and decimal version, reads the server-side statistics around each
measurement, and what it prints of them agrees with what the server counted.

perf_analyzer is the C++ binary that tritonclient's wheel installs beside Python; it needs
Debian's libb64-0d and a CUDA runtime library (PyPI's nvidia-cuda-runtime-cu12), no GPU. The
README's test command installs both (the CUDA library in .venv-perf/, out of the CPU install);
where either is missing the test says so and skips.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from support import ROOT, SERVED, Server, http, run_cli

pytestmark = pytest.mark.service
MODEL = "tiny"


def perf_analyzer() -> tuple[Path, dict[str, str]]:
    """The binary and the environment it runs in, or a skip naming what is missing."""
    exe = Path(sys.executable).parent / "perf_analyzer"
    if not exe.is_file():
        pytest.skip("perf_analyzer is not installed (tritonclient's wheel ships it: pip install -e '.[test]')")
    env = dict(os.environ)
    lib = ROOT / ".venv-perf" / "nvidia" / "cuda_runtime" / "lib"  # scripts/test.sh puts it there
    env["LD_LIBRARY_PATH"] = f"{lib}:{env.get('LD_LIBRARY_PATH', '')}".rstrip(":")
    probe = subprocess.run([str(exe), "--version"], capture_output=True, text=True, env=env, timeout=30)
    if probe.returncode != 0:
        line = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"perf_analyzer cannot start here ({line}): it needs Debian's libb64-0d and "
                    f"nvidia-cuda-runtime-cu12, which scripts/test.sh installs")
    return exe, env


def server_section(output: str) -> dict[str, float]:
    """The numbers perf_analyzer prints under ``Server:`` for the (last) concurrency measured."""
    section = output.rsplit("Server:", 1)[1]
    numbers = {key: float(re.search(rf"{key}: (\d+)", section).group(1))
               for key in ("Inference count", "Execution count", "Successful request count")}
    latency = re.search(r"Avg request latency: (\d+) usec \(overhead (\d+) usec \+ queue (\d+) usec \+ "
                        r"compute input (\d+) usec \+ compute infer (\d+) usec \+ compute output (\d+) usec\)", section)
    numbers.update(zip(("request", "overhead", "queue", "input", "infer", "output"), map(float, latency.groups())))
    numbers["client_avg_us"] = float(re.findall(r"Avg latency: (\d+) usec", output)[-1])
    return numbers


def _stats(server: Server) -> dict:
    return json.loads(http("GET", server.url + f"/v2/models/{MODEL}/stats")[1])["model_stats"][0]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_measures_the_server_and_reads_its_statistics(bundles, tmp_path, protocol):
    exe, env = perf_analyzer()
    bundle = bundles.get(*SERVED)
    data = tmp_path / "input.json"  # real held-out samples, as a user makes them
    assert run_cli("export", "perf-data", bundle, data, "--rows", "16").returncode == 0
    with Server(bundle, "--target", "ort-fp32") as server:
        url = server.url[len("http://"):] if protocol == "http" else server.grpc_url
        before = _stats(server)
        # A noisy two-core machine: short windows, a loose stability bound, a few trials.
        result = subprocess.run([str(exe), "-m", MODEL, "-u", url, "-i", protocol, "--input-data", str(data),
                                 "--concurrency-range", "1:2:1", "--measurement-interval", "500",
                                 "--stability-percentage", "50", "--max-trials", "6"],
                                capture_output=True, text=True, env=env, timeout=180)
        after = _stats(server)
        if protocol == "http":  # perf_analyzer's own random bytes: NaN, inf, values near float32's limits
            noise = subprocess.run([str(exe), "-m", MODEL, "-u", url, "--concurrency-range", "1",
                                    "--measurement-interval", "300", "--stability-percentage", "100", "--max-trials",
                                    "3"], capture_output=True, text=True, env=env, timeout=120)
            assert "Request concurrency: 1" in noise.stdout, (noise.stdout + noise.stderr)[-3000:]
            metrics = http("GET", server.url + "/metrics")[1].decode()
            assert re.search(r'inference_non_finite_samples_total\{model="tiny",tensor="input",version="\d+"\} [1-9]',
                             metrics), metrics
        server.stop()
        stderr = server.process.stderr.read()
    output = result.stdout + result.stderr
    assert "Warning:" not in stderr and "overflow" not in stderr, stderr[-3000:]
    assert result.returncode == 0, output[-3000:]
    assert "missing statistics" not in output and "Request concurrency: 2" in output, output[-3000:]
    printed = server_section(output)
    answered = after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"]
    # What perf_analyzer read from the server's statistics is a window of what the server counted.
    assert 0 < printed["Successful request count"] <= answered
    assert printed["Inference count"] >= printed["Successful request count"]
    # The server's own time for a request is inside the client's, and the parts add up to it.
    assert 0 < printed["request"] <= printed["client_avg_us"]
    parts = sum(printed[k] for k in ("overhead", "queue", "input", "infer", "output"))
    assert abs(parts - printed["request"]) <= 5, printed
    assert "Traceback" not in stderr, stderr[-2000:]


def test_perf_data_is_the_held_out_samples_byte_for_byte(bundles, tmp_path):
    bundle = bundles.get(*SERVED)
    assert run_cli("export", "perf-data", bundle, tmp_path / "perf.json", "--rows", "5").returncode == 0
    data = json.loads((tmp_path / "perf.json").read_text())["data"]
    from optimize.deploy.perf_data import sample_order

    held = np.load(bundle / "data" / "heldout.npz")["x"]
    order = sample_order(len(held), 5)
    assert len(data) == 5 and len(set(order.tolist())) == 5
    for row, entry in zip(order, data):
        assert entry["x"]["shape"] == list(held.shape[1:])
        sent = np.frombuffer(base64.b64decode(entry["x"]["b64"]), dtype=held.dtype).reshape(held.shape[1:])
        assert np.array_equal(sent, held[row])
    wrong = run_cli("export", "perf-data", bundle, tmp_path / "none.json", "--rows", "0")
    assert wrong.returncode == 2 and "--rows 0 must be at least 1" in wrong.stderr
    assert not (tmp_path / "none.json").exists()
