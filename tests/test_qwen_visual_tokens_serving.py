"""The plugin's ShortQwen2VLForConditionalGeneration and ShortQwen2_5_VLForConditionalGeneration served by vLLM with
a budget of K = 16 merged tokens per image, on images of 9, 35 and 64 tokens: an image of at most K tokens keeps them
all and is served exactly as the stock class serves it (K = all); a larger one shrinks the prompt by exactly N - K
placeholders and matches a transformers reference of the same selection, each kept token at its own M-RoPE position.
Two servers per architecture, one after the other: the stock class and the budget; and a fifth, Qwen2-VL's budget at
tensor-parallel size 2 (one vision head per rank: the attention scores are summed over the ranks)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from shortlvlm_vllm.checkpoint.reader import open_checkpoint
from shortlvlm_vllm.prune.compensate import CompensationSettings
from shortlvlm_vllm.prune.pipeline import plan_pruning, write_plan
from shortlvlm_vllm.prune.recipe import PruneRecipe
from shortlvlm_vllm.serving.launcher import VLLMServer

from .conftest import random_image
from .serving_reference import agrees, qwen_reference_generate, served_answers

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(3600)]  # five server starts
MODEL = "tiny"
BUDGET = 16
# (image size, merged tokens): Qwen resizes to multiples of 28 px, one token per 28 x 28
IMAGES = (((96, 80), 9), ((200, 150), 35), ((224, 224), 64))
QUESTIONS = ["What is in the image?", "Describe the colours."]
PROMPTS = [(size, tokens, question) for size, tokens in IMAGES for question in QUESTIONS]
NEW_TOKENS = 8


@pytest.fixture(scope="module", params=["tiny_qwen2_vl", "tiny_qwen2_5_vl"], ids=["qwen2-vl", "qwen2.5-vl"])
def source(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def budget_qwen(source, tmp_path_factory):
    """The tiny Qwen with no layer removed and a budget of 16 merged tokens per image."""
    return _budget_checkpoint(source, tmp_path_factory)


def _budget_checkpoint(source, tmp_path_factory):
    src = open_checkpoint(source)
    recipe = PruneRecipe(compensation=CompensationSettings("none"), visual_tokens=BUDGET)
    return write_plan(src, tmp_path_factory.mktemp("models") / f"{source.name}-k16", recipe, plan_pruning(src, recipe))


def _answers(model, tmp_path_factory, **server_kwargs):
    """Per prompt: prompt tokens, greedy tokens and the top-5 (token, logprob) of each step, from a server started for
    them alone (it adds the budget class's --video-pruning-rate switch itself)."""
    log_path = tmp_path_factory.mktemp("logs") / "vllm.log"
    with VLLMServer(model, log_path=log_path, dtype="float32", served_model_name=MODEL, startup_timeout=1500,
                    extra_args=["--limit-mm-per-prompt", '{"image": 1}'], **server_kwargs) as server:
        prompts = [(random_image(seed, size), question) for seed, (size, _, question) in enumerate(PROMPTS)]
        return served_answers(server.base_url, server.api_key, MODEL, prompts, NEW_TOKENS)


@pytest.fixture(scope="module")
def stock_answers(source, tmp_path_factory):
    return _answers(source, tmp_path_factory)


@pytest.fixture(scope="module")
def budget_answers(budget_qwen, tmp_path_factory):
    return _answers(budget_qwen, tmp_path_factory)


def test_the_prompt_shrinks_by_the_dropped_placeholders(stock_answers, budget_answers):
    shrunk = [stock[0] - pruned[0] for stock, pruned in zip(stock_answers, budget_answers, strict=True)]
    assert shrunk == [tokens - min(BUDGET, tokens) for _, tokens, _ in PROMPTS]  # 0, 19 and 48 per image


def test_an_image_within_the_budget_is_served_as_the_stock_class_serves_it(stock_answers, budget_answers):
    """K = all: same prompts, same tokens, same logprobs, to the last bit (the positions went through vLLM's
    correction hook and came back unchanged)."""
    within = [i for i, (_, tokens, _) in enumerate(PROMPTS) if tokens <= BUDGET]
    assert within and [budget_answers[i] for i in within] == [stock_answers[i] for i in within]


def _check_against_reference(answers, checkpoint) -> None:
    processor = AutoProcessor.from_pretrained(checkpoint)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()
    exact = 0
    for seed, ((size, _, question), (prompt_tokens, vllm_tokens, vllm_top)) in enumerate(zip(PROMPTS, answers,
                                                                                             strict=True)):
        ref_length, ref_tokens, ref_top = qwen_reference_generate(model, processor, random_image(seed, size), question,
                                                                  BUDGET, NEW_TOKENS)
        assert prompt_tokens == ref_length
        exact += agrees(vllm_tokens, vllm_top, ref_tokens, ref_top)
    assert exact >= len(PROMPTS) - 1, "greedy outputs diverged on several prompts"


def test_with_a_budget_vllm_matches_the_transformers_reference(budget_answers, budget_qwen):
    _check_against_reference(budget_answers, budget_qwen)


@pytest.fixture(scope="module")
def tensor_parallel_budget(tiny_qwen2_vl, tmp_path_factory):
    checkpoint = _budget_checkpoint(tiny_qwen2_vl, tmp_path_factory)
    return checkpoint, _answers(checkpoint, tmp_path_factory, tensor_parallel_size=2)


def test_tensor_parallel_selects_the_tokens_of_a_single_process(tensor_parallel_budget):
    checkpoint, answers = tensor_parallel_budget
    _check_against_reference(answers, checkpoint)
