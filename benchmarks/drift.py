"""Drift monitoring: false alarms on unshifted traffic, detection of real shifts, and its cost.

Digits CNN (scikit-learn's real digits): trained on half the images; of the other half, a
reference pool (profiles are drawn from it, five draws of ``--reference`` images each) and a
traffic pool kept apart from both training and reference. Windows of ``--window`` requests are
sampled with replacement from the traffic pool, unshifted or shifted:
- Gaussian noise, std 0.25 on these [0, 1] pixels (std 0.5 on a [-1, 1] scale), clipped to [0, 1];
- brightness +0.15 (+0.3 on a [-1, 1] scale), clipped;
- class prior: only digits 0, 1 and 2 arrive.
The profile and the test are the product's own (``build_profile`` through the ``ort-fp32``
Runner, ``WindowTest``); the delay is the number of requests until the first alarm in a stream.

MiniLM (the real all-MiniLM-L6-v2): the reference is English prose (standard-library docstrings);
unshifted traffic is other docstrings, shifted traffic is code identifiers (names defined in
standard-library modules, a few per request).

Cost: the monitor's ``observe`` per single-sample batch, in microseconds, and the server's
throughput at concurrency 4 with monitoring on and off (two servers, rounds interleaved).

    python -m benchmarks.drift [--window 20] [--windows 1000]
"""

from __future__ import annotations

import argparse
import importlib
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import environment, markdown_table, write_results
from optimize.drift.profile import build_profile
from optimize.pipeline import run_build
from optimize.plan import BuildPlan, DataConfig, SourceConfig
from optimize.targets.base import RunnerConfig

SHIFTS = ("none", "noise", "brightness", "prior")


