"""ShortLlavaForConditionalGeneration: vLLM's LLaVA with the image's tokens cut to a budget K before the
language model (visual_tokens, VisionZip-style), so the prompt holds K placeholders per image.

The budget comes from config.json's `short_lvlm.visual_tokens` (written by `shortlvlm prune
--visual-tokens K`); `--hf-overrides '{"short_lvlm": {"visual_tokens": K}}'` changes it when serving, and
`short_lvlm.visual_token_selection: random` serves a seeded random choice of K tokens instead (a test arm).
Without a budget, or with K equal to the image's token count, the class is vLLM's own LLaVA.
"""

from __future__ import annotations

from functools import cached_property

import torch
from vllm.config import VllmConfig
from vllm.distributed import tensor_model_parallel_all_reduce
from vllm.model_executor.models.clip import CLIPVisionTransformer
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from shortlvlm_vllm.serving.visual_tokens import (
    cls_attention,
    configured_budget,
    configured_selection,
    image_token_count,
    key_metric,
    key_sums,
    random_visual_tokens,
    select_visual_tokens,
)
from shortlvlm_vllm.serving.vllm_plugin.side_path import DeclaredSidePaths


class ShortLlavaProcessingInfo(LlavaProcessingInfo):
    """Reports K placeholder tokens per image, so the prompt's count matches what the model returns."""

    @cached_property
    def visual_tokens(self) -> int | None:
        """K from the served config (read once: it is fixed for the server's life), None for every token."""
        return configured_budget(self.get_hf_config().to_dict())

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        if self.visual_tokens is None:
            return super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        return self.visual_tokens


@MULTIMODAL_REGISTRY.register_processor(
    LlavaMultiModalProcessor, info=ShortLlavaProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class ShortLlavaForConditionalGeneration(DeclaredSidePaths, LlavaForConditionalGeneration):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = self.config.to_dict()
        self.visual_tokens = configured_budget(config)
        self.selects_tokens = self.visual_tokens is not None and self.visual_tokens < image_token_count(config)
        self.selection, self.selection_seed = configured_selection(config)
        self.attach_declared_side_paths(self.language_model.model.layers, config.get("short_lvlm"),
                                        self.config.text_config.hidden_size)

    def _image_pixels_to_features(self, vision_tower, pixel_values: torch.Tensor) -> torch.Tensor:
        if not self.selects_tokens:
            return super()._image_pixels_to_features(vision_tower, pixel_values)
        if self.selection == "random":
            features = super()._image_pixels_to_features(vision_tower, pixel_values)
            return random_visual_tokens(features, pixel_values, self.visual_tokens, self.selection_seed)
        features, attention, keys = feature_layer_outputs(vision_tower.vision_model, pixel_values)
        return select_visual_tokens(features, attention, keys, self.visual_tokens)


def feature_layer_outputs(
    tower: CLIPVisionTransformer, pixel_values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Patch features [B, N, C], [CLS] attention [B, N] and key metric [B, N, d] at the feature layer.

    vLLM builds the tower only up to the feature layer (its last layer here) and its attention returns
    no probabilities, so the last layer's queries and keys are recomputed from that layer's input. Under
    tensor parallelism each rank holds num_heads / tp of the heads (QKVParallelLinear): the head sums are
    all-reduced, so every rank scores with every head and selects the same tokens.
    """
    hidden = tower.pre_layrnorm(tower.embeddings(pixel_values))
    *front, feature_layer = tower.encoder.layers
    for layer in front:
        hidden = layer(hidden)
    attn = feature_layer.self_attn
    query, key, _ = attn.qkv_proj(feature_layer.layer_norm1(hidden))[0].chunk(3, dim=-1)
    hidden = feature_layer(hidden)
    attention = cls_attention(query, key, attn.num_heads_per_partition)
    keys = key_sums(key, attn.num_heads_per_partition)
    if attn.tp_size > 1:
        attention = tensor_model_parallel_all_reduce(attention)
        keys = tensor_model_parallel_all_reduce(keys)
    return hidden[:, 1:], attention, key_metric(keys, attn.num_heads)[:, 1:]
