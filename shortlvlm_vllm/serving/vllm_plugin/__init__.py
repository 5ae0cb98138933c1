"""vLLM plugin (entry point `vllm.general_plugins`): registers the project's model classes by name.

A checkpoint that needs one of these classes names it in config.json's `architectures` (its `model_type`
stays the stock one, so transformers still loads it); vLLM calls `register()` in every process it starts.
The classes are registered as `module:Class` strings so that vLLM imports them only when a checkpoint asks.
This module imports nothing from vLLM at import time, so the rest of the package can use the names below.
"""

from __future__ import annotations

from collections.abc import Mapping

from shortlvlm_vllm.errors import ShortLVLMError

SHORT_LLAVA_ARCHITECTURE = "ShortLlavaForConditionalGeneration"
SHORT_QWEN2_VL_ARCHITECTURE = "ShortQwen2VLForConditionalGeneration"
SHORT_QWEN2_5_VL_ARCHITECTURE = "ShortQwen2_5_VLForConditionalGeneration"

REGISTERED_CLASSES: dict[str, str] = {
    SHORT_LLAVA_ARCHITECTURE: "shortlvlm_vllm.serving.vllm_plugin.llava:ShortLlavaForConditionalGeneration",
    SHORT_QWEN2_VL_ARCHITECTURE: "shortlvlm_vllm.serving.vllm_plugin.qwen_vl:ShortQwen2VLForConditionalGeneration",
    SHORT_QWEN2_5_VL_ARCHITECTURE:
        "shortlvlm_vllm.serving.vllm_plugin.qwen_vl:ShortQwen2_5_VLForConditionalGeneration",
    # mPLUG-Owl2 under its checkpoint's own name: vLLM has no class for it
    "MPLUGOwl2LlamaForCausalLM": "shortlvlm_vllm.serving.vllm_plugin.mplug_owl2:MPLUGOwl2LlamaForCausalLM",
    # Qwen-VL-Chat under its checkpoint's own name: vLLM dropped its class in 0.23
    "QWenLMHeadModel": "shortlvlm_vllm.serving.vllm_plugin.qwen:QWenLMHeadModel",
}

# model_type -> the registered class that serves a visual-token budget for it
VISUAL_TOKEN_ARCHITECTURES: dict[str, str] = {"llava": SHORT_LLAVA_ARCHITECTURE,
                                              "qwen2_vl": SHORT_QWEN2_VL_ARCHITECTURE,
                                              "qwen2_5_vl": SHORT_QWEN2_5_VL_ARCHITECTURE}
# vLLM 0.32 hands a model the M-RoPE positions to correct after its vision tower (recompute_mrope_positions) only
# when its multimodal pruning is on, and only --video-pruning-rate > 0 turns it on. The Qwen classes serve no video
# with a budget, so the rate has no other effect: the flag is the switch.
MROPE_RECOMPUTE_ARGS = ("--video-pruning-rate", "0.5")
MROPE_RECOMPUTE_ARCHITECTURES = (SHORT_QWEN2_VL_ARCHITECTURE, SHORT_QWEN2_5_VL_ARCHITECTURE)


def visual_token_architecture(config: Mapping) -> str:
    """The registered class that serves a visual-token budget for this config.json, or a clear error."""
    model_type = config.get("model_type")
    if model_type not in VISUAL_TOKEN_ARCHITECTURES:
        raise ShortLVLMError(
            f"a visual-token budget needs a registered model class, and there is none for model type "
            f"{model_type!r} (supported: {', '.join(VISUAL_TOKEN_ARCHITECTURES)}). Drop --visual-tokens."
        )
    return VISUAL_TOKEN_ARCHITECTURES[model_type]


def budget_architecture(config: Mapping, budget: int) -> str:
    """The registered class that serves `budget` visual tokens for this config.json, once K fits the image."""
    from shortlvlm_vllm.serving.visual_tokens import budget_limit, check_budget

    architecture = visual_token_architecture(config)
    check_budget(budget, budget_limit(config))
    return architecture


def serving_args(config: Mapping) -> list[str]:
    """The vLLM arguments a checkpoint's registered class needs beyond its config.json (config.json as a dict): the
    M-RoPE switch for a Qwen class with a budget (one that only applies side paths takes videos as the stock class
    does, so the switch, which also turns on Qwen2.5-VL's video pruning, stays off)."""
    from shortlvlm_vllm.serving.visual_tokens import configured_budget

    if set(config.get("architectures") or ()) & set(MROPE_RECOMPUTE_ARCHITECTURES) and configured_budget(config):
        return list(MROPE_RECOMPUTE_ARGS)
    return []


def budget_overrides(config: Mapping, budget: int, selection: str | None = None) -> dict:
    """vLLM `--hf-overrides` that serve a checkpoint (config.json as a dict) with `budget` visual tokens,
    chosen by `selection` ("visionzip" or "random"; None: as the checkpoint says).

    vLLM replaces a dict-valued key as a whole, so the checkpoint's `short_lvlm` section is carried over
    with only `visual_tokens` (and the selection) changed; `architectures` names the registered class.
    """
    from shortlvlm_vllm.serving.visual_tokens import configured_selection

    section = {**(config.get("short_lvlm") or {}), "visual_tokens": budget}
    if selection is not None:
        section["visual_token_selection"] = selection
        configured_selection({"short_lvlm": section})
    return {"architectures": [budget_architecture(config, budget)], "short_lvlm": section}


def register() -> None:
    """Register the classes with vLLM's ModelRegistry, the reference models' configs with transformers (vLLM reads
    config.json through AutoConfig), and their chat templates as vLLM's fallbacks, and on CPU turn on vLLM's
    multimodal pruning path as its GPU runner does (cpu_runner); calling it again changes nothing."""
    from vllm import ModelRegistry
    from vllm.platforms import current_platform
    from vllm.transformers_utils.chat_templates import registry as chat_templates_registry

    from shortlvlm_vllm.models import chat_templates, register_with_transformers

    register_with_transformers()
    if current_platform.is_cpu():
        from shortlvlm_vllm.serving.vllm_plugin.cpu_runner import enable_multimodal_pruning_on_cpu

        enable_multimodal_pruning_on_cpu()  # the Qwen classes' budget needs it (see cpu_runner)
    for model_type, path in chat_templates().items():
        if chat_templates_registry.get_chat_template_fallback_path(model_type, "") != path:
            chat_templates_registry.register_chat_template_fallback_path(model_type, path)
    supported = set(ModelRegistry.get_supported_archs())
    for architecture, qualified_name in REGISTERED_CLASSES.items():
        if architecture not in supported:
            ModelRegistry.register_model(architecture, qualified_name)
