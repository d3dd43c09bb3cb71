#!/usr/bin/env bash
# Install optimize for CPU into .venv, train the digits CNN on scikit-learn's real handwritten
# digits, build every target this machine can run, print the table, then benchmark every engine
# against torch eager (batch sweep, concurrency, open-loop arrivals) and name the winner.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${SKIP_INSTALL:-}" ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q --no-compile --disable-pip-version-check torch==2.13.0 -e '.[cpu]'
  .venv/bin/python -m compileall -q -j 0 .venv/lib >/dev/null 2>&1 || true  # on every core, not pip's one
  PYTHON=.venv/bin/python
fi
PYTHON=${PYTHON:-python3}
WORK=${WORK:-demo-output}
# The checkpoint is trained once; a rerun into the same folder reuses it.
[ -f "$WORK/digits.pt" ] || "$PYTHON" -m models.digits "$WORK"
"$PYTHON" -m optimize build "$WORK/digits.pt" --arch models.digits:DigitsNet \
  --calib "$WORK/digits_calib.npz" --eval-data "$WORK/digits_test.npz" --target all --out "$WORK/bundle"
"$PYTHON" -m optimize inspect "$WORK/bundle"
"$PYTHON" -m optimize bench "$WORK/bundle" --duration "${BENCH_DURATION:-2s}"
