#!/usr/bin/env bash
# For a GPU machine without network whose Python already has torch and triton (a CUDA image):
# copy the pure-Python packages MuonQ needs beyond those from this machine's .venv into .deps/,
# take .deps/ along, and put it on PYTHONPATH there (scripts/gpu_checks.sh does).
#   bash scripts/bundle_deps.sh        # here, after bash scripts/setup.sh --dev
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
rm -rf .deps && mkdir -p .deps
# hydra-core and its parser runtime, omegaconf, python-dotenv; torchao for adamw8bit (its compiled
# extensions are left out: they are built for one Python version, and AdamW8bit does not use them)
cp -r "$SITE"/{hydra,omegaconf,antlr4,dotenv,torchao} "$SITE"/{hydra_core,omegaconf,antlr4_python3_runtime,python_dotenv,torchao}-*.dist-info .deps/
find .deps \( -name '*.so' -o -name __pycache__ \) -prune -exec rm -rf {} +
echo "bundle_deps: $(du -sh .deps | cut -f1) in .deps/ ($(ls .deps | grep -vc dist-info) packages)"
