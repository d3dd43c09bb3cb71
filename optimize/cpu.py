"""The processor at hand: its model, cores and the instruction sets that decide inference speed.

What is fast depends on the CPU more than on the model: INT8 dot products (x86 VNNI, AMX-INT8;
ARM dot-product and i8mm) make static INT8 pay off, native BF16 (AVX-512 BF16, AMX-BF16; ARM
BF16) makes a BF16 engine several times faster than FP32, where on an AVX2-only CPU it would be
emulated and slow. ``detect()`` reads them once (Linux ``/proc/cpuinfo``; elsewhere only the
architecture is known), ``parse_cpuinfo`` is the pure part the tests feed with real CPUs' files.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
from pathlib import Path
from typing import Any

# /proc/cpuinfo flag -> the name recorded (x86 "flags", ARM "Features").
X86_SETS = {"avx2": "avx2", "fma": "fma", "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512_vnni": "avx512_vnni",
            "avx512_bf16": "avx512_bf16", "avx512_fp16": "avx512_fp16", "avx_vnni": "avx_vnni",
            "amx_tile": "amx_tile", "amx_int8": "amx_int8", "amx_bf16": "amx_bf16", "amx_fp16": "amx_fp16"}
ARM_SETS = {"asimd": "neon", "asimddp": "dotprod", "i8mm": "i8mm", "bf16": "bf16", "sve": "sve", "sve2": "sve2",
            "asimdhp": "fp16", "fphp": "fp16"}
INT8_DOT = ("avx512_vnni", "avx_vnni", "amx_int8", "dotprod", "i8mm")
NATIVE_BF16 = ("avx512_bf16", "amx_bf16", "bf16")
NATIVE_FP16 = ("avx512_fp16", "amx_fp16", "fp16")


@dataclasses.dataclass(frozen=True)
class CpuInfo:
    """A CPU's identity: model name, logical cores, architecture and instruction sets (sorted)."""

    model: str
    cores: int
    arch: str
    isa: tuple[str, ...]

    @property
    def int8_dot(self) -> bool:
        """INT8 dot-product instructions (VNNI, AMX-INT8, ARM dotprod/i8mm): static INT8 pays off."""
        return any(s in self.isa for s in INT8_DOT)

    @property
    def native_bf16(self) -> bool:
        return any(s in self.isa for s in NATIVE_BF16)

    @property
    def native_fp16(self) -> bool:
        return any(s in self.isa for s in NATIVE_FP16)

    def summary(self) -> str:
        """One line: model, cores and the sets that matter, e.g. for a report."""
        return (f"{self.model} ({self.cores} cores, {self.arch}; {', '.join(self.isa) or 'no SIMD sets known'}; "
                f"INT8 dot product: {'yes' if self.int8_dot else 'no'}, native BF16: "
                f"{'yes' if self.native_bf16 else 'no'})")

    def to_json(self) -> dict[str, Any]:
        return {"cpu": self.model, "cores": self.cores, "arch": self.arch, "isa": list(self.isa),
                "int8_dot": self.int8_dot, "native_bf16": self.native_bf16, "native_fp16": self.native_fp16}


def parse_cpuinfo(text: str, arch: str, cores: int | None = None) -> CpuInfo:
    """The ``CpuInfo`` that a ``/proc/cpuinfo`` text describes (the first processor's entry)."""
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and model is None and value.strip():
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    table = ARM_SETS if arch.lower() in ("aarch64", "arm64") or "asimd" in flags else X86_SETS
    isa = tuple(sorted({name for flag, name in table.items() if flag in flags}))
    count = cores or sum(line.lower().startswith("processor") for line in text.splitlines()) or 1
    return CpuInfo(model or _arm_model(text) or platform.processor() or arch, count, arch, isa)


def _arm_model(text: str) -> str | None:
    """ARM entries name the part by number: the implementer and part the kernel reports."""
    fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}
    parts = {"0xd0c": "Neoverse N1", "0xd40": "Neoverse V1", "0xd4f": "Neoverse V2", "0xd49": "Neoverse N2"}
    part = fields.get("cpu part")
    if part:
        return parts.get(part, f"ARM part {part}")
    return None


@functools.lru_cache(maxsize=1)
def detect() -> CpuInfo:
    """This machine's CPU (read once per process)."""
    arch = platform.machine() or "unknown"
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return CpuInfo(platform.processor() or arch, os.cpu_count() or 1, arch, ())
    return parse_cpuinfo(text, arch, os.cpu_count())


# What decides which engine is fastest: a CPU that differs in one of these may rank targets differently.
DECISIVE = ("int8_dot", "native_bf16", "native_fp16")


def differences(recorded: dict[str, Any] | None, here: CpuInfo) -> list[str]:
    """How ``here`` differs from a recorded CPU (``CpuInfo.to_json``) in what decides speed: the
    instruction sets, and the INT8 dot-product and native BF16/FP16 support they give. Empty when
    the record is missing (an old bundle) or the same."""
    if not recorded or "isa" not in recorded:
        return []
    out = []
    ours = here.to_json()
    for key in DECISIVE:
        if key in recorded and bool(recorded[key]) != ours[key]:
            out.append(f"{key.replace('_', ' ')}: {'yes' if recorded[key] else 'no'} there, "
                       f"{'yes' if ours[key] else 'no'} here")
    gained = sorted(set(here.isa) - set(recorded["isa"]))
    lost = sorted(set(recorded["isa"]) - set(here.isa))
    if gained or lost:
        out.append("instruction sets " + ", ".join([*(f"+{s}" for s in gained), *(f"-{s}" for s in lost)]))
    return out
