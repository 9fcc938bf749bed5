#!/usr/bin/env bash
# The GPU check in one device call (under 10 minutes on an H100/H200): install what the GPU image lacks from the
# carried wheels, then the GPU-marked tests, the fused q/k prologue benchmark and the training-step benchmark, each
# step's output and status into RESULTS/<device>-<date>/ (summary.md lists them with their wall times).
#
#   ../shared/tools/device-wheels.sh .venv/bin/python .whl   # here, first: the wheels the device image lacks
#   bash benchmarks/gpu_check.sh                              # there, from the repo root, with .whl/ carried
#   bash benchmarks/gpu_check.sh --cpu-smoke                  # on CPU (CI): every step as far as a CPU allows
#
# RESULTS is $OUT when set (the device tool brings $OUT back), else benchmarks/results. --cpu-smoke installs the
# project the same way, collects the GPU tests (they skip without CUDA) and checks that both benchmarks start
# (--help), so that the first GPU call does not fail on the plumbing. Exits 1 if a step failed, 2 on bad usage.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=gpu
case "${1:-}" in
  --cpu-smoke) mode=cpu-smoke ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--cpu-smoke]" >&2; exit 2 ;;
esac
python=${PYTHON:-python3}

device=$("$python" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")')
if [[ $mode == gpu && $device == cpu ]]; then
  echo "no CUDA device here; run with --cpu-smoke on CPU" >&2
  exit 2
fi

site=$(mktemp -d "${TMPDIR:-/tmp}/nopetrain-site.XXXXXX")
trap 'rm -rf "$site"' EXIT

# The carried wheels, then the project itself (its kernels/, data_pipelines/ and launch/ folders install under the
# nopetrain namespace, which a bare PYTHONPATH would not give); offline, no dependency resolution.
if compgen -G ".whl/*.whl" > /dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
fi
"$python" -m pip install -q --no-index --no-deps --no-build-isolation --target "$site" .
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
slug=$(printf '%s' "$device" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-//; s/-$//')
today=$(date -u +%F)
results="${OUT:-benchmarks/results}/$slug-$today"
mkdir -p "$results"
commit=$(git rev-parse --short HEAD 2> /dev/null || echo unknown)
{
  echo "# GPU check ($mode)"
  echo
  echo "- device: $device"
  echo "- date: $today"
  echo "- commit: $commit"
  echo "- $("$python" -c 'import torch, triton; print(f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}")')"
  echo
  echo "| step | status | seconds | log |"
  echo "|---|---|---|---|"
} > "$results/summary.md"

failed=0
step() {
  local name=$1 started status
  shift
  echo "== $name: $*"
  started=$(date +%s)
  if "$@" > "$results/$name.log" 2>&1; then status=ok; else status="failed (exit $?)"; failed=1; fi
  echo "| $name | $status | $(($(date +%s) - started)) | $name.log |" >> "$results/summary.md"
  tail -n 3 "$results/$name.log"
}

if [[ $mode == gpu ]]; then
  step gpu_tests "$python" -m pytest -q -m gpu tests
  step qk_norm_rope_bench "$python" benchmarks/bench_qk_norm_rope.py
  step train_step_bench "$python" benchmarks/bench_train_step.py --models smollm_360m smollm_1p7b
  # The benchmarks write their tables beside the others; keep a copy with this check's logs.
  for table in benchmarks/results/*-"$slug-$today".md; do
    [[ -e $table ]] && cp "$table" "$results/"
  done
else
  step gpu_tests "$python" -m pytest -q -m gpu tests -p no:cacheprovider
  step qk_norm_rope_bench "$python" benchmarks/bench_qk_norm_rope.py --help
  step train_step_bench "$python" benchmarks/bench_train_step.py --help
fi
echo "wrote $results/summary.md"
exit "$failed"
