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
