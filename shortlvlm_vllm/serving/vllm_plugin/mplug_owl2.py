"""MPLUGOwl2LlamaForCausalLM: mPLUG-Owl2 for vLLM (which ships no class for it), under the name its checkpoint
gives, loading the original key layout and config.

The vision tower and the visual abstractor are the reference model's own modules (shortlvlm_vllm.models.mplug_owl2),
replicated on every rank; the decoder is vLLM's (paged attention, tensor-parallel linear layers) with the
modality-adaptive parts: text and image copies of both layer norms and of the key and value projections. Which
tokens are image tokens comes from the `is_multimodal` mask vLLM passes to embed_input_ids, kept for the forward
that follows (as vLLM's Ernie-4.5-VL does for its modality experts); decode steps carry no image token.

Prompts: vLLM's renderer tokenizes the whole prompt; `_postprocess_prompt` re-tokenizes it the way the original's
tokenizer_image_token does (each piece between "<|image|>" tags on its own), leaving one image token per tag,
which the prompt update expands to the image's `num_learnable_queries + 1` tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property

import torch
from torch import nn
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.llama import LlamaMLP
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
)
from vllm.sequence import IntermediateTensors

from shortlvlm_vllm.adapters.mplug_owl2 import MPLUG_OWL2
from shortlvlm_vllm.models.mplug_owl2 import (
    IMAGE_TAG,
    TEXT,
    VISUAL,
    MPLUGOwl2Config,
    MPLUGOwl2Processor,
    VisionModel,
    VisualAbstractor,
    tokenize_prompt,
)
from shortlvlm_vllm.serving.vllm_plugin.side_path import DeclaredSidePaths, load_stacked_weights

# The decoder's stacked parameters: (vLLM parameter, checkpoint name, shard)
STACKED = (("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1))


class MPLUGOwl2ProcessingInfo(BaseProcessingInfo):
    def get_hf_config(self) -> MPLUGOwl2Config:
        return self.ctx.get_hf_config(MPLUGOwl2Config)

    def get_hf_processor(self, **kwargs: object) -> MPLUGOwl2Processor:
        return self.ctx.get_hf_processor(MPLUGOwl2Processor, **kwargs)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    @cached_property
    def image_token_id(self) -> int:
        return self.get_hf_config().image_token_index

    def get_num_image_tokens(self) -> int:
        return self.get_hf_config().image_tokens

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.get_num_image_tokens()}


class MPLUGOwl2DummyInputsBuilder(BaseDummyInputsBuilder[MPLUGOwl2ProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return IMAGE_TAG * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int],
                          mm_options: MultiModalDummyOptions) -> dict:
        size = self.info.get_hf_config().vision["image_size"]
        return {"image": self._get_dummy_images(width=size, height=size, num_images=mm_counts.get("image", 0),
                                                overrides=mm_options.get("image"))}


class MPLUGOwl2MultiModalProcessor(BaseMultiModalProcessor[MPLUGOwl2ProcessingInfo]):
    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        processor = self.info.get_hf_processor()
        return BatchFeature({"pixel_values": processor.preprocess_images(hf_data["images"])})

    def _postprocess_prompt(self, prompt: list[int]) -> list[int]:
        """The prompt as the original tokenizes it: each piece between "<|image|>" tags on its own."""
        tokenizer = self.info.get_tokenizer()
        bos = bool(prompt) and prompt[0] == tokenizer.bos_token_id
        text = tokenizer.decode(prompt[1:] if bos else prompt)
        if IMAGE_TAG not in text:
            return prompt
        return tokenize_prompt(tokenizer, text, self.info.image_token_id, 1, bos=bos)

    def _get_mm_fields_config(self, hf_inputs: BatchFeature,
                              hf_processor_mm_kwargs: Mapping[str, object]) -> Mapping[str, MultiModalFieldConfig]:
        return {"pixel_values": MultiModalFieldConfig.batched("image")}

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        token = self.info.image_token_id
        return [PromptReplacement(modality="image", target=[token],
                                  replacement=[token] * self.info.get_num_image_tokens())]


class MultiwayRMSNorm(nn.Module):
    """`multiway.0` for text tokens, `multiway.1` for image tokens."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.multiway = nn.ModuleList([RMSNorm(hidden_size, eps=eps), RMSNorm(hidden_size, eps=eps)])

    def forward(self, hidden: torch.Tensor, visual: torch.Tensor | None) -> torch.Tensor:
        out = self.multiway[TEXT](hidden)
        if visual is not None:
            out[visual] = self.multiway[VISUAL](hidden[visual])
        return out


class MultiwayLinear(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool, quant_config, prefix: str) -> None:
        super().__init__()
        self.multiway = nn.ModuleList([
            ColumnParallelLinear(input_size, output_size, bias=bias, quant_config=quant_config,
                                 prefix=f"{prefix}.multiway.{i}") for i in (TEXT, VISUAL)])

    def forward(self, hidden: torch.Tensor, visual: torch.Tensor | None) -> torch.Tensor:
        out, _ = self.multiway[TEXT](hidden)
        if visual is not None:
            out[visual] = self.multiway[VISUAL](hidden[visual])[0]
        return out


