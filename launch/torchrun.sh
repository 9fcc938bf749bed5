#!/usr/bin/env bash
# torchrun on this node: launch/torchrun.sh [hydra overrides...]
#   one node:      NPROC processes (default: every local GPU), standalone rendezvous
#   several nodes: run it once per node (e.g. `srun --ntasks-per-node=1 launch/torchrun.sh ...`); NNODES (default
#                  SLURM_NNODES) agents meet at RDZV_ENDPOINT (default: the job's first node, port MASTER_PORT or 29500)
# Preemption: torchrun's agent forwards only the signals named by --signals-to-handle (its environment variable
# TORCHELASTIC_SIGNALS_TO_HANDLE is overwritten from that flag), so SIGUSR1 is added; the workers checkpoint and exit
# 75, and the agent SIGKILLs any worker still running SHUTDOWN_TIMEOUT seconds after forwarding (torchrun's own
# default is 30 s, too short for a large checkpoint).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${NPROC:-}" ]; then
  NPROC=$(command -v nvidia-smi >/dev/null && nvidia-smi -L | wc -l || echo 1)
fi
NNODES=${NNODES:-${SLURM_NNODES:-1}}
args=(
  --nproc_per_node="$NPROC"
  --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
  --shutdown-timeout="${SHUTDOWN_TIMEOUT:-300}"
)
if [ "$NNODES" -eq 1 ]; then
  args+=(--standalone)
else
  if [ -z "${RDZV_ENDPOINT:-}" ]; then
    head_node=$(python -c 'import os; from nopetrain.slurm import expand_nodelist
print(expand_nodelist(os.environ["SLURM_JOB_NODELIST"])[0])')
    RDZV_ENDPOINT="$head_node:${MASTER_PORT:-29500}"
  fi
  args+=(--nnodes="$NNODES" --rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="${SLURM_JOB_ID:-nopetrain}")
fi
exec torchrun "${args[@]}" train.py "$@"
