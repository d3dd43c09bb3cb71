"""Which layer broke it: ``optimize explain`` on a model whose plain static INT8 breaks the budget,
its ranking against ONNX Runtime's own ``qdq_loss_debug``, and who was right.

Builds the model's FP32 and static INT8 engines (``--no-recover``: the plain INT8 engines, failed
ones kept in the stage cache), runs ``optimize explain`` on them (timed), then ranks the ONNX
Runtime engine's quantized tensors by ONNX Runtime's own measure (``qdq_loss_debug``: the SQNR of
each activation before and after its Q/DQ pair, the model run end to end; a tensor's error goes to
the layers that read it) on the same held-out samples. Where the two top-k lists disagree, each
disputed layer is kept in FP32 alone (with the nodes that quantize its inputs; one rebuild each,
the build's own configuration otherwise) and the final output's SQNR against FP32 is measured: the
layer whose float copy helps more was the one to name.

    python -m benchmarks.layer_error [--model efficientnet|minilm|resnet50|<zoo name>] [--samples 64] [--top 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import environment, markdown_table, write_results

RESULTS = Path(__file__).parent / "results"
TARGETS = ("ort-fp32", "ort-int8", "openvino-int8")


def make(model: str, work: Path) -> list[str]:
    """The model's checkpoint and data in ``work``; the ``optimize build`` arguments for it."""
    if model == "minilm":
        from models.minilm import make_checkpoint

        make_checkpoint(work)
        return ["build", str(work / "minilm.pt"), "--arch", "models.minilm:MiniLM", "--calib",
                str(work / "minilm_text.npz"), "--target", ",".join(TARGETS)]
    if model == "resnet50":
        from models.resnet import make_checkpoint

        make_checkpoint(work, 50, calib_samples=80)
        return ["build", str(work / "resnet50.pt"), "--arch", "models.resnet:resnet50", "--calib",
                str(work / "resnet_calib.npz"), "--held-out", "0.8", "--target", ",".join(TARGETS)]
    from models import zoo

    zoo.make(model, work)
    args = zoo.build_args(model, work, "OUT", TARGETS)
    at = args.index("--out")
    return args[:at] + args[at + 2:]


def optimize(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "optimize", *args], capture_output=True, text=True)


