"""Long texts served end to end: all-MiniLM-L6-v2 behind ``optimize serve``, against sentence-transformers.

Builds MiniLM with its tokenizer (``ort-fp32`` and ``openvino-int8``), serves each target, sends
texts of 8 to 300 words of standard-library docstrings in one request (mixed lengths, so the
batch is padded to its longest text), and compares every embedding with sentence-transformers'
own (``max_seq_length`` 256). The baseline in the same run is what a server cut at the
calibration length (64 tokens, the old behaviour) would answer: the same engine fed 64 tokens.
Reports the cosine per text, the tokens each text has, and the truncation counter.

    python -m benchmarks.text_length [--out benchmarks/results/text_length]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from benchmarks.common import environment, markdown_table, write_results

WORDS = (8, 40, 110, 300)
CALIBRATION_LENGTH = 64


def texts() -> list[str]:
    import argparse as a
    import csv
    import logging
    import textwrap
    import zipfile

    words = " ".join(m.__doc__ for m in (a, logging, csv, textwrap, zipfile)).split()
    return [" ".join(words[:n]) for n in WORDS]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_and_embed(bundle: Path, target: str, batch: list[str]) -> tuple[np.ndarray, dict, str]:
    """(embeddings, response parameters, the truncation counter's line) from a real server."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "optimize", "serve", str(bundle), "--target", target,
                               "--host", "127.0.0.1", "--port", str(port), "--no-grpc"], stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/v2/health/ready", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        body = json.dumps({"inputs": [{"name": "text", "shape": [len(batch), 1], "datatype": "BYTES",
                                       "data": batch}]}).encode()
        answer = json.loads(urllib.request.urlopen(urllib.request.Request(
            f"{url}/v2/models/minilm/infer", body, {"Content-Type": "application/json"})).read())
        metrics = urllib.request.urlopen(url + "/metrics").read().decode()
    finally:
        server.terminate()
        server.wait(60)
    output = answer["outputs"][0]
    counter = next(line for line in metrics.splitlines() if line.startswith("inference_text_truncated_total"))
    return np.asarray(output["data"], np.float64).reshape(output["shape"]), answer.get("parameters", {}), counter


def cut_at_calibration_length(bundle: Path, target: str, batch: list[str]) -> np.ndarray:
    """What a server that cut every text at the calibration length answered: the same engine, 64 tokens."""
    from optimize.bundle import load_runner, read_manifest
    from optimize.inputs.tokenizer import TextEncoder

    manifest = read_manifest(bundle)
    section = {**manifest.text, "max_length": CALIBRATION_LENGTH}
    feeds = TextEncoder(bundle, section, list(manifest.inputs)).encode(batch)
    with load_runner(bundle, target) as runner:
        return runner.infer(feeds)["output"].astype(np.float64)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/text_length"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    from models.minilm import make_checkpoint, model_dir
    from optimize.build.pipeline import run_build
    from optimize.build.plan import BuildPlan, DataConfig, SourceConfig

    batch = texts()
    reference_model = SentenceTransformer(str(model_dir()), device="cpu")
    reference = reference_model.encode(batch, normalize_embeddings=True).astype(np.float64)
    tokens = [len(reference_model.tokenizer(t)["input_ids"]) for t in batch]
    rows = [["target", "served", *[f"{w} words ({n} tokens)" for w, n in zip(WORDS, tokens)], "text_truncated"]]
    results: dict = {"environment": environment(), "words": list(WORDS), "tokens": tokens,
                     "sentence_transformers_max_seq_length": reference_model.max_seq_length, "targets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_checkpoint(folder)
        plan = BuildPlan(source=SourceConfig(folder / "minilm.pt", "models.minilm:MiniLM"), out=folder / "bundle",
                         targets=("ort-fp32", "openvino-int8"),
                         data=DataConfig(calib=str(folder / "minilm_text.npz"), tokenizer=str(folder / "tokenizer")),
                         name="minilm")
        result = run_build(plan)
        served_length = result.manifest.text["max_length"]
        for target in result.manifest.built_targets():
            served, parameters, counter = serve_and_embed(result.bundle, target, batch)
            old = cut_at_calibration_length(result.bundle, target, batch)
            now, before = cosine(served, reference), cosine(old, reference)
            results["targets"][target] = {"served_max_length": served_length, "cosine": now.tolist(),
                                          "cosine_cut_at_64": before.tolist(), "parameters": parameters,
                                          "counter": counter}
            rows.append([target, f"up to {served_length}", *[f"{c:.6f}" for c in now],
                         str(parameters.get("text_truncated", 0))])
            rows.append([target, f"cut at {CALIBRATION_LENGTH} (before)", *[f"{c:.6f}" for c in before], "-"])
    markdown = ("# Long texts served end to end: cosine to sentence-transformers\n\n"
                f"`python -m benchmarks.text_length`. sentence-transformers encodes at max_seq_length "
                f"{reference_model.max_seq_length}; the server at the length the build read from the model's files. "
                f"One request holds all four texts (padded to the longest).\n\n" + markdown_table(rows))
    write_results(args.out, results, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
