"""The documentation: the site builds in strict mode (a broken link or anchor fails), its reference
pages are made from the code, and every command block marked runnable runs as written."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from support import ROOT, runnable_blocks

@pytest.mark.service
def test_the_site_builds_in_strict_mode_with_the_generated_reference(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs need mkdocs-material: pip install -e '.[test]'")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env={
                                **__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    commands = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    for name in ("optimize build", "optimize serve", "optimize tune", "optimize export perf-data"):
        assert f"<code>{name}</code>" in commands, name
    metrics = (tmp_path / "site" / "reference" / "metrics" / "index.html").read_text()
    assert "inference_non_finite_samples_total" in metrics and "inference_requests_total" in metrics
    assert "/v2/repository/index" in (tmp_path / "site" / "reference" / "routes" / "index.html").read_text()


def test_the_readme_stays_a_starting_point():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    linked = set(re.findall(r"\]\((docs/[^)#]+)", text))
    assert linked and all((ROOT / link).is_file() or link.startswith("docs/reference/") for link in linked), linked


def test_runnable_blocks_exist_and_run_optimize_only():
    """The blocks themselves run after the README's demo, in its folder (``run_blocks``, called by
    ``test_readme_demo_builds_all_cpu_targets_on_real_digits``): its stage cache makes their builds
    cache hits."""
    blocks = runnable_blocks()
    assert blocks, "no block is marked runnable"
    for page, block in blocks:
        for line in [ln.strip() for ln in block.splitlines() if ln.strip() and not ln.startswith("#")]:
            assert line.startswith(("optimize ", "python -m models.")), f"{page}: {line}"
