#!/usr/bin/env bash
# One command from a fresh checkout to a full test run:
#   creates .venv (if missing), installs the CPU build of torch 2.13.0 *first* (an
#   unpinned torch would pull a multi-GB CUDA build), then this package with its dev
#   extras (torch range, jax/flax/optax, pytest), then runs the test suite.
# Extra arguments go to pytest, e.g. ./scripts/test.sh tests/v1/torch -x
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install --quiet --upgrade pip
"${PIP[@]}" install --quiet "torch==${TORCH_VERSION}"
"${PIP[@]}" install --quiet -e ".[dev]"

exec "$VENV/bin/python" -m pytest "$@"
