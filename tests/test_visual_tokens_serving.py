"""The plugin's ShortLlavaForConditionalGeneration served by vLLM: with every visual token it is the stock class
exactly; with a budget K it matches a transformers reference of the same selection. Three servers for the module,
one per test setup: K = 16 of 64 (from config.json), stock, K = all (through --hf-overrides)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from shortlvlm_vllm.checkpoint.reader import open_checkpoint
from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.prune.compensate import CompensationSettings
from shortlvlm_vllm.prune.pipeline import plan_pruning, write_plan
from shortlvlm_vllm.prune.recipe import PruneRecipe
from shortlvlm_vllm.serving.launcher import VLLMServer
from shortlvlm_vllm.serving.vllm_plugin import budget_overrides

from .conftest import random_image
from .serving_reference import agrees, reference_generate, served_answers

pytestmark = pytest.mark.vllm
MODEL = "tiny"
ALL_TOKENS, BUDGET = 64, 16
QUESTIONS = ["What is in the image?", "Describe the colours.", "Is there a square? Answer yes or no."]
NEW_TOKENS = 8


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


def _answers(server: VLLMServer):
    """Per question: prompt tokens, greedy tokens, and the top-5 (token, logprob) of each step."""
    prompts = [(random_image(seed), question) for seed, question in enumerate(QUESTIONS)]
    return served_answers(server.base_url, server.api_key, MODEL, prompts, NEW_TOKENS)


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


def test_with_a_budget_vllm_matches_the_transformers_reference(budget_answers, budget_llava):
    processor = AutoProcessor.from_pretrained(budget_llava)
    model = LlavaForConditionalGeneration.from_pretrained(budget_llava, dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    exact = 0
    for seed, (question, (prompt_tokens, vllm_tokens, vllm_top)) in enumerate(zip(QUESTIONS, budget_answers,
                                                                                  strict=True)):
        ref_length, ref_tokens, ref_top = reference_generate(model, processor, random_image(seed), question, BUDGET,
                                                             NEW_TOKENS)
        assert prompt_tokens == ref_length  # K placeholders, not 64
        exact += agrees(vllm_tokens, vllm_top, ref_tokens, ref_top)
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
