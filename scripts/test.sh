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
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0 -e '.[cpu,test]'
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
