"""The plugin's ShortLlavaForConditionalGeneration under tensor and pipeline parallelism, and with LoRA on: the same
greedy tokens as the single-process transformers reference (vLLM's top-5 rule where they differ).

One checkpoint carries everything the registered class adds to stock LLaVA: a visual-token budget (16 of 64, chosen
from the [CLS] attention that tensor parallelism splits over ranks) and SCP side paths on both pipeline stages (5 kept
layers of 8, which vLLM splits unevenly, 3 + 2). Two servers for the module, one after the other: TP=2 with a LoRA
adapter on every down-projection, and PP=2. The CPU build runs both on 2 cores (one worker bound to each).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoProcessor

from shortlvlm_vllm.checkpoint.reader import open_checkpoint
from shortlvlm_vllm.checkpoint.surgery import layer_renumbering, write_pruned_checkpoint
from shortlvlm_vllm.data.calibration import CalibrationSource
from shortlvlm_vllm.prune.compensate import CompensationSettings
from shortlvlm_vllm.prune.pipeline import plan_pruning
from shortlvlm_vllm.prune.recipe import PruneRecipe
from shortlvlm_vllm.serving.launcher import VLLMServer
from shortlvlm_vllm.serving.vllm_plugin import SHORT_LLAVA_ARCHITECTURE
from shortlvlm_vllm.serving.vllm_plugin.side_path import CONFIG_KEY

from .conftest import random_image
from .serving_reference import agrees, reference_generate, served_answers, with_side_paths

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(3000)]  # a TP=2 start can take 10 minutes on a busy CPU
MODEL, ADAPTER = "served", "adapter"
DROPPED = [1, 4, 6]  # kept 0, 2, 3, 5, 7 -> side paths at new layers 0, 2 (first stage) and 3 (second stage)
BUDGET = 16
LORA_RANK, LORA_ALPHA = 8, 16
QUESTIONS = ["What is in the image?", "Describe the colours.", "Is there a square? Answer yes or no.",
             "Where is the largest shape?", "How many shapes are there?", "What is the background colour?"]
PROMPTS = [(random_image(seed), question) for seed, question in enumerate(QUESTIONS)]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def checkpoint(tiny_llava, llava_calib, tmp_path_factory):
    """The tiny LLaVA without layers 1, 4, 6, SCP kept as side paths (rank 16), and a budget of 16 visual tokens."""
    src = open_checkpoint(tiny_llava)
    recipe = PruneRecipe(drop_layers=DROPPED, compensation=CompensationSettings(rank=16),
                         calibration=CalibrationSource(str(llava_calib), num_samples=24, heldout=0))
    plan = plan_pruning(src, recipe)
    edits = plan.compensation.side_paths(src, layer_renumbering(src.num_layers, plan.pruned))
    out = tmp_path_factory.mktemp("models") / "tiny-llava-parallel"
    return write_pruned_checkpoint(src, out, plan.pruned, edits.record | {"visual_tokens": BUDGET},
                                   added=edits.added, architectures=edits.architectures)


def _lora_weights(checkpoint) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per decoder layer, the adapter's (A [r, in], B [out, r]) on down_proj: large enough to change the answers."""
    text = json.loads((checkpoint / "config.json").read_text())["text_config"]
    generator = torch.Generator().manual_seed(7)
    return {layer: (torch.randn(LORA_RANK, text["intermediate_size"], generator=generator) * 0.1,
                    torch.randn(text["hidden_size"], LORA_RANK, generator=generator) * 0.1)
            for layer in range(text["num_hidden_layers"])}


@pytest.fixture(scope="module")
def lora_adapter(checkpoint, tmp_path_factory):
    """A PEFT LoRA adapter on every decoder layer's down_proj, in the names PEFT gives transformers' LLaVA."""
    out = tmp_path_factory.mktemp("adapters") / "down-proj-lora"
    out.mkdir()
    tensors = {}
    for layer, (a, b) in _lora_weights(checkpoint).items():
        prefix = f"base_model.model.model.language_model.layers.{layer}.mlp.down_proj"
        tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = a, b
    save_file(tensors, out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": LORA_RANK, "lora_alpha": LORA_ALPHA, "target_modules": ["down_proj"],
        "bias": "none", "base_model_name_or_path": str(checkpoint), "task_type": "CAUSAL_LM"}))
    return out


