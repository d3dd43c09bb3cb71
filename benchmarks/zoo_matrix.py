"""The zoo matrix: every zoo model (``models/zoo.py``) through every CPU target with default flags.

Per model and target: the metric against the FP32 model (labelled accuracy where the model's test
labels reach the gate, else top-1 agreement or the max error), the drop and its 95% interval,
engine size, build time, and built or failed with the reason. ``--prune 0.3,0.5`` adds, for every
model where channel or head pruning applies, a pruned build: the recovered accuracy and INT8 on top
against the unpruned FP32 model, the recovery's steps, time, reason for stopping and curve.
``--compile`` adds the ``torch-compile`` target.

    python -m benchmarks.zoo_matrix [--models a,b] [--prune 0.3,0.5] [--compile] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import environment, markdown_table, write_results
from models import zoo


def build(name: str, folder: Path, out: Path, targets: tuple[str, ...], *extra: str) -> dict[str, Any]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "optimize", *zoo.build_args(name, folder, out, targets, *extra)],
                            capture_output=True, text=True)
    manifest_path = out / "manifest.json"
    if not manifest_path.is_file():
        lines = result.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit {result.returncode}", "seconds": time.perf_counter() - start}
    return {"manifest": json.loads(manifest_path.read_text()), "seconds": time.perf_counter() - start,
            "exit": result.returncode}


def cell(entry: dict[str, Any]) -> dict[str, Any]:
    gate = entry.get("gate") or {}
    accuracy = entry.get("accuracy") or {}
    measured = accuracy.get("eval", accuracy.get("held_out", {}))
    return {"status": entry["status"], "reason": entry.get("reason"), "metric": gate.get("metric"),
            "drop": gate.get("drop"), "interval": gate.get("interval"), "budget": gate.get("budget"),
            "measured": measured, "size_bytes": entry.get("size_bytes"), "build_time_s": entry.get("build_time_s"),
            "recovery": (entry.get("recovery") or {}).get("chosen_change")}


def shown(c: dict[str, Any]) -> str:
    if c["status"] != "built":
        return f"{c['status']}: {c['reason']}"
    drop = "-" if c["drop"] is None else f"{c['drop']:.3g}"
    interval = "" if not c["interval"] else f" [{c['interval'][0]:.2g}, {c['interval'][1]:.2g}]"
    extra = f"; {c['recovery']}" if c["recovery"] else ""
    return f"{c['metric']} drop {drop}{interval}, {c['size_bytes'] / 1024:.0f} KiB, {c['build_time_s']:.1f} s{extra}"


def _g(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(zoo.ZOO))
    parser.add_argument("--prune", default="", help="pruning ratios, e.g. 0.3,0.5")
    parser.add_argument("--compile", action="store_true", help="add the torch-compile target")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--from-log", help="render the tables from runs' printed lines (files joined by commas; "
                                           "later lines replace earlier ones) instead of running")
    args = parser.parse_args()
    names = [n for n in args.models.split(",") if n]
    targets = zoo.CPU_TARGETS + (("torch-compile",) if args.compile else ())
    ratios = [float(r) for r in args.prune.split(",") if r]
    results: dict[str, Any] = {"environment": environment(), "models": {}, "pruned": {}}
    if args.from_log:  # re-render the tables from the lines a run printed
        lines = [line for f in args.from_log.split(",") for line in Path(f).read_text().splitlines()]
        for line in lines:
            if not line.startswith("{"):
                continue
            (key, value), = json.loads(line).items()
            if "@" in key:  # a later line for the same model and ratio replaces an earlier one
                entries = results["pruned"].setdefault(key.split("@")[0], [])
                entries[:] = [e for e in entries if e["ratio"] != value["ratio"]] + [value]
            else:
                results["models"][key] = value
        render(results, targets, ratios, args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in names:
            summary = zoo.make(name, work / name)
            run = build(name, work / name, work / f"{name}-bundle", targets)
            record = {"family": zoo.ZOO[name].family, "fp32_quality": summary["quality"],
                      "min_quality": summary["min_quality"], "build_s": round(run["seconds"], 1)}
            if "error" in run:
                record["error"] = run["error"]
            else:
                record["targets"] = {t: cell(e) for t, e in run["manifest"]["targets"].items()}
            results["models"][name] = record
            print(json.dumps({name: record}, default=str), flush=True)
            if not zoo.ZOO[name].prunable:
                continue
            for ratio in ratios:
                pruned = build(name, work / name, work / f"{name}-p{ratio}", ("ort-int8", "openvino-int8"),
                               "--prune", str(ratio))
                entry: dict[str, Any] = {"ratio": ratio, "build_s": round(pruned["seconds"], 1)}
                if "error" in pruned:
                    entry["error"] = pruned["error"]
                else:
                    stage = pruned["manifest"]["stages"]["prune"]
                    acc = stage["accuracy"]
                    key = "eval" if "eval" in acc["original"] else "held_out"
                    metric = next(m for m in ("accuracy_pct", "top1_agreement_pct", "max_abs_error")
                                  if m in acc["original"][key])
                    recovery = stage.get("recovery") or {}
                    entry.update(
                        metric=metric, macs_ratio=stage.get("macs_ratio"),
                        original=acc["original"][key].get(metric), pruned=acc["pruned"][key].get(metric),
                        recovered=acc.get("recovered", {}).get(key, {}).get(metric),
                        steps=recovery.get("steps"), seconds=recovery.get("seconds"), stopped=recovery.get("stopped"),
                        advice=recovery.get("advice"), recovered_gate=recovery.get("gate"),
                        curve=[(c["step"], c["drop"]) for c in recovery.get("curve", [])],
                        int8={t: {**cell(e), "value": ((e.get("accuracy") or {}).get(key) or {}).get(metric)}
                              for t, e in pruned["manifest"]["targets"].items()})
                results["pruned"].setdefault(name, []).append(entry)
                print(json.dumps({f"{name}@{ratio}": entry}, default=str), flush=True)
    render(results, targets, ratios, args)


def render(results: dict[str, Any], targets: tuple[str, ...], ratios: list[float], args: Any) -> None:
    rows = []
    for name, record in results["models"].items():
        if "error" in record:
            rows.append([name, f"{record['fp32_quality']['score']:.4g}", *(["error: " + record["error"]] * len(targets))])
            continue
        rows.append([name, f"{record['fp32_quality']['score']:.4g} (min {record['min_quality']:g})",
                     *(shown(record["targets"][t]) if t in record["targets"] else "-" for t in targets)])
    cells = [c for r in results["models"].values() for c in (r.get("targets") or {}).values()]
    built = sum(c["status"] == "built" for c in cells)
    markdown = ["# Zoo matrix: every zoo model through every CPU target, default flags", "",
                "`python -m benchmarks.zoo_matrix" + (f" --prune {args.prune}" if ratios else "") + "`", "",
                f"{built} of {len(cells)} cells built within budget.", "",
                markdown_table([["model", "FP32 quality", *targets], *rows])]
    if results["pruned"]:
        prune_rows = []
        for name, entries in results["pruned"].items():
            for e in entries:
                if "error" in e:
                    prune_rows.append([name, f"{e['ratio']:.0%}", "error: " + e["error"], "", "", "", ""])
                    continue
                int8 = ", ".join(f"{t} {v['value']:.4g} ({v['status']})" for t, v in e["int8"].items()
                                 if v.get("value") is not None)
                prune_rows.append([name, f"{e['ratio']:.0%}", f"{e['metric']}: {_g(e['original'])} -> pruned "
                                   f"{_g(e['pruned'])} -> recovered {_g(e['recovered'])}", int8,
                                   f"{e['steps']} steps, {e['seconds']:.0f} s", e["stopped"] or "",
                                   " ".join(f"{s}:{d:.3g}" for s, d in e["curve"][:6] if d is not None)])
        markdown += ["", "## Pruned, recovered, and INT8 on top (against the unpruned FP32 model)", "",
                     markdown_table([["model", "ratio", "accuracy", "INT8 on top", "recovery", "stopped",
                                     "curve (step:drop on the selection split)"], *prune_rows])]
    write_results(Path(args.out) / "zoo_matrix", results, "\n".join(markdown) + "\n")


if __name__ == "__main__":
    main()
