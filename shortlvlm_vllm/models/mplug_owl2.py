"""mPLUG-Owl2 (Ye et al., CVPR 2024; X-PLUG/mPLUG-Owl, folder mPLUG-Owl2) as a transformers model of this project.

The architecture, as the original code defines it and the hub checkpoint (MAGAer13/mplug-owl2-llama2-7b) stores it:
- a ViT (`model.vision_model`: [CLS] + patches, fused per-head-interleaved qkv, QuickGELU MLP, post layer norm);
- the visual abstractor (`model.visual_abstractor`): learnable queries cross-attending to the ViT's tokens (the
  queries' own keys included) with sin-cos position embeddings, then `visual_fc` to the language model's width
  and a learned end-of-image token: `num_learnable_queries + 1` tokens per image;
- a Llama-2 decoder whose layers are modality-adaptive: the two layer norms and the key and value projections
  exist twice (`.multiway.0` for text tokens, `.multiway.1` for image tokens), the query, output and MLP once.

Prompts follow the original `tokenizer_image_token`: the text is split at "<|image|>", each piece tokenized
without special tokens, BOS first, and each image becomes its tokens in place of the tag. The original marks that
place with id -200 in input_ids, which no embedding table holds; here every image token is `image_token_index`
(default 0, Llama-2's <unk>, which its tokenizer never produces from text), so vLLM's prompt machinery can carry it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import BatchFeature, GenerationMixin, LlamaConfig, PreTrainedModel, ProcessorMixin
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

MODEL_TYPE = "mplug_owl2"
ARCHITECTURE = "MPLUGOwl2LlamaForCausalLM"
IMAGE_TAG = "<|image|>"
# The original conversation format as a chat template (the hub checkpoint ships none): the processor's default,
# and vLLM's fallback for this model type (registered by the plugin, from models.CHAT_TEMPLATES).
CHAT_TEMPLATE_PATH = Path(__file__).with_name("mplug_owl2_chat_template.jinja")
TEXT, VISUAL = 0, 1  # the multiway index of each modality, as the original's modality indicators

VISION_DEFAULTS = {  # MplugOwlVisionConfig's defaults (the 7B checkpoint's values)
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
    "image_size": 448, "patch_size": 14, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-6,
}
ABSTRACTOR_DEFAULTS = {  # MplugOwlVisualAbstractorConfig's defaults
    "num_learnable_queries": 64, "hidden_size": 1024, "num_hidden_layers": 6, "num_attention_heads": 16,
    "intermediate_size": 2816, "layer_norm_eps": 1e-6, "encoder_hidden_size": 1024, "grid_size": 32,
}


class MPLUGOwl2Config(LlamaConfig):
    """The original MPLUGOwl2Config: a LlamaConfig (flat text fields) with `visual_config` =
    {"visual_model": {...}, "visual_abstractor": {...}}."""

    model_type = MODEL_TYPE

    def __init__(self, visual_config: dict | None = None, image_token_index: int = 0, **kwargs) -> None:
        visual_config = dict(visual_config or {})
        visual_config["visual_model"] = {**VISION_DEFAULTS, **visual_config.get("visual_model", {})}
        visual_config["visual_abstractor"] = {**ABSTRACTOR_DEFAULTS, **visual_config.get("visual_abstractor", {})}
        self.visual_config = visual_config
        self.image_token_index = image_token_index
        super().__init__(**kwargs)

    @property
    def vision(self) -> dict:
        return self.visual_config["visual_model"]

    @property
    def abstractor(self) -> dict:
        return self.visual_config["visual_abstractor"]

    @property
    def image_tokens(self) -> int:
        """Tokens each image gives the language model: the abstractor's queries and the end-of-image token."""
        return self.abstractor["num_learnable_queries"] + 1


# --- sin-cos position embeddings of the abstractor (MAE's), in numpy float32 as the original computes them ---

