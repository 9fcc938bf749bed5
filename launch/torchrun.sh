#!/usr/bin/env bash
# One node, every local GPU (or NPROC processes on CPU): launch/torchrun.sh [hydra overrides...]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${NPROC:-}" ]; then
  NPROC=$(command -v nvidia-smi >/dev/null && nvidia-smi -L | wc -l || echo 1)
fi
exec torchrun --standalone --nproc_per_node="$NPROC" train.py "$@"
