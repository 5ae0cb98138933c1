"""Prune after quantize for Qwen2-VL, Qwen2.5-VL, mPLUG-Owl2 and Qwen-VL-Chat: SCP on a W4A16 source is kept as side
paths that the architecture's registered class applies (ShortQwen2VL / ShortQwen2_5_VL, the plugin's
MPLUGOwl2LlamaForCausalLM and QWenLMHeadModel), checked against transformers with the same side paths, as
test_prune_quantized does for LLaVA."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from shortlvlm_vllm.chat import data_url, image_message, template_image_turn
from shortlvlm_vllm.checkpoint.reader import open_checkpoint
from shortlvlm_vllm.checkpoint.surgery import layer_renumbering, write_pruned_checkpoint
from shortlvlm_vllm.cli import main
from shortlvlm_vllm.data.calibration import CalibrationSource
from shortlvlm_vllm.prune.compensate import CompensationSettings
from shortlvlm_vllm.prune.pipeline import plan_pruning, write_plan
from shortlvlm_vllm.prune.recipe import PruneRecipe
from shortlvlm_vllm.quantize.dequantize import dequantized_copy
from shortlvlm_vllm.quantize.driver import QuantizeRecipe, quantize_checkpoint
from shortlvlm_vllm.serving.launcher import VLLMServer, has_cuda
from shortlvlm_vllm.serving.vllm_plugin import serving_args
from shortlvlm_vllm.serving.vllm_plugin.side_path import CONFIG_KEY, basis_key
from tests.tiny_mplug_owl2 import build_tiny_mplug_owl2
from tests.tiny_qwen import build_tiny_qwen
from tests.tiny_qwen_vl import build_tiny_qwen_vl

from .conftest import IMAGE_SIZES, random_image
from .serving_reference import with_side_paths

RANK = 8
QUESTIONS = ["What is in the image?", "Describe the colours."]
# Four decoder layers, hidden 128, intermediate 256 (Qwen-VL-Chat: its MLP's 512 / 2): shapes vLLM's CPU W4A16
# kernel takes.
BUILDERS = {
    "qwen2_vl": lambda out: build_tiny_qwen_vl(out, "qwen2_vl", num_layers=4),
    "qwen2_5_vl": lambda out: build_tiny_qwen_vl(out, "qwen2_5_vl", num_layers=4),
    "mplug_owl2": lambda out: build_tiny_mplug_owl2(out, num_layers=4),
    "qwen": lambda out: build_tiny_qwen(out, num_layers=4),
}


@pytest.fixture(scope="module", params=list(BUILDERS))
def source(request, tmp_path_factory) -> Path:
    return BUILDERS[request.param](tmp_path_factory.mktemp("models") / f"tiny-{request.param}-4")


@pytest.fixture(scope="module")
def quantized(source, tmp_path_factory) -> Path:
    return quantize_checkpoint(source, tmp_path_factory.mktemp("models") / f"{source.name}-w4a16",
                               QuantizeRecipe(method="rtn"))


@pytest.fixture(scope="module")
def pruned_quantized(quantized, llava_calib, tmp_path_factory) -> Path:
    """`shortlvlm prune` on the quantized checkpoint: TIS finds one layer, SCP stays unfused."""
    out = tmp_path_factory.mktemp("pruned") / f"{quantized.name}-tis-scp"
    assert main(["prune", str(quantized), "--ratio", "0.25", "--calib", str(llava_calib), "--num-samples", "16",
                 "--heldout", "0", "--rank", str(RANK), "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def folded_and_unfused(source, llava_calib, tmp_path_factory) -> tuple[Path, Path, Path]:
    """One plan (TIS 25%, SCP rank 16) on the full-precision source written three ways: folded, unfused side paths
    (what a quantized source gets), uncompensated."""
    src = open_checkpoint(source)
    recipe = PruneRecipe(ratio=0.25, compensation=CompensationSettings(rank=16),
                         calibration=CalibrationSource(str(llava_calib), num_samples=24, heldout=0))
    plan = plan_pruning(src, recipe)
    out = tmp_path_factory.mktemp("compensation")
    folded = write_plan(src, out / "folded", recipe, plan)
    edits = plan.compensation.side_paths(src, layer_renumbering(src.num_layers, plan.pruned))
    unfused = write_pruned_checkpoint(src, out / "unfused", plan.pruned, edits.record, added=edits.added,
                                      architectures=edits.architectures)
    plan.compensation = None
    recipe.compensation = CompensationSettings("none")
    return folded, unfused, write_plan(src, out / "none", recipe, plan)


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def _inputs(processor, seed: int, question: str) -> dict[str, torch.Tensor]:
    text = processor.apply_chat_template([template_image_turn(question)], add_generation_prompt=True)
    return processor(images=random_image(seed, IMAGE_SIZES[seed % 2]), text=text, return_tensors="pt")


def test_scp_on_a_quantized_source_is_kept_as_side_paths(source, quantized, pruned_quantized):
    src = open_checkpoint(quantized)
    config = _config(pruned_quantized)
    assert config["architectures"] == [src.adapter.side_path_architecture]
    assert config["model_type"] == src.adapter.model_type  # transformers still loads it with its stock class
    record = config["short_lvlm"]
    (pruned,) = record["pruned_layers"]
    (kept,) = record["compensation_pairs"].values()
    renumber = layer_renumbering(4, [pruned])
    assert record[CONFIG_KEY] == {"layers": [renumber[kept]], "rank": RANK, "dtype": "bfloat16"}
    source_tensors, written = _tensors(quantized), _tensors(pruned_quantized)
    prefix = next(match[0] for name in source_tensors if (match := src.adapter.match_layer_key(name)))
    # the source's own key layout, at its down-projection (Qwen-VL-Chat: mlp.c_proj)
    basis = written.pop(f"{prefix}{renumber[kept]}.{basis_key(src.adapter.side_path_target)}")
    assert basis.dtype == torch.bfloat16 and basis.shape == (128, RANK)
    assert torch.allclose(basis.float().T @ basis.float(), torch.eye(RANK), atol=2e-2)

    def renamed(name: str) -> str | None:
        match = src.adapter.match_layer_key(name)
        if match is None:
            return name
        return f"{match[0]}{renumber[match[1]]}{match[2]}" if match[1] in renumber else None

    expected = {renamed(name): name for name in source_tensors if renamed(name)}
    assert set(written) == set(expected)
    assert all(torch.equal(written[new], source_tensors[old]) for new, old in expected.items())  # nothing folded
    assert serving_args(config) == []  # no budget: no M-RoPE switch (it would turn on Qwen2.5-VL's video pruning)


@torch.no_grad()
def test_unfused_equals_folded_in_transformers(folded_and_unfused):
    folded_dir, unfused_dir, none_dir = folded_and_unfused
    processor = AutoProcessor.from_pretrained(folded_dir)
    models = {"unfused": with_side_paths(unfused_dir)}
    for name, path in (("folded", folded_dir), ("none", none_dir)):
        models[name] = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    for seed, question in enumerate(QUESTIONS):
        inputs = _inputs(processor, seed, question)
        logits = {name: model(**inputs).logits[0].float() for name, model in models.items()}
        # the bases' bfloat16 rounding is the only difference; SCP itself moves the logits far more
        difference = (logits["unfused"] - logits["folded"]).abs().max()
        assert difference < 2e-3 * logits["folded"].abs().max()
        assert (logits["none"] - logits["folded"]).abs().max() > 20 * difference


# vLLM: the registered class applies the side paths (one server per checkpoint, one after the other).


def _first_token_logprobs(client, seed: int, question: str) -> tuple[dict[int, float], int]:
    """The served first token's top-5 log-probabilities by token id, and the prompt's token count."""
    response = client.chat.completions.create(
        model="served", messages=image_message(data_url(random_image(seed, IMAGE_SIZES[seed % 2])), question),
        max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=5,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True, "add_special_tokens": True},
    )
    return {int(t.token.removeprefix("token_id:")): t.logprob
            for t in response.choices[0].logprobs.content[0].top_logprobs}, response.usage.prompt_tokens


def _serve(checkpoint: Path, log_path: Path, dtype: str) -> VLLMServer:
    return VLLMServer(checkpoint, log_path=log_path, dtype=dtype, served_model_name="served", startup_timeout=1500,
                      extra_args=["--limit-mm-per-prompt", '{"image": 1}'])


@pytest.mark.vllm
@torch.no_grad()
def test_vllm_side_paths_match_the_folded_model(folded_and_unfused, tmp_path):
    folded_dir, unfused_dir, none_dir = folded_and_unfused
    processor = AutoProcessor.from_pretrained(folded_dir)
    references = {"side paths": with_side_paths(unfused_dir)}
    for name, path in (("folded", folded_dir), ("none", none_dir)):
        references[name] = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    with _serve(unfused_dir, tmp_path / "vllm.log", "float32") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0)
        for seed, question in enumerate(QUESTIONS):
            served, _ = _first_token_logprobs(client, seed, question)
            inputs = _inputs(processor, seed, question)
            gaps = {}
            for name, model in references.items():
                log_probs = model(**inputs).logits[0, -1].float().log_softmax(-1)
                gaps[name] = max(abs(lp - float(log_probs[token])) for token, lp in served.items())
            # float32 on both sides: the served model is transformers' with the side paths, to ~1e-4 (the folded
            # model differs by the bases' bfloat16 rounding); without them it would be the uncompensated one.
            assert gaps["side paths"] < 2e-3 and gaps["folded"] < 1e-2, gaps
            assert gaps["none"] > 5 * max(gaps["side paths"], gaps["folded"]), gaps
        log = server.log_tail(10_000)
    assert f"Resolved architecture: {_config(unfused_dir)['architectures'][0]}" in log


@pytest.mark.vllm
@torch.no_grad()
def test_vllm_serves_the_pruned_quantized_checkpoint(pruned_quantized, tmp_path):
    """W4A16 weights on vLLM's CPU kernel with the side paths beside them. This is also the architecture's check
    that vLLM serves its W4A16 checkpoints (a GPTQ one loads through the same compressed-tensors path)."""
    processor = AutoProcessor.from_pretrained(pruned_quantized)
    with dequantized_copy(open_checkpoint(pruned_quantized)) as dense:
        reference = with_side_paths(dense.path, torch.bfloat16)
    with _serve(pruned_quantized, tmp_path / "vllm.log", "bfloat16") as server:  # the CPU W4A16 kernel: bfloat16
        client = openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0)
        for seed, question in enumerate(QUESTIONS):
            served, prompt_tokens = _first_token_logprobs(client, seed, question)
            inputs = _inputs(processor, seed, question)
            assert prompt_tokens == inputs["input_ids"].shape[1]  # the image's placeholders, as transformers counts
            hf_top = reference(**inputs).logits[0, -1].topk(5).indices.tolist()
            # Same weights, bfloat16 on both sides: the greedy choices agree up to rounding.
            assert max(served, key=served.get) in hf_top and hf_top[0] in served
        log = server.log_tail(10_000)
    architecture = _config(pruned_quantized)["architectures"][0]
    assert f"Resolved architecture: {architecture}" in log and "compressed-tensors" in log
    if not has_cuda():
        assert "CPUWNA16LinearKernel" in log