def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    omega = np.arange(dim // 2, dtype=np.float32) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = np.einsum("m,d->md", positions.reshape(-1), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, grid_size: int, cls_token: bool = True) -> np.ndarray:
    coords = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(coords, coords), axis=0).reshape(2, 1, grid_size, grid_size)  # width first
    embed = np.concatenate([sincos_1d(dim // 2, grid[0]), sincos_1d(dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, dim]), embed], axis=0) if cls_token else embed


def abstractor_position_embeddings(abstractor: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The abstractor's (queries, keys) position embeddings: 1-D over the queries; 2-D over the ViT's grid with a
    zero row for [CLS]."""
    queries = np.arange(abstractor["num_learnable_queries"], dtype=np.float32)
    return (torch.from_numpy(sincos_1d(abstractor["hidden_size"], queries)).float(),
            torch.from_numpy(sincos_2d(abstractor["hidden_size"], abstractor["grid_size"])).float())


# --- the vision tower and the visual abstractor: plain torch, shared with the vLLM class ---

class VisionEmbeddings(nn.Module):
    def __init__(self, vision: dict) -> None:
        super().__init__()
        hidden, patch = vision["hidden_size"], vision["patch_size"]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden))
        self.patch_embed = nn.Conv2d(3, hidden, kernel_size=patch, stride=patch, bias=False)
        self.position_embedding = nn.Parameter(torch.zeros(1, (vision["image_size"] // patch) ** 2 + 1, hidden))
        self.pre_layernorm = nn.LayerNorm(hidden, eps=vision["layer_norm_eps"])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        embeddings = torch.cat([self.cls_token.expand(len(patches), 1, -1).to(patches.dtype), patches], dim=1)
        embeddings = embeddings + self.position_embedding[:, : embeddings.shape[1]].to(patches.dtype)
        return self.pre_layernorm(embeddings)


class VisionAttention(nn.Module):
    def __init__(self, vision: dict) -> None:
        super().__init__()
        self.num_heads = vision["num_attention_heads"]
        self.query_key_value = nn.Linear(vision["hidden_size"], 3 * vision["hidden_size"])
        self.dense = nn.Linear(vision["hidden_size"], vision["hidden_size"])

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        batch, length, width = hidden.shape
        # the fused projection interleaves q, k, v per head: [B, T, heads, 3, head_dim]
        qkv = self.query_key_value(hidden).reshape(batch, length, self.num_heads, 3, width // self.num_heads)
        query, key, value = qkv.permute(3, 0, 2, 1, 4)
        probs = torch.softmax(query @ key.transpose(-1, -2) * (width // self.num_heads) ** -0.5, dim=-1)
        return self.dense((probs @ value).transpose(1, 2).reshape(batch, length, width))


class VisionMLP(nn.Module):
    def __init__(self, vision: dict) -> None:
        super().__init__()
        self.activation_fn = ACT2FN[vision["hidden_act"]]
        self.fc1 = nn.Linear(vision["hidden_size"], vision["intermediate_size"])
        self.fc2 = nn.Linear(vision["intermediate_size"], vision["hidden_size"])

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden)))


class VisionLayer(nn.Module):
    def __init__(self, vision: dict) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(vision["hidden_size"], eps=vision["layer_norm_eps"])
        self.self_attn = VisionAttention(vision)
        self.post_attention_layernorm = nn.LayerNorm(vision["hidden_size"], eps=vision["layer_norm_eps"])
        self.mlp = VisionMLP(vision)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden))
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class VisionEncoder(nn.Module):
    def __init__(self, vision: dict) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(vision) for _ in range(vision["num_hidden_layers"]))


class VisionModel(nn.Module):
    """The ViT: every token of its last layer, [CLS] first, after the post layer norm."""

    def __init__(self, vision: dict) -> None:
        super().__init__()
        self.embeddings = VisionEmbeddings(vision)
        self.encoder = VisionEncoder(vision)
        self.post_layernorm = nn.LayerNorm(vision["hidden_size"], eps=vision["layer_norm_eps"])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            hidden = layer(hidden)
        return self.post_layernorm(hidden)


class AbstractorMultiHeadAttention(nn.Module):
    def __init__(self, abstractor: dict) -> None:
        super().__init__()
        hidden, encoder = abstractor["hidden_size"], abstractor["encoder_hidden_size"]
        self.num_heads = abstractor["num_attention_heads"]
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(encoder, hidden)
        self.value = nn.Linear(encoder, hidden)
        # buffers the original saves too; recomputed here, so a checkpoint's copies are ignored on load
        q_pos_embed, k_pos_embed = abstractor_position_embeddings(abstractor)
        self.register_buffer("q_pos_embed", q_pos_embed, persistent=False)
        self.register_buffer("k_pos_embed", k_pos_embed, persistent=False)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        batch, num_queries, width = queries.shape
        position = torch.cat([self.q_pos_embed, self.k_pos_embed]).to(queries)

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(batch, -1, self.num_heads, width // self.num_heads).transpose(1, 2)

        key, value = heads(self.key(keys + position)), heads(self.value(keys))
        query = heads(self.query(queries + self.q_pos_embed.to(queries)))
        probs = torch.softmax(query @ key.transpose(-1, -2) / math.sqrt(width // self.num_heads), dim=-1)
        return (probs @ value).transpose(1, 2).reshape(batch, num_queries, width)


class AbstractorMLP(nn.Module):
    def __init__(self, abstractor: dict) -> None:
        super().__init__()
        hidden, inner = abstractor["hidden_size"], abstractor["intermediate_size"]
        self.act = nn.SiLU()
        self.w1 = nn.Linear(hidden, inner)
        self.w2 = nn.Linear(inner, hidden)
        self.w3 = nn.Linear(hidden, inner)
        self.ffn_ln = nn.LayerNorm(inner, eps=abstractor["layer_norm_eps"])

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.w2(self.ffn_ln(self.act(self.w1(hidden)) * self.w3(hidden)))


class AbstractorCrossOutput(nn.Module):
    def __init__(self, abstractor: dict) -> None:
        super().__init__()
        width = abstractor["encoder_hidden_size"]
        self.out_proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = AbstractorMLP(abstractor)

    def forward(self, context: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        hidden = queries + self.out_proj(context)
        return hidden + self.mlp(self.norm2(hidden))


class AbstractorCrossAttention(nn.Module):
    def __init__(self, abstractor: dict) -> None:
        super().__init__()
        self.attention = AbstractorMultiHeadAttention(abstractor)
        self.output = AbstractorCrossOutput(abstractor)
        self.norm1 = nn.LayerNorm(abstractor["encoder_hidden_size"])
        self.normk = nn.LayerNorm(abstractor["encoder_hidden_size"])

    def forward(self, queries: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        queries = self.norm1(queries)  # the residual is the normed queries, as in the original
        keys = torch.cat([queries, self.normk(image)], dim=1)
        return self.output(self.attention(queries, keys), queries)


class AbstractorLayer(nn.Module):
    def __init__(self, abstractor: dict) -> None:
        super().__init__()
        self.crossattention = AbstractorCrossAttention(abstractor)


class AbstractorEncoder(nn.Module):
    def __init__(self, abstractor: dict) -> None:
        super().__init__()
        self.layers = nn.ModuleList(AbstractorLayer(abstractor) for _ in range(abstractor["num_hidden_layers"]))


class VisualAbstractor(nn.Module):
    """ViT tokens [B, 1 + N, C] -> image tokens for the language model [B, queries + 1, D]."""

    def __init__(self, abstractor: dict, language_hidden_size: int) -> None:
        super().__init__()
        self.encoder = AbstractorEncoder(abstractor)
        self.visual_fc = nn.Linear(abstractor["hidden_size"], language_hidden_size)
        self.query_embeds = nn.Parameter(torch.zeros(1, abstractor["num_learnable_queries"], abstractor["hidden_size"]))
        self.vit_eos = nn.Parameter(torch.zeros(1, 1, language_hidden_size))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        queries = self.query_embeds.expand(len(image), -1, -1).to(image.dtype)
        for layer in self.encoder.layers:
            queries = layer.crossattention(queries, image)
        tokens = self.visual_fc(queries)
        return torch.cat([tokens, self.vit_eos.expand(len(tokens), 1, -1).to(tokens.dtype)], dim=1)


# --- the modality-adaptive decoder ---

class Multiway(nn.Module):
    """One module per modality (`multiway.0` text, `multiway.1` image), each token through its own."""

    def __init__(self, make: callable) -> None:
        super().__init__()
        self.multiway = nn.ModuleList([make(), make()])

    def forward(self, hidden: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        text_out = self.multiway[TEXT](hidden)
        if not bool(visual.any()):
            return text_out
        return torch.where(visual[..., None], self.multiway[VISUAL](hidden), text_out)


class MultiwayAttention(nn.Module):
    def __init__(self, config: MPLUGOwl2Config, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        kv_width = config.num_key_value_heads * self.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = Multiway(lambda: nn.Linear(config.hidden_size, kv_width, bias=bias))
        self.v_proj = Multiway(lambda: nn.Linear(config.hidden_size, kv_width, bias=bias))
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(self, hidden: torch.Tensor, visual: torch.Tensor, position_embeddings,
                causal_mask: torch.Tensor) -> torch.Tensor:
        batch, length, _ = hidden.shape
        shape = (batch, length, -1, self.head_dim)
        query = self.q_proj(hidden).view(shape).transpose(1, 2)
        key = self.k_proj(hidden, visual).view(shape).transpose(1, 2)
        value = self.v_proj(hidden, visual).view(shape).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = attention(self, query, key, value, causal_mask, scaling=self.scaling, dropout=0.0)
        return self.o_proj(out.reshape(batch, length, -1)), weights


class MultiwayDecoderLayer(nn.Module):
    def __init__(self, config: MPLUGOwl2Config, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = MultiwayAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = Multiway(lambda: LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps))
        self.post_attention_layernorm = Multiway(lambda: LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps))

    def forward(self, hidden_states: torch.Tensor, visual: torch.Tensor, position_embeddings,
                causal_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(output, attention weights: eager attention's, None from SDPA)."""
        attended, weights = self.self_attn(
            self.input_layernorm(hidden_states, visual), visual, position_embeddings, causal_mask)
        hidden_states = hidden_states + attended
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states, visual)), weights


class MPLUGOwl2PreTrainedModel(PreTrainedModel):
    config_class = MPLUGOwl2Config
    config: MPLUGOwl2Config
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["MultiwayDecoderLayer", "VisionLayer", "AbstractorLayer"]
    _supports_sdpa = True
    _supports_attention_backend = True
    # the original's sin-cos buffers: recomputed from the config, never loaded
    _keys_to_ignore_on_load_unexpected = [r"\.(q|k)_pos_embed$"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """transformers' defaults (linear, embedding, norms, rotary frequencies), the bare parameters, and the
        sin-cos buffers, which loading leaves unset."""
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, VisionEmbeddings):
            init.normal_(module.cls_token, std=std)
            init.normal_(module.position_embedding, std=std)
        elif isinstance(module, VisualAbstractor):
            init.normal_(module.query_embeds, std=std)
            init.normal_(module.vit_eos, std=std)
        elif isinstance(module, AbstractorMultiHeadAttention):
            q_pos_embed, k_pos_embed = abstractor_position_embeddings(self.config.abstractor)
            init.copy_(module.q_pos_embed, q_pos_embed)
            init.copy_(module.k_pos_embed, k_pos_embed)


class MPLUGOwl2LlamaModel(MPLUGOwl2PreTrainedModel):
    def __init__(self, config: MPLUGOwl2Config) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MultiwayDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)
        self.vision_model = VisionModel(config.vision)
        self.visual_abstractor = VisualAbstractor(config.abstractor, config.hidden_size)
        self.post_init()

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[images, queries + 1, D]: what each image puts in the language model."""
        return self.visual_abstractor(self.vision_model(pixel_values))

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None
                ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor | None, ...]]:
        """The decoder's states (the embeddings and each layer's output, the last normed, as transformers orders
        hidden_states) and each layer's attention weights."""
        visual = input_ids == self.config.image_token_index
        embeds = self.embed_tokens(input_ids.masked_fill(visual, 0))
        if pixel_values is not None:
            features = self.image_features(pixel_values).reshape(-1, embeds.shape[-1])
            if features.shape[0] != int(visual.sum()):
                raise ValueError(f"{int(visual.sum())} image tokens in input_ids, {features.shape[0]} image features")
            embeds = embeds.masked_scatter(visual[..., None], features.to(embeds.dtype))
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand_as(input_ids)
        position_embeddings = self.rotary_emb(embeds, positions)
        length = input_ids.shape[1]
        causal_mask = torch.full((length, length), torch.finfo(embeds.dtype).min, dtype=embeds.dtype,
                                 device=embeds.device).triu(1)[None, None]
        states, attentions = [embeds], []
        for layer in self.layers:
            hidden, weights = layer(states[-1], visual, position_embeddings, causal_mask)
            states.append(hidden)
            attentions.append(weights)
        states[-1] = self.norm(states[-1])
        return tuple(states), tuple(attentions)


