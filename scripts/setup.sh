#!/usr/bin/env bash
# Create .venv (once) and install MuonQ with torch matched to the machine.
#   bash scripts/setup.sh          # runtime dependencies
#   bash scripts/setup.sh --dev    # plus the test dependencies
# Env: PYTHON (default python3), TORCH_VERSION (CPU wheel pin, default 2.13.0),
#      TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu where no local CPU wheel exists).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
STAMP=.venv/.muonq-setup
want=requirements.txt
[[ "${1:-}" == "--dev" ]] && want=requirements-dev.txt
if [[ -f $STAMP ]] && grep -qx "$want $(cat requirements.txt requirements-dev.txt pyproject.toml | sha1sum | cut -c1-12)" $STAMP; then
  exit 0
fi
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: CUDA GPU found; installing torch from requirements.txt (CUDA build)"
    $PIP install -q "torch>=2.9"
  else
    echo "setup: no CUDA GPU; installing the CPU wheel torch==${TORCH_VERSION:-2.13.0}"
    $PIP install -q "torch==${TORCH_VERSION:-2.13.0}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
  fi
fi
# With torch present, requirements that admit its version install nothing more of it.
$PIP install -q -r "$want"
$PIP install -q --no-deps -e .
echo "$want $(cat requirements.txt requirements-dev.txt pyproject.toml | sha1sum | cut -c1-12)" > $STAMP
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
