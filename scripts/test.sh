#!/usr/bin/env bash
# Install optimize with every CPU backend and the test tools into .venv, then run the tests.
# Arguments go to pytest: `scripts/test.sh -m "not slow and not service"` is the quick subset.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0 -e '.[cpu,test]'
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
