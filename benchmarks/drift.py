"""Drift monitoring: detection delay per shift and scale, false alarms, estimated accuracy, cost.

Streams of requests go through the product's own ``DriftMonitor`` (features, window scales,
bootstrap thresholds and accuracy estimate as the server runs them), with profiles made by the
product's ``profile_from_outputs`` from the ``ort-fp32`` engine's outputs.

The world each stream comes from is a finite pool of real data, and a reference is drawn from
that pool as a held-out set is drawn from the world; traffic is drawn from the same pool with
replacement. (Traffic from a pool kept apart from the reference would differ from it by that
pool's own sampling noise, which 2,000-sample windows see: a shift of the benchmark, not of the
world. Drawing the reference without replacement from the pool makes the long scales slightly
conservative.)

Digits CNN (scikit-learn's real digits, the reference ``DigitsNet``): trained on half the images;
the other half (899) is the pool, and each of ``--draws`` references is 250 of them, with labels
for the confidence calibration. Shifts, applied to the pool's images: Gaussian noise (std 0.25),
brightness +0.15, a class prior (only digits 0-2), rotation by 15 degrees, a shear (0.3), one
quarter of the image blanked (a random quadrant per image), a Gaussian blur (sigma 0.7 pixel). The
labels are used only here: for each shift's accuracy and to score the estimated accuracy.

MiniLM (the real all-MiniLM-L6-v2): the pool is the standard-library docstring corpus; shifts are
docstring paragraphs of other modules, the corpus sentences truncated to their first third, and
code identifiers.

Each detection stream: unshifted traffic for 2,000 requests plus a random offset (0-1,999, so the
shift starts anywhere relative to every scale's windows), then ``--after`` shifted requests. The
delay is the number of requests from the first shifted one to the one that closed the first
alarming window; a stream with no alarm by then counts as missed. False alarms: ``--null-requests``
unshifted requests per reference draw, through the same monitor.

Cost: ``observe`` per single-sample batch (the held-out images in turn), in microseconds, and the server's throughput at
concurrency 4 with monitoring on and off (two servers, rounds interleaved).

    python -m benchmarks.drift [--streams 100] [--null-requests 400000] [--draws 5]
"""

from __future__ import annotations

import argparse
import importlib
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import environment, markdown_table, write_results
from benchmarks.drift_streams import (BEFORE, ESTIMATE_SCALE, Pool, detection, false_alarms, fast_window_cost, infer_pool,
                                      summarise)
from optimize.drift.profile import profile_from_outputs
from optimize.build.pipeline import run_build
from optimize.build.plan import BuildPlan, DataConfig, SourceConfig
from optimize.targets.base import RunnerConfig
from serve.monitor import DriftMonitor

IMAGE_SHIFTS = ("noise", "brightness", "prior", "rotate15", "shear", "occlude_quarter", "blur")
TEXT_SHIFTS = ("other docstrings", "truncated sentences", "code identifiers")