def _serve(checkpoint, tmp_path_factory, **kwargs) -> VLLMServer:
    log_path = tmp_path_factory.mktemp("logs") / "vllm.log"
    extra_args = ["--limit-mm-per-prompt", '{"image": 1}', *kwargs.pop("extra_args", [])]
    return VLLMServer(checkpoint, log_path=log_path, dtype="float32", served_model_name=MODEL, startup_timeout=1500,
                      extra_args=extra_args, **kwargs)


@pytest.fixture(scope="module")
def tensor_parallel(checkpoint, lora_adapter, tmp_path_factory):
    """TP=2 with LoRA enabled: answers of the base model and of the adapter, and the server log."""
    lora = ["--enable-lora", "--max-lora-rank", str(LORA_RANK), "--lora-modules", f"{ADAPTER}={lora_adapter}"]
    with _serve(checkpoint, tmp_path_factory, tensor_parallel_size=2, extra_args=lora) as server:
        answers = {name: served_answers(server.base_url, server.api_key, name, PROMPTS, NEW_TOKENS)
                   for name in (MODEL, ADAPTER)}
        return answers, server.log_tail(100_000)


@pytest.fixture(scope="module")
def pipeline_parallel(checkpoint, tmp_path_factory):
    with _serve(checkpoint, tmp_path_factory, pipeline_parallel_size=2) as server:
        return served_answers(server.base_url, server.api_key, MODEL, PROMPTS, NEW_TOKENS), server.log_tail(100_000)


@pytest.fixture(scope="module")
def references(checkpoint):
    """The transformers reference (one process, every head), with and without the side paths and the adapter."""
    processor = AutoProcessor.from_pretrained(checkpoint)
    merged = with_side_paths(checkpoint)
    scale = LORA_ALPHA / LORA_RANK
    with torch.no_grad():
        for layer, (a, b) in _lora_weights(checkpoint).items():
            merged.model.language_model.layers[layer].mlp.down_proj.weight += scale * b @ a
    models = {MODEL: with_side_paths(checkpoint), ADAPTER: merged}
    return {name: [reference_generate(model, processor, image, question, BUDGET, NEW_TOKENS)
                   for image, question in PROMPTS] for name, model in models.items()}


def _check_against_reference(served, reference) -> int:
    """Greedy tokens of every prompt obey the top-5 rule against the reference; returns how many are equal."""
    exact = 0
    for (prompt_tokens, tokens, top), (ref_length, ref_tokens, ref_top) in zip(served, reference, strict=True):
        assert prompt_tokens == ref_length  # K placeholders, not 64
        exact += agrees(tokens, top, ref_tokens, ref_top)
    return exact


def test_checkpoint_has_side_paths_on_both_pipeline_stages(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["architectures"] == [SHORT_LLAVA_ARCHITECTURE] and config["text_config"]["num_hidden_layers"] == 5
    assert config["short_lvlm"][CONFIG_KEY]["layers"] == [0, 2, 3] and config["short_lvlm"]["visual_tokens"] == BUDGET


def test_tensor_parallel_selects_the_tokens_of_a_single_process(tensor_parallel, references):
    answers, log = tensor_parallel
    assert "tensor_parallel_size=2" in log and f"Resolved architecture: {SHORT_LLAVA_ARCHITECTURE}" in log
    exact = _check_against_reference(answers[MODEL], references[MODEL])
    assert exact >= len(PROMPTS) - 1, f"only {exact} of {len(PROMPTS)} prompts gave the reference's greedy tokens"


def test_side_paths_apply_with_a_lora_adapter(tensor_parallel, references):
    """The adapter's requests get LoRA on down_proj and the side paths on the MLP output: (I + V V^T)(W + s B A) x."""
    answers, _ = tensor_parallel
    exact = _check_against_reference(answers[ADAPTER], references[ADAPTER])
    assert exact >= len(PROMPTS) - 1, f"only {exact} of {len(PROMPTS)} prompts gave the reference's greedy tokens"
    assert [a[1] for a in answers[ADAPTER]] != [a[1] for a in answers[MODEL]], "the adapter changed no answer"


def test_pipeline_parallel_with_an_uneven_split(pipeline_parallel, references):
    answers, log = pipeline_parallel
    assert "Hidden layers were unevenly partitioned: [3,2]" in log
    exact = _check_against_reference(answers, references[MODEL])
    assert exact >= len(PROMPTS) - 1, f"only {exact} of {len(PROMPTS)} prompts gave the reference's greedy tokens"
