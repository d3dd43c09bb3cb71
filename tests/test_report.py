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
    # The drift reference of the target served by default: every feature watched, its scales.
    served = next(n for n, e in manifest.targets.items() if e.status == "built" and e.drift)
    drift = page[page.index("<h2>Drift reference</h2>"):]
    assert drift.startswith(f"<h2>Drift reference</h2>\n<p>{served} (served by default)")
    assert all(f"<td>{name}</td>" in drift for name in manifest.targets[served].drift["features"])
    card = (bundle / "MODEL_CARD.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    (index,) = front["model-index"]
    assert index["name"] == "tiny" and {r["task"]["name"] for r in index["results"]} == {
        f"{n} engine" for n in manifest.built_targets()}
    assert all(m["value"] is not None for r in index["results"] for m in r["metrics"])
    # Each engine's gate drop is in the card, with its interval, on the data it was measured on.
    drops = [m for r in index["results"] for m in r["metrics"] if m["type"] == "accuracy_drop"]
    assert len(drops) == len(manifest.built_targets()) and all("95% interval" in m["name"] for m in drops)
    assert "## Accuracy against the FP32 model" in card and "| 95% interval |" in card
    (bundle / "report.html").unlink()
    result = run_cli("report", bundle)
    assert result.returncode == 0 and (bundle / "report.html").is_file()
    # A benchmark report that cannot be read is said in one line; the page is still written.
    (bundle / "bench").mkdir(exist_ok=True)
    (bundle / "bench" / "report.json").write_text("{broken")
    (bundle / "report.html").unlink()
    broken = run_cli("report", bundle)
    assert broken.returncode == 0 and (bundle / "report.html").is_file(), broken.stderr
    said = [line for line in broken.stderr.splitlines() if "report.json cannot be read" in line]
    assert len(said) == 1 and "optimize bench" in said[0] and "Traceback" not in broken.stderr
    assert run_cli("report", tmp_path / "nothing").returncode == 2
