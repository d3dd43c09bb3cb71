"""A bundle measured on another CPU: what ``optimize serve`` says at start-up, and ``--reselect``.

Builds the digits CNN with ``--target auto`` (every CPU target, benchmarked, a winner recorded),
then rewrites the manifest's record of where the winner was measured to an Intel Sapphire Rapids
(AMX) CPU, as if the bundle had been built there, and starts ``optimize serve`` twice: plainly
(the warning) and with ``--reselect`` (every gated target timed here, the fastest served). Each
server is stopped with SIGTERM once ready; the start-up lines are kept.

    python -m benchmarks.reselect [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks.common import environment, write_results
from optimize.cpu import parse_cpuinfo

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "cpuinfo" / "intel_sapphire_rapids_amx.txt"


def start_up_lines(bundle: Path, port: int, *flags: str) -> list[str]:
    """The server's log until it is ready, then SIGTERM."""
    command = [sys.executable, "-m", "optimize", "serve", str(bundle), "--port", str(port), "--drain-delay", "0", "--no-grpc",
               "--host", "127.0.0.1", *flags]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    return [line.split(" ", 2)[-1] for line in err.splitlines() if "serve:" in line]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    from models.digits import make_checkpoint

    work = Path(tempfile.mkdtemp(prefix="bench-reselect-"))
    make_checkpoint(work)
    bundle = work / "bundle"
    subprocess.run([sys.executable, "-m", "optimize", "build", str(work / "digits.pt"), "--arch",
                    "models.digits:DigitsNet", "--calib", str(work / "digits_calib.npz"), "--target", "auto",
                    "--out", str(bundle)], check=True, stdout=subprocess.DEVNULL)
    manifest = json.loads((bundle / "manifest.json").read_text())
    built_here = manifest["winner"]["target"]
    elsewhere = parse_cpuinfo(FIXTURE.read_text(), "x86_64").to_json()
    manifest["winner"]["measured_on"] = elsewhere
    manifest["machine"] = {**elsewhere, "system": manifest["machine"].get("system")}
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
    plain = start_up_lines(bundle, 18431)
    reselected = start_up_lines(bundle, 18432, "--reselect")
    results = {"winner_recorded": built_here, "recorded_cpu": elsewhere["cpu"], "plain": plain,
               "reselect": reselected, "environment": environment()}
    md = (f"# Serving a bundle measured on another CPU\n\n`python -m benchmarks.reselect`: the digits CNN built "
          f"with `--target auto` here (winner {built_here}), its record of where it was measured rewritten to "
          f"{elsewhere['cpu']}; served on {results['environment']['machine']['cpu']}.\n\n"
          "## `optimize serve bundle/`\n\n```\n" + "\n".join(plain) + "\n```\n\n"
          "## `optimize serve bundle/ --reselect`\n\n```\n" + "\n".join(reselected) + "\n```\n")
    write_results(Path(args.out) / "reselect", results, md)
    print(md)


if __name__ == "__main__":
    main()
