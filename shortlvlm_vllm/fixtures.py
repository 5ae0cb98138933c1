"""Tiny vision-language checkpoints built offline in seconds, in the hub layout that vLLM loads.

They stand in for hub models in tests and in the demo: same transformers classes, same key
names and files (tokenizer, processor, chat template) as llava-hf/llava-1.5-7b-hf,
Qwen/Qwen2-VL-2B-Instruct and Qwen/Qwen2.5-VL-3B-Instruct.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from shortlvlm_vllm.adapters import adapter_for_config
from shortlvlm_vllm.adapters.llava import LLAVA
from shortlvlm_vllm.checkpoint import INDEX_NAME, SINGLE_SHARD_NAME, atomic_output_dir

# The chat template of llava-hf/llava-1.5-7b-hf: "USER: <image>\n{question} ASSISTANT:".
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]


# The chat template of Qwen/Qwen2-VL-2B-Instruct and Qwen/Qwen2.5-VL-3B-Instruct (chat_template.json).
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_VL_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                          "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_VL_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


def _byte_level_bpe(special_tokens: list[str], unk_token: str | None = None):
    """A tokenizers.Tokenizer where every byte is a token, special tokens first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(special_tokens + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk_token))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(special_tokens)
    return tok


def build_byte_tokenizer():
    """A byte-level tokenizer (every byte a token) with LLaVA's special tokens."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = _byte_level_bpe(SPECIAL_TOKENS, unk_token="<unk>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


def build_qwen_vl_tokenizer():
    """A byte-level tokenizer with Qwen-VL's special and vision tokens; like Qwen's, it adds no BOS."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=_byte_level_bpe(QWEN_VL_SPECIAL_TOKENS), eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"},
        chat_template=QWEN_VL_CHAT_TEMPLATE,
    )


