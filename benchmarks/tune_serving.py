"""``optimize tune`` on the digits CNN and ResNet-50, both ``ort-int8``: the default serving
configuration's throughput within the SLO against the tuned one's (measured again in interleaved
rounds by the search itself), the search's wall time, and the Triton config that carries the result.

    python -m benchmarks.tune_serving [--models digits,resnet50] [--bundle digits=PATH ...]
        [--slo digits=p99=5ms --slo resnet50=p99=300ms] [--time-budget 180]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.bench_serve import build
from benchmarks.common import environment, write_results
from optimize.cpu import detect
from optimize.deploy.triton import export_repository, to_pbtxt
from optimize.bundle.serving import ServingKnobs
from optimize.select import parse_slo
from optimize.tune.report import markdown
from optimize.tune.search import TuneConfig, tune

SLOS = {"digits": "p99=5ms", "resnet50": "p99=300ms", "resnet18": "p99=100ms"}
WINDOWS = {"digits": 1.5, "resnet50": 3.0, "resnet18": 2.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="digits,resnet50")
    parser.add_argument("--bundle", action="append", default=[], help="NAME=PATH of an ort-int8 bundle to reuse")
    parser.add_argument("--slo", action="append", default=[], help="NAME=p99=20ms")
    parser.add_argument("--time-budget", type=float, default=180.0)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    given = dict(item.split("=", 1) for item in args.bundle)
    slos = {**SLOS, **dict(item.split("=", 1) for item in args.slo)}
    work = Path(tempfile.mkdtemp(prefix="bench-tune-"))
    results, parts = {}, []
    for name in args.models.split(","):
        bundle = Path(given[name]) if name in given else build(work / name, name, ("ort-int8",))
        slo = parse_slo(slos[name])
        record = tune(bundle, TuneConfig(target="ort-int8", slo_ms=slo.limit_ms, percentile=slo.percentile,
                                         window_s=WINDOWS.get(name, 2.0), time_budget_s=args.time_budget),
                      progress=lambda line, n=name: print(f"{n}: {line}", flush=True))
        knobs = ServingKnobs.from_json(record["knobs"])
        exported = export_repository(bundle, work / f"repo-{name}", "ort-int8", knobs.max_batch, knobs.instances,
                                     knobs.max_delay_ms / 1000, 64, threads=knobs.threads)
        results[name] = {"record": record, "triton_config": exported["config"]}
        parts.append(markdown(record).replace("# Serving configuration of ort-int8",
                                              f"## {name} (ort-int8), SLO {slos[name]}")
                     + "\nThe Triton config `optimize export triton` writes from it:\n\n```\n"
                     + to_pbtxt(exported["config"]) + "```\n")
    md = (f"# optimize tune: serving configurations measured on {detect().summary()}\n\n"
          f"`python -m benchmarks.tune_serving --models {args.models} --time-budget {args.time_budget:g}`. The load "
          "generator (the project's closed loops over HTTP) shares the two cores with the server, so what is "
          "tuned here is the server and its client together; on a machine with many cores the layouts tried "
          "grow (1 x 16, 2 x 8, 4 x 4, ...) and the client weighs less.\n\n" + "\n".join(parts))
    write_results(Path(args.out) / "tune_serving", {**results, "environment": environment()}, md)
    print(md)


if __name__ == "__main__":
    main()
