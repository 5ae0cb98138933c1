"""The transformers references that served answers are checked against, and vLLM's rule for comparing greedy
tokens: shared by the serving tests (visual tokens, side paths, tensor and pipeline parallelism)."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from shortlvlm_vllm.adapters import adapter_for_config
from shortlvlm_vllm.chat import data_url, image_message, template_image_turn
from shortlvlm_vllm.serving.visual_tokens import (
    keep_most_attended,
    key_metric,
    key_sums,
    merge_group_scores,
    received_attention,
    select_visual_tokens,
)
from shortlvlm_vllm.serving.vllm_plugin.side_path import CONFIG_KEY, attach_side_paths, basis_key

TOP = 5


def with_side_paths(checkpoint: Path, dtype: torch.dtype = torch.float32):
    """The checkpoint's stock transformers class (it ignores the bases) with the side paths attached and their bases
    loaded: LLaVA, Qwen2-VL / Qwen2.5-VL, or the project's mPLUG-Owl2 or Qwen-VL-Chat reference."""
    config = json.loads((checkpoint / "config.json").read_text())
    adapter = adapter_for_config(config)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=dtype, attn_implementation="eager").eval()
    side_paths = attach_side_paths(adapter.decoder_layers(model), config["short_lvlm"][CONFIG_KEY],
                                   model.config.get_text_config().hidden_size, adapter.side_path_target)
    loaded = set()
    for shard in sorted(checkpoint.glob("*.safetensors")):
        for key, tensor in load_file(shard).items():
            match = adapter.match_layer_key(key)
            if match and match[2] == f".{basis_key(adapter.side_path_target)}":
                side_paths[match[1]].basis.copy_(tensor)
                loaded.add(match[1])
    assert loaded == set(side_paths), (loaded, sorted(side_paths))
    return model


