"""The tiny LLaVA fixture: deterministic, hub layout, loadable by stock transformers."""

from __future__ import annotations

import json

from safetensors import safe_open
from transformers import AutoProcessor, LlavaForConditionalGeneration

from shortlvlm_vllm.fixtures import build_tiny_llava
from shortlvlm_vllm.images import template_image_turn


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
