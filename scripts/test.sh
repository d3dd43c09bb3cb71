#!/usr/bin/env bash
# Install optimize with every CPU backend and the test tools into .venv, then run the tests.
# Arguments go to pytest: `scripts/test.sh -m "not slow and not service"` is the quick subset.
set -euo pipefail
cd "$(dirname "$0")/.."
# System packages (as root, when missing): a Docker engine and debootstrap for the container
# test, Prometheus (promtool) for the alert rules.
if [ "$(id -u)" = 0 ] && ! { command -v dockerd && command -v debootstrap && command -v promtool; } >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends docker.io debootstrap prometheus >/dev/null
fi
python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0 -e '.[cpu,search,test]'
# A real Triton server (PyTriton) for the conformance tests, in a virtualenv of its own so that its
# pins meet nothing of ours.
if [ ! -x .venv-triton/bin/python ] || ! .venv-triton/bin/python -c "import pytriton, onnxruntime" 2>/dev/null; then
    python3 -m venv .venv-triton
    .venv-triton/bin/pip install -q --disable-pip-version-check nvidia-pytriton==0.7.0 onnxruntime==1.32.0 \
        || echo "PyTriton could not be installed: the conformance tests will skip" >&2
fi
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=25 "$@"
