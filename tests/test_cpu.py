"""Instruction-set detection on the /proc/cpuinfo files of several real CPUs."""

from __future__ import annotations

from pathlib import Path

import pytest

from optimize.cpu import detect, parse_cpuinfo

FIXTURES = Path(__file__).parent / "fixtures" / "cpuinfo"


@pytest.mark.parametrize("name, arch, model, cores, has, lacks, int8_dot, bf16", [
    ("amd_epyc_avx2", "x86_64", "AMD EPYC", 2, {"avx2", "fma"}, {"avx512f", "avx512_vnni", "amx_tile"}, False, False),
    ("intel_icelake_vnni", "x86_64", "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz", 4,
     {"avx2", "avx512f", "avx512_vnni"}, {"avx512_bf16", "amx_bf16", "avx_vnni"}, True, False),
    ("intel_sapphire_rapids_amx", "x86_64", "Intel(R) Xeon(R) Platinum 8488C", 2,
     {"avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16"}, set(), True, True),
    ("arm_graviton3", "aarch64", "Neoverse V1", 2, {"neon", "dotprod", "i8mm", "bf16", "sve", "fp16"},
     {"avx2", "sve2"}, True, True),
])
def test_instruction_sets_of_real_cpus(name, arch, model, cores, has, lacks, int8_dot, bf16):
    info = parse_cpuinfo((FIXTURES / f"{name}.txt").read_text(), arch)
    assert info.model == model and info.cores == cores and info.arch == arch
    assert has <= set(info.isa) and not lacks & set(info.isa), info.isa
    assert info.int8_dot is int8_dot and info.native_bf16 is bf16
    assert list(info.isa) == sorted(info.isa)
    recorded = info.to_json()
    assert recorded["isa"] == list(info.isa) and recorded["native_bf16"] is bf16
    assert model in info.summary()


def test_this_machine_is_detected_once():
    first = detect()
    assert first is detect() and first.cores >= 1 and first.arch


def test_differences_in_what_decides_speed():
    from optimize.cpu import differences

    epyc = parse_cpuinfo((FIXTURES / "amd_epyc_avx2.txt").read_text(), "x86_64")
    spr = parse_cpuinfo((FIXTURES / "intel_sapphire_rapids_amx.txt").read_text(), "x86_64")
    changed = differences(spr.to_json(), epyc)
    assert "int8 dot: yes there, no here" in changed and "native bf16: yes there, no here" in changed
    assert any("-amx_int8" in c for c in changed)
    assert differences(epyc.to_json(), epyc) == [] and differences(None, epyc) == []
    assert differences({"cpu": "old bundle"}, epyc) == []  # recorded before instruction sets were


def test_serving_on_another_cpu_says_the_winner_may_not_be_fastest(caplog):
    import logging
    from types import SimpleNamespace

    from serve.server import _warn_if_measured_elsewhere

    spr = parse_cpuinfo((FIXTURES / "intel_sapphire_rapids_amx.txt").read_text(), "x86_64")
    manifest = SimpleNamespace(winner={"target": "openvino-int8", "measured_on": spr.to_json()}, machine=spr.to_json())
    with caplog.at_level(logging.WARNING, logger="serve"):
        _warn_if_measured_elsewhere(manifest, "openvino-int8")
    here = detect()
    if here.to_json()["isa"] == list(spr.isa):
        assert not caplog.records
    else:
        message = caplog.records[0].getMessage()
        assert "the winner was measured on Intel(R) Xeon(R) Platinum 8488C" in message
        assert "may not be the fastest" in message and "--reselect" in message


@pytest.mark.parametrize("name, arch", [("amd_epyc_avx2", "x86_64"), ("intel_icelake_vnni", "x86_64"),
                                        ("intel_sapphire_rapids_amx", "x86_64"), ("arm_graviton3", "aarch64")])
def test_what_a_cpu_gets_follows_its_raw_flags(name, arch, monkeypatch):
    """The decisions that depend on the CPU, for CPUs this machine is not: openvino-bf16 is offered and
    torch-compile computes in BF16 exactly where the recorded /proc/cpuinfo flags show native BF16."""
    import optimize.cpu
    from optimize.targets import registry
    from optimize.targets.torch_compile import cpu_precision
    from support import cpu_flags, native_bf16

    text = (FIXTURES / f"{name}.txt").read_text()
    monkeypatch.setattr(optimize.cpu, "detect", lambda: parse_cpuinfo(text, arch))
    native = native_bf16(cpu_flags(text))
    reason = registry.unavailable_reason("openvino-bf16")
    assert (reason is None) == native, reason
    if not native:
        assert "has no native BF16" in reason
    assert cpu_precision(parse_cpuinfo(text, arch)) == ("bf16" if native else "fp32")


def test_this_cpu_is_read_as_its_raw_flags_say():
    from support import cpu_flags, int8_dot, native_bf16

    info = detect()
    assert info.native_bf16 == native_bf16() and info.int8_dot == int8_dot()
    if info.arch == "x86_64":
        assert set(info.isa) <= cpu_flags()
