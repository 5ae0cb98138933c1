"""The transformers references that served answers are checked against, and vLLM's rule for comparing greedy
tokens: shared by the serving tests (visual tokens, side paths, tensor and pipeline parallelism)."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import torch
from safetensors.torch import load_file
from transformers import LlavaForConditionalGeneration

from shortlvlm_vllm.adapters.llava import LLAVA
from shortlvlm_vllm.chat import data_url, image_message, template_image_turn
from shortlvlm_vllm.serving.visual_tokens import key_metric, key_sums, select_visual_tokens
from shortlvlm_vllm.serving.vllm_plugin.side_path import BASIS_KEY, CONFIG_KEY, attach_side_paths

LAYER = "language_model.model.layers."
TOP = 5


def with_side_paths(checkpoint: Path, dtype: torch.dtype = torch.float32) -> LlavaForConditionalGeneration:
    """Stock transformers' LLaVA (it ignores the bases) with the side paths attached and their bases loaded."""
    model = LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype, attn_implementation="eager").eval()
    spec = json.loads((checkpoint / "config.json").read_text())["short_lvlm"][CONFIG_KEY]
    side_paths = attach_side_paths(LLAVA.decoder_layers(model), spec, model.config.text_config.hidden_size)
    tensors = {}
    for shard in sorted(checkpoint.glob("*.safetensors")):
        tensors |= load_file(shard)
    for layer, side_path in side_paths.items():
        side_path.basis.copy_(tensors[f"{LAYER}{layer}.{BASIS_KEY}"])
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
