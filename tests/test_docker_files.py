"""The serving image's two variants, read as files: pinned, no PyTorch, the GPU stack only in the GPU one.

Building and running the CPU image is ``test_container.py``; the GPU image needs NVIDIA's package
index and a GPU, so here its recipe is checked for what can be checked without them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU_ONLY = ("onnxruntime-gpu", "tensorrt", "cuda-python", "nvidia-", "cupy")


def requirements(name: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / "docker" / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[a-z,]+\])?==([0-9][0-9A-Za-z.\-+]*)", line)
            assert match, f"{name}: {line!r} is not pinned with =="
            pins[match.group(1).lower()] = match.group(3)
    return pins


def test_cpu_and_gpu_requirements_are_pinned_without_torch():
    cpu, gpu = requirements("requirements-serve.txt"), requirements("requirements-serve-gpu.txt")
    for pins in (cpu, gpu):
        assert "torch" not in pins and "uvicorn" in pins and "prometheus-client" in pins
    assert not [p for p in cpu if p.startswith(GPU_ONLY)]
    assert {"onnxruntime-gpu", "tensorrt-cu13", "cuda-python"} <= set(gpu)
    assert "onnxruntime" not in gpu  # the CPU wheel would shadow the CUDA one
    assert gpu["tensorrt-cu13"].startswith("11.")
    shared = set(cpu) & set(gpu)
    assert all(cpu[p] == gpu[p] for p in shared), {p: (cpu[p], gpu[p]) for p in shared if cpu[p] != gpu[p]}


def test_dockerfile_picks_the_variant_by_build_argument():
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG REQUIREMENTS=requirements-serve.txt" in text
    assert '-r "/src/docker/${REQUIREMENTS}"' in text
    assert re.search(r"^USER 10001", text, re.M) and "HEALTHCHECK" in text
    entrypoint = re.search(r"^ENTRYPOINT (.+)$", text, re.M).group(1)
    assert json.loads(entrypoint)[:2] == ["optimize", "serve"]  # exec form: signals reach the server
    assert '! /opt/serve/bin/python -c "import torch"' in text