class MPLUGOwl2LlamaForCausalLM(MPLUGOwl2PreTrainedModel, GenerationMixin):
    """The original's MPLUGOwl2LlamaForCausalLM: same module tree, same state_dict keys. No KV cache: each
    generation step runs the whole sequence again (a reference, for checking, not for speed)."""

    def __init__(self, config: MPLUGOwl2Config) -> None:
        super().__init__(config)
        self.model = MPLUGOwl2LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, output_hidden_states: bool = False,
                output_attentions: bool = False, **kwargs) -> CausalLMOutputWithPast:
        """Full-sequence logits; `attention_mask` (all ones for a batch of one) and cache arguments are accepted
        and unused."""
        states, attentions = self.model(input_ids, pixel_values)
        return CausalLMOutputWithPast(logits=self.lm_head(states[-1]),
                                      hidden_states=states if output_hidden_states else None,
                                      attentions=attentions if output_attentions else None)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                                      **kwargs) -> dict:
        return {"input_ids": input_ids, "pixel_values": pixel_values}


# --- the processor ---

def tokenize_prompt(tokenizer, text: str, image_token_id: int, tokens_per_image: int, bos: bool = True) -> list[int]:
    """The original's tokenizer_image_token: BOS, then each piece between "<|image|>" tags tokenized on its own
    (no special tokens), each tag replaced by `tokens_per_image` image tokens."""
    ids = [tokenizer.bos_token_id] if bos and tokenizer.bos_token_id is not None else []
    for index, piece in enumerate(text.split(IMAGE_TAG)):
        if index:
            ids += [image_token_id] * tokens_per_image
        if piece:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return ids