@torch.no_grad()
def reference_generate(model, processor, image, question: str, budget: int | None, new_tokens: int):
    """transformers' LLaVA with the same visual-token selection: [CLS] attention and keys from the vision tower's own
    (eager) attention at the feature layer, then the K selected tokens in K placeholders; budget None: every token,
    the stock model.

    Returns the prompt length, the greedy tokens and each step's top-5 token ids."""
    text = processor.apply_chat_template([template_image_turn(question)], add_generation_prompt=True)
    inputs = processor(images=image, text=text, return_tensors="pt").to(model.device)
    if budget is None:
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        return (inputs["input_ids"].shape[1], out.sequences[0, -new_tokens:].tolist(),
                [logits[0].topk(TOP).indices.tolist() for logits in out.logits])
    tower = model.model.vision_tower
    layers = tower.encoder.layers
    feature_index = model.config.vision_feature_layer % (len(layers) + 1)  # hidden_states[i] = output of layer i-1
    feature_layer = layers[feature_index - 1]
    keys = {}
    hook = feature_layer.self_attn.k_proj.register_forward_hook(lambda module, args, out: keys.update(k=out))
    vision = tower(inputs["pixel_values"], output_hidden_states=True, output_attentions=True)
    hook.remove()
    heads = model.config.vision_config.num_attention_heads
    attention = vision.attentions[feature_index - 1][:, :, 0, 1:].sum(dim=1)
    selected = select_visual_tokens(vision.hidden_states[feature_index][:, 1:], attention,
                                    key_metric(key_sums(keys["k"], heads), heads)[:, 1:], budget)
    image_embeds = model.model.multi_modal_projector(selected)[0]
    ids = inputs["input_ids"][0]
    image_positions = (ids == model.config.image_token_id).nonzero()[:, 0]
    ids = torch.cat([ids[: image_positions[0] + budget], ids[image_positions[-1] + 1:]])
    embeds = model.get_input_embeddings()(ids).clone()
    embeds[image_positions[0]: image_positions[0] + budget] = image_embeds
    out = model.generate(inputs_embeds=embeds[None], attention_mask=torch.ones(1, len(ids), dtype=torch.long,
                                                                               device=model.device),
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return len(ids), out.sequences[0, -new_tokens:].tolist(), [logits[0].topk(TOP).indices.tolist()
                                                              for logits in out.logits]


@torch.no_grad()
def qwen_reference_generate(model, processor, image, question: str, budget: int | None, new_tokens: int):
    """transformers' Qwen2-VL / Qwen2.5-VL with the same visual-token selection: the attention each patch receives
    in the last vision block, recomputed from that block's input with transformers' own projection and rotary
    embedding; then the kept merged tokens in min(K, N) placeholders, every token at its position in the full prompt
    (transformers' get_rope_index); budget None: every token. Greedy decoding by hand, each step at the next position.

    Returns the prompt length, the greedy tokens and each step's top-5 token ids."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision
    from transformers.vision_utils import get_vision_window_index

    text = processor.apply_chat_template([template_image_turn(question)], add_generation_prompt=True)
    inputs = processor(images=image, text=text, return_tensors="pt")
    ids, grid_thw = inputs["input_ids"][0], inputs["image_grid_thw"]
    positions, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=grid_thw)
    visual = model.model.visual
    captured = {}
    hook = visual.blocks[-1].attn.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(hidden=args[0], **kwargs), with_kwargs=True)
    merged = visual(inputs["pixel_values"], grid_thw=grid_thw).pooler_output
    hook.remove()
    attn = visual.blocks[-1].attn
    hidden = captured["hidden"]
    query, key, _ = attn.qkv(hidden).reshape(len(hidden), 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    query, key = apply_rotary_pos_emb_vision(query, key, *captured["position_embeddings"])
    merge_size = visual.spatial_merge_size
    scores = merge_group_scores(received_attention(query, key, captured["cu_seqlens"]), merge_size**2)
    if hasattr(visual, "window_size"):  # Qwen2.5-VL: the blocks ran in window order
        window_index, _ = get_vision_window_index(grid_thw, spatial_merge_size=merge_size,
                                                  window_size=visual.window_size, patch_size=visual.patch_size)
        scores = scores[torch.argsort(window_index)]
    image_slots = (ids == model.config.image_token_id).nonzero()[:, 0]
    kept = keep_most_attended(scores, budget if budget is not None else len(scores))
    keep = torch.ones(len(ids), dtype=torch.bool)
    keep[image_slots] = False
    keep[image_slots[kept]] = True
    ids, positions = ids[keep], positions[:, :, keep]
    embeds = model.get_input_embeddings()(ids).clone()
    embeds[ids == model.config.image_token_id] = merged[kept]
    out = model(inputs_embeds=embeds[None], position_ids=positions, use_cache=True)
    tokens, top = [], []
    for step in range(new_tokens):
        logits = out.logits[0, -1]
        tokens.append(int(logits.argmax()))
        top.append(logits.topk(TOP).indices.tolist())
        position = torch.full((3, 1, 1), int(positions.max()) + 1 + step)
        out = model(input_ids=torch.tensor([[tokens[-1]]]), position_ids=position, past_key_values=out.past_key_values,
                    use_cache=True)
    return len(ids), tokens, top


def served_answers(base_url: str, api_key: str, model: str, prompts, new_tokens: int):
    """Per (image, question): prompt tokens, greedy tokens, and the top-5 (token, logprob) of each step."""
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0)
    out = []
    for image, question in prompts:
        response = client.chat.completions.create(
            model=model, messages=image_message(data_url(image), question), max_tokens=new_tokens,
            temperature=0.0, logprobs=True, top_logprobs=TOP,
            extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True, "add_special_tokens": True})
        steps = response.choices[0].logprobs.content
        out.append((response.usage.prompt_tokens, [_token_id(s.token) for s in steps],
                    [[(_token_id(t.token), t.logprob) for t in s.top_logprobs] for s in steps]))
    return out


def _token_id(token: str) -> int:
    return int(token.removeprefix("token_id:"))


def agrees(served_tokens, served_top, reference_tokens, reference_top) -> bool:
    """True when the greedy tokens are equal; raises AssertionError unless they obey vLLM's check_logprobs_close rule:
    at the first divergence each side's choice is in the other's top-5, after which the sequences no longer compare.

    served_top: per step, the (token, logprob) pairs; reference_top: per step, the token ids."""
    for i, (v, h) in enumerate(zip(served_tokens, reference_tokens, strict=True)):
        if v != h:
            assert v in reference_top[i] and h in [t for t, _ in served_top[i]], (i, served_tokens, reference_tokens)
            return False
    return True
