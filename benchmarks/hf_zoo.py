"""The Hugging Face zoo matrix: ``transformers`` architectures saved as model folders, each built from
its folder alone (no --arch, no preprocessing flags) through the CPU targets with default flags.

Per architecture and target: the labelled accuracy against the FP32 model's, the drop and its 95%
interval, the exporter route, build time; built or failed with the reason. ``--prune 0.3`` adds a
pruned build (ort-int8 and openvino-int8 on top) where pruning applies: the accuracy after
recovery, and with INT8 on top, against the unpruned FP32 model; or why it did not apply.

The models are small configs of the real classes (``models/hf_folders.py``), trained for seconds
on scikit-learn's digits (image) or standard-library docstrings with the all-MiniLM-L6-v2 tokenizer
(text).

    python -m benchmarks.hf_zoo [--archs vit,deit,...] [--targets ort-fp32,ort-int8,openvino-int8] [--prune 0.3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import environment, markdown_table, write_results
from models import hf_folders

TARGETS = ("ort-fp32", "ort-int8", "openvino-fp32", "openvino-int8")


def build(folder: Path, data: str, out: Path, targets: tuple[str, ...], *extra: str) -> dict[str, Any]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "optimize", "build", str(folder), "--calib", data, "--target",
                             ",".join(targets), "--out", str(out), *extra], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - start
    manifest = out / "manifest.json"
    if not manifest.is_file():
        lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error")]
        return {"error": (lines or result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1],
                "seconds": seconds}
    return {"manifest": json.loads(manifest.read_text()), "seconds": seconds, "log": result.stderr}


def cell(entry: dict[str, Any]) -> dict[str, Any]:
    gate = entry.get("gate") or {}
    held = (entry.get("accuracy") or {}).get("held_out") or {}
    return {"status": entry["status"], "reason": entry.get("reason"), "metric": gate.get("metric"),
            "drop": gate.get("drop"), "interval": gate.get("interval"), "accuracy_pct": held.get("accuracy_pct"),
            "precision": entry.get("precision"), "build_time_s": entry.get("build_time_s"),
            "size_bytes": entry.get("size_bytes")}


def shown(c: dict[str, Any]) -> str:
    if c["status"] != "built":
        return f"{c['status']}: {c['reason']}"
    accuracy = "-" if c["accuracy_pct"] is None else f"{c['accuracy_pct']:.1f}%"
    drop = "-" if c["drop"] is None else f"{c['drop']:+.2g}"
    return f"{accuracy} (drop {drop}), {c['build_time_s']:.1f} s"


def _why(c: dict[str, Any]) -> str:
    reason = c.get("reason") or ""
    if reason.startswith("accuracy gate") and c.get("drop") is not None:
        return f"gate: {c['metric']} drop {c['drop']:.3g} points"
    return "no layer in INT8" if "no layer computes in INT8" in reason else reason[:80]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default=",".join(hf_folders.IMAGE_ARCHS + hf_folders.TEXT_ARCHS))
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--prune", default="", help="pruning ratios, e.g. 0.3")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--render", action="store_true", help="render the tables again from OUT/hf_zoo.json")
    args = parser.parse_args()
    if args.render:
        results = json.loads((Path(args.out) / "hf_zoo.json").read_text())
        render(results, tuple(t for t in args.targets.split(",") if t), args)
        return
    targets = tuple(t for t in args.targets.split(",") if t)
    ratios = [float(r) for r in args.prune.split(",") if r]
    results: dict[str, Any] = {"environment": environment(), "command": " ".join(sys.argv[1:]), "archs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for arch in [a for a in args.archs.split(",") if a]:
            start = time.perf_counter()
            made = hf_folders.make(work, (arch,))[arch]
            record: dict[str, Any] = {"class": made["class"], "kind": made["kind"],
                                      "torch_test_accuracy_pct": round(100 * made["test_accuracy"], 2),
                                      "train_s": round(time.perf_counter() - start, 1)}
            run = build(Path(made["model"]), made["data"], work / f"{arch}-bundle", targets)
            record["build_s"] = round(run["seconds"], 1)
            if "error" in run:
                record["error"] = run["error"]
            else:
                manifest = run["manifest"]
                export = manifest["stages"]["export"]
                record.update(route=export.get("route"), failed_routes=export.get("failed_routes", []),
                              inputs=[s["name"] for s in manifest["inputs"]],
                              outputs=[o["name"] for o in manifest["outputs"]],
                              notes=manifest["data"]["notes"],
                              targets={t: cell(e) for t, e in manifest["targets"].items()})
            for ratio in ratios:
                pruned = build(Path(made["model"]), made["data"], work / f"{arch}-p{ratio}",
                               ("ort-int8", "openvino-int8"), "--prune", str(ratio))
                entry: dict[str, Any] = {"ratio": ratio, "build_s": round(pruned["seconds"], 1)}
                if "error" in pruned:
                    entry["error"] = pruned["error"]
                else:
                    stage = pruned["manifest"]["stages"].get("prune") or {}
                    accuracy = stage.get("accuracy") or {}
                    pick = lambda part: ((accuracy.get(part) or {}).get("held_out") or {}).get("accuracy_pct")  # noqa: E731
                    entry.update(macs_ratio=stage.get("macs_ratio"), original=pick("original"), pruned=pick("pruned"),
                                 recovered=pick("recovered"), kept_whole=stage.get("kept_whole") or stage.get("skipped"),
                                 int8={t: cell(e) for t, e in pruned["manifest"]["targets"].items()})
                record.setdefault("pruned", []).append(entry)
            results["archs"][arch] = record
            print(json.dumps({arch: record}, default=str), flush=True)
    render(results, targets, args)


def render(results: dict[str, Any], targets: tuple[str, ...], args: Any) -> None:
    rows, prune_rows = [], []
    for arch, r in results["archs"].items():
        if "error" in r:
            rows.append([arch, r["class"], f"{r['torch_test_accuracy_pct']:.1f}%", "-", *(["error: " + r["error"]] * len(targets)), f"{r['build_s']:.0f}"])
        else:
            route = r["route"] + (f" (after {len(r['failed_routes'])} failed)" if r["failed_routes"] else "")
            rows.append([arch, r["class"], f"{r['torch_test_accuracy_pct']:.1f}%", route,
                         *(shown(r["targets"][t]) if t in r["targets"] else "-" for t in targets), f"{r['build_s']:.0f}"])
        for e in r.get("pruned", []):
            if "error" in e:
                prune_rows.append([arch, f"{e['ratio']:.0%}", "error: " + e["error"], "", ""])
                continue
            int8 = ", ".join(f"{t} {c['accuracy_pct']:.1f}%" if c["status"] == "built" and c["accuracy_pct"] is not None
                             else f"{t} {c['status']} ({_why(c)})" for t, c in e["int8"].items())
            fmt = lambda v: "-" if v is None else f"{v:.1f}%"  # noqa: E731
            prune_rows.append([arch, f"{e['ratio']:.0%}", f"{fmt(e['original'])} -> pruned {fmt(e['pruned'])} -> "
                               f"recovered {fmt(e['recovered'])}", int8, f"{e['build_s']:.0f}"])
    cells = [c for r in results["archs"].values() for c in (r.get("targets") or {}).values()]
    built = sum(c["status"] == "built" for c in cells)
    machine = results["environment"]["machine"]
    markdown = ["# Hugging Face zoo: transformers architectures built from their model folders, default flags", "",
                f"`python -m benchmarks.hf_zoo {results['command']}`".replace(" `", "`"), "",
                f"CPU: {machine.get('cpu', {}).get('model') if isinstance(machine.get('cpu'), dict) else machine.get('cpu')}", "",
                f"{built} of {len(cells)} cells built within budget. Accuracy: labelled, on the held-out part of the "
                f"data given (the FP32 engine's is the model's own); drop: the gate's, in points against FP32.", "",
                markdown_table([["arch", "class", "torch accuracy", "export route", *targets, "build s"], *rows])]
    if prune_rows:
        markdown += ["", "## Pruned with default flags, recovered, and INT8 on top (against the unpruned FP32 model)", "",
                     markdown_table([["arch", "ratio", "accuracy", "INT8 on top", "build s"], *prune_rows])]
    write_results(Path(args.out) / "hf_zoo", results, "\n".join(markdown) + "\n")


if __name__ == "__main__":
    main()
