"""The INT8 fallback on a model whose INT8 breaches the budget: what it kept in FP32 and what that costs.

Trains a zoo model (default: the EfficientNet-style CNN on digits, whose depthwise and
squeeze-excitation layers lose most in INT8), builds it twice with ``optimize`` from the same
data: once with ``--no-recover`` (the plain INT8 engine) and once with default flags (the
candidate search: other calibrations, then sensitive nodes kept in FP32). Reports for each
target the labelled accuracy against FP32, the drop's interval, the candidates tried and what was
kept, and the latency of FP32, plain INT8 and recovered INT8, timed interleaved in the same run.

    python -m benchmarks.int8_fallback [--model efficientnet] [--scheme static] [--rounds 7] [--threads 2] [--batch 1]

``--scheme`` fixes the INT8 scheme of both builds (default: chosen by measurement, as the CLI does).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import environment, markdown_table, time_interleaved, timing_parser, write_results
from models import zoo
from optimize.bundle import load_runner
from optimize.targets import registry
from optimize.targets.base import RunnerConfig

TARGETS = ("ort-fp32", "ort-int8", "openvino-fp32", "openvino-int8")


def build(name: str, folder: Path, out: Path, *extra: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "optimize", *zoo.build_args(name, folder, out, TARGETS, *extra)],
                            capture_output=True, text=True)
    if not (out / "manifest.json").is_file():
        raise SystemExit(f"build failed: {result.stderr.strip().splitlines()[-1]}")
    return json.loads((out / "manifest.json").read_text())


def main() -> None:
    parser = timing_parser(__doc__)
    parser.add_argument("--model", default="efficientnet", choices=list(zoo.ZOO))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--scheme", choices=("static", "dynamic", "weights"))
    parser.add_argument("--tag", default="", help="suffix of the results' file names")
    parser.add_argument("--max-accuracy-drop", help="the builds' budget (default: the CLI's)")
    args = parser.parse_args()
    fixed = (("--int8-scheme", args.scheme) if args.scheme else ()) + (
        ("--max-accuracy-drop", args.max_accuracy_drop) if args.max_accuracy_drop else ())
    work = Path(tempfile.mkdtemp(prefix="bench-fallback-"))
    zoo.make(args.model, work / "model")
    plain = build(args.model, work / "model", work / "plain", "--no-recover", "--threads", str(args.threads), *fixed)
    searched = build(args.model, work / "model", work / "searched", "--threads", str(args.threads), *fixed)
    feeds = dict(np.load(work / "model" / "eval.npz"))
    feeds.pop("labels", None)
    feeds = {k: v[:args.batch] for k, v in feeds.items()}
    calls, runners, rows, summary = {}, [], [], {}
    engines = [("ort-fp32", "searched", "ort-fp32"), ("ort-int8", "plain", "ort-int8 plain"),
               ("ort-int8", "searched", "ort-int8 searched"), ("openvino-fp32", "searched", "openvino-fp32"),
               ("openvino-int8", "plain", "openvino-int8 plain"), ("openvino-int8", "searched", "openvino-int8 searched")]
    for target, bundle, label in engines:
        entry = (plain if bundle == "plain" else searched)["targets"][target]
        if entry["status"] == "built":
            runner = load_runner(work / bundle, target)
        else:  # over budget, so not in the bundle: its engine from the build's stage cache
            found = list((work / f"{bundle}.cache").glob(f"target-{target}-[0-9a-f]*"))
            folder = Path(entry["cache_entry"]) if entry.get("cache_entry") else found[0] if len(found) == 1 else None
            if folder is None:  # which of the candidates it was is not recorded: not timed
                continue
            runner = registry.backend(target).runner(folder, RunnerConfig(threads=args.threads))
        runners.append(runner)
        calls[label] = (lambda r: lambda: r.infer(feeds))(runner)
    timing = time_interleaved(calls, args.rounds, baseline="ort-fp32")
    for target, bundle, label in engines:
        entry = (plain if bundle == "plain" else searched)["targets"][target]
        gate = entry.get("gate") or {}
        recovery = entry.get("recovery") or {}
        t = timing.get(label) or {"p50_ms": float("nan"), "p50_spread_pct": float("nan"),
                                  "speedup_vs_ort-fp32": float("nan"), "speedup_vs_ort-fp32_range": (float("nan"),) * 2}
        summary[label] = {"status": entry["status"], "gate": gate, "recovery": recovery, "timing": t}
        tried = ", ".join(f"{c['change']} ({c['selection_drop']:.3g})" for c in recovery.get("candidates", []))
        rows.append([label, entry["status"], f"{gate.get('drop', 0):.3g} [{gate['interval'][0]:.2g}, "
                     f"{gate['interval'][1]:.2g}]" if gate.get("interval") else f"{gate.get('drop')}",
                     recovery.get("chosen_change") or "-", f"{t['p50_ms']:.3f}", f"{t['p50_spread_pct']:.0f}",
                     f"{t['speedup_vs_ort-fp32']:.2f}x ({t['speedup_vs_ort-fp32_range'][0]:.2f}-"
                     f"{t['speedup_vs_ort-fp32_range'][1]:.2f})", tried or "-"])
    metric = next(iter(summary.values()))["gate"].get("metric", "")
    md = (f"# INT8 fallback on `{args.model}` ({zoo.ZOO[args.model].family}), batch {args.batch}, "
          f"{args.threads} threads\n\n`python -m benchmarks.int8_fallback --model {args.model} --rounds {args.rounds} "
          f"--threads {args.threads} --batch {args.batch}" + (f" --scheme {args.scheme}" if args.scheme else "")
          + (f" --max-accuracy-drop {args.max_accuracy_drop}" if args.max_accuracy_drop else "")
          + f"` on {environment()['machine'].get('cpu')}\n\n"
          + markdown_table([["engine", "status", f"{metric} drop [95% interval]", "kept / chosen", "p50 ms",
                             "spread %", "speed vs ort-fp32 (range)", "candidates tried (selection-split drop)"],
                            *rows])
          + "\n`plain` is built with `--no-recover`; `searched` with default flags. Timed interleaved in one run; "
            "speed ratios are paired per round.\n")
    write_results(Path(args.out) / f"int8_fallback_{args.model}{args.tag}",
                  {"model": args.model, "engines": summary, "environment": environment()}, md)
    for runner in runners:
        runner.close()
    print(md)


if __name__ == "__main__":
    main()
