"""ShortQwen2VLForConditionalGeneration and ShortQwen2_5_VLForConditionalGeneration: vLLM's Qwen2-VL and
Qwen2.5-VL with each image cut to a budget of K merged tokens after the patch merger, so that the prompt holds
min(K, N) placeholders for an image of N tokens. The kept tokens are those the vision tower's last block attends to
most (visual_tokens.received_attention, summed over each merge group), in their original order, and each keeps its
own M-RoPE position; so does the text after the image.

The budget comes from config.json's `short_lvlm.visual_tokens` (written by `shortlvlm prune --visual-tokens K`);
without one the classes are vLLM's own. vLLM computes a request's M-RoPE positions when it arrives, before the
tower has chosen: get_mrope_input_positions gives the image's slots stand-in positions, each kept token leaves the
tower with its own (t, h, w) offsets in 4 extra channels, and vLLM's runner hands those to recompute_mrope_positions
before the language model runs (the hook of vLLM's Qwen2.5-VL video pruning, EVS). vLLM 0.32 calls that hook only
with --video-pruning-rate > 0 (vllm_plugin.MROPE_RECOMPUTE_ARGS; `shortlvlm serve` adds it): with a budget the
classes refuse to start without it, and refuse, each with its reason, what the hook does not cover: videos,
pipeline parallelism (only the first stage's positions are corrected), the vision tower in data-parallel mode
(its own sharded path), and a Qwen2.5-VL whose last vision block uses window attention.

The classes also apply SCP side paths (a quantized source pruned with SCP, `short_lvlm.side_paths`), with or without a
budget, the way the LLaVA class does (side_path.DeclaredSidePaths).
"""

from __future__ import annotations

from dataclasses import replace
from functools import cached_property

import torch
from vllm.config import VllmConfig
from vllm.distributed import tensor_model_parallel_all_reduce
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.serving.visual_tokens import (
    configured_budget,
    keep_most_attended,
    kept_token_count,
    merge_group_scores,
    position_channels,
    prompt_mrope_positions,
    received_attention,
)
from shortlvlm_vllm.serving.vllm_plugin.side_path import DeclaredSidePaths

POSITION_CHANNELS = 4  # (t, h, w, extent) appended to each kept token's embedding


class _BudgetProcessingInfo:
    """Reports min(K, N) placeholder tokens per image, and images only, once a budget is set."""

    @cached_property
    def visual_tokens(self) -> int | None:
        """K from the served config (read once: it is fixed for the server's life), None for every token."""
        return configured_budget(self.get_hf_config().to_dict())

    def get_supported_mm_limits(self):
        return super().get_supported_mm_limits() if self.visual_tokens is None else {"image": None}

    def get_mm_max_tokens_per_item(self, seq_len, mm_counts):
        if self.visual_tokens is None:
            return super().get_mm_max_tokens_per_item(seq_len, mm_counts)
        return {"image": self.get_max_image_tokens()}

    def get_num_image_tokens(self, **kwargs) -> int:
        num_tokens = super().get_num_image_tokens(**kwargs)
        return num_tokens if self.visual_tokens is None else kept_token_count(self.visual_tokens, num_tokens)