class MPLUGOwl2Processor(ProcessorMixin):
    """Images as the original's process_images ("resize": stretched to a square of the longer side, then the
    CLIP image processor), prompts as tokenize_prompt with each image's tokens expanded."""

    attributes = ["image_processor", "tokenizer"]

    def __init__(self, image_processor=None, tokenizer=None, chat_template: str | None = None,
                 image_token_index: int = 0, tokens_per_image: int = ABSTRACTOR_DEFAULTS["num_learnable_queries"] + 1,
                 **kwargs) -> None:
        self.image_token_index = image_token_index
        self.tokens_per_image = tokens_per_image
        chat_template = chat_template or getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATE_PATH.read_text()
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    def preprocess_images(self, images: Sequence) -> torch.Tensor:
        squares = [image.convert("RGB").resize((max(image.size), max(image.size))) for image in images]
        return self.image_processor(squares, return_tensors="pt")["pixel_values"]

    def __call__(self, images=None, text: str | None = None, return_tensors: str | None = "pt", **kwargs):
        data = {}
        if text is not None:
            data["input_ids"] = torch.tensor([tokenize_prompt(
                self.tokenizer, text, self.image_token_index, self.tokens_per_image)])
            data["attention_mask"] = torch.ones_like(data["input_ids"])
        if images is not None:
            data["pixel_values"] = self.preprocess_images(images if isinstance(images, list | tuple) else [images])
        return BatchFeature(data)


def register_with_transformers() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

    AutoConfig.register(MODEL_TYPE, MPLUGOwl2Config, exist_ok=True)
    AutoModelForImageTextToText.register(MPLUGOwl2Config, MPLUGOwl2LlamaForCausalLM, exist_ok=True)
    AutoModelForCausalLM.register(MPLUGOwl2Config, MPLUGOwl2LlamaForCausalLM, exist_ok=True)
    AutoProcessor.register(MPLUGOwl2Config, MPLUGOwl2Processor, exist_ok=True)
