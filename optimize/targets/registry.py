"""The closed list of target names, mapped to backends without importing them.

A target is a backend (named by module path, imported on first use) at one precision. Adding a
backend is one module exposing ``BACKEND`` (an ``optimize.targets.base.Backend``) and one line here.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import shutil
from typing import TYPE_CHECKING

from optimize.errors import OptimizeError, TargetUnavailable

if TYPE_CHECKING:
    from optimize.targets.base import Backend


@dataclasses.dataclass(frozen=True)
class TargetInfo:
    """A target name: which module builds and runs it, at which precision, needing what."""

    name: str
    module: str
    precision: str
    packages: tuple[str, ...]
    extra: str
    needs_gpu: bool = False
    needs_compiler: bool = False  # builds C++ at build time
    baseline: bool = False  # measured beside the others, never picked as the winner (or served by default)
    native: str | None = None  # a precision the CPU must run natively (bf16): emulated, it is slower than FP32


TRT_PACKAGES = ("tensorrt", "cuda.bindings", "onnxconverter_common", "onnxruntime")
TARGETS: dict[str, TargetInfo] = {t.name: t for t in (
    TargetInfo("ort-fp32", "optimize.targets.onnxruntime", "fp32", ("onnxruntime",), "onnxruntime"),
    TargetInfo("ort-int8", "optimize.targets.onnxruntime", "int8", ("onnxruntime",), "onnxruntime"),
    TargetInfo("openvino-fp32", "optimize.targets.openvino", "fp32", ("openvino",), "openvino"),
    TargetInfo("openvino-bf16", "optimize.targets.openvino", "bf16", ("openvino",), "openvino", native="bf16"),
    TargetInfo("openvino-int8", "optimize.targets.openvino", "int8", ("openvino", "nncf"), "openvino"),
    TargetInfo("trt-fp16", "optimize.targets.tensorrt", "fp16", TRT_PACKAGES, "tensorrt", True),
    TargetInfo("trt-int8", "optimize.targets.tensorrt", "int8", TRT_PACKAGES, "tensorrt", True),
    # FP32 on CPU; FP16 when PyTorch sees a CUDA GPU (the manifest records which).
    TargetInfo("torch-compile", "optimize.targets.torch_compile", "fp32", ("torch",), "torch", needs_compiler=True,
               baseline=True),
)}

SPECIAL = ("all", "auto")


def get(name: str) -> TargetInfo:
    if name not in TARGETS:
        raise OptimizeError(f"unknown target {name!r}; choose from {', '.join([*TARGETS, *SPECIAL])}")
    return TARGETS[name]


def gpu_reason() -> str | None:
    """None when an NVIDIA GPU is visible, else why not."""
    if os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl"):
        return None
    if shutil.which("nvidia-smi"):
        return None
    return "no NVIDIA GPU on this machine"


def unavailable_reason(name: str) -> str | None:
    """None when this machine can build ``name``; else the reason (hardware or packages only)."""
    info = get(name)
    if info.needs_gpu:
        reason = gpu_reason()
        if reason:
            return reason
    if info.native == "bf16":
        from optimize.cpu import detect

        cpu = detect()
        if not cpu.native_bf16:
            return (f"this CPU ({cpu.model}) has no native BF16 (AVX-512 BF16, AMX-BF16 or ARM BF16): it would "
                    f"run emulated, slower than FP32")
    if info.needs_compiler and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        return "no C++ compiler on this machine (AOTInductor compiles C++): install g++"
    for package in info.packages:
        if not installed(package):
            return f"package {package!r} is not installed: pip install 'optimize[{info.extra}]'"
    return None


def installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except ModuleNotFoundError:  # a dotted name whose parent package is missing
        return False


def expand(names: list[str]) -> list[str]:
    """Expand ``all``/``auto`` into every target name; check the others exist."""
    out: list[str] = []
    for name in names:
        for part in name.split(","):
            part = part.strip()
            chosen = list(TARGETS) if part in SPECIAL else [get(part).name]
            out.extend(n for n in chosen if n not in out)
    return out


def backend(name: str) -> "Backend":
    """The ``Backend`` of target ``name``, ready to build and run; a missing package or GPU says
    what is missing (and the ``pip install`` extra)."""
    reason = unavailable_reason(name)
    if reason:
        raise TargetUnavailable(f"target {name} is unavailable: {reason}")
    return facts(name)


def facts(name: str) -> "Backend":
    """The ``Backend`` of target ``name`` for its facts (engine files, Triton entry), without
    checking that this machine can build or run it. Backend modules import their packages lazily."""
    return importlib.import_module(get(name).module).BACKEND