def shifted(kind: str, images: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    if kind == "noise":
        return np.clip(images + rng.normal(0, 0.25, images.shape), 0, 1).astype(np.float32), labels
    if kind == "brightness":
        return np.clip(images + 0.15, 0, 1).astype(np.float32), labels
    if kind == "prior":
        keep = labels <= 2
        return images[keep], labels[keep]
    return images, labels


def windows_of(bins: np.ndarray, test, window: int, count: int, rng: np.random.Generator) -> list:
    picks = rng.integers(0, len(bins), size=(count, window))
    return [test.test(test.counts(bins[p]), window) for p in picks]


def delay(bins: np.ndarray, test, window: int, rng: np.random.Generator, streams: int = 50, limit: int = 50) -> float:
    """Median requests until the first alarm in a stream of tumbling windows (None if never in ``limit``)."""
    found = []
    for _ in range(streams):
        for k in range(limit):
            if test.test(test.counts(bins[rng.integers(0, len(bins), size=window)]), window).alarm:
                found.append((k + 1) * window)
                break
        else:
            found.append(float("inf"))
    return float(np.median(found))


def digits(work: Path, args: argparse.Namespace) -> dict:
    import torch

    from models.digits import DigitsNet, train
    from optimize.bundle import load_runner
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)[:, None]
    labels = data.target.astype(np.int64)
    order = np.random.default_rng(1).permutation(len(images))
    half = len(images) // 2
    train_idx, rest = order[:half], order[half:]
    reference_pool, traffic = rest[:len(rest) // 2], rest[len(rest) // 2:]
    np.random.seed(0)
    model = train(DigitsNet(), images[train_idx], labels[train_idx], epochs=30)
    torch.save(model.state_dict(), work / "digits.pt")
    np.savez(work / "reference.npz", x=images[reference_pool])
    bundle = run_build(BuildPlan(source=SourceConfig(work / "digits.pt", "models.digits:DigitsNet"), out=work / "bundle",
                                 targets=("ort-fp32",), data=DataConfig(calib=str(work / "reference.npz"),
                                                                        held_out_fraction=0.5),
                                 runner=RunnerConfig(threads=2)), say=print).bundle
    runner = load_runner(bundle, "ort-fp32")
    spec_in = [{"name": "x", "shape": [-1, 1, 8, 8], "dtype": "float32"}]
    spec_out = [{"name": "output", "shape": [-1, 10]}]
    rng = np.random.default_rng(2)
    results: dict = {"reference_pool": len(reference_pool), "traffic_pool": len(traffic), "draws": []}
    for draw in range(args.draws):
        chosen = rng.choice(reference_pool, size=args.reference, replace=False)
        profile = build_profile("ort-fp32", runner, {"x": images[chosen]}, spec_in, spec_out, "classify")
        test = profile.window_test(args.alpha)
        row = {"draw": draw, "threshold": test.threshold(args.window)}
        for kind in SHIFTS:
            x, _ = shifted(kind, images[traffic], labels[traffic], rng)
            bins = profile.sample_bins({"x": x}, runner.infer({"x": x}))
            got = windows_of(bins, test, args.window, args.windows, rng)
            rate = float(np.mean([r.alarm for r in got]))
            row[kind] = {"alarm_rate": rate,
                         "delay_requests": delay(bins, test, args.window, rng) if kind != "none" else None,
                         "top_feature": profile.names[int(np.argmin(np.mean([r.p_values for r in got], axis=0)))]}
        results["draws"].append(row)
        print({k: (v["alarm_rate"] if isinstance(v, dict) else v) for k, v in row.items()})
    runner.close()
    results["bundle"] = str(bundle)
    return results


def code_identifiers(count: int, rng: np.random.Generator) -> list[str]:
    names = sorted({n for m in ("os", "json", "socket", "asyncio", "collections", "typing", "subprocess", "inspect",
                                "threading", "pathlib", "email", "logging", "http.client", "unittest")
                    for n in dir(importlib.import_module(m)) if len(n) > 3})
    return [" ".join(rng.choice(names, size=int(rng.integers(3, 9)))) for _ in range(count)]


def minilm(work: Path, args: argparse.Namespace) -> dict:
    from models.minilm import corpus, extra_corpus, make_checkpoint
    from optimize.bundle import load_runner, read_manifest
    from optimize.tokenizer import TextEncoder

    make_checkpoint(work)
    bundle = run_build(BuildPlan(source=SourceConfig(work / "minilm.pt", "models.minilm:MiniLM"), out=work / "bundle",
                                 targets=("ort-fp32",), data=DataConfig(calib=str(work / "minilm_text.npz"),
                                                                        held_out_fraction=0.5, max_held_out=600,
                                                                        tokenizer=str(work / "tokenizer")),
                                 runner=RunnerConfig(threads=2)), say=print).bundle
    from optimize.drift.profile import Profile

    profile = Profile.load(bundle, "ort-fp32")
    encoder = TextEncoder.from_manifest(bundle, read_manifest(bundle))
    runner = load_runner(bundle, "ort-fp32")
    rng = np.random.default_rng(3)
    # Unshifted: the corpus texts the build did not hold out (same split, same seed), disjoint from
    # the reference. A mild real shift: other docstring paragraphs (longer, from other modules).
    from optimize.calibration import Samples

    text = np.load(work / "minilm_text.npz")
    unshifted, _ = Samples({k: text[k] for k in text.files}).split(0.5, seed=0, max_held_out=600)
    held_texts = set(corpus())
    prose = [t for t in extra_corpus() if t not in held_texts][:400]
    code = code_identifiers(400, rng)
    test = profile.window_test(args.alpha)
    out = {"reference_samples": int(len(profile.reference_bins)), "threshold": test.threshold(args.window),
           "unshifted_samples": len(unshifted)}
    for kind, feeds in (("corpus, not held out (unshifted)", unshifted.arrays),
                        ("other docstring paragraphs", encoder.encode(prose)),
                        ("code identifiers", encoder.encode(code))):
        texts = next(iter(feeds.values()))
        bins = np.concatenate([profile.sample_bins({k: v[s:s + 32] for k, v in feeds.items()},
                                                   runner.infer({k: v[s:s + 32] for k, v in feeds.items()}))
                               for s in range(0, len(texts), 32)])
        got = windows_of(bins, test, args.window, args.windows, rng)
        out[kind] = {"alarm_rate": float(np.mean([r.alarm for r in got])),
                     "delay_requests": delay(bins, test, args.window, rng) if "unshifted" not in kind else None,
                     "top_feature": profile.names[int(np.argmin(np.mean([r.p_values for r in got], axis=0)))]}
        print(kind, out[kind])
    runner.close()
    return out


def cost(bundle: Path, args: argparse.Namespace) -> dict:
    from benchmarks.bench_serve import ServerProcess, client_for
    from optimize.bench.load import closed_loop
    from optimize.bundle import load_runner
    from optimize.drift.profile import Profile
    from serve.monitor import DriftMonitor

    profile = Profile.load(bundle, "ort-fp32")
    monitor = DriftMonitor(profile, "digits", "v", args.window)
    runner = load_runner(bundle, "ort-fp32")
    x = np.load(bundle / "data" / "heldout.npz")["x"][:1]
    outputs = runner.infer({"x": x})
    runner.close()
    for _ in range(200):
        monitor.observe({"x": x}, outputs)
    samples = []
    for _ in range(2000):
        start = time.perf_counter()
        monitor.observe({"x": x}, outputs)
        samples.append(time.perf_counter() - start)
    per_call_us = float(np.mean(samples) * 1e6)  # the mean: window tests and binning are amortised over requests
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
    return {"observe_us_per_request": per_call_us, "requests_per_s": rates, "on_over_off": ratio,
            "on_over_off_median": float(np.median(ratio))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument("--windows", type=int, default=1000)
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--reference", type=int, default=250)
    parser.add_argument("--alpha", type=float, default=0.01)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-drift-"))
    (work / "digits").mkdir()
    result = {"digits": digits(work / "digits", args)}
    if not args.skip_minilm:
        (work / "minilm").mkdir()
        result["minilm"] = minilm(work / "minilm", args)
    result["cost"] = cost(Path(result["digits"]["bundle"]), args)

    draws = result["digits"]["draws"]
    rows = [["reference draw", "threshold (min p)", *[f"{k}: alarm rate" for k in SHIFTS], "delay (requests): noise / brightness / prior"]]
    for d in draws:
        rows.append([str(d["draw"]), f"{d['threshold']:.5f}", *[f"{d[k]['alarm_rate'] * 100:.1f}%" for k in SHIFTS],
                     " / ".join(f"{d[k]['delay_requests']:g}" for k in SHIFTS[1:])])
    means = {k: float(np.mean([d[k]["alarm_rate"] for d in draws])) for k in SHIFTS}
    rows.append(["mean", "", *[f"{means[k] * 100:.1f}%" for k in SHIFTS], ""])
    worst_false = max(d["none"]["alarm_rate"] for d in draws)
    md = (f"# Drift monitoring\n\n`python -m benchmarks.drift --window {args.window} --windows {args.windows}`\n\n"
          f"## Digits CNN, windows of {args.window} requests, alpha {args.alpha:g}\n\n"
          f"{args.draws} reference draws of {args.reference} images; {args.windows} windows per row, sampled with "
          f"replacement from a traffic pool of {result['digits']['traffic_pool']} images kept apart from training "
          f"and reference.\n\n" + markdown_table(rows)
          + f"\nFalse alarms: {means['none'] * 100:.2f}% averaged over draws, {worst_false * 100:.2f}% for the worst draw.\n"
          + "Strongest feature per shift (draw 0): " + ", ".join(f"{k}: {draws[0][k]['top_feature']}" for k in SHIFTS[1:])
          + "\n")
    if "minilm" in result:
        m = result["minilm"]
        md += (f"\n## MiniLM, windows of {args.window} texts\n\n"
               + markdown_table([["traffic", "alarm rate", "delay (requests)", "strongest feature"],
                                 *[[k, f"{m[k]['alarm_rate'] * 100:.1f}%", "-" if m[k]["delay_requests"] is None
                                    else f"{m[k]['delay_requests']:g}", m[k]["top_feature"]]
                                   for k in ("corpus, not held out (unshifted)", "other docstring paragraphs",
                                             "code identifiers")]]))
    c = result["cost"]
    md += (f"\n## Cost\n\n`observe` per single-request batch: {c['observe_us_per_request']:.1f} us (mean of 2000, "
           f"with the binning and the window test of every 20th request).\n"
           f"Server throughput at concurrency 4, monitoring on / off, per round: "
           + ", ".join(f"{r:.3f}" for r in c["on_over_off"]) + f" (median {c['on_over_off_median']:.3f}).\n")
    write_results(Path(args.out) / "drift", {**result, "args": vars(args), "environment": environment()}, md)
    print(md)


if __name__ == "__main__":
    main()
