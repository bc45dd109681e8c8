#!/usr/bin/env bash
# Set-up on a fresh machine, idempotent: a virtual environment at .venv with the CPU build
# of torch==2.13.0 installed first (an open range would pull a multi-GB CUDA build), then
# this package with its Ray and development extras.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.dana-installed
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet -e ".[ray,dev]"
touch "$stamp"
