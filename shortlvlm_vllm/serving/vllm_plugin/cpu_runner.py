"""Turns on vLLM's multimodal pruning path in its CPU model runner, as its GPU runner does.

vLLM 0.32's GPUModelRunner.load_model sets `is_multimodal_pruning_enabled` once the model is loaded
(vllm/v1/worker/gpu_model_runner.py, load_model, line 5156): the model declares pruning support and
--video-pruning-rate is above 0. CPUModelRunner.load_model (vllm/v1/worker/cpu_model_runner.py, line 62) replaces
that method and never sets it, so on CPU the runner never hands a model its M-RoPE positions to correct
(recompute_mrope_positions): neither the plugin's Qwen classes with a visual-token budget nor vLLM's own Qwen2.5-VL
video pruning (EVS) can be served there. This wraps CPUModelRunner.load_model to set the flag by the GPU runner's
rule; a vLLM whose CPU runner sets it itself is left alone.
"""

from __future__ import annotations

from functools import wraps

PATCHED = "_shortlvlm_sets_multimodal_pruning"


def enable_multimodal_pruning_on_cpu() -> None:
    """Wrap CPUModelRunner.load_model once (calling it again changes nothing)."""
    from vllm.model_executor.models.interfaces import supports_multimodal_pruning
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    load_model = CPUModelRunner.load_model
    if getattr(load_model, PATCHED, False):
        return

    @wraps(load_model)
    def load_model_with_pruning(self, *args, **kwargs):
        load_model(self, *args, **kwargs)
        mm_config = self.model_config.multimodal_config
        self.is_multimodal_pruning_enabled = self.is_multimodal_pruning_enabled or bool(
            supports_multimodal_pruning(self.get_model())
            and mm_config is not None
            and mm_config.is_multimodal_pruning_enabled()
        )

    setattr(load_model_with_pruning, PATCHED, True)
    CPUModelRunner.load_model = load_model_with_pruning
