"""vLLM plugin (entry point `vllm.general_plugins`): registers the project's model classes by name.

A checkpoint that needs one of these classes names it in config.json's `architectures` (its `model_type`
stays the stock one, so transformers still loads it); vLLM calls `register()` in every process it starts.
The classes are registered as `module:Class` strings so that vLLM imports them only when a checkpoint asks.
This module imports nothing from vLLM at import time, so the rest of the package can use the names below.
"""

from __future__ import annotations

SHORT_LLAVA_ARCHITECTURE = "ShortLlavaForConditionalGeneration"

REGISTERED_CLASSES: dict[str, str] = {
    SHORT_LLAVA_ARCHITECTURE: "shortlvlm_vllm.vllm_plugin.llava:ShortLlavaForConditionalGeneration",
}


def register() -> None:
    """Register the classes with vLLM's ModelRegistry; calling it again changes nothing."""
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for architecture, qualified_name in REGISTERED_CLASSES.items():
        if architecture not in supported:
            ModelRegistry.register_model(architecture, qualified_name)
