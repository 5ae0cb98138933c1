"""The plugin's ShortLlavaForConditionalGeneration served by vLLM: with every visual token it is the stock class
exactly; with a budget K it matches a transformers reference of the same selection. Three servers for the module,
one per test setup: K = 16 of 64 (from config.json), stock, K = all (through --hf-overrides)."""

from __future__ import annotations

import json

import openai
import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from shortlvlm_vllm.chat import data_url, image_message, template_image_turn
from shortlvlm_vllm.checkpoint.reader import open_checkpoint
from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.prune.compensate import CompensationSettings
from shortlvlm_vllm.prune.pipeline import plan_pruning, write_plan
from shortlvlm_vllm.prune.recipe import PruneRecipe
from shortlvlm_vllm.serving.launcher import VLLMServer
from shortlvlm_vllm.serving.visual_tokens import key_metric, select_visual_tokens
from shortlvlm_vllm.serving.vllm_plugin import budget_overrides

from .conftest import random_image

pytestmark = pytest.mark.vllm
MODEL = "tiny"
ALL_TOKENS, BUDGET = 64, 16
QUESTIONS = ["What is in the image?", "Describe the colours.", "Is there a square? Answer yes or no."]
NEW_TOKENS = 8
TOP = 5


@pytest.fixture(scope="module")
def budget_llava(tiny_llava, tmp_path_factory):
    """The tiny LLaVA with no layer removed and a budget of 16 of its 64 visual tokens."""
    src = open_checkpoint(tiny_llava)
    recipe = PruneRecipe(compensation=CompensationSettings("none"), visual_tokens=BUDGET)
    return write_plan(src, tmp_path_factory.mktemp("models") / "tiny-llava-k16", recipe, plan_pruning(src, recipe))


def _serve(model, tmp_path_factory, *extra_args: str) -> VLLMServer:
    log_path = tmp_path_factory.mktemp("logs") / "vllm.log"
    return VLLMServer(model, log_path=log_path, dtype="float32", served_model_name=MODEL, startup_timeout=1200,
                      extra_args=["--limit-mm-per-prompt", '{"image": 1}', *extra_args])


def _answers(server: VLLMServer) -> list[tuple[int, list[int], list[list[tuple[int, float]]]]]:
    """Per question: prompt tokens, greedy tokens, and the top-5 (token, logprob) of each step."""
    client = openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0)
    out = []
    for seed, question in enumerate(QUESTIONS):
        response = client.chat.completions.create(
            model=MODEL, messages=image_message(data_url(random_image(seed)), question), max_tokens=NEW_TOKENS,
            temperature=0.0, logprobs=True, top_logprobs=TOP,
            extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True, "add_special_tokens": True})
        steps = response.choices[0].logprobs.content
        out.append((response.usage.prompt_tokens, [_token_id(s.token) for s in steps],
                    [[(_token_id(t.token), t.logprob) for t in s.top_logprobs] for s in steps]))
    return out


def _token_id(token: str) -> int:
    return int(token.removeprefix("token_id:"))


@pytest.fixture(scope="module")
def stock_answers(tiny_llava, tmp_path_factory):
    with _serve(tiny_llava, tmp_path_factory) as server:
        return _answers(server)


@pytest.fixture(scope="module")
def all_tokens_answers(budget_llava, tmp_path_factory):
    overrides = budget_overrides(json.loads((budget_llava / "config.json").read_text()), ALL_TOKENS)
    with _serve(budget_llava, tmp_path_factory, "--hf-overrides", json.dumps(overrides)) as server:
        return _answers(server)


@pytest.fixture(scope="module")
def budget_answers(budget_llava, tmp_path_factory):
    with _serve(budget_llava, tmp_path_factory) as server:
        return _answers(server)


@torch.no_grad()
def reference_generate(model, processor, image, question: str, budget: int):
    """transformers' LLaVA with the same selection: [CLS] attention and keys from the vision tower's own
    (eager) attention at the feature layer, then the K selected tokens in K placeholders."""
    text = processor.apply_chat_template([template_image_turn(question)], add_generation_prompt=True)
    inputs = processor(images=image, text=text, return_tensors="pt")
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
                                    key_metric(keys["k"], heads)[:, 1:], budget)
    image_embeds = model.model.multi_modal_projector(selected)[0]
    ids = inputs["input_ids"][0]
    image_positions = (ids == model.config.image_token_id).nonzero()[:, 0]
    ids = torch.cat([ids[: image_positions[0] + budget], ids[image_positions[-1] + 1:]])
    embeds = model.get_input_embeddings()(ids).clone()
    embeds[image_positions[0]: image_positions[0] + budget] = image_embeds
    out = model.generate(inputs_embeds=embeds[None], attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return len(ids), out.sequences[0, -NEW_TOKENS:].tolist(), [logits[0].topk(TOP).indices.tolist()
                                                              for logits in out.logits]


def test_with_a_budget_vllm_matches_the_transformers_reference(budget_answers, budget_llava):
    processor = AutoProcessor.from_pretrained(budget_llava)
    model = LlavaForConditionalGeneration.from_pretrained(budget_llava, dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    exact = 0
    for seed, (question, (prompt_tokens, vllm_tokens, vllm_top)) in enumerate(zip(QUESTIONS, budget_answers,
                                                                                  strict=True)):
        ref_length, ref_tokens, ref_top = reference_generate(model, processor, random_image(seed), question, BUDGET)
        assert prompt_tokens == ref_length  # K placeholders, not 64
        vllm_top_ids = [[t for t, _ in step] for step in vllm_top]
        # vLLM's check_logprobs_close rule: equal tokens, or at the first divergence each side's choice is in the
        # other's top-k, after which the sequences no longer compare.
        for i, (v, h) in enumerate(zip(vllm_tokens, ref_tokens, strict=True)):
            if v != h:
                assert v in ref_top[i] and h in vllm_top_ids[i], (i, vllm_tokens, ref_tokens)
                break
        else:
            exact += 1
    assert exact >= 2, "greedy outputs diverged on most prompts"


def test_budget_differs_from_all_tokens(budget_answers, stock_answers):
    """The budget changes the prompt (16 placeholders instead of 64), so the comparison above is not vacuous."""
    assert [a[0] for a in stock_answers] == [a[0] + ALL_TOKENS - BUDGET for a in budget_answers]


def test_with_every_token_the_registered_class_is_the_stock_class_exactly(stock_answers, all_tokens_answers):
    """Same prompts, same tokens, same logprobs, to the last bit."""
    assert all_tokens_answers == stock_answers


def test_a_zero_budget_override_stops_the_server_with_a_clear_error(budget_llava, tmp_path_factory):
    server = _serve(budget_llava, tmp_path_factory, "--hf-overrides", json.dumps({"short_lvlm": {"visual_tokens": 0}}))
    with pytest.raises(ShortLVLMError, match="vLLM exited"):
        server.start()
    assert "visual_tokens 0 leaves no image token: keep between 1 and 64" in server.log_path.read_text()
