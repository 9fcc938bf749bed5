#!/usr/bin/env bash
# The GPU check in one device call (under 10 minutes on an H100/H200): install what the GPU image lacks from the
# carried wheels, then the GPU-marked tests, the fused q/k prologue benchmark and the training-step benchmark, each
# step's output and status into RESULTS/<device>-<date>/ (summary.md lists them with their wall times).
#
#   ../shared/tools/device-wheels.sh .venv/bin/python .whl   # here, first: the wheels the device image lacks
#   bash benchmarks/gpu_check.sh                              # there, from the repo root, with .whl/ carried
#   bash benchmarks/gpu_check.sh drope                        # there: the drope_gpu experiment alone (~8 min)
#   bash benchmarks/gpu_check.sh --cpu-smoke                  # on CPU (CI): every step as far as a CPU allows
#
# RESULTS is $OUT when set (the device tool brings $OUT back), else benchmarks/results. `drope` runs
# configs/experiment/drope_gpu.yaml, its report and arm logs into RESULTS/drope_gpu-<device>-<date>/ (its own call: it
# does not fit beside the rest in one task's device time). --cpu-smoke installs the project the same way, collects
# the GPU tests (they skip without CUDA), checks that both benchmarks start (--help) and runs drope_gpu at a tiny
# size, so that the first GPU call does not fail on the plumbing. Exits 1 if a step failed, 2 on bad usage.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=gpu
case "${1:-}" in
  --cpu-smoke) mode=cpu-smoke ;;
  drope) mode=drope ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [drope | --cpu-smoke]" >&2; exit 2 ;;
esac
python=${PYTHON:-python3}

device=$("$python" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")')
if [[ $mode != cpu-smoke && $device == cpu ]]; then
  echo "no CUDA device here; run with --cpu-smoke on CPU" >&2
  exit 2
fi

scratch=$(mktemp -d "${TMPDIR:-/tmp}/nopetrain-scratch.XXXXXX")
trap 'rm -rf "$scratch"' EXIT

# The carried wheels, then the project itself, editable as `make` and the Dockerfile install it, into the
# interpreter's own environment (the device machine is bare and given back after the call); offline, no dependency
# resolution. Editable because every step runs from the repository root, whose nopetrain/ comes first on sys.path:
# beside a plain install that copy would be imported, and its kernels/, data_pipelines/ and launch/ folders, which
# install under the nopetrain namespace, would not be found (tests/test_gpu_check.py runs this in such an environment).
if compgen -G ".whl/*.whl" > /dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile .whl/*.whl
fi
"$python" -m pip install -q --no-index --no-deps --no-build-isolation -e .
slug=$(printf '%s' "$device" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-//; s/-$//')
today=$(date -u +%F)
prefix=""
[[ $mode == drope ]] && prefix=drope_gpu-
results="${OUT:-benchmarks/results}/$prefix$slug-$today"
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

# The DroPE comparison at the GPU profile's size, or (smoke) at a tiny one: same corpus build, arms and report.
drope_gpu() {
  local size=()
  if [[ $mode == cpu-smoke ]]; then
    size=(params.layers=2 params.hidden=64 params.heads=2 params.kv_heads=1 params.mlp=128 params.steps=8
      params.drope_step=7 params.batch=4 params.micro_batch=4 params.precision=fp32 params.log_every=4
      params.checkpoint_every=4 corpus.seq_len=128 corpus.vocab_size=1024 corpus.max_mb_per_source=0.25
      corpus.lookup_documents=40 corpus.lookup_tasks=[standard] threads_per_arm=1 eval.factors=[1,2]
      eval.perplexity.documents=2 eval.logit_scale.documents=2 eval.niah.trials=2 eval.niah.tasks=[standard]
      eval.report.paired=[])
  fi
  # Checkpoints stay on the machine's disk (gone with $scratch); the report and the arms' logs come back.
  "$python" -m nopetrain.experiment drope_gpu "out=$scratch/drope_gpu" "corpus.path=$scratch/drope_gpu_corpus" "${size[@]}"
  cp -r "$scratch"/drope_gpu/results.* "$scratch"/drope_gpu/trials.csv "$scratch"/drope_gpu/*.png "$scratch"/drope_gpu/logs \
    "$results/"
}

if [[ $mode == gpu ]]; then
  step gpu_tests "$python" -m pytest -q -m gpu tests
  step qk_norm_rope_bench "$python" benchmarks/bench_qk_norm_rope.py
  step train_step_bench "$python" benchmarks/bench_train_step.py --models smollm_360m smollm_1p7b
  # The benchmarks write their tables beside the others; keep a copy with this check's logs.
  for table in benchmarks/results/*-"$slug-$today".md; do
    [[ -e $table ]] && cp "$table" "$results/"
  done
elif [[ $mode == drope ]]; then
  step drope_gpu drope_gpu
else
  step gpu_tests "$python" -m pytest -q -m gpu tests -p no:cacheprovider
  step qk_norm_rope_bench "$python" benchmarks/bench_qk_norm_rope.py --help
  step train_step_bench "$python" benchmarks/bench_train_step.py --help
  step drope_gpu drope_gpu
fi
echo "wrote $results/summary.md"
exit "$failed"
