#!/usr/bin/env bash
# First run: set up soma-models and train a small V1-architecture model on text that ships
# with the project (its own sources and docs; nothing is downloaded except the packages
# pip installs), score it exactly as the chain would on held-out files, and print where
# the weights, metrics and loss plot are.
#
#   scripts/demo.sh                 # from the repository root (or anywhere: it cds there)
#   scripts/demo.sh --steps 200     # extra arguments go to `soma-models train --demo`
#   scripts/demo.sh --protocol 0.1.1   # score as the product page's revision does
#
# The score follows a V1 protocol revision: the network's "0.1.7" unless --protocol or
# SOMA_MODELS_PROTOCOL says otherwise; the demo names the one it used. Each run gets its
# own folder (runs/demo, then runs/demo-2, ...): an earlier demo is never replaced.
#
# About 5-7 minutes on a 2-core CPU once the environment exists.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
venv="${SOMA_VENV:-$repo/.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    echo "==> creating $venv"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)

# torch first, pinned: the CPU wheel is fine for the demo (use your CUDA wheel on a GPU box).
if ! "$venv/bin/python" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
    echo "==> installing torch 2.13.0"
    "${pip[@]}" install "torch==2.13.0"
fi
if ! "$venv/bin/python" -c 'import soma_models.train, matplotlib, flax' 2>/dev/null \
        || [ "$repo/pyproject.toml" -nt "$venv/.soma_models_installed" ]; then
    echo "==> installing soma-models (editable, all extras)"
    "${pip[@]}" install -e '.[all]'
    touch "$venv/.soma_models_installed"
fi

protocol="$("$venv/bin/python" -c 'import sys
from soma_models.train.cli import revision_of
print(revision_of(sys.argv[1:]))' "$@")"
echo "==> training (soma-models train --demo $*) under protocol revision $protocol"
start=$(date +%s)
"$venv/bin/soma-models" train --demo "$@"
echo "==> demo finished in $(( $(date +%s) - start )) s (protocol revision $protocol)"
