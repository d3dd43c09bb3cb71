"""The console the CLI owns, and a library that only logs."""

import logging

from support import run_cli


def _build(checkpoint, out, *flags):
    return run_cli(*flags, "build", checkpoint["ckpt"], "--arch", checkpoint["arch"], "--calib", checkpoint["calib"],
                   "--target", "ort-fp32", "--out", out)


def test_quiet_keeps_warnings_only_and_the_console_handler_is_installed_once(tiny_checkpoint, tmp_path):
    from optimize.cli.console import StderrHandler, install

    said = _build(tiny_checkpoint, tmp_path / "a")
    assert said.returncode == 0, said.stderr
    assert said.stderr.splitlines()[0].startswith("loaded state-dict checkpoint") and "ort-fp32: built" in said.stderr
    assert "ort-fp32" in said.stdout and "loaded" not in said.stdout  # the table on stdout, progress on stderr
    quiet = _build(tiny_checkpoint, tmp_path / "b", "--quiet")
    assert quiet.returncode == 0 and "loaded" not in quiet.stderr and "ort-fp32" in quiet.stdout
    assert all(line.startswith("warning: ") for line in quiet.stderr.splitlines()), quiet.stderr
    verbose = _build(tiny_checkpoint, tmp_path / "c", "--verbose")
    assert verbose.returncode == 0 and "loaded state-dict checkpoint" in verbose.stderr
    logger = logging.getLogger("optimize")
    kept = list(logger.handlers), logger.level
    try:
        for _ in range(3):  # as three commands in one process do
            install()
        assert len([h for h in logger.handlers if isinstance(h, StderrHandler)]) == 1
    finally:
        logger.handlers[:], logger.level = kept
    both = run_cli("--quiet", "--verbose", "inspect", tmp_path / "a")
    assert both.returncode == 2 and "contradict" in both.stderr


def test_the_library_prints_nothing_and_logs_to_optimize_loggers(tiny_checkpoint, tmp_path, capsys, caplog):
    from optimize.build.pipeline import run_build
    from optimize.build.plan import BuildPlan, DataConfig, SourceConfig

    t = tiny_checkpoint
    plan = BuildPlan(source=SourceConfig(t["ckpt"], t["arch"]), out=tmp_path / "api", targets=("ort-fp32",),
                     data=DataConfig(calib=str(t["calib"])))
    with caplog.at_level(logging.INFO, logger="optimize"):
        result = run_build(plan)
    assert result.manifest.built_targets() == ["ort-fp32"]
    out, err = capsys.readouterr()
    assert out == "" and err == "", (out, err)
    names = {r.name for r in caplog.records}
    assert "optimize.build.prepare" in names and "optimize.build.pipeline" in names, names