def qdq_loss_ranking(fp32: Path, int8: Path, batches: list[dict[str, np.ndarray]]) -> list[tuple[str, float]]:
    """ONNX Runtime's own ranking: (node, qdq_err dB) worst first, each quantized activation named by
    the node that produces it (the model's inputs by the node that reads them)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization.qdq_loss_debug import (collect_activations, compute_activation_error,
                                                         create_activation_matching,
                                                         modify_model_output_intermediate_tensors)

    with tempfile.TemporaryDirectory() as tmp:
        float_aug, qdq_aug = Path(tmp) / "float.onnx", Path(tmp) / "qdq.onnx"
        modify_model_output_intermediate_tensors(str(fp32), str(float_aug))
        modify_model_output_intermediate_tensors(str(int8), str(qdq_aug))

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.items = iter(batches)

            def get_next(self):
                return next(self.items, None)

        float_acts = collect_activations(str(float_aug), Reader())
        qdq_acts = collect_activations(str(qdq_aug), Reader())
    errors = compute_activation_error(create_activation_matching(qdq_acts, float_acts))
    graph = onnx.load(str(fp32)).graph
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.name)
    ranked: dict[str, float] = {}
    for tensor, error in errors.items():  # a Q/DQ pair's error belongs to the layers that read it
        for node in consumers.get(tensor, []):
            if np.isfinite(error["qdq_err"]):
                ranked[node] = min(ranked.get(node, np.inf), float(error["qdq_err"]))
    return sorted(ranked.items(), key=lambda item: item[1])


def keep_one(onnx_path: Path, calib: Path, build_config: dict, names: tuple[str, ...], work: Path, batches,
             reference) -> float:
    """Final-output SQNR (dB) of ``ort-int8`` as built, with ``names`` (one layer) kept in FP32."""
    from optimize.inputs.calibration import Samples
    from optimize.targets import onnxruntime as ort_target
    from optimize.targets.base import BuildConfig, BuildInputs, RunnerConfig
    from optimize.targets.layer_error import ErrorSum

    with np.load(calib) as data:
        samples = Samples({k: data[k] for k in data.files if k != "labels"}, None, "calibration")
    folder = work / f"keep-{abs(hash(names))}"
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in build_config.items()}
    config = BuildConfig(**{**fields, "keep_fp32": names})
    ort_target.BACKEND.build(BuildInputs(onnx_path), config, samples, folder)
    total = ErrorSum()
    with ort_target.BACKEND.runner(folder, RunnerConfig()) as runner:
        for feeds, ref in zip(batches, reference):
            for name, value in runner.infer(feeds).items():
                total.add(ref[name], value)
    return total.sqnr_db


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--disputes", type=int, default=8, help="at most this many disputed nodes rebuilt alone in FP32")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-layer-error-"))
    build_args = make(args.model, work)
    bundle = work / "bundle"
    started = time.perf_counter()
    result = optimize(*build_args, "--out", str(bundle), "--int8-scheme", "static", "--no-recover")
    build_s = time.perf_counter() - started
    if not (bundle / "manifest.json").is_file():
        raise SystemExit(f"build failed: {result.stderr.strip().splitlines()[-1]}")
    manifest = json.loads((bundle / "manifest.json").read_text())
    started = time.perf_counter()
    result = optimize("explain", str(bundle), "--samples", str(args.samples))
    explain_s = time.perf_counter() - started
    if result.returncode:
        raise SystemExit(f"explain failed: {result.stderr.strip().splitlines()[-1]}")
    record = json.loads((bundle / "explain" / "layers.json").read_text())

    from optimize.inspect.explain import held_out
    from optimize.inspect.report import worst
    from optimize.targets.layer_error import ReferenceModel

    batches = held_out(bundle, args.samples)
    entry = manifest["targets"]["ort-int8"]
    int8_dir = bundle / entry["folder"] if entry["status"] == "built" else Path(entry["cache_entry"])
    theirs = qdq_loss_ranking(bundle / "model.onnx", int8_dir / "model.onnx", batches)
    ours = [(layer["node"], layer["local"]["sqnr_db"]) for layer in worst(record["engines"]["ort-int8"], 10 ** 6)]
    top_ours, top_theirs = [n for n, _ in ours[:args.top]], [n for n, _ in theirs[:args.top]]
    disputed = [n for n in dict.fromkeys(top_ours + top_theirs) if not (n in top_ours and n in top_theirs)][:args.disputes]
    reference_model = ReferenceModel(bundle / "model.onnx", [])
    reference = [reference_model.run(b) for b in batches]
    calib = Path(build_args[build_args.index("--calib") + 1])
    plain = record["engines"]["ort-int8"]["fidelity"]["outputs"]
    plain_db = next(iter(plain.values()))["untouched"]["sqnr_db"]
    from optimize.inputs.calibration import Samples
    from optimize.targets import onnxruntime as ort_target
    from optimize.targets.base import RunnerConfig
    from optimize.targets.layer_error import engine_layers

    with np.load(bundle / "data" / "heldout.npz") as data:
        held = Samples({k: data[k] for k in data.files if k != "labels"}, None, "held out")
    groups = engine_layers(ort_target.BACKEND, int8_dir, RunnerConfig(), bundle / "model.onnx", held).keep
    kept = {node: keep_one(bundle / "model.onnx", calib, entry["build_config"], (node, *groups.get(node, ())), work,
                           batches, reference) for node in disputed}
    modules = {layer["node"]: layer["module"] for layer in record["engines"]["ort-int8"]["layers"]}
    rows = [["layer (node)", "module", "our rank (local dB)", "qdq_loss_debug rank (qdq_err dB)",
             "final SQNR with it alone in FP32 (dB)"]]
    our_rank = {n: (i + 1, db) for i, (n, db) in enumerate(ours)}
    their_rank = {n: (i + 1, db) for i, (n, db) in enumerate(theirs)}
    for node in dict.fromkeys(top_ours + top_theirs):
        o, t = our_rank.get(node), their_rank.get(node)
        rows.append([f"`{node}`", f"`{modules.get(node, '?')}`", f"{o[0]} ({o[1]:.1f})" if o else "-",
                     f"{t[0]} ({t[1]:.1f})" if t else "-",
                     f"{kept[node]:.1f}" if node in kept else ("(both name it)" if o and t and node in top_ours
                                                                and node in top_theirs else "(not rebuilt)")])
    gains = {"ours": [kept[n] for n in disputed if n in top_ours], "theirs": [kept[n] for n in disputed if n in top_theirs]}
    worst_rows = [["engine", "final dB", "worst layers (local dB)"]]
    for name, engine in record["engines"].items():
        final = next(iter(engine["fidelity"]["outputs"].values()))["untouched"]
        worst_rows.append([name, "exact" if final["exact"] else f"{final['sqnr_db']:.1f}",
                           ", ".join(f"`{layer['module']}` {layer['op']} ({layer['local']['sqnr_db']:.1f})"
                                     for layer in worst(engine, 5)) or "-"])
    results = {"model": args.model, "samples": args.samples, "explain_s": explain_s, "build_s": build_s,
               "targets": {t: {"status": e["status"], "gate": e.get("gate")} for t, e in manifest["targets"].items()},
               "ours": ours[:20], "qdq_loss_debug": theirs[:20], "disputed_kept_alone_db": kept,
               "plain_int8_final_db": plain_db, "mean_gain_db": {k: (float(np.mean(v)) - plain_db if v else None)
                                                                 for k, v in gains.items()},
               "environment": environment()}
    env = results["environment"]
    md = (f"# Per-layer error on `{args.model}`: our ranking against ONNX Runtime's `qdq_loss_debug`\n\n"
          f"`python -m benchmarks.layer_error --model {args.model} --samples {args.samples} --top {args.top}` on "
          f"{env['machine'].get('cpu')} ({env['machine'].get('cores')} cores)\n\n"
          f"Plain static INT8 (`--no-recover`): " + ", ".join(f"{t} {v['status']}" for t, v in results["targets"].items())
          + f". `optimize explain` on {args.samples} held-out samples, every engine: **{explain_s:.1f} s** wall "
          f"(the build took {build_s:.0f} s).\n\n## Each engine's worst layers (local error)\n\n"
          + markdown_table(worst_rows)
          + f"\n## ONNX Runtime INT8: the two rankings' top {args.top}, and each disputed node kept in FP32 alone\n\n"
          f"Plain INT8 final output: {plain_db:.1f} dB. Ours ranks by the error a node adds fed the FP32 model's "
          f"inputs; `qdq_loss_debug` by the SQNR of each activation across its own Q/DQ pair in the INT8 model run "
          f"end to end.\n\n" + markdown_table(rows))
    write_results(RESULTS / f"layer_error_{args.model}", results, md)
    print(md)


if __name__ == "__main__":
    main()
