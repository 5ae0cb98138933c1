"""Per-architecture knowledge, kept out of the algorithm and the checkpoint writer.

An adapter says where the decoder layers of the language model live (in checkpoint key names
and in config.json) for one vision-language architecture. Adding an architecture means adding
an adapter here, nothing else.
"""

from __future__ import annotations

from shortlvlm_vllm.adapters.base import ArchitectureAdapter
from shortlvlm_vllm.adapters.llava import LLAVA
from shortlvlm_vllm.adapters.mplug_owl2 import MPLUG_OWL2
from shortlvlm_vllm.adapters.qwen import QWEN
from shortlvlm_vllm.adapters.qwen_vl import QWEN2_5_VL, QWEN2_VL
from shortlvlm_vllm.errors import ShortLVLMError

ADAPTERS: tuple[ArchitectureAdapter, ...] = (LLAVA, QWEN2_VL, QWEN2_5_VL, MPLUG_OWL2, QWEN)


def supported_model_types() -> list[str]:
    return [a.model_type for a in ADAPTERS]


def adapter_for_config(config: dict, source: str = "the model") -> ArchitectureAdapter:
    """The adapter for a config.json dict; a clear error naming the supported ones otherwise."""
    model_type = config.get("model_type")
    for adapter in ADAPTERS:
        if model_type == adapter.model_type:
            return adapter
    architectures = ", ".join(config.get("architectures") or []) or "none listed"
    raise ShortLVLMError(
        f"{source} is not a supported vision-language checkpoint (model_type={model_type!r}, "
        f"architectures: {architectures}). Supported model types: "
        f"{', '.join(supported_model_types())}."
    )


__all__ = ["ADAPTERS", "ArchitectureAdapter", "adapter_for_config", "supported_model_types"]
