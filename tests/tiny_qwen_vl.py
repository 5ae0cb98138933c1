"""Tiny random-weight Qwen2-VL and Qwen2.5-VL checkpoints, built at test time in the hub layout: same transformers
classes, key names and files (tokenizer, processor, chat template) as Qwen/Qwen2-VL-2B-Instruct and
Qwen/Qwen2.5-VL-3B-Instruct."""

from __future__ import annotations

from pathlib import Path

import torch

from shortlvlm_vllm.adapters import adapter_for_config
from shortlvlm_vllm.tiny_models import byte_level_bpe, save_hub_checkpoint

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


def build_qwen_vl_tokenizer():
    """A byte-level tokenizer with Qwen-VL's special and vision tokens; like Qwen's, it adds no BOS."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=byte_level_bpe(QWEN_VL_SPECIAL_TOKENS), eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"},
        chat_template=QWEN_VL_CHAT_TEMPLATE,
    )


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
