"""The tiny LLaVA, Qwen2-VL and Qwen2.5-VL fixtures: deterministic, hub layout, loadable by stock transformers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

from shortlvlm_vllm.chat import template_image_turn
from shortlvlm_vllm.tiny_models import (
    build_byte_tokenizer,
    build_tiny_llava,
    llava_config,
    llava_processor,
    write_random_llava,
)
from tests.tiny_qwen_vl import build_tiny_qwen_vl


def test_same_seed_same_bytes(tmp_path):
    a = build_tiny_llava(tmp_path / "a", num_layers=2)
    b = build_tiny_llava(tmp_path / "b", num_layers=2)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    c = build_tiny_llava(tmp_path / "c", num_layers=2, seed=1)
    assert (c / "model.safetensors").read_bytes() != (a / "model.safetensors").read_bytes()


def test_hub_layout_and_transformers_load(tiny_llava):
    with safe_open(tiny_llava / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    prefixes = {"language_model.model.", "language_model.lm_head.", "vision_tower.vision_model.",
                "multi_modal_projector."}
    assert all(any(k.startswith(p) for p in prefixes) for k in keys), keys
    assert "language_model.model.layers.7.mlp.down_proj.weight" in keys
    model, info = LlavaForConditionalGeneration.from_pretrained(tiny_llava, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    config = json.loads((tiny_llava / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 8
    assert config["text_config"]["hidden_size"] % 32 == 0
    processor = AutoProcessor.from_pretrained(tiny_llava)
    text = processor.apply_chat_template(
        [template_image_turn("Hi?")],
        add_generation_prompt=True,
    )
    assert text == "USER: <image>\nHi? ASSISTANT:"


@pytest.mark.parametrize(("fixture", "architecture"), [
    ("tiny_qwen2_vl", "Qwen2VLForConditionalGeneration"), ("tiny_qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
])
def test_qwen_hub_layout_and_transformers_load(request, fixture, architecture):
    """The key names of Qwen/Qwen2-VL-2B-Instruct and Qwen/Qwen2.5-VL-3B-Instruct; two vision blocks, eight layers."""
    model_dir = request.getfixturevalue(fixture)
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    prefixes = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.", "visual.")
    assert all(k.startswith(prefixes) for k in keys), keys
    assert {k.split(".")[2] for k in keys if k.startswith("visual.blocks.")} == {"0", "1"}
    assert {k.split(".")[2] for k in keys if k.startswith("model.layers.")} == set(map(str, range(8)))
    model, info = AutoModelForImageTextToText.from_pretrained(model_dir, output_loading_info=True)
    assert type(model).__name__ == architecture
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    processor = AutoProcessor.from_pretrained(model_dir)
    text = processor.apply_chat_template([template_image_turn("Hi?")], add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>Hi?<|im_end|>\n<|im_start|>assistant\n")
    assert processor.image_token_id == model.config.image_token_id
    assert processor.video_processor is not None


def test_qwen_same_seed_same_bytes(tmp_path):
    a = build_tiny_qwen_vl(tmp_path / "a", "qwen2_5_vl", num_layers=2)
    b = build_tiny_qwen_vl(tmp_path / "b", "qwen2_5_vl", num_layers=2)
    for name in sorted(p.name for p in a.iterdir()):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_a_random_checkpoint_of_any_size_is_written_shard_by_shard(tmp_path):
    """write_random_llava (the 7B-shaped benchmark's writer) on a small config: hub layout, several shards and an
    index, loadable with every weight, norms one and biases zero, a tokenizer as large as the vocabulary."""
    tokenizer = build_byte_tokenizer(vocab_size=1024)
    assert len(tokenizer) == 1024 and tokenizer.decode(tokenizer("a cat")["input_ids"][1:]) == "a cat"
    config = llava_config(tokenizer, num_layers=3, hidden_size=128, intermediate_size=320, num_heads=4, num_kv_heads=4,
                          vocab_size=1024, vision_hidden_size=64, vision_heads=2, image_size=28, patch_size=14)
    out = write_random_llava(config, llava_processor(tokenizer, config), tmp_path / "m", max_shard_bytes=200_000)
    shards = sorted(out.glob("*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) > 3 and set(index["weight_map"].values()) == {p.name for p in shards}
    assert "language_model.model.layers.2.mlp.down_proj.weight" in index["weight_map"]
    model, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    layer = model.model.language_model.layers[1]
    assert layer.input_layernorm.weight.eq(1).all() and model.model.vision_tower.pre_layrnorm.bias.eq(0).all()
    assert 0.015 < float(layer.mlp.up_proj.weight.detach().float().std()) < 0.025  # normal(0, 0.02)
    assert model.dtype == torch.bfloat16 and model.config.text_config.head_dim == 32