class _BudgetProcessor:
    """Replaces an image's placeholder with min(K, N) image tokens, N from the image's patch grid."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        budget = self.info.visual_tokens
        if budget is None:
            return super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        hf_processor = self.info.get_hf_processor(**hf_processor_mm_kwargs)
        image_token = self.info.get_tokenizer().get_vocab()[hf_processor.image_token]
        merge_unit = self.info.get_image_processor(**hf_processor_mm_kwargs).merge_size ** 2

        def kept_placeholders(item_idx: int) -> list[int]:
            grid_thw = out_mm_kwargs["image"][item_idx]["image_grid_thw"].data
            return [image_token] * kept_token_count(budget, int(grid_thw.prod()) // merge_unit)

        return [PromptReplacement(modality="image", target=[image_token], replacement=kept_placeholders)]


class _VisualTokenBudget(DeclaredSidePaths):
    """The budget's model side and the side paths, shared by both classes (first in their bases, so it wraps the
    stock methods)."""

    def _init_short_lvlm(self, vllm_config: VllmConfig) -> None:
        """The side paths and the budget config.json declares (after the stock __init__ has built the layers)."""
        config = self.config.to_dict()
        self.attach_declared_side_paths(self.language_model.model.layers, config.get("short_lvlm"),
                                        self.config.text_config.hidden_size)
        self.visual_tokens = configured_budget(config)
        if self.visual_tokens is None:
            return
        why = None
        if not vllm_config.model_config.get_multimodal_config().is_multimodal_pruning_enabled():
            why = ("vLLM 0.32 corrects the kept tokens' M-RoPE positions (recompute_mrope_positions) only when its "
                   "multimodal pruning is on: serve with --video-pruning-rate 0.5 (with a budget the model takes no "
                   "video, so the rate changes nothing else; `shortlvlm serve` adds it)")
        elif vllm_config.parallel_config.pipeline_parallel_size > 1:
            why = ("vLLM corrects M-RoPE positions on the first pipeline stage only, so the later stages would rotate "
                   "the kept tokens by the wrong positions: serve it without --pipeline-parallel-size")
        elif self.use_data_parallel:
            why = "the vision tower's data-parallel mode runs its own sharded path: drop --mm-encoder-tp-mode data"
        elif not self._last_block_sees_whole_images():
            why = ("the importance is the attention a patch receives from its whole image, and the last vision block "
                   "uses window attention")
        if why:
            raise ShortLVLMError(f"visual_tokens {self.visual_tokens} cannot be served: {why}.")

    def _last_block_sees_whole_images(self) -> bool:
        last = len(self.visual.blocks) - 1
        return last in getattr(self.visual, "fullatt_block_indexes", [last])  # Qwen2-VL: every block does

    def get_mrope_input_positions(self, input_tokens, mm_features):
        """The prompt's positions before the tower has chosen: exact for the text, stand-ins (the first K grid
        offsets) for each image's kept tokens, which recompute_mrope_positions replaces."""
        if self.visual_tokens is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        merge_size = self.config.vision_config.spatial_merge_size
        images = []
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            grid_thw = feature.data["image_grid_thw"].data.tolist()
            kept = kept_token_count(self.visual_tokens, int(torch.tensor(grid_thw).prod()) // merge_size**2)
            images.append((feature.mm_position.offset, position_channels(grid_thw, merge_size, torch.arange(kept))))
        return prompt_mrope_positions(len(input_tokens), images)

    def embed_multimodal(self, **kwargs):
        if self.visual_tokens is None:
            return super().embed_multimodal(**kwargs)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if image_input["type"] != "pixel_values":
            raise ShortLVLMError("visual-token pruning scores the vision tower's attention, so it needs images, "
                                 "not precomputed image embeddings.")
        return self._kept_image_tokens(image_input["pixel_values"], image_input["image_grid_thw"].tolist())

    def _kept_image_tokens(self, pixel_values: torch.Tensor, grid_thw: list[list[int]]) -> tuple[torch.Tensor, ...]:
        """Per image: its kept merged tokens, each with its position_channels appended.

        vLLM's vision attention returns no probabilities, so the last block's queries and keys (after the rotary
        embedding) are taken as they enter its attention kernel. Under tensor parallelism each rank holds
        num_heads / tp of the heads: the head sums are all-reduced, so every rank selects the same tokens.
        """
        merge_size = self.visual.spatial_merge_size
        metadata = self.visual.prepare_encoder_metadata(grid_thw)
        last_attention = self.visual.blocks[-1].attn
        captured = {}
        hook = last_attention.attn.register_forward_pre_hook(
            lambda module, args, kwargs: captured.update(kwargs), with_kwargs=True)
        try:
            embeds = self.visual(pixel_values, grid_thw=grid_thw, encoder_metadata=metadata)
        finally:
            hook.remove()
        patch_scores = received_attention(captured["query"][0], captured["key"][0], captured["cu_seqlens"])
        if last_attention.tp_size > 1:
            patch_scores = tensor_model_parallel_all_reduce(patch_scores)
        scores = merge_group_scores(patch_scores, merge_size**2)
        if "reverse_indices" in metadata:  # Qwen2.5-VL's blocks run in window order; the merger's output does not
            scores = scores[metadata["reverse_indices"]]
        sizes = [t * h * w // merge_size**2 for t, h, w in grid_thw]
        kept_tokens = []
        for image_embeds, image_scores, grid in zip(embeds.split(sizes), scores.split(sizes), grid_thw, strict=True):
            kept = keep_most_attended(image_scores, self.visual_tokens)
            channels = position_channels(grid, merge_size, kept).to(image_embeds.device, image_embeds.dtype)
            kept_tokens.append(torch.cat([image_embeds[kept], channels], dim=1))
        return tuple(kept_tokens)

    def get_encoder_cudagraph_config(self):
        """No encoder CUDA graph with a budget: it would bypass embed_multimodal (as vLLM's EVS path says)."""
        config = super().get_encoder_cudagraph_config()
        return config if self.visual_tokens is None else replace(config, modalities=[])


class ShortQwen2VLProcessingInfo(_BudgetProcessingInfo, Qwen2VLProcessingInfo):
    pass


class ShortQwen2VLMultiModalProcessor(_BudgetProcessor, Qwen2VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    ShortQwen2VLMultiModalProcessor, info=ShortQwen2VLProcessingInfo, dummy_inputs=Qwen2VLDummyInputsBuilder
)
class ShortQwen2VLForConditionalGeneration(_VisualTokenBudget, Qwen2VLForConditionalGeneration):
    supports_multimodal_pruning = True
    # vLLM's own correction for a Qwen-VL prompt with pruned image tokens (it reads this class's config the same way)
    recompute_mrope_positions = Qwen2_5_VLForConditionalGeneration.recompute_mrope_positions

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._init_short_lvlm(vllm_config)
        if self.visual_tokens is None:
            self.supports_multimodal_pruning = False  # stock Qwen2-VL: vLLM never asks it to correct positions


class ShortQwen2_5_VLProcessingInfo(_BudgetProcessingInfo, Qwen2_5_VLProcessingInfo):
    pass


class ShortQwen2_5_VLMultiModalProcessor(_BudgetProcessor, Qwen2_5_VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    ShortQwen2_5_VLMultiModalProcessor, info=ShortQwen2_5_VLProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder
)
class ShortQwen2_5_VLForConditionalGeneration(_VisualTokenBudget, Qwen2_5_VLForConditionalGeneration):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._init_short_lvlm(vllm_config)
