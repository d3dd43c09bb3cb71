"""The stage runner: keys derived from typed configs, input hashes and code; a docstring edit is a
hit, a code edit or any config field a miss; interrupted stages leave nothing; two processes
building one key at once build it once; every stage declares the modules its code imports."""

from __future__ import annotations

import dataclasses
import importlib
import multiprocessing
import sys
import textwrap
import time
from pathlib import Path

import pytest

from optimize.bundle.cache import Stage, StageCache, module_source_hash, stage_key, undeclared_imports
from optimize.build.scheme_choice import TIMING_STAGE
from optimize.build.export_stage import EXPORT_STAGE, ExportStageConfig
from optimize.build.prune_stage import PRUNE_STAGE, PruneStageConfig
from optimize.passes.distill import DistillConfig
from optimize.passes.prune import PruneConfig
from optimize.inputs.specs import TensorSpec
from optimize.build.target_stage import TargetStageConfig, target_stage
from optimize.targets import registry
from optimize.targets.base import BuildConfig

INPUTS = {"onnx": "a" * 64, "calibration": "b" * 64}


def _other(value):
    """A different value of the same kind, for any field of the configs below."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "-changed"
    if value is None:
        return 0.5
    if isinstance(value, tuple):
        return value + (value[0],) if value else (("changed", 1),)
    if isinstance(value, dict):
        return {**value, "changed": 1}
    if dataclasses.is_dataclass(value):
        first = dataclasses.fields(value)[0]
        return dataclasses.replace(value, **{first.name: _other(getattr(value, first.name))})
    raise TypeError(type(value))


def _variants(config):
    """``config`` with each field changed in turn: (field name, changed config)."""
    for field in dataclasses.fields(config):
        yield field.name, dataclasses.replace(config, **{field.name: _other(getattr(config, field.name))})


CONFIGS = [
    (target_stage("ort-int8"), TargetStageConfig("ort-int8", BuildConfig(precision="int8", int8_scheme="static"))),
    (EXPORT_STAGE, ExportStageConfig((TensorSpec("x", (-1, 3, 8, 8), "float32", ("batch",)),), ("output",), True)),
    (PRUNE_STAGE, PruneStageConfig(PruneConfig(ratio=0.5), DistillConfig(), "classify",
                                   (TensorSpec("x", (-1, 4)),), "cnn", 1.0)),
]


@pytest.mark.parametrize("stage,config", CONFIGS, ids=[s.name for s, _ in CONFIGS])
def test_every_config_field_and_every_input_hash_changes_the_key(stage, config):
    base = stage_key(stage, INPUTS, config)
    assert stage_key(stage, dict(INPUTS), config) == base  # the same stage, inputs and config: a hit
    for name, changed in _variants(config):
        assert stage_key(stage, INPUTS, changed) != base, f"changing {name} did not change the key"
    if isinstance(config, TargetStageConfig):  # and every field of the BuildConfig inside it
        for name, changed in _variants(config.build):
            assert stage_key(stage, INPUTS, dataclasses.replace(config, build=changed)) != base, name
    for name in INPUTS:
        assert stage_key(stage, {**INPUTS, name: "c" * 64}, config) != base, f"input {name}"


def test_every_build_config_field_is_a_cache_miss_in_a_real_cache(tmp_path):
    cache, stage, built = StageCache(tmp_path), target_stage("ort-fp32"), []

    def produce(folder: Path) -> dict:
        built.append(folder)
        (folder / "engine").write_text("x")
        return {"n": len(built)}

    config = TargetStageConfig("ort-fp32", BuildConfig(precision="fp32"))
    first, result = cache.run(stage, INPUTS, config, produce)
    assert result == {"n": 1} and (first / "engine").is_file()
    assert cache.run(stage, INPUTS, config, produce) == (first, {"n": 1}) and cache.hits == ["target-ort-fp32"]
    fields = [f.name for f in dataclasses.fields(BuildConfig)]
    for name, changed in _variants(config.build):
        cache.run(stage, INPUTS, dataclasses.replace(config, build=changed), produce)
    assert len(built) == 1 + len(fields)  # one build per changed field, none reused
    assert len({p.name for p in tmp_path.iterdir() if not p.name.startswith(".")}) == 1 + len(fields)


@pytest.fixture
def stage_module(tmp_path, monkeypatch):
    """A module of a stage, on the path, that the test edits."""
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "stage_code_under_test.py"

    def write(source: str) -> None:
        path.write_text(textwrap.dedent(source))
        module_source_hash.cache_clear()
        importlib.invalidate_caches()

    write('''
        """What this stage does."""

        def transform(x):
            """Double it."""
            return 2 * x  # why: the engine wants twice the input
    ''')
    yield write
    sys.modules.pop("stage_code_under_test", None)
    module_source_hash.cache_clear()


def test_a_docstring_or_comment_edit_is_a_hit_and_a_code_edit_a_miss(tmp_path, stage_module):
    stage = Stage("edited", ("stage_code_under_test",))
    cache, runs = StageCache(tmp_path / "cache"), []
    config = BuildConfig(precision="fp32")

    def produce(folder: Path) -> dict:
        runs.append(1)
        return {}

    cache.run(stage, INPUTS, config, produce)
    stage_module('''
        """What this stage does, said better, with an example."""

        def transform(x):
            """Double it (the input is never changed)."""
            return 2 * x  # a comment rewritten
    ''')
    cache.run(stage, INPUTS, config, produce)
    assert len(runs) == 1 and cache.hits == ["edited"]
    stage_module('''
        def transform(x):
            return 3 * x
    ''')
    cache.run(stage, INPUTS, config, produce)
    assert len(runs) == 2


def test_an_interrupted_stage_leaves_no_folder_and_a_broken_one_is_rebuilt(tmp_path):
    cache, stage = StageCache(tmp_path), target_stage("ort-fp32")
    config = TargetStageConfig("ort-fp32", BuildConfig(precision="fp32"))

    def interrupted(folder: Path) -> dict:
        (folder / "half-written").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.run(stage, INPUTS, config, interrupted)
    assert [p.name for p in tmp_path.iterdir() if p.name != ".locks"] == []
    folder, result = cache.run(stage, INPUTS, config, lambda folder: {"ok": 1})
    assert result == {"ok": 1}
    (folder / "result.json").write_text("{ truncated")  # a crash while writing the record
    again, result = cache.run(stage, INPUTS, config, lambda folder: {"ok": 2})
    assert again == folder and result == {"ok": 2}


def _build_once(root: str, marker: str) -> str:
    def produce(folder: Path) -> dict:
        with open(marker, "a") as handle:
            handle.write("built\n")
        time.sleep(0.5)  # the other process arrives while this one builds
        return {"pid": multiprocessing.current_process().pid}

    folder, _ = StageCache(Path(root)).run(target_stage("ort-fp32"), INPUTS,
                                           TargetStageConfig("ort-fp32", BuildConfig(precision="fp32")), produce)
    return str(folder)


def test_two_processes_building_one_key_build_it_once(tmp_path):
    marker = tmp_path / "builds.txt"
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        folders = pool.starmap(_build_once, [(str(tmp_path / "cache"), str(marker))] * 2)
    assert folders[0] == folders[1]
    assert marker.read_text().count("built") == 1


@pytest.mark.parametrize("stage", [EXPORT_STAGE, PRUNE_STAGE, TIMING_STAGE,
                                   *(target_stage(t) for t in registry.TARGETS)], ids=lambda s: s.name)
def test_each_stage_declares_every_module_its_code_imports(stage):
    assert undeclared_imports(stage) == {}, "declare these modules in the stage, or its cache goes stale"
