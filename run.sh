#!/usr/bin/env bash
# Launch training under torchrun.
#   bash run.sh                                # embedded default: Shakespeare + llama-tiny, on whatever is here
#   bash run.sh 0,1,2,3 muonq llama-60m [hydra overrides...]
# Multi-node: set NNODES, NODE_RANK and RDZV_ENDPOINT (host:port of node 0), same command on every node:
#   NNODES=2 NODE_RANK=0 RDZV_ENDPOINT=node0:29500 bash run.sh 0,1,2,3,4,5,6,7 muonq llama-1b
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
PY=.venv/bin/python
if [[ $# -eq 0 ]]; then
  # No arguments: prepare the embedded corpus (cached, skipped when done) and train the CPU recipe.
  $PY process_data.py --name tiny_shakespeare --tokenizer bpe-8192
  if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    GPUS=0; NGPUS=1
  else
    GPUS=""; NGPUS=1
  fi
  OPT=muonq; RECIPE=llama-tiny
else
  if [[ $# -lt 3 ]]; then
    echo "usage: bash run.sh GPUS OPTIMIZER RECIPE [hydra overrides...]   e.g. bash run.sh 0,1,2,3 muonq llama-60m" >&2
    exit 2
  fi
  GPUS=$1; OPT=$2; RECIPE=$3; shift 3
  NGPUS=$(awk -F, '{print NF}' <<<"$GPUS")
fi
RUN_NAME=${RUN_NAME:-${RECIPE}_${OPT}}
export MUONQ_RUN_DIR=${MUONQ_RUN_DIR:-outputs/$(date +%Y-%m-%d)/$(date +%H-%M-%S)_${RUN_NAME}}
mkdir -p logs
[[ -n "$GPUS" ]] && export CUDA_VISIBLE_DEVICES=$GPUS
# On SIGTERM/SIGINT (preemption) the workers finish their step and save a checkpoint (exit 75);
# torchrun SIGKILLs workers still running after this many seconds (its default is 30).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}
if [[ -n "${NNODES:-}" && "${NNODES}" != 1 ]]; then
  LAUNCH=(--nnodes="$NNODES" --node-rank="${NODE_RANK:?set NODE_RANK}" --rdzv-backend=c10d
          --rdzv-endpoint="${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port of node 0}" --rdzv-id="${RDZV_ID:-$RUN_NAME}")
else
  LAUNCH=(--standalone)
fi
$PY -m torch.distributed.run "${LAUNCH[@]}" --nproc-per-node="$NGPUS" run_hydra.py -cn test_hydra \
  recipe="$RECIPE" optimizer_params="$OPT" \
  +logging_params.wandb.project="${WANDB_PROJECT:-MuonQ}" +logging_params.wandb.name="$RUN_NAME" "$@" \
  |& tee "logs/${RUN_NAME}.console.log"
