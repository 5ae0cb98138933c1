"""Reference models, in transformers' style, for the architectures transformers does not ship (mPLUG-Owl2,
Qwen-VL).

Each loads checkpoints in its original key layout and config, runs attention through transformers' attention
functions (so the calibration pass sees post-RoPE queries and keys as for any transformers model), and is
registered with transformers' Auto classes by `register_with_transformers()`.
"""

from __future__ import annotations

from pathlib import Path


def chat_templates() -> dict[str, Path]:
    """model type -> the chat template of its original conversation format, for checkpoints that ship none."""
    from shortlvlm_vllm.models import mplug_owl2, qwen

    return {mplug_owl2.MODEL_TYPE: mplug_owl2.CHAT_TEMPLATE_PATH, qwen.MODEL_TYPE: qwen.CHAT_TEMPLATE_PATH}


def register_with_transformers() -> None:
    """Make AutoConfig, AutoModelForImageTextToText and AutoProcessor know the reference models; idempotent."""
    from shortlvlm_vllm.models import mplug_owl2, qwen

    mplug_owl2.register_with_transformers()
    qwen.register_with_transformers()
