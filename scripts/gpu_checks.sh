#!/usr/bin/env bash
# The GPU checks and measurements (docs/benchmarks.md, docs/kernels.md), one stage per call so each
# fits in ten minutes on one H100/H200:
#   bash scripts/gpu_checks.sh tests            # CUDA tests: kernels vs reference, every optimizer trains,
#                                               # the step never waits for the GPU, compiled vs eager
#   bash scripts/gpu_checks.sh kernels          # benchmarks/bench_kernels.py: update-pass GB/s, step ratios
#   bash scripts/gpu_checks.sh train [RECIPE..] # benchmarks/bench_train.py: tokens/s, MFU, peak memory
#                                               # (default llama-60m; llama-350m and llama-1b one call each)
#   bash scripts/gpu_checks.sh sync  [RECIPE..] # muon, muonq with nonfinite=stop vs abort (the guard's sync)
# Logs (and JSON) go to $RESULTS (default reports/gpu). Uses .venv/bin/python when there, else python3;
# with .deps/ present (scripts/bundle_deps.sh, for a machine without network) it goes on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
RESULTS=${RESULTS:-reports/gpu}
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[[ -d .deps ]] && export PYTHONPATH="$PYTHONPATH:$PWD/.deps"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
stage=${1:-}; shift || true
if [[ ! $stage =~ ^(tests|kernels|train|sync)$ ]]; then
  echo "usage: bash scripts/gpu_checks.sh tests|kernels|train|sync [args]" >&2; exit 2
fi
recipes=("${@:-llama-60m}"); tag=$(IFS=_; echo "${recipes[*]}")
$PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "gpu_checks: no CUDA device")'
{ date -u; nvidia-smi -L; $PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'; } \
  | tee "$RESULTS/$stage-env.txt"
case $stage in
  tests)  # four test processes share the GPU when pytest-xdist is there (the runs are small)
    parallel=$($PY -c 'import xdist' 2>/dev/null && echo "-n 4" || true)
    $PY -m pytest -q -p no:cacheprovider $parallel tests/test_gpu.py tests/test_kernels.py tests/test_no_host_sync.py "$@" \
      2>&1 | tee "$RESULTS/tests.log" ;;
  kernels)
    $PY benchmarks/bench_kernels.py "$@" 2>&1 | tee "$RESULTS/kernels.log" ;;
  train)
    $PY benchmarks/bench_train.py --recipes "${recipes[@]}" --json "$RESULTS/train-$tag.json" 2>&1 | tee "$RESULTS/train-$tag.log" ;;
  sync)
    for mode in stop abort; do
      $PY benchmarks/bench_train.py --recipes "${recipes[@]}" --optimizers muon muonq \
        --override recipe.training_params.nonfinite=$mode --json "$RESULTS/sync-$tag-$mode.json" 2>&1 | tee "$RESULTS/sync-$tag-$mode.log"
    done ;;
esac
