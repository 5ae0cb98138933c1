"""Tiny random-weight LLaVA checkpoints built offline in seconds, in the hub layout that vLLM loads
(`shortlvlm make-tiny-llava`), and the writer of a transformers model in that layout (the toy model uses it).

Same transformers classes, key names and files (tokenizer, processor, chat template) as llava-hf/llava-1.5-7b-hf.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from shortlvlm_vllm.adapters import adapter_for_config
from shortlvlm_vllm.adapters.llava import LLAVA
from shortlvlm_vllm.checkpoint.safetensors_io import OutputTensor
from shortlvlm_vllm.checkpoint.writer import Shard, write_checkpoint

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


def byte_level_bpe(special_tokens: list[str], unk_token: str | None = None):
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

    tok = byte_level_bpe(SPECIAL_TOKENS, unk_token="<unk>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
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
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for name in sorted(state):
        tensor = OutputTensor(name, value=state[name])
        if max_shard_bytes and shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    with tempfile.TemporaryDirectory(prefix="shortlvlm-processor-") as side_files:
        processor.save_pretrained(side_files)
        GenerationConfig(
            bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id
        ).save_pretrained(side_files)
        return write_checkpoint(out_dir, [Shard(tensors, {"format": "pt"}) for tensors in shards],
                                json.loads(model.config.to_json_string()), side_files_from=Path(side_files),
                                overwrite=overwrite)


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
