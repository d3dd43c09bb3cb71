"""``report.html`` and ``MODEL_CARD.md``: made from what the bundle holds, refreshed by build and
bench, rebuilt by ``optimize report``."""

from __future__ import annotations

import re

import yaml

from support import SERVED, run_cli


def test_build_writes_a_self_contained_page_and_a_model_card_from_the_manifest(bundles, tmp_path):
    from optimize.bundle.folder import read_manifest
    from optimize.bundle.table import precision_text

    bundle = bundles.copy(tmp_path / "bundle", *SERVED)
    page = (bundle / "report.html").read_text()
    manifest = read_manifest(bundle)
    assert page.startswith("<!doctype html>") and "<h2>Accuracy against the FP32 model</h2>" in page
    assert not re.search(r"""(src|href)=["'](?!data:|#)""", page)  # nothing outside the page: images inline
    for name, entry in manifest.targets.items():
        assert name in page and precision_text(entry) in page
    assert "Not measured yet: <code>optimize bench BUNDLE</code>" in page
    card = (bundle / "MODEL_CARD.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    (index,) = front["model-index"]
    assert index["name"] == "tiny" and {r["task"]["name"] for r in index["results"]} == {
        f"{n} engine" for n in manifest.built_targets()}
    assert all(m["value"] is not None for r in index["results"] for m in r["metrics"])
    (bundle / "report.html").unlink()
    result = run_cli("report", bundle)
    assert result.returncode == 0 and (bundle / "report.html").is_file()
    assert run_cli("report", tmp_path / "nothing").returncode == 2
