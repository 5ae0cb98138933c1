"""Qwen-VL / Qwen-VL-Chat (Bai et al., 2023; hub Qwen/Qwen-VL-Chat, remote code only) as a transformers model of this
project.

The architecture, as the original remote code (modeling_qwen.py, visual.py) defines it and the hub checkpoint
stores it, model type `qwen`, architecture `QWenLMHeadModel`:
- a ViT (`transformer.visual`): patch convolution, a learned 16 x 16 position table interpolated (bicubic) to the
  patch grid, pre layer norm, `transformer.resblocks.N` (fused per-head-interleaved `in_proj`, GELU MLP);
- the resampler (`transformer.visual.attn_pool`): 256 learned queries (2-D sin-cos positions) cross-attending to the
  ViT's patches (`nn.MultiheadAttention`), then `ln_post` and `proj`: 256 tokens per image;
- a Qwen-7B decoder (`transformer.h.N`): RMSNorm `ln_1`/`ln_2`, fused `attn.c_attn` (q, k, v, with bias), rotary
  embeddings (rotate-half), `attn.c_proj`, and the MLP `c_proj(w1(x) * silu(w2(x)))`; dynamic NTK and log-n query
  scaling beyond `seq_length` tokens.

Prompts: each image is `<img>` + 256 tokens + `</img>`, and the image's features replace the 256 tokens between the
tags. The original puts the image's path or URL (as byte ids) there and loads it inside the model; here the images
go to the processor and the span is 256 `<imgpad>` tokens, which the original's own tokenizer also gives for an empty
path (vLLM's port did the same). The tokenizer reads the checkpoint's `qwen.tiktoken` into a fast byte-level BPE
tokenizer with the original's special tokens at the original's ids.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    BatchFeature,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
)
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward, rotate_half

from shortlvlm_vllm.models.mplug_owl2 import sincos_2d

MODEL_TYPE = "qwen"
ARCHITECTURE = "QWenLMHeadModel"
CHAT_TEMPLATE_PATH = Path(__file__).with_name("qwen_chat_template.jinja")
IMAGE_SPAN = 256  # tokens between <img> and </img> (the original tokenizer's IMG_TOKEN_SPAN)
# The original tokenizer's pre-tokenization pattern and special tokens, in id order after the BPE ranks.
PAT_STR = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
           r"""|\s+(?!\S)|\s+""")
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
IMAGE_START, IMAGE_END, IMAGE_PAD = "<img>", "</img>", "<imgpad>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, *(f"<|extra_{i}|>" for i in range(205)),
                  "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", IMAGE_START, IMAGE_END, IMAGE_PAD)
VISUAL_DEFAULTS = {  # Qwen-VL-Chat's visual config; n_queries is VisionTransformer's default
    "heads": 16, "image_size": 448, "image_start_id": 151857, "layers": 48, "mlp_ratio": 4.9231,
    "output_dim": 4096, "patch_size": 14, "width": 1664, "n_queries": IMAGE_SPAN,
}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class QWenConfig(PretrainedConfig):
    """The original QWenConfig (flat text fields, `visual` dict), with its defaults (Qwen-VL-Chat's)."""

    model_type = MODEL_TYPE

    def __init__(self, vocab_size: int = 151936, hidden_size: int = 4096, num_hidden_layers: int = 32,
                 num_attention_heads: int = 32, emb_dropout_prob: float = 0.0, attn_dropout_prob: float = 0.0,
                 layer_norm_epsilon: float = 1e-6, initializer_range: float = 0.02,
                 max_position_embeddings: int = 8192, scale_attn_weights: bool = True, use_cache: bool = True,
                 bf16: bool = False, fp16: bool = False, fp32: bool = False, kv_channels: int = 128,
                 rotary_pct: float = 1.0, rotary_emb_base: float = 10000, use_dynamic_ntk: bool = True,
                 use_logn_attn: bool = True, use_flash_attn: str | bool = "auto", intermediate_size: int = 22016,
                 no_bias: bool = True, tie_word_embeddings: bool = False, seq_length: int = 2048,
                 visual: dict | None = None, **kwargs) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.emb_dropout_prob = emb_dropout_prob
        self.attn_dropout_prob = attn_dropout_prob
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        self.scale_attn_weights = scale_attn_weights
        self.use_cache = use_cache
        self.max_position_embeddings = max_position_embeddings
        self.bf16, self.fp16, self.fp32 = bf16, fp16, fp32
        self.kv_channels = kv_channels
        self.rotary_pct = rotary_pct
        self.rotary_emb_base = rotary_emb_base
        self.use_dynamic_ntk = use_dynamic_ntk
        self.use_logn_attn = use_logn_attn
        self.use_flash_attn = use_flash_attn
        self.no_bias = no_bias
        self.seq_length = seq_length
        self.visual = {**VISUAL_DEFAULTS, **(visual or {})}
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def image_start_id(self) -> int:
        return self.visual["image_start_id"]

    @property
    def image_pad_id(self) -> int:
        """The id of the tokens that image features replace (<img> + 2, as the original tokenizer orders them)."""
        return self.visual["image_start_id"] + 2


# --- the vision tower and the resampler: plain torch, shared with the vLLM class ---

def resize_positions(table: torch.Tensor, length: int) -> torch.Tensor:
    """A square position table [S*S, C] at `length` = s*s positions: bicubic when the sizes differ (get_abs_pos)."""
    src, tgt = int(math.sqrt(table.shape[0])), int(math.sqrt(length))
    if src == tgt:
        return table
    grid = table.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).flatten(0, 2).to(table.dtype)


