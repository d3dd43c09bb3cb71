"""The serving image, built from the project's Dockerfile and run by a real Docker engine.

No registry is reachable, so the base image is made here from Debian packages (``debootstrap``,
then ``docker import``) and passed as the Dockerfile's ``BASE_IMAGE``; the Python wheels the image
needs are downloaded beforehand into ``docker/wheels/`` of a copy of the build context. The test
starts its own ``dockerd`` (own socket and data root) and stops it by its PID.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from support import ROOT, free_port, http

pytestmark = [pytest.mark.slow, pytest.mark.service, pytest.mark.container]
BASE = "optimize-test-base:bookworm"
IMAGE = "optimize-serve-test:latest"
MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")


def _missing() -> str | None:
    for tool in ("dockerd", "debootstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/test.sh installs docker.io and debootstrap)"
    if os.geteuid() != 0:
        return "dockerd and debootstrap need root"
    return None


class DockerEngine:
    """A private ``dockerd``: its own socket, data root and PID, stopped by that PID."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="dk-", dir="/tmp"))
        self.socket = self.root / "docker.sock"
        self.log = open(self.root / "dockerd.log", "w")
        self.process = subprocess.Popen(
            ["dockerd", "--host", f"unix://{self.socket}", "--data-root", str(self.root / "data"),
             "--exec-root", str(self.root / "exec"), "--pidfile", str(self.root / "dockerd.pid")],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            assert self.process.poll() is None, (self.root / "dockerd.log").read_text()[-3000:]
            if self.socket.exists() and self.run("info", check=False).returncode == 0:
                return
            time.sleep(0.5)
        raise AssertionError("dockerd did not start: " + (self.root / "dockerd.log").read_text()[-3000:])

    def run(self, *args: str, check: bool = True, timeout: int = 900, **kwargs) -> subprocess.CompletedProcess:
        env = {**os.environ, "DOCKER_HOST": f"unix://{self.socket}", "DOCKER_BUILDKIT": "0"}
        result = subprocess.run(["docker", *args], env=env, capture_output=True, text=True, timeout=timeout, **kwargs)
        if check:
            assert result.returncode == 0, f"docker {' '.join(args)}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        return result

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
        subprocess.run(["umount", "-R", str(self.root / "exec")], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def docker():
    reason = _missing()
    if reason:
        pytest.skip(reason)
    engine = DockerEngine()
    yield engine
    engine.stop()


def build_context(folder: Path) -> Path:
    """The files the Dockerfile copies, plus the wheels it needs, for a build without an index."""
    context = folder / "context"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "wheels")
    context.mkdir()
    for name in ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, context / name)
    for name in ("optimize", "serve", "docker"):
        shutil.copytree(ROOT / name, context / name, ignore=skip)
    wheels = context / "docker" / "wheels"
    download = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", str(wheels),
                               "-r", str(ROOT / "docker" / "requirements-serve.txt"), "setuptools>=68"],
                              capture_output=True, text=True, timeout=900)
    assert download.returncode == 0, download.stderr[-3000:]
    return context


@pytest.fixture(scope="module")
def image(docker, tmp_path_factory):
    folder = tmp_path_factory.mktemp("image")
    rootfs = folder / "rootfs"
    strap = subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv", "bookworm",
                            str(rootfs), MIRROR], capture_output=True, text=True, timeout=1200)
    assert strap.returncode == 0, strap.stdout[-2000:] + strap.stderr[-2000:]
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    docker.run("import", "-", BASE, stdin=tar.stdout)
    tar.wait()
    shutil.rmtree(rootfs, ignore_errors=True)
    context = build_context(folder)
    docker.run("build", "--build-arg", f"BASE_IMAGE={BASE}", "-t", IMAGE, str(context), timeout=1800)
    return IMAGE


@pytest.fixture(scope="module")
def bundle(bundles):
    return bundles.get("--target", "ort-fp32")


def test_image_is_slim_and_unprivileged(docker, image):
    config = json.loads(docker.run("inspect", image).stdout)[0]["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"][:3] == ["optimize", "serve", "/bundle"] and config["Healthcheck"]["Test"][0] == "CMD"
    probe = docker.run("run", "--rm", "--entrypoint", "python3", image, "-c",
                       "import importlib.util as u; print([m for m in ('torch', 'onnx', 'nncf') if u.find_spec(m)])")
    assert probe.stdout.strip() == "[]"  # serving needs the runtimes only


def test_container_serves_a_mounted_bundle_and_drains_on_stop(docker, image, bundle):
    import tritonclient.http as triton

    from optimize.bundle import load_runner

    port = free_port()
    name = f"serve-{port}"
    docker.run("run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8000", "-v", f"{bundle}:/bundle:ro", image,
               "--drain-delay", "1")
    try:
        deadline = time.time() + 120
        health = ""
        while time.time() < deadline and health != "healthy":
            state = json.loads(docker.run("inspect", name).stdout)[0]["State"]
            assert state["Status"] == "running", docker.run("logs", name, check=False).stderr[-3000:]
            health = state["Health"]["Status"]
            time.sleep(1)
        assert health == "healthy", docker.run("logs", name, check=False).stderr[-3000:]

        x = np.load(bundle / "data" / "heldout.npz")["x"][:2]
        want = load_runner(bundle, "ort-fp32").infer({"x": x})["output"]
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        tensor = triton.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=True)
        result = client.infer("tiny", [tensor], outputs=[triton.InferRequestedOutput("output", binary_data=True)])
        assert np.allclose(result.as_numpy("output"), want, atol=1e-5)
        status, body, _ = http("GET", f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and b'model_info{' in body and b'outcome="ok"' in body

        begin = time.time()
        docker.run("stop", "-t", "40", name)  # SIGTERM: drain, finish, exit 0
        state = json.loads(docker.run("inspect", name).stdout)[0]["State"]
        assert state["ExitCode"] == 0 and time.time() - begin < 30, docker.run("logs", name, check=False).stderr[-3000:]
    finally:
        docker.run("rm", "-f", name, check=False)
