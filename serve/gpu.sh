#!/usr/bin/env bash
# Serve a checkpoint on an NVIDIA GPU with the CUDA build of vLLM (what `./setup.sh` installs
# when nvidia-smi is present). Stock `vllm serve` works unchanged on a pruned checkpoint:
#   serve/gpu.sh ./pruned-llava [more vLLM arguments]
set -euo pipefail
model=${1:?usage: serve/gpu.sh MODEL_DIR [vLLM arguments]}; shift
exec "$(dirname "$0")/../.venv/bin/vllm" serve "$model" --host 127.0.0.1 --port "${PORT:-8000}" \
    --limit-mm-per-prompt '{"image": 1}' "$@"
