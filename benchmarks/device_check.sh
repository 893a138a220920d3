#!/usr/bin/env bash
# The GPU machine's entry point: install the carried wheels (.whl/, from `make device-wheels`) into
# /tmp/prtool-site without touching the machine's torch, then run benchmarks/device_check.py.
#   bash benchmarks/device_check.sh OUT [--budget S] [--only STEPS] [--smoke] [--dry-run]
# PYTHON overrides the interpreter (default python3, the one that holds PyTorch there).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import open_clip" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "open_clip is not installed and .whl/ holds no wheels: run 'make device-wheels' and carry .whl" >&2
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/prtool-site .whl/*.whl \
    || { echo "installing the carried wheels failed" >&2; exit 2; }
  export PYTHONPATH=/tmp/prtool-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
exec "$PY" benchmarks/device_check.py "$@"
