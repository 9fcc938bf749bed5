#!/usr/bin/env bash
# The GPU check in one device call: install what the GPU image lacks from the carried wheels, then the versions,
# the GPU-marked tests, the fused q/k prologue benchmark and the training-step benchmark, each step's output and
# status into RESULTS/<device>-<date>/ (summary.md: every step that ran, passed, failed or was skipped, and why, with
# its wall time). Each step runs under its own time bound (in seconds, printed as it starts): together at most 8
# minutes, so that the whole check fits one 10-minute command of a lent H100 or H200 by construction.
#
#   make device-wheels                     # here, first: the wheels the device image lacks, into .whl/
#   bash benchmarks/gpu_check.sh           # there, from the repo root, with .whl/ carried
#   bash benchmarks/gpu_check.sh drope     # there: the drope_gpu experiment alone (~8 min)
#   bash benchmarks/gpu_check.sh --cpu-smoke   # on CPU (CI): every step as far as a CPU allows
#
# RESULTS is $OUT when set (the device tool brings $OUT back), else benchmarks/results. `drope` runs
# configs/experiment/drope_gpu.yaml, its report and arm logs into RESULTS/drope_gpu-<device>-<date>/ (its own call: it
# does not fit beside the rest in one task's device time). --cpu-smoke installs the project the same way, collects
# the GPU tests (they skip without CUDA), checks that both benchmarks start (--help) and runs drope_gpu at a tiny
# size, so that the first GPU call does not fail on the plumbing. Exits 1 if a step failed, 2 on bad usage. Needs no
# git: the commit is read from .git/HEAD where there is one (NOPETRAIN_COMMIT, which the benchmarks record).
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
# Loud where a carried wheel is missing: every requirement of the project must now be installed (pip check's lines
# about other packages of the image are not ours). A version below pyproject's lower bounds (which name what was
# tested: the image's own, `make test-device-versions`) is not fatal; the summary lists it.
requirements=$("$python" -m pip check 2> /dev/null | grep '^nopetrain ' || true)
missing=$(grep 'which is not installed' <<< "$requirements" || true)
if [[ -n $missing ]]; then
  echo "the carried wheels (.whl/) lack what the project requires; build them with make device-wheels:" >&2
  echo "$missing" >&2
  exit 1
fi
untested=$(grep -v 'which is not installed' <<< "$requirements" || true)
slug=$(printf '%s' "$device" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-//; s/-$//')
today=$(date -u +%F)
prefix=""
[[ $mode == drope ]] && prefix=drope_gpu-
results="${OUT:-benchmarks/results}/$prefix$slug-$today"
mkdir -p "$results"
# The checkout's commit without git (a bare image may lack it): HEAD names a branch ref or a commit.
commit=unknown
if [[ -f .git/HEAD ]]; then
  head=$(< .git/HEAD)
  if [[ $head == "ref: "* ]]; then
    ref=${head#ref: }
    commit=$( (cat ".git/$ref" 2> /dev/null || grep " $ref\$" .git/packed-refs 2> /dev/null | cut -d' ' -f1) | head -c 12)
  else
    commit=${head:0:12}
  fi
fi
export NOPETRAIN_COMMIT=${commit:-unknown}
{
  echo "# GPU check ($mode)"
  echo
  echo "- device: $device"
  echo "- date: $today"
  echo "- commit: $NOPETRAIN_COMMIT"
  echo "- $("$python" -c 'import torch, triton; print(f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}")')"
  if [[ -n $untested ]]; then
    echo "- below the tested versions (pyproject.toml's lower bounds):"
    sed 's/^/  - /' <<< "$untested"
  fi
  echo
  echo "| step | status | seconds | log |"
  echo "|---|---|---|---|"
} > "$results/summary.md"

failed=0
# step NAME SECONDS COMMAND...: runs COMMAND under a time bound, its output into NAME.log, a row into summary.md.
step() {
  local name=$1 bound=$2 started status code
  shift 2
  echo "== $name (at most ${bound} s): $*"
  started=$(date +%s)
  code=0
  # A function of this script (drope_gpu) runs in a bash that timeout can start: exported, with what it reads.
  if declare -F "$1" > /dev/null; then
    export -f "${1?}"
    export python mode scratch results
    set -- bash -c "$(printf '%q ' "$@")"
  fi
  timeout --kill-after=10 "$bound" "$@" > "$results/$name.log" 2>&1 || code=$?
  case $code in
    0) status=ok ;;
    124 | 137) status="failed (over its ${bound} s bound)"; failed=1 ;;
    *) status="failed (exit $code)"; failed=1 ;;
  esac
  echo "| $name | $status | $(($(date +%s) - started)) | $name.log |" >> "$results/summary.md"
  tail -n 3 "$results/$name.log"
}
# skip NAME REASON: a row saying the step did not run, and why.
skip() {
  echo "| $1 | skipped: $2 | 0 | - |" >> "$results/summary.md"
  echo "== $1: skipped: $2"
}

# The device's interpreter, torch, CUDA, Triton, GPU and flash-attn, first in every check.
versions_py='
import platform, torch, triton
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}")
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}: {props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs, sm_{props.major}{props.minor}")
try:
    import flash_attn
    print(f"flash-attn {flash_attn.__version__}")
except ImportError:
    print("flash-attn: not installed")
'

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

# The time bounds of a GPU check's steps: versions 30 + tests 150 + kernels 120 + training steps 150 = 450 s, under
# 8 minutes; the benchmarks are sized to fit: one sequence length (the q/k benchmark compiles the reference once per
# head shape, variant and length: 6 compiles, not its default 24) and fewer steps than their defaults.
if [[ $mode == gpu ]]; then
  step versions 30 "$python" -c "$versions_py"
  step gpu_tests 150 "$python" -m pytest -q -m gpu tests
  step qk_norm_rope_bench 120 "$python" benchmarks/bench_qk_norm_rope.py --seqs 8192
  step train_step_bench 150 "$python" benchmarks/bench_train_step.py --models smollm_360m smollm_1p7b --steps 5
  # The benchmarks write their tables beside the others; keep a copy with this check's logs.
  for table in benchmarks/results/*-"$slug-$today".md; do
    [[ -e $table ]] && cp "$table" "$results/"
  done
elif [[ $mode == drope ]]; then
  step drope_gpu 540 drope_gpu
else
  step versions 30 "$python" -c "$versions_py"
  step gpu_tests 300 "$python" -m pytest -q -m gpu tests -p no:cacheprovider
  skip qk_norm_rope_bench "no GPU (--cpu-smoke); qk_norm_rope_bench_start checks that it starts"
  step qk_norm_rope_bench_start 60 "$python" benchmarks/bench_qk_norm_rope.py --help
  skip train_step_bench "no GPU (--cpu-smoke); train_step_bench_start checks that it starts"
  step train_step_bench_start 60 "$python" benchmarks/bench_train_step.py --help
  step drope_gpu 400 drope_gpu
fi
echo "wrote $results/summary.md"
exit "$failed"
