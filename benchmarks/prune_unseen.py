"""Half the channels pruned, default flags, on three CNNs the zoo's tests never see (``models/unseen.py``).

Each model is trained for seconds on the digits (1x8x8, 1,258 training images), then
``optimize build --prune 0.5 --target ort-int8,openvino-int8`` with the training images as
unlabelled ``--calib`` and the 539 test digits with labels as ``--eval-data``, nothing else. Per
model: recovery's steps, time, why it stopped, the step it kept; the recovered model's labelled
accuracy drop against the unpruned FP32 model on the test digits with its 95% interval, against the
budget (the gate's default, 1 point); and INT8 on top (the gate's verdict per engine).

    python -m benchmarks.prune_unseen [--models a,b] [--work DIR] [--label after] [--out benchmarks/results]

``--work`` keeps the trained checkpoints, so a second run (``--label before`` on an older checkout)
measures the same models; the table shows every label found in the results file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import environment, markdown_table, write_results
from models import unseen, zoo
from models.zoo_data import digit_images
from optimize.cpu import detect

TARGETS = ("ort-int8", "openvino-int8")
BUDGET = 1.0


def prepare(name: str, folder: Path) -> dict[str, Any]:
    """Train ``name`` once (kept in ``folder``) and write its checkpoint and data."""
    summary_path = folder / "summary.json"
    if summary_path.is_file():
        return json.loads(summary_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    spec = zoo.ZooModel(name, name, unseen.FACTORIES[name], digit_images, "classify", "accuracy", 90.0, (),
                        epochs=25)
    data = spec.data()
    module = zoo.train(spec, data)
    torch.save(module.state_dict(), folder / "model.pt")
    np.savez(folder / "calib.npz", **data.train)
    np.savez(folder / "eval.npz", **data.test, labels=data.test_y)
    summary = {"name": name, "train_samples": len(data.train_y), "test_samples": len(data.test_y),
               "fp32_accuracy": zoo.quality(spec, module, data)["accuracy"],
               "parameters": sum(p.numel() for p in module.parameters())}
    summary_path.write_text(json.dumps(summary))
    return summary


def measure(name: str, folder: Path, out: Path) -> dict[str, Any]:
    from optimize.inputs.checkpoint import load_checkpoint
    from optimize.validate import drop_interval

    arch = f"models.unseen:{name}"
    start = time.perf_counter()
    if (out / "manifest.json").is_file():  # measured already (an interrupted run): read it again
        result = subprocess.CompletedProcess([], 0, "", "")
    else:
        result = subprocess.run([sys.executable, "-m", "optimize", "build", str(folder / "model.pt"), "--arch", arch,
                                "--calib", str(folder / "calib.npz"), "--eval-data", str(folder / "eval.npz"),
                                "--task", "classify", "--prune", "0.5", "--target", ",".join(TARGETS),
                                "--out", str(out)], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if not (out / "manifest.json").is_file():
        return {"error": (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]}
    manifest = json.loads((out / "manifest.json").read_text())
    stage = manifest["stages"]["prune"]
    recovery = stage["recovery"]
    test = np.load(folder / "eval.npz")
    x, labels = torch.from_numpy(test["x"]), test["labels"]
    with torch.no_grad():
        reference = load_checkpoint(folder / "model.pt", arch).module(x).numpy()
        recovered = load_checkpoint(out / "pruned.pt", arch).module(x).numpy()
    drop = float(((reference.argmax(1) == labels).mean() - (recovered.argmax(1) == labels).mean()) * 100)
    low, high = drop_interval("classify", reference, recovered, labels, True)
    int8 = {}
    for target, entry in manifest["targets"].items():
        gate = entry.get("gate") or {}
        int8[target] = {"status": entry["status"], "drop": gate.get("drop"), "interval": gate.get("interval")}
    return {"build_s": round(seconds, 1), "macs_ratio": stage.get("macs_ratio"), "steps": recovery["steps"],
            "seconds": recovery["seconds"], "stopped": recovery["stopped"], "best_step": recovery["best_step"],
            "advice": recovery.get("advice"), "drop": drop, "interval": [low, high],
            "within_budget": drop <= BUDGET, "int8": int8,
            "curve": [(c["step"], c["seconds"], c["drop"], round(c["distance"], 5)) for c in recovery["curve"]],
            "signals": recovery.get("signals")}


def render(results: dict[str, Any]) -> str:
    rows = []
    for name, runs in results["models"].items():
        for label, r in runs.items():
            if "error" in r:
                rows.append([name, label, "error: " + r["error"], "", "", "", ""])
                continue
            int8 = "; ".join(f"{t} {e['status']} (drop {e['drop']:.3g})" if e["drop"] is not None else
                             f"{t} {e['status']}" for t, e in r["int8"].items())
            rows.append([name, label, f"{r['steps']} steps, {r['seconds']:.0f} s (kept {r['best_step']})",
                         r["stopped"], f"{r['drop']:.2f} [{r['interval'][0]:.2f}, {r['interval'][1]:.2f}]"
                         + ("" if r["within_budget"] else " over"),
                         r.get("advice") or "-", int8])
    cpu = results.get("cpu") or {}
    machine = f"{cpu.get('model', '?')}, {cpu.get('cores', '?')} cores, {' '.join(cpu.get('isa', []))}"
    head = ["model", "run", "recovery", "stopped", "held-out drop [95%] (budget 1)", "advice", "INT8 on top"]
    return (f"# Half the channels pruned, default flags, on three CNNs outside the zoo's tests\n\n"
            f"`python -m benchmarks.prune_unseen` on {machine}; labelled accuracy on the 539 "
            f"test digits against the unpruned FP32 model.\n\n" + markdown_table([head, *rows]) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(unseen.FACTORIES))
    parser.add_argument("--work", default="/tmp/prune_unseen")
    parser.add_argument("--label", default="after")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    path = Path(args.out) / "prune_unseen.json"
    results = json.loads(path.read_text()) if path.is_file() else {"models": {}}
    results["environment"] = environment()
    results["cpu"] = dataclasses.asdict(detect())
    work = Path(args.work)
    for name in args.models.split(","):
        summary = prepare(name, work / name)
        entry = measure(name, work / name, work / f"{name}-{args.label}")
        entry["fp32_accuracy"] = summary["fp32_accuracy"]
        results["models"].setdefault(name, {})[args.label] = entry
        print(json.dumps({name: {args.label: entry}}), flush=True)
        write_results(path, results, render(results))


if __name__ == "__main__":
    main()