class VisualAttention(nn.Module):
    """Self-attention whose fused projection interleaves q, k, v per head: [T, heads, 3 * head_dim]."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        batch, length, width = hidden.shape
        qkv = self.in_proj(hidden).reshape(batch, length, self.heads, 3 * (width // self.heads))
        query, key, value = qkv.transpose(1, 2).chunk(3, dim=-1)
        probs = torch.softmax(query / math.sqrt(width // self.heads) @ key.transpose(-1, -2), dim=-1)
        return self.out_proj((probs @ value).transpose(1, 2).reshape(batch, length, width))


class VisualMLP(nn.Module):
    def __init__(self, width: int, inner: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, inner)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(inner, width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(hidden)))


class VisualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=1e-6)
        self.ln_2 = nn.LayerNorm(width, eps=1e-6)
        self.attn = VisualAttention(width, heads)
        self.mlp = VisualMLP(width, int(width * mlp_ratio))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.attn(self.ln_1(hidden))
        return hidden + self.mlp(self.ln_2(hidden))


class VisualTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(VisualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers))


class Resampler(nn.Module):
    """Learned queries (with 2-D sin-cos positions) cross-attending once to the patches (with theirs)."""

    def __init__(self, queries: int, embed_dim: int, kv_dim: int) -> None:
        super().__init__()
        grid = int(math.sqrt(queries))
        self.pos_embed = nn.Parameter(torch.from_numpy(sincos_2d(embed_dim, grid, cls_token=False)).float(),
                                      requires_grad=False)
        self.query = nn.Parameter(torch.zeros(queries, embed_dim))
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        self.attn = nn.MultiheadAttention(embed_dim, embed_dim // 128, batch_first=True)
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        key_positions = resize_positions(self.pos_embed, patches.shape[1]).to(patches.dtype)
        values = self.ln_kv(self.kv_proj(patches))
        queries = (self.ln_q(self.query) + self.pos_embed).to(values.dtype).expand(len(values), -1, -1)
        return self.attn(queries, values + key_positions, values, need_weights=False)[0]


class VisionTransformer(nn.Module):
    """Pixels [B, 3, S, S] -> image tokens for the language model [B, n_queries, output_dim]."""

    def __init__(self, visual: dict) -> None:
        super().__init__()
        width, patch = visual["width"], visual["patch_size"]
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.positional_embedding = nn.Parameter(torch.zeros(256, width))
        self.ln_pre = nn.LayerNorm(width, eps=1e-6)
        self.transformer = VisualTransformer(width, visual["layers"], visual["heads"], visual["mlp_ratio"])
        self.attn_pool = Resampler(visual["n_queries"], visual["output_dim"], width)
        self.ln_post = nn.LayerNorm(visual["output_dim"], eps=1e-6)
        self.proj = nn.Parameter(torch.zeros(visual["output_dim"], visual["output_dim"]))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.conv1(pixel_values.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)
        hidden = self.ln_pre(patches + resize_positions(self.positional_embedding, patches.shape[1]))
        for block in self.transformer.resblocks:
            hidden = block(hidden)
        return self.ln_post(self.attn_pool(hidden)) @ self.proj


# --- the decoder ---

class QWenRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.float()
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(hidden) * self.weight


def rotary_tables(config: QWenConfig, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [length, head_dim] in float32, with the original's dynamic NTK: beyond `seq_length` tokens the base
    grows by alpha^(d / (d - 2)), alpha = 2^ceil(log2(length / seq_length) + 1) - 1."""
    dim = int(config.kv_channels * config.rotary_pct)
    alpha = 1.0
    if config.use_dynamic_ntk:
        alpha = max(2 ** math.ceil(math.log(length / config.seq_length, 2) + 1) - 1, 1)
    base = config.rotary_emb_base * alpha ** (dim / (dim - 2))
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, device=device).float() / dim)
    freqs = torch.outer(torch.arange(length, device=device).float(), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def logn_scale(config: QWenConfig, length: int, device: torch.device) -> torch.Tensor | None:
    """The original's log-n query scaling, log_{seq_length}(position + 1) beyond `seq_length`, or None (all ones)."""
    if not config.use_logn_attn or length <= config.seq_length:
        return None
    positions = torch.arange(1, length + 1, device=device, dtype=torch.float64)
    return torch.where(positions > config.seq_length, positions.log() / math.log(config.seq_length), 1.0).float()


class QWenAttention(nn.Module):
    def __init__(self, config: QWenConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = 1
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        projection = config.kv_channels * config.num_attention_heads
        self.c_attn = nn.Linear(config.hidden_size, 3 * projection)
        self.c_proj = nn.Linear(projection, config.hidden_size, bias=not config.no_bias)

    def forward(self, hidden: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], logn: torch.Tensor | None,
                causal_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length, _ = hidden.shape
        query, key, value = (t.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
                             for t in self.c_attn(hidden).split(self.config.hidden_size, dim=2))
        cos, sin = rotary
        query = (query.float() * cos + rotate_half(query.float()) * sin).type_as(value)  # float32, as the original
        key = (key.float() * cos + rotate_half(key.float()) * sin).type_as(value)
        if logn is not None:
            query = query * logn[:, None].to(query.dtype)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = attention(self, query, key, value, causal_mask, scaling=self.scaling, dropout=0.0)
        return self.c_proj(out.reshape(batch, length, -1)), weights


class QWenMLP(nn.Module):
    def __init__(self, config: QWenConfig) -> None:
        super().__init__()
        inner, bias = config.intermediate_size // 2, not config.no_bias
        self.w1 = nn.Linear(config.hidden_size, inner, bias=bias)
        self.w2 = nn.Linear(config.hidden_size, inner, bias=bias)
        self.c_proj = nn.Linear(inner, config.hidden_size, bias=bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.w1(hidden) * F.silu(self.w2(hidden)))


class QWenBlock(nn.Module):
    def __init__(self, config: QWenConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = QWenRMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.attn = QWenAttention(config, layer_idx)
        self.ln_2 = QWenRMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mlp = QWenMLP(config)

    @property
    def self_attn(self) -> QWenAttention:
        """The attention under the name the calibration hooks look for (the checkpoint's name is `attn`)."""
        return self.attn

    def forward(self, hidden_states: torch.Tensor, rotary, logn, causal_mask
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(output, attention weights: eager attention's, None from SDPA)."""
        attended, weights = self.attn(self.ln_1(hidden_states), rotary, logn, causal_mask)
        hidden_states = hidden_states + attended
        return hidden_states + self.mlp(self.ln_2(hidden_states)), weights


class QWenPreTrainedModel(PreTrainedModel):
    config_class = QWenConfig
    config: QWenConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    _no_split_modules = ["QWenBlock", "VisualAttentionBlock"]
    _supports_sdpa = True
    _supports_attention_backend = True
    # the original's non-persistent buffers, in case a re-saved checkpoint holds them
    _keys_to_ignore_on_load_unexpected = [r"\.attn\.masked_bias$", r"\.rotary_emb\.inv_freq$"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """transformers' defaults, the bare parameters, and the resampler's sin-cos positions (a saved parameter)."""
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, QWenRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, VisionTransformer):
            init.normal_(module.positional_embedding, std=std)
            init.normal_(module.proj, std=std)
        elif isinstance(module, Resampler):
            init.normal_(module.query, std=std)
            grid = int(math.sqrt(module.query.shape[0]))
            init.copy_(module.pos_embed, torch.from_numpy(sincos_2d(module.pos_embed.shape[1], grid, False)).float())
        elif isinstance(module, nn.MultiheadAttention):
            init.normal_(module.in_proj_weight, std=std)
            init.zeros_(module.in_proj_bias)


class QWenModel(QWenPreTrainedModel):
    def __init__(self, config: QWenConfig) -> None:
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.h = nn.ModuleList(QWenBlock(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = QWenRMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.visual = VisionTransformer(config.visual)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None
                ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor | None, ...]]:
        """The decoder's states (the embeddings and each layer's output, the last normed, as transformers orders
        hidden_states) and each layer's attention weights."""
        visual = input_ids == self.config.image_pad_id
        embeds = self.wte(input_ids)
        if pixel_values is not None:
            features = self.visual(pixel_values).reshape(-1, embeds.shape[-1])
            if features.shape[0] != int(visual.sum()):
                raise ValueError(f"{int(visual.sum())} image tokens in input_ids, {features.shape[0]} image features")
            embeds = embeds.masked_scatter(visual[..., None], features.to(embeds.dtype))
        length = input_ids.shape[1]
        rotary = rotary_tables(self.config, length, embeds.device)
        logn = logn_scale(self.config, length, embeds.device)
        causal_mask = torch.full((length, length), torch.finfo(embeds.dtype).min, dtype=embeds.dtype,
                                 device=embeds.device).triu(1)[None, None]
        states, attentions = [embeds], []
        for layer in self.h:
            hidden, weights = layer(states[-1], rotary, logn, causal_mask)
            states.append(hidden)
            attentions.append(weights)
        states[-1] = self.ln_f(states[-1])
        return tuple(states), tuple(attentions)


class QWenLMHeadModel(QWenPreTrainedModel, GenerationMixin):
    """The original's QWenLMHeadModel: same module tree, same state_dict keys. No KV cache: each generation step runs
    the whole sequence again (a reference, for checking, not for speed)."""

    def __init__(self, config: QWenConfig) -> None:
        super().__init__(config)
        self.transformer = QWenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, output_hidden_states: bool = False,
                output_attentions: bool = False, **kwargs) -> CausalLMOutputWithPast:
        """Full-sequence logits; `attention_mask` (right padding at most: causal attention never reads it) and cache
        arguments are accepted and unused."""
        states, attentions = self.transformer(input_ids, pixel_values)
        return CausalLMOutputWithPast(logits=self.lm_head(states[-1]),
                                      hidden_states=states if output_hidden_states else None,
                                      attentions=attentions if output_attentions else None)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                                      **kwargs) -> dict:
        return {"input_ids": input_ids, "pixel_values": pixel_values}


# --- the tokenizer and the processor ---

def read_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """qwen.tiktoken: one `base64(token) rank` per line."""
    import base64

    lines = Path(path).read_bytes().splitlines()
    return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines if line)}


def tokenizer_from_tiktoken(path: str | Path):
    """A tokenizers.Tokenizer equal to the original's tiktoken encoding: byte-level BPE over `path`'s ranks, the
    original's pre-tokenization pattern and NFC normalization, and its special tokens at ids len(ranks), ...

    transformers' TikTokenConverter turns the ranks into merges; the ranks are read here, so the tiktoken package
    (which the quantization environment lacks) is not needed."""
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class Converter(TikTokenConverter):
        load_tiktoken_bpe = staticmethod(read_tiktoken_ranks)

    tokenizer = Converter(vocab_file=str(path), pattern=PAT_STR).converted()
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    ranks = len(read_tiktoken_ranks(path))
    if tokenizer.token_to_id(ENDOFTEXT) != ranks:
        raise ValueError(f"{path}: the special tokens do not follow the {ranks} BPE ranks")
    return tokenizer


class QWenTokenizer(PreTrainedTokenizerFast):
    """The tokenizer the hub checkpoint names (`tokenizer_class: QWenTokenizer`), built from its qwen.tiktoken."""

    vocab_files_names = {"vocab_file": "qwen.tiktoken"}

    def __init__(self, vocab_file: str | None = None, tokenizer_object=None, **kwargs) -> None:
        if tokenizer_object is None and kwargs.get("tokenizer_file") is None:
            tokenizer_object = tokenizer_from_tiktoken(vocab_file)
        kwargs.setdefault("eos_token", ENDOFTEXT)  # the original's eod_id
        kwargs.setdefault("pad_token", ENDOFTEXT)  # generation_config's pad_token_id
        super().__init__(tokenizer_object=tokenizer_object, vocab_file=vocab_file, **kwargs)


def expand_image_spans(ids: list[int], start_id: int) -> tuple[list[int], int]:
    """Every <img>...</img> as <img> + IMAGE_SPAN image pads + </img>, whatever stood between the tags (a path, in
    the original's prompts); returns the ids and the number of images."""
    end_id, pad_id = start_id + 1, start_id + 2
    out, images, i = [], 0, 0
    while i < len(ids):
        if ids[i] != start_id:
            out.append(ids[i])
            i += 1
            continue
        try:
            end = ids.index(end_id, i)
        except ValueError:
            raise ValueError("an <img> tag without </img>") from None
        out += [start_id, *[pad_id] * IMAGE_SPAN, end_id]
        images += 1
        i = end + 1
    return out, images


class QWenVLProcessor(ProcessorMixin):
    """Images as the original's VisionTransformer.image_transform (bicubic resize to a square, CLIP normalization),
    prompts tokenized whole with each image span expanded."""

    attributes = ["tokenizer"]

    def __init__(self, tokenizer=None, chat_template: str | None = None,
                 image_size: int = VISUAL_DEFAULTS["image_size"], **kwargs) -> None:
        self.image_size = image_size
        chat_template = chat_template or getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATE_PATH.read_text()
        super().__init__(tokenizer, chat_template=chat_template)

    @property
    def image_start_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(IMAGE_START)

    def preprocess_images(self, images: Sequence) -> torch.Tensor:
        from torchvision import transforms

        transform = transforms.Compose([
            transforms.Resize((self.image_size, self.image_size),
                              interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize(mean=CLIP_MEAN, std=CLIP_STD),
        ])
        return torch.stack([transform(image.convert("RGB")) for image in images])

    def tokenize_prompt(self, text: str) -> tuple[list[int], int]:
        return expand_image_spans(self.tokenizer(text, add_special_tokens=False)["input_ids"], self.image_start_id)

    def __call__(self, images=None, text: str | None = None, return_tensors: str | None = "pt", **kwargs):
        images = [] if images is None else list(images) if isinstance(images, list | tuple) else [images]
        data = {}
        if text is not None:
            ids, spans = self.tokenize_prompt(text)
            if spans != len(images):
                raise ValueError(f"the prompt has {spans} image spans and {len(images)} images were given")
            data["input_ids"] = torch.tensor([ids])
            data["attention_mask"] = torch.ones_like(data["input_ids"])
        if images:
            data["pixel_values"] = self.preprocess_images(images)
        return BatchFeature(data)


def register_with_transformers() -> None:
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
    )

    AutoConfig.register(MODEL_TYPE, QWenConfig, exist_ok=True)
    AutoModelForImageTextToText.register(QWenConfig, QWenLMHeadModel, exist_ok=True)
    AutoModelForCausalLM.register(QWenConfig, QWenLMHeadModel, exist_ok=True)
    AutoTokenizer.register(QWenConfig, fast_tokenizer_class=QWenTokenizer, exist_ok=True)
    AutoProcessor.register(QWenConfig, QWenVLProcessor, exist_ok=True)

