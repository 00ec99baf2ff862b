#!/usr/bin/env bash
# Create .venv and install diffutron with its test extras.
# torch is pinned and installed first: on CPU-only machines pip's configuration supplies a CPU
# wheel for this exact version; elsewhere the pin installs torch the normal way.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
