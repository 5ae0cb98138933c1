"""Tiny LLaVA-1.5 checkpoints built offline in seconds, in the hub layout that vLLM loads.

They stand in for hub models in tests and in the demo: same transformers classes, same key
names and files (tokenizer, processor, chat template) as llava-hf/llava-1.5-7b-hf.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

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


def build_byte_tokenizer():
    """A byte-level tokenizer (every byte a token) with LLaVA's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
        chat_template=LLAVA_CHAT_TEMPLATE,
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


def save_llava(
    model,
    processor,
    out_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a LLaVA model in the hub layout (llava-hf key names) that stock vLLM loads."""
    from transformers import GenerationConfig

    model.config.dtype = str(dtype).removeprefix("torch.")
    text = model.config.text_config
    state = {LLAVA.hub_key(k): v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
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
    return save_llava(model, processor, out_dir, dtype=dtype, max_shard_bytes=max_shard_bytes, overwrite=overwrite)


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
