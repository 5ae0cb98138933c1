"""QWenLMHeadModel: Qwen-VL / Qwen-VL-Chat for vLLM (which dropped its class in 0.23), under the name its checkpoint
gives, loading the original key layout and config.

The vision tower and the resampler are the reference model's own modules (shortlvlm_vllm.models.qwen), replicated on
every rank; the decoder is vLLM's (paged attention, tensor-parallel linear layers): the fused `c_attn` loads into a
QKV projection, `w2` (the gate) and `w1` (up) into one gate-up projection. Like vLLM's own port before 0.23, it has no
dynamic NTK and no log-n query scaling: both change nothing below `seq_length` (2048) tokens, the longest context vLLM
derives from this config.json (the smallest of max_position_embeddings and seq_length); a longer --max-model-len
(which vLLM refuses unless told to allow it) would make the served model differ from the original.

SCP side paths (a quantized source pruned with SCP, `short_lvlm.side_paths`) sit at each declared layer's `mlp.c_proj`
output, the way the other registered classes apply them (side_path.DeclaredSidePaths).

Prompts: the chat template writes each image as "Picture N:<img></img>"; vLLM's renderer tokenizes the prompt whole
(the tags are special tokens) and the prompt update puts the image's 256 <imgpad> tokens between the tags.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
    PromptUpdateDetails,
)
from vllm.sequence import IntermediateTensors

from shortlvlm_vllm.adapters.qwen import QWEN
from shortlvlm_vllm.models.qwen import IMAGE_END, IMAGE_START, QWenConfig, QWenVLProcessor, VisionTransformer
from shortlvlm_vllm.serving.vllm_plugin.side_path import DeclaredSidePaths, load_stacked_weights

# The decoder's stacked parameters: (vLLM parameter, checkpoint name, shard)
STACKED = (("mlp.gate_up_proj", "mlp.w2", 0), ("mlp.gate_up_proj", "mlp.w1", 1))


class QWenProcessingInfo(BaseProcessingInfo):
    def get_hf_config(self) -> QWenConfig:
        return self.ctx.get_hf_config(QWenConfig)

    def get_hf_processor(self, **kwargs: object) -> QWenVLProcessor:
        return self.ctx.get_hf_processor(QWenVLProcessor, **kwargs)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_num_image_tokens(self) -> int:
        return self.get_hf_config().visual["n_queries"]

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.get_num_image_tokens()}


class QWenDummyInputsBuilder(BaseDummyInputsBuilder[QWenProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return "".join(f"Picture {i}:{IMAGE_START}{IMAGE_END}\n" for i in range(1, mm_counts.get("image", 0) + 1))

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int],
                          mm_options: MultiModalDummyOptions) -> dict:
        size = self.info.get_hf_config().visual["image_size"]
        return {"image": self._get_dummy_images(width=size, height=size, num_images=mm_counts.get("image", 0),
                                                overrides=mm_options.get("image"))}


class QWenMultiModalProcessor(BaseMultiModalProcessor[QWenProcessingInfo]):
    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        return BatchFeature({"pixel_values": self.info.get_hf_processor().preprocess_images(hf_data["images"])})

    def _get_mm_fields_config(self, hf_inputs: BatchFeature,
                              hf_processor_mm_kwargs: Mapping[str, object]) -> Mapping[str, MultiModalFieldConfig]:
        return {"pixel_values": MultiModalFieldConfig.batched("image")}

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        config = self.info.get_hf_config()
        start, end, pad = config.image_start_id, config.image_start_id + 1, config.image_pad_id
        span = [start, *[pad] * self.info.get_num_image_tokens(), end]
        return [PromptReplacement(modality="image", target=[start, end],
                                  replacement=PromptUpdateDetails.select_token_id(span, embed_token_id=pad))]


class QWenAttention(nn.Module):
    def __init__(self, config: QWenConfig, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        heads = config.num_attention_heads
        head_dim = config.hidden_size // heads
        quant_config = vllm_config.quant_config
        self.c_attn = QKVParallelLinear(config.hidden_size, head_dim, heads, bias=True, quant_config=quant_config,
                                        prefix=f"{prefix}.c_attn")
        self.c_proj = RowParallelLinear(heads * head_dim, config.hidden_size, bias=not config.no_bias,
                                        quant_config=quant_config, prefix=f"{prefix}.c_proj")
        self.rotary_emb = get_rope(head_dim, max_position=config.max_position_embeddings, is_neox_style=True,
                                   rope_parameters={"rope_type": "default", "rope_theta": config.rotary_emb_base})
        self.attn = Attention(heads // tp, head_dim, head_dim**-0.5, cache_config=vllm_config.cache_config,
                              quant_config=quant_config, prefix=f"{prefix}.attn")

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.c_attn(hidden)
        query, key, value = qkv.chunk(3, dim=-1)
        query, key = self.rotary_emb(positions, query, key)
        out, _ = self.c_proj(self.attn(query, key, value))
        return out


class QWenMLP(nn.Module):
    def __init__(self, config: QWenConfig, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        inner, bias = config.intermediate_size // 2, not config.no_bias
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [inner] * 2, bias=bias,
                                                       quant_config=vllm_config.quant_config,
                                                       prefix=f"{prefix}.gate_up_proj")
        self.c_proj = RowParallelLinear(inner, config.hidden_size, bias=bias, quant_config=vllm_config.quant_config,
                                        prefix=f"{prefix}.c_proj")
        self.act_fn = SiluAndMul()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(hidden)
        out, _ = self.c_proj(self.act_fn(gate_up))
        return out


class QWenBlock(nn.Module):
    def __init__(self, config: QWenConfig, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = QWenAttention(config, vllm_config, f"{prefix}.attn")
        self.ln_2 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = QWenMLP(config, vllm_config, f"{prefix}.mlp")

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.attn(positions, self.ln_1(hidden))
        return hidden + self.mlp(self.ln_2(hidden))


class QWenModel(nn.Module):
    def __init__(self, config: QWenConfig, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        self.wte = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.h = nn.ModuleList(QWenBlock(config, vllm_config, f"{prefix}.h.{i}")
                               for i in range(config.num_hidden_layers))
        self.ln_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.visual = VisionTransformer(config.visual)


@MULTIMODAL_REGISTRY.register_processor(
    QWenMultiModalProcessor, info=QWenProcessingInfo, dummy_inputs=QWenDummyInputsBuilder)
class QWenLMHeadModel(DeclaredSidePaths, nn.Module, SupportsMultiModal):
    packed_modules_mapping = {"gate_up_proj": ["w2", "w1"]}

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return f"Picture {i}:{IMAGE_START}{IMAGE_END}"
        raise ValueError("Only image modality is supported")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.transformer = QWenModel(config, vllm_config, "transformer")
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config,
                                      prefix="lm_head")
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.attach_declared_side_paths(self.transformer.h, config.to_dict().get("short_lvlm"), config.hidden_size,
                                        QWEN.side_path_target)

    def get_language_model(self) -> nn.Module:
        return self

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            return []
        if isinstance(pixel_values, list | tuple):
            pixel_values = torch.stack(list(pixel_values))
        return list(self.transformer.visual(pixel_values))

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings: MultiModalEmbeddings | None = None,
                        *, is_multimodal: torch.Tensor | None = None) -> torch.Tensor:
        embeds = self.transformer.wte(input_ids)
        if multimodal_embeddings is None or len(multimodal_embeddings) == 0 or is_multimodal is None:
            return embeds
        return embeds.masked_scatter(is_multimodal[:, None], torch.cat(list(multimodal_embeddings)).to(embeds.dtype))

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs: object) -> torch.Tensor:
        hidden = inputs_embeds if inputs_embeds is not None else self.transformer.wte(input_ids)
        for layer in self.transformer.h:
            hidden = layer(positions, hidden)
        return self.transformer.ln_f(hidden)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # the original's buffers are skipped, if saved; only the decoder's MLP is fused
        return load_stacked_weights(self, weights, STACKED, skip=(".attn.masked_bias", ".rotary_emb.inv_freq"),
                                    within="transformer.h.")