def make_llava(
    tokenizer,
    *,
    num_layers: int,
    hidden_size: int,
    intermediate_size: int | None = None,
    vision_hidden_size: int = 64,
    vision_layers: int = 2,
    image_size: int = 64,
    patch_size: int = 8,
    initializer_range: float = 0.02,
    seed: int = 0,
):
    """A randomly initialised LLaVA-1.5-architecture model and its processor (head size 32)."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    special = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "<pad>", "<image>")}
    text_config = LlamaConfig(
        vocab_size=-(-len(tokenizer) // 32) * 32, hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // 32, num_key_value_heads=max(1, hidden_size // 64), head_dim=32,
        max_position_embeddings=1024, rms_norm_eps=1e-5, initializer_range=initializer_range,
        tie_word_embeddings=False, bos_token_id=special["<s>"], eos_token_id=special["</s>"],
        pad_token_id=special["<pad>"],
    )
    vision_config = CLIPVisionConfig(
        hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size, projection_dim=vision_hidden_size,
        num_hidden_layers=vision_layers, num_attention_heads=vision_hidden_size // 32, image_size=image_size,
        patch_size=patch_size, initializer_range=initializer_range,
    )
    config = LlavaConfig(
        vision_config=vision_config, text_config=text_config, image_token_index=special["<image>"],
        projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=-2,
        image_seq_length=(image_size // patch_size) ** 2, tie_word_embeddings=False,
    )
    config.architectures = list(LLAVA.architectures)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=tokenizer.chat_template,
    )
    return model, processor


def save_hub_checkpoint(
    model,
    processor,
    out_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int | None = None,
    hub_layout: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write a model with its processor and generation config, its weights in the hub's key names
    (the adapter's hub_key_renames) or, with hub_layout=False, in transformers' own names."""
    from transformers import GenerationConfig

    adapter = adapter_for_config(model.config.to_dict())
    model.config.dtype = str(dtype).removeprefix("torch.")
    text = model.config.get_text_config()
    rename = adapter.hub_key if hub_layout else str
    state = {rename(k): v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    with atomic_output_dir(Path(out_dir), overwrite) as tmp:
        model.config.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        GenerationConfig(
            bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id
        ).save_pretrained(tmp)
        _save_hub_weights(state, tmp, max_shard_bytes)
    return Path(out_dir)


def build_tiny_llava(
    out_dir: str | Path,
    *,
    num_layers: int = 8,
    hidden_size: int = 128,
    image_size: int = 64,
    patch_size: int = 8,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    initializer_range: float = 0.1,
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a random-weight LLaVA-1.5-architecture checkpoint; same arguments, same bytes."""
    model, processor = make_llava(
        build_byte_tokenizer(), num_layers=num_layers, hidden_size=hidden_size, image_size=image_size,
        patch_size=patch_size, initializer_range=initializer_range, seed=seed,
    )
    return save_hub_checkpoint(model, processor, out_dir, dtype=dtype, max_shard_bytes=max_shard_bytes,
                               overwrite=overwrite)


def make_qwen_vl(
    tokenizer,
    model_type: str = "qwen2_vl",
    *,
    num_layers: int,
    hidden_size: int,
    vision_hidden_size: int = 64,
    vision_layers: int = 2,
    min_pixels: int = 4 * 28 * 28,
    max_pixels: int = 64 * 28 * 28,
    initializer_range: float = 0.02,
    seed: int = 0,
):
    """A randomly initialised Qwen2-VL or Qwen2.5-VL model and its processor (head size 32 everywhere).

    Images are resized to multiples of 28 pixels with between min_pixels and max_pixels (4 to 64
    image tokens by default): the token count per image varies with its size, as on the hub models.
    """
    import transformers

    if model_type not in QWEN_VL_MODEL_TYPES:
        raise ValueError(f"model_type must be one of {QWEN_VL_MODEL_TYPES}, not {model_type!r}")
    special = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_VL_SPECIAL_TOKENS}
    text_config = {
        "vocab_size": -(-len(tokenizer) // 32) * 32, "hidden_size": hidden_size, "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers, "num_attention_heads": hidden_size // 32,
        "num_key_value_heads": max(1, hidden_size // 64), "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
        "max_window_layers": num_layers, "initializer_range": initializer_range,
        # M-RoPE: the head's 16 rotary frequency pairs split over (time, height, width), as 16/24/24 of 64 on the hub
        "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]}, "rope_theta": 1e6,
        "bos_token_id": special["<|endoftext|>"], "eos_token_id": special["<|im_end|>"],
        "pad_token_id": special["<|endoftext|>"],
    }
    vision_config = {"depth": vision_layers, "num_heads": vision_hidden_size // 32, "patch_size": 14,
                     "spatial_merge_size": 2, "temporal_patch_size": 2, "initializer_range": initializer_range}
    if model_type == "qwen2_vl":
        vision_config |= {"embed_dim": vision_hidden_size, "hidden_size": hidden_size, "mlp_ratio": 2}
        config_class, model_class, processor_class = (
            transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration, transformers.Qwen2VLProcessor)
    else:
        # window attention in every block but the last, as the hub model has it in all but every 8th
        vision_config |= {"hidden_size": vision_hidden_size, "intermediate_size": 2 * vision_hidden_size,
                          "out_hidden_size": hidden_size, "window_size": 112,
                          "fullatt_block_indexes": [vision_layers - 1]}
        config_class, model_class, processor_class = (
            transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration,
            transformers.Qwen2_5_VLProcessor)
    config = config_class(
        text_config=text_config, vision_config=vision_config, image_token_id=special["<|image_pad|>"],
        video_token_id=special["<|video_pad|>"], vision_start_token_id=special["<|vision_start|>"],
        vision_end_token_id=special["<|vision_end|>"], tie_word_embeddings=False,
    )
    config.architectures = list(adapter_for_config(config.to_dict()).architectures)
    torch.manual_seed(seed)
    model = model_class(config).eval()
    pixels = {"min_pixels": min_pixels, "max_pixels": max_pixels}
    processor = processor_class(
        image_processor=transformers.Qwen2VLImageProcessor(**pixels),
        video_processor=transformers.Qwen2VLVideoProcessor(**pixels),
        tokenizer=tokenizer, chat_template=tokenizer.chat_template,
    )
    return model, processor


def build_tiny_qwen_vl(
    out_dir: str | Path,
    model_type: str = "qwen2_vl",
    *,
    num_layers: int = 8,
    hidden_size: int = 128,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    initializer_range: float = 0.1,
    hub_layout: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write a random-weight Qwen2-VL (model_type "qwen2_vl") or Qwen2.5-VL ("qwen2_5_vl") checkpoint;
    same arguments, same bytes. hub_layout=False writes transformers' key names instead of the hub's."""
    model, processor = make_qwen_vl(
        build_qwen_vl_tokenizer(), model_type, num_layers=num_layers, hidden_size=hidden_size,
        initializer_range=initializer_range, seed=seed,
    )
    return save_hub_checkpoint(model, processor, out_dir, dtype=dtype, hub_layout=hub_layout, overwrite=overwrite)


def _save_hub_weights(state: dict[str, torch.Tensor], out: Path, max_shard_bytes: int | None) -> None:
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(state):
        nbytes = state[name].numel() * state[name].element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = state[name]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], out / SINGLE_SHARD_NAME, metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
