#!/usr/bin/env bash
# Install optimize with every CPU backend and the test tools into .venv, then run the tests.
# Arguments go to pytest: `scripts/test.sh -m "not slow and not service"` is the quick subset.
set -euo pipefail
cd "$(dirname "$0")/.."
# System packages (as root, when missing): a Docker engine and debootstrap for the container
# test, Prometheus (promtool) for the alert rules, libb64 for Triton's perf_analyzer.
if [ "$(id -u)" = 0 ] && ! { command -v dockerd && command -v debootstrap && command -v promtool \
        && ldconfig -p | grep -q libb64.so.0d; } >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends docker.io debootstrap prometheus libb64-0d >/dev/null
fi
python3 -m venv .venv
# pip byte-compiles every installed module on one core (about a minute here); compileall does the
# same on every core. (Without compiled modules every process compiles what it imports, and Ray's
# workers do it again in each trial: slower than compiling once.)
.venv/bin/pip install -q --no-compile --disable-pip-version-check torch==2.13.0 -e '.[cpu,search,test]'
.venv/bin/python -m compileall -q -j 0 .venv/lib >/dev/null 2>&1 || true  # a few vendored files are not Python 3
# A real Triton server (PyTriton) for the conformance tests, in a virtualenv of its own so that its
# pins meet nothing of ours.
if [ ! -x .venv-triton/bin/python ] || ! .venv-triton/bin/python -c "import pytriton, onnxruntime" 2>/dev/null; then
    python3 -m venv .venv-triton
    .venv-triton/bin/pip install -q --disable-pip-version-check nvidia-pytriton==0.7.0 onnxruntime==1.32.0 \
        || echo "PyTriton could not be installed: the conformance tests will skip" >&2
fi
# Triton's perf_analyzer (installed with tritonclient) loads a CUDA runtime library to start, no GPU:
# kept in a folder of its own, as the CPU install holds no CUDA wheels.
if [ ! -e .venv-perf/nvidia/cuda_runtime/lib/libcudart.so.12 ]; then
    .venv/bin/pip install -q --no-compile --disable-pip-version-check --target .venv-perf 'nvidia-cuda-runtime-cu12>=12,<13' \
        || echo "the CUDA runtime for perf_analyzer could not be installed: its tests will skip" >&2
fi
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=25 "$@"