class MultiwayAttention(nn.Module):
    def __init__(self, config: MPLUGOwl2Config, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        head_dim = config.hidden_size // config.num_attention_heads
        self.num_heads = config.num_attention_heads // tp
        self.num_kv_heads = max(1, config.num_key_value_heads // tp)
        quant_config, bias = vllm_config.quant_config, config.attention_bias
        self.q_proj = ColumnParallelLinear(config.hidden_size, config.num_attention_heads * head_dim, bias=bias,
                                           quant_config=quant_config, prefix=f"{prefix}.q_proj")
        kv_width = config.num_key_value_heads * head_dim
        self.k_proj = MultiwayLinear(config.hidden_size, kv_width, bias, quant_config, f"{prefix}.k_proj")
        self.v_proj = MultiwayLinear(config.hidden_size, kv_width, bias, quant_config, f"{prefix}.v_proj")
        self.o_proj = RowParallelLinear(config.num_attention_heads * head_dim, config.hidden_size, bias=bias,
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")
        self.rotary_emb = get_rope(head_dim, max_position=config.max_position_embeddings,
                                   rope_parameters=config.rope_parameters, is_neox_style=True)
        self.attn = Attention(self.num_heads, head_dim, head_dim**-0.5, num_kv_heads=self.num_kv_heads,
                              cache_config=vllm_config.cache_config, quant_config=quant_config,
                              prefix=f"{prefix}.attn")

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, visual: torch.Tensor | None) -> torch.Tensor:
        query, _ = self.q_proj(hidden)
        query, key = self.rotary_emb(positions, query, self.k_proj(hidden, visual))
        out, _ = self.o_proj(self.attn(query, key, self.v_proj(hidden, visual)))
        return out


class MultiwayDecoderLayer(nn.Module):
    def __init__(self, config: MPLUGOwl2Config, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        self.self_attn = MultiwayAttention(config, vllm_config, f"{prefix}.self_attn")
        self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                            quant_config=vllm_config.quant_config, prefix=f"{prefix}.mlp")
        self.input_layernorm = MultiwayRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = MultiwayRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, visual: torch.Tensor | None) -> torch.Tensor:
        hidden = hidden + self.self_attn(positions, self.input_layernorm(hidden, visual), visual)
        return hidden + self.mlp(self.post_attention_layernorm(hidden, visual))


class MPLUGOwl2Model(nn.Module):
    def __init__(self, config: MPLUGOwl2Config, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MultiwayDecoderLayer(config, vllm_config, f"{prefix}.layers.{i}")
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.vision_model = VisionModel(config.vision)
        self.visual_abstractor = VisualAbstractor(config.abstractor, config.hidden_size)


@MULTIMODAL_REGISTRY.register_processor(
    MPLUGOwl2MultiModalProcessor, info=MPLUGOwl2ProcessingInfo, dummy_inputs=MPLUGOwl2DummyInputsBuilder)
class MPLUGOwl2LlamaForCausalLM(DeclaredSidePaths, nn.Module, SupportsMultiModal):
    packed_modules_mapping = {"gate_up_proj": ["gate_proj", "up_proj"]}

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return IMAGE_TAG
        raise ValueError("Only image modality is supported")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = MPLUGOwl2Model(config, vllm_config, "model")
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config,
                                      prefix="lm_head")
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.visual: torch.Tensor | None = None  # image-token mask of the next forward
        self.attach_declared_side_paths(self.model.layers, config.to_dict().get("short_lvlm"), config.hidden_size)

    def get_language_model(self) -> nn.Module:
        return self

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            return []
        if isinstance(pixel_values, list | tuple):
            pixel_values = torch.stack(list(pixel_values))
        pixel_values = pixel_values.to(next(self.model.vision_model.parameters()).dtype)
        features = self.model.visual_abstractor(self.model.vision_model(pixel_values))
        return list(features)

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings: MultiModalEmbeddings | None = None,
                        *, is_multimodal: torch.Tensor | None = None) -> torch.Tensor:
        embeds = self.model.embed_tokens(input_ids)
        self.visual = None
        if multimodal_embeddings is None or len(multimodal_embeddings) == 0 or is_multimodal is None:
            return embeds
        self.visual = is_multimodal
        return embeds.masked_scatter(is_multimodal[:, None], torch.cat(list(multimodal_embeddings)).to(embeds.dtype))

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs: object) -> torch.Tensor:
        hidden = inputs_embeds if inputs_embeds is not None else self.model.embed_tokens(input_ids)
        visual, self.visual = self.visual, None
        if visual is not None:
            if not bool(visual.any()):
                visual = None
            elif len(visual) < len(hidden):  # padded batch: the padding is text
                visual = torch.cat([visual, visual.new_zeros(len(hidden) - len(visual))])
        for layer in self.model.layers:
            hidden = layer(positions, hidden, visual)
        return self.model.norm(hidden)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_stacked_weights(self, weights, STACKED, skip=MPLUG_OWL2.saved_buffers)  # computed here