def shifted(kind: str, images: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    from scipy import ndimage

    def each(transform) -> np.ndarray:
        return np.clip(np.stack([transform(img[0])[None] for img in images]), 0, 1).astype(np.float32)

    if kind == "noise":
        return np.clip(images + rng.normal(0, 0.25, images.shape), 0, 1).astype(np.float32), labels
    if kind == "brightness":
        return np.clip(images + 0.15, 0, 1).astype(np.float32), labels
    if kind == "prior":
        keep = labels <= 2
        return images[keep], labels[keep]
    if kind == "rotate15":
        return each(lambda im: ndimage.rotate(im, 15, reshape=False, order=1, mode="constant")), labels
    if kind == "shear":
        centre = np.array([3.5, 3.5])
        matrix = np.array([[1.0, 0.0], [0.3, 1.0]])
        return each(lambda im: ndimage.affine_transform(im, matrix, offset=centre - matrix @ centre, order=1)), labels
    if kind == "occlude_quarter":
        out = images.copy()
        for img, quadrant in zip(out, rng.integers(0, 4, len(out))):
            r, c = divmod(int(quadrant), 2)
            img[0, 4 * r:4 * r + 4, 4 * c:4 * c + 4] = 0
        return out, labels
    if kind == "blur":
        return each(lambda im: ndimage.gaussian_filter(im, 0.7)), labels
    return images, labels


def _said(model: str, row: dict) -> None:
    print(f"{model} draw {row['draw']}: {row['false_alarms']['requests_per_false_alarm']:.0f} requests per false "
          f"alarm", {s: v["alarm_rate"] for s, v in row["false_alarms"]["per_scale"].items()}, flush=True)


def _summarise_shifts(out: dict, profile, records: dict[str, list], window: int) -> None:
    out["scales"] = [s.samples for s in profile.plan_scales(window)]
    for kind, found in records.items():
        out["shifts"][kind] = summarise(found, out["scales"])
        print(kind, out["shifts"][kind], flush=True)


def digits(work: Path, args: argparse.Namespace) -> dict:
    import torch
    from sklearn.datasets import load_digits

    from models.digits import DigitsNet, train
    from optimize.bundle import load_runner

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)[:, None]
    labels = data.target.astype(np.int64)
    order = np.random.default_rng(1).permutation(len(images))
    half = len(images) // 2
    train_idx, world = order[:half], order[half:]
    np.random.seed(0)
    model = train(DigitsNet(), images[train_idx], labels[train_idx], epochs=30)
    torch.save(model.state_dict(), work / "digits.pt")
    np.savez(work / "world.npz", x=images[world], labels=labels[world])
    bundle = run_build(BuildPlan(source=SourceConfig(work / "digits.pt", "models.digits:DigitsNet"), out=work / "bundle",
                                 targets=("ort-fp32",), data=DataConfig(calib=str(work / "world.npz"),
                                                                        held_out_fraction=0.3),
                                 runner=RunnerConfig(threads=2))).bundle
    runner = load_runner(bundle, "ort-fp32")
    rng = np.random.default_rng(2)
    normal = infer_pool(runner, {"x": images[world]}, labels[world])
    pools = {k: infer_pool(runner, {"x": x}, y) for k in IMAGE_SHIFTS for x, y in [shifted(k, images[world], labels[world], rng)]}
    runner.close()

    def accuracy(pool: Pool) -> float:
        return float((pool.outputs["output"].argmax(axis=1) == pool.labels).mean())

    spec_in = [{"name": "x", "shape": [-1, 1, 8, 8], "dtype": "float32"}]
    spec_out = [{"name": "output", "shape": [-1, 10]}]
    result: dict = {"pool": normal.size, "reference": args.reference, "accuracy": accuracy(normal),
                    "shift_accuracy": {k: accuracy(p) for k, p in pools.items()}, "draws": [], "shifts": {}}
    records: dict[str, list] = {k: [] for k in IMAGE_SHIFTS}
    per_draw = max(1, args.streams // args.draws)
    for draw in range(args.draws):
        chosen = rng.choice(normal.size, size=args.reference, replace=False)
        feeds, outputs = normal.take(chosen)
        started = time.perf_counter()
        profile = profile_from_outputs("ort-fp32", feeds, outputs, spec_in, spec_out, "classify",
                                       labels=normal.labels[chosen])
        DriftMonitor(profile, "bench", "v", args.window)  # calibrates the profile's test once
        row = {"draw": draw, "calibration_s": time.perf_counter() - started, "calibration": profile.calibration,
               "features": len(profile.features),
               "false_alarms": false_alarms(profile, normal, args.null_requests, args.window, rng)}
        row["fast_window"] = {k: fast_window_cost(profile, pools[k], args.window, rng,
                                                  profile.plan_scales(args.window)[0].alpha)
                              for k in IMAGE_SHIFTS} if draw == 0 else None
        for kind in IMAGE_SHIFTS:
            records[kind] += detection(profile, normal, pools[kind], per_draw, args.after, args.window, rng,
                                       result["shift_accuracy"][kind])
        result["draws"].append(row)
        _said("digits", row)
    _summarise_shifts(result, profile, records, args.window)
    result["bundle"] = str(bundle)
    return result


def code_identifiers(count: int, rng: np.random.Generator) -> list[str]:
    names = sorted({n for m in ("os", "json", "socket", "asyncio", "collections", "typing", "subprocess", "inspect",
                                "threading", "pathlib", "email", "logging", "http.client", "unittest")
                    for n in dir(importlib.import_module(m)) if len(n) > 3})
    return [" ".join(rng.choice(names, size=int(rng.integers(3, 9)))) for _ in range(count)]


def _padded(feeds: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
    return {k: np.pad(v, ((0, 0), (0, length - v.shape[1]))) for k, v in feeds.items()}


def minilm(work: Path, args: argparse.Namespace) -> dict:
    from models.minilm import corpus, extra_corpus, make_checkpoint
    from optimize.bundle import load_runner, read_manifest
    from optimize.inputs.tokenizer import TextEncoder

    make_checkpoint(work)
    bundle = run_build(BuildPlan(source=SourceConfig(work / "minilm.pt", "models.minilm:MiniLM"), out=work / "bundle",
                                 targets=("ort-fp32",), data=DataConfig(calib=str(work / "minilm_text.npz"),
                                                                        held_out_fraction=0.5, max_held_out=600,
                                                                        tokenizer=str(work / "tokenizer")),
                                 runner=RunnerConfig(threads=2))).bundle
    manifest = read_manifest(bundle)
    encoder = TextEncoder.from_manifest(bundle, manifest)
    runner = load_runner(bundle, "ort-fp32")
    rng = np.random.default_rng(3)
    texts = corpus()
    sources = {"world": texts, "other docstrings": extra_corpus()[:600],
               "truncated sentences": [" ".join(t.split()[:max(1, len(t.split()) // 3)]) for t in texts],
               "code identifiers": code_identifiers(600, rng)}
    encoded = {k: encoder.encode(v) for k, v in sources.items()}
    length = max(next(iter(f.values())).shape[1] for f in encoded.values())
    pools = {k: infer_pool(runner, _padded(f, length)) for k, f in encoded.items()}
    runner.close()
    normal = pools.pop("world")
    inputs = [s.to_json() for s in manifest.inputs]
    outputs_spec = [{"name": o["name"], "shape": o["shape"]} for o in manifest.outputs]
    reference = int(manifest.data["held_out_samples"])
    out: dict = {"pool": normal.size, "reference": reference, "draws": [], "shifts": {}}
    records: dict[str, list] = {k: [] for k in TEXT_SHIFTS}
    draws = max(1, args.draws - 2)
    for draw in range(draws):
        chosen = rng.choice(normal.size, size=reference, replace=False)
        feeds, produced = normal.take(chosen)
        profile = profile_from_outputs("ort-fp32", feeds, produced, inputs, outputs_spec, manifest.task,
                                       pad_id=manifest.text["pad_id"])
        row = {"draw": draw, "false_alarms": false_alarms(profile, normal, args.null_requests // 2, args.window, rng)}
        for kind in TEXT_SHIFTS:
            records[kind] += detection(profile, normal, pools[kind], max(1, args.streams // draws // 2), args.after,
                                       args.window, rng, None)
        out["draws"].append(row)
        _said("minilm", row)
    _summarise_shifts(out, profile, records, args.window)
    return out


def cost(bundle: Path, args: argparse.Namespace) -> dict:
    from benchmarks.bench_serve import ServerProcess, client_for
    from optimize.bench.load import closed_loop
    from optimize.bundle import load_runner
    from optimize.drift.profile import Profile

    profile = Profile.load(bundle, "ort-fp32")
    monitors = {"all scales": DriftMonitor(profile, "digits", "v", args.window),
                "fast window only": DriftMonitor(profile, "digits", "v", args.window, (args.window,))}
    runner = load_runner(bundle, "ort-fp32")
    held = np.load(bundle / "data" / "heldout.npz")["x"]
    requests = [({"x": held[i:i + 1]}, runner.infer({"x": held[i:i + 1]})) for i in range(len(held))]
    runner.close()
    for monitor in monitors.values():
        for i in range(2000):  # one held-out image per request, in turn, as served traffic
            monitor.observe(*requests[i % len(requests)])
    per_round: dict[str, list[float]] = {k: [] for k in monitors}
    for _ in range(args.rounds):  # rounds interleaved between the two monitors
        for name, monitor in monitors.items():
            start = time.perf_counter()
            for i in range(4000):
                monitor.observe(*requests[i % len(requests)])
            per_round[name].append((time.perf_counter() - start) / 4000 * 1e6)
    per_call_us = float(np.median(per_round["all scales"]))  # window tests and binning amortised over requests
    servers = {"on": ServerProcess(bundle, "ort-fp32"), "off": ServerProcess(bundle, "ort-fp32", "--no-drift")}
    rates: dict[str, list[float]] = {"on": [], "off": []}
    try:
        clients = {k: client_for(bundle, s.url) for k, s in servers.items()}
        for _ in range(args.rounds):
            for k, (client, feeds) in clients.items():
                rates[k].append(closed_loop(lambda b, c=client, f=feeds: c.infer(f), 4, 3.0).summary()["requests_per_s"])
    finally:
        for server in servers.values():
            server.stop()
    ratio = [a / b for a, b in zip(rates["on"], rates["off"])]
    return {"observe_us_per_request": per_call_us, "observe_us_per_round": per_round,
            "observe_fast_only_us": float(np.median(per_round["fast window only"])), "requests_per_s": rates,
            "on_over_off": ratio,
            "on_over_off_median": float(np.median(ratio)),
            "on_over_off_iqr": [float(np.percentile(ratio, 25)), float(np.percentile(ratio, 75))]}


def _delay(value) -> str:
    return "-" if value is None else f"{value:g}"


def _shift_rows(part: dict, kinds: tuple[str, ...], accuracy: bool) -> list[list[str]]:
    scales = part["scales"]
    head = ["shift", *(["accuracy", "drop (points)"] if accuracy else []),
            *[f"scale {s}: detected / median delay" for s in scales],
            "any scale: within 200 / within 1,000 / median delay"]
    head += ["accuracy MAE (points): estimate / mean tempered conf. / mean raw conf."] if accuracy else []
    rows = [head]
    for kind in kinds:
        got = part["shifts"][kind]
        row = [kind]
        if accuracy:
            acc = part["shift_accuracy"][kind]
            row += [f"{acc * 100:.1f}%", f"{(part['accuracy'] - acc) * 100:.1f}"]
        row += [f"{got['per_scale'][s]['detected'] * 100:.0f}% / {_delay(got['per_scale'][s]['median_delay'])}"
                for s in scales]
        row.append(f"{got['any']['within_200'] * 100:.0f}% / {got['any']['within_1000'] * 100:.0f}% / "
                   f"{_delay(got['any']['median_delay'])}")
        if accuracy:
            row.append(f"{got['estimate_mae']:.1f} / {got['calibrated_confidence_mae']:.1f} / "
                       f"{got['raw_confidence_mae']:.1f}")
        rows.append(row)
    return rows


def _false_alarm_rows(part: dict) -> tuple[list[list[str]], str]:
    scales = part["scales"]
    rows = [["reference draw", *[f"scale {s}: alarmed windows (alpha)" for s in scales],
             "unshifted requests per false alarm"]]
    for d in part["draws"]:
        fa = d["false_alarms"]
        rows.append([str(d["draw"]), *[f"{fa['per_scale'][s]['alarms']}/{fa['per_scale'][s]['windows']} = "
                                       f"{fa['per_scale'][s]['alarm_rate'] * 100:.3f}% ({fa['per_scale'][s]['alpha'] * 100:.3f}%)"
                                       for s in scales],
                     f"{fa['requests_per_false_alarm']:.0f}"])
    total = sum(d["false_alarms"]["requests"] for d in part["draws"])
    alarms = sum(d["false_alarms"]["alarms"] for d in part["draws"])
    rates = {s: [d["false_alarms"]["per_scale"][s]["alarm_rate"] for d in part["draws"]] for s in scales}
    note = (f"All draws: {total} unshifted requests, {alarms} false alarms: "
            f"{total / alarms if alarms else float('inf'):.0f} requests per false alarm. Per scale, mean / worst draw: "
            + ", ".join(f"{s}: {np.mean(r) * 100:.3f}% / {max(r) * 100:.3f}%" for s, r in rates.items()) + ".\n")
    return rows, note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument("--streams", type=int, default=100, help="Detection streams per shift (digits; half for text).")
    parser.add_argument("--after", type=int, default=2400, help="Shifted requests per stream.")
    parser.add_argument("--null-requests", type=int, default=400000, help="Unshifted requests per reference draw.")
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--reference", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--skip-cost", action="store_true")
    parser.add_argument("--cost-only", type=Path, metavar="BUNDLE",
                        help="Measure only the cost, on this digits bundle (results in drift_cost.*).")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if args.cost_only:
        c = cost(args.cost_only, args)
        md = (f"# Drift monitoring: cost\n\n`python -m benchmarks.drift --cost-only BUNDLE`\n\n"
              f"`observe` per single-request batch (held-out images in turn; per round the mean of 4000, "
              f"{args.rounds} rounds interleaved): {c['observe_us_per_request']:.1f} us median (rounds "
              f"{min(c['observe_us_per_round']['all scales']):.1f}-{max(c['observe_us_per_round']['all scales']):.1f}), "
              f"against {c['observe_fast_only_us']:.1f} us for the fast window alone.\n"
              f"Server throughput at concurrency 4, monitoring on / off, per round: "
              + ", ".join(f"{r:.3f}" for r in c["on_over_off"])
              + f" (median {c['on_over_off_median']:.3f}, interquartile {c['on_over_off_iqr'][0]:.3f}-"
                f"{c['on_over_off_iqr'][1]:.3f}).\n")
        write_results(Path(args.out) / "drift_cost", {"cost": c, "args": {k: str(v) for k, v in vars(args).items()},
                                                      "environment": environment()}, md)
        print(md)
        return
    work = Path(tempfile.mkdtemp(prefix="bench-drift-"))
    (work / "digits").mkdir()
    result = {"digits": digits(work / "digits", args)}
    if not args.skip_minilm:
        (work / "minilm").mkdir()
        result["minilm"] = minilm(work / "minilm", args)
    if not args.skip_cost:
        result["cost"] = cost(Path(result["digits"]["bundle"]), args)

    d = result["digits"]
    command = (f"python -m benchmarks.drift --streams {args.streams} --null-requests {args.null_requests} "
               f"--draws {args.draws}")
    md = (f"# Drift monitoring\n\n`{command}`\n\n"
          f"## Digits CNN: detection per shift and scale\n\n"
          f"Pool of {d['pool']} images (accuracy {d['accuracy'] * 100:.1f}%), {args.draws} reference draws of "
          f"{d['reference']}, {d['shifts'][IMAGE_SHIFTS[0]]['streams']} streams per shift; each stream "
          f"{BEFORE}-{2 * BEFORE - 1} unshifted requests, then {args.after} shifted. Delay: requests from the first "
          f"shifted one to the first alarm. Estimated accuracy: every {ESTIMATE_SCALE}-sample window wholly "
          f"inside the shift, against the shifted pool's true accuracy.\n\n"
          + markdown_table(_shift_rows(d, IMAGE_SHIFTS, True)))
    rows, note = _false_alarm_rows(d)
    md += "\n## Digits CNN: false alarms on unshifted traffic\n\n" + markdown_table(rows) + "\n" + note
    fast = d["draws"][0]["fast_window"]
    md += ("\nWhat the fast window's smaller alpha costs (draw 0; share of wholly shifted 20-sample windows that "
           "alarm, at this alpha / at the former 1%): "
           + ", ".join(f"{k}: {v['alpha'] * 100:.0f}% / {v['one_percent'] * 100:.0f}%" for k, v in fast.items()) + ".\n")
    md += ("\nConfidence calibration, cross-fitted on each reference (two folds; fitted on one half, checked on "
           "the other): " + "; ".join(
               f"draw {r['draw']}: T {r['calibration']['temperature']:.2f}, accuracy "
               f"{r['calibration']['check']['accuracy'] * 100:.1f}%, estimate {r['calibration']['check']['estimated'] * 100:.1f}%, "
               f"mean tempered conf. {r['calibration']['check']['calibrated_confidence'] * 100:.1f}%, raw "
               f"{r['calibration']['check']['raw_confidence'] * 100:.1f}%; ECE {r['calibration']['check']['ece'] * 100:.1f} "
               f"(raw {r['calibration']['check']['ece_raw'] * 100:.1f})" for r in d["draws"])
           + f". Calibrating the three scales' thresholds: {np.median([r['calibration_s'] for r in d['draws']]):.1f} s "
             f"(median over draws) for {d['draws'][0]['features']} features.\n")
    if "minilm" in result:
        m = result["minilm"]
        md += (f"\n## MiniLM: detection per shift and scale\n\nPool of {m['pool']} docstring sentences, "
               f"{len(m['draws'])} reference draws of {m['reference']}, {m['shifts'][TEXT_SHIFTS[0]]['streams']} streams "
               f"per shift.\n\n" + markdown_table(_shift_rows(m, TEXT_SHIFTS, False)))
        rows, note = _false_alarm_rows(m)
        md += "\n## MiniLM: false alarms on unshifted traffic\n\n" + markdown_table(rows) + "\n" + note
    if "cost" in result:
        c = result["cost"]
        md += (f"\n## Cost\n\n`observe` per single-request batch: {c['observe_us_per_request']:.1f} us median over "
               f"{args.rounds} rounds, against {c['observe_fast_only_us']:.1f} us for the fast window alone.\n"
               f"Server throughput at concurrency 4, monitoring on / off, per round: "
               + ", ".join(f"{r:.3f}" for r in c["on_over_off"])
               + f" (median {c['on_over_off_median']:.3f}, interquartile {c['on_over_off_iqr'][0]:.3f}-"
                 f"{c['on_over_off_iqr'][1]:.3f}).\n")
    write_results(Path(args.out) / "drift", {**result, "args": vars(args), "environment": environment()}, md)
    print(md)


if __name__ == "__main__":
    main()
