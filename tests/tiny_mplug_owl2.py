"""Tiny random-weight mPLUG-Owl2 checkpoints, built at test time in the original layout: config.json as the original
MPLUGOwl2Config writes it (model_type mplug_owl2, flat Llama fields, visual_config), the original state_dict keys
(the abstractor's sin-cos buffers included), a Llama-style tokenizer and a CLIP image processor, and no chat template
(the hub checkpoint has none either).

The weights are drawn with numpy's PCG64 generator in sorted key order, so the same arguments give the same values
on any machine and torch version: the logits recorded from the original code (tests/test_mplug_owl2.py) stay valid.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from shortlvlm_vllm.checkpoint.safetensors_io import OutputTensor
from shortlvlm_vllm.checkpoint.writer import Shard, write_checkpoint
from shortlvlm_vllm.models.mplug_owl2 import (
    ARCHITECTURE,
    MPLUGOwl2Config,
    MPLUGOwl2LlamaForCausalLM,
    MPLUGOwl2Processor,
    abstractor_position_embeddings,
)
from shortlvlm_vllm.tiny_models import byte_level_bpe

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # Llama-2's first three ids
IMAGE_SIZE, PATCH_SIZE, QUERIES = 56, 14, 8  # 16 patches + [CLS]; 8 queries + end-of-image = 9 tokens per image


def build_tokenizer():
    """A byte-level tokenizer with Llama-2's special tokens at Llama-2's ids (<unk> 0, <s> 1, </s> 2), BOS added."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = byte_level_bpe(SPECIAL_TOKENS, unk_token="<unk>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_config(num_layers: int, hidden_size: int) -> MPLUGOwl2Config:
    visual_config = {
        "visual_model": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                         "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "hidden_act": "quick_gelu",
                         "layer_norm_eps": 1e-6, "use_cls_token": True, "use_post_layernorm": True},
        "visual_abstractor": {"num_learnable_queries": QUERIES, "hidden_size": 64, "num_hidden_layers": 2,
                              "num_attention_heads": 2, "intermediate_size": 96, "layer_norm_eps": 1e-6,
                              "encoder_hidden_size": 64, "grid_size": IMAGE_SIZE // PATCH_SIZE,
                              "add_v2t_pos_emb": False, "use_cls_token": True},
    }
    config = MPLUGOwl2Config(
        visual_config=visual_config, vocab_size=288, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=hidden_size // 32, num_key_value_heads=hidden_size // 32,
        max_position_embeddings=1024, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=None,
        tie_word_embeddings=False, rope_theta=10000.0,
    )
    config.architectures = [ARCHITECTURE]
    return config


def original_state_dict(config: MPLUGOwl2Config, seed: int, std: float) -> dict[str, torch.Tensor]:
    """The original model's state_dict for `config`: random weights (norm gains around 1, so that the text and
    image copies differ), and the buffers the original saves: each layer's rotary frequencies (transformers 4.31,
    the version it pins, keeps them in the state_dict) and the abstractor's sin-cos position embeddings."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in MPLUGOwl2LlamaForCausalLM(config).state_dict().items()}
    rng = np.random.default_rng(seed)
    state = {}
    for name in sorted(shapes):
        noise = rng.standard_normal(shapes[name], dtype=np.float32) * np.float32(std)
        gain = name.endswith("norm.weight") or ".multiway." in name and "layernorm" in name or "_ln.weight" in name \
            or name.endswith(("norm1.weight", "normk.weight", "norm2.weight"))
        state[name] = torch.from_numpy(noise + np.float32(1.0) if gain else noise)
    head_dim = config.hidden_size // config.num_attention_heads
    inv_freq = 1.0 / (config.rope_parameters["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
    for layer in range(config.num_hidden_layers):
        state[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = inv_freq
    q_pos_embed, k_pos_embed = abstractor_position_embeddings(config.abstractor)
    for layer in range(config.abstractor["num_hidden_layers"]):
        prefix = f"model.visual_abstractor.encoder.layers.{layer}.crossattention.attention."
        state[prefix + "q_pos_embed"], state[prefix + "k_pos_embed"] = q_pos_embed, k_pos_embed
    return state


def build_tiny_mplug_owl2(out_dir: str | Path, *, num_layers: int = 8, hidden_size: int = 128, seed: int = 0,
                          std: float = 0.1, overwrite: bool = False) -> Path:
    """Write a random-weight mPLUG-Owl2 checkpoint in the original layout; same arguments, same bytes."""
    from transformers import CLIPImageProcessor

    config = tiny_config(num_layers, hidden_size)
    state = original_state_dict(config, seed, std)
    tensors = [OutputTensor(name, value=state[name]) for name in sorted(state)]
    tokenizer = build_tokenizer()
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = MPLUGOwl2Processor(image_processor, tokenizer, image_token_index=config.image_token_index,
                                   tokens_per_image=config.image_tokens)
    config_dict = json.loads(config.to_json_string())
    with tempfile.TemporaryDirectory(prefix="shortlvlm-mplug-owl2-") as side_files:
        tokenizer.save_pretrained(side_files)
        image_processor.save_pretrained(side_files)
        # the processor's settings for this size of model (the 7B's are the defaults)
        (Path(side_files) / "processor_config.json").write_text(json.dumps({
            "processor_class": type(processor).__name__, "image_token_index": processor.image_token_index,
            "tokens_per_image": processor.tokens_per_image}))
        return write_checkpoint(out_dir, [Shard(tensors, {"format": "pt"})], config_dict,
                                side_files_from=Path(side_files), overwrite=overwrite)
