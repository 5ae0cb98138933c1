#!/usr/bin/env bash
# The GPU check of issue 16 (see eval/gpu_check.py): on a machine with an NVIDIA GPU and the package registry in
# reach, sets up the CUDA flavour (vLLM 0.33) and runs the check; about 10 minutes on one H200.
#   eval/gpu_check.sh [OUT_DIR]      (default: runs/gpu_check)
set -euo pipefail
cd "$(dirname "$0")/.."
SHORTLVLM_FLAVOUR=gpu ./setup.sh
PYTHONUNBUFFERED=1 exec .venv/bin/python eval/gpu_check.py --output "${1:-runs/gpu_check}"
