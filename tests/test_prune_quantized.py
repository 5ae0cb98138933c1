"""Pruning a W4A16 (compressed-tensors) checkpoint: surgery on packed weights, the quantization config's
per-layer lists, SCP kept unfused as bf16 side paths served by the plugin's class, unfused == folded, and
formats that cannot be pruned."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import openai
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

from shortlvlm_vllm.adapters.llava import LLAVA
from shortlvlm_vllm.chat import data_url, image_message, template_image_turn
from shortlvlm_vllm.checkpoint.quantization_config import pruned_quantization_config
from shortlvlm_vllm.checkpoint.reader import open_checkpoint
from shortlvlm_vllm.checkpoint.surgery import layer_renumbering, write_pruned_checkpoint
from shortlvlm_vllm.cli import main
from shortlvlm_vllm.data.calibration import CalibrationSource
from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.prune.compensate import CompensationSettings, fold_output
from shortlvlm_vllm.prune.pipeline import plan_pruning, write_plan
from shortlvlm_vllm.prune.recipe import PruneRecipe
from shortlvlm_vllm.quantize.dequantize import dequantized_copy
from shortlvlm_vllm.quantize.driver import QuantizeRecipe, quantize_checkpoint
from shortlvlm_vllm.serving.launcher import VLLMServer
from shortlvlm_vllm.serving.vllm_plugin import SHORT_LLAVA_ARCHITECTURE
from shortlvlm_vllm.serving.vllm_plugin.side_path import BASIS_KEY, CONFIG_KEY
from shortlvlm_vllm.tiny_models import build_tiny_llava

from .conftest import random_image
from .serving_reference import with_side_paths

LAYER = "language_model.model.layers."
RANK = 8
QUESTIONS = ["What is in the image?", "Describe the colours."]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> Path:
    """A 4-layer tiny LLaVA (hidden 128: shapes vLLM's CPU W4A16 kernel takes), round-to-nearest W4A16."""
    models = tmp_path_factory.mktemp("models")
    source = build_tiny_llava(models / "tiny-llava-4", num_layers=4)
    return quantize_checkpoint(source, models / "tiny-llava-4-w4a16", QuantizeRecipe(method="rtn"))


@pytest.fixture(scope="module")
def pruned_quantized(quantized, llava_calib, tmp_path_factory) -> Path:
    """`shortlvlm prune` on the quantized checkpoint: TIS finds one layer, SCP stays unfused."""
    out = tmp_path_factory.mktemp("pruned") / "w4a16-tis-scp"
    assert main(["prune", str(quantized), "--ratio", "0.25", "--calib", str(llava_calib), "--num-samples", "16",
                 "--heldout", "0", "--rank", str(RANK), "-o", str(out)]) == 0
    return out


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def _renamed(name: str, renumber: dict[int, int]) -> str | None:
    """`name` in the pruned checkpoint (None: its layer was dropped)."""
    match = LLAVA.match_layer_key(name)
    if match is None:
        return name
    return f"{match[0]}{renumber[match[1]]}{match[2]}" if match[1] in renumber else None


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def test_dropping_a_layer_of_a_quantized_checkpoint(quantized, tmp_path):
    out = tmp_path / "dropped"
    assert main(["prune", str(quantized), "--drop-layers", "1", "-o", str(out)]) == 0
    src, dst = _tensors(quantized), _tensors(out)
    renumber = layer_renumbering(4, [1])
    expected = {_renamed(name, renumber): name for name in src if _renamed(name, renumber)}
    assert set(dst) == set(expected)
    for new, old in expected.items():  # packed weights, scales and everything else: bit for bit
        assert dst[new].dtype == src[old].dtype and torch.equal(dst[new], src[old]), new
    assert f"{LAYER}2.mlp.down_proj.weight_packed" in dst and f"{LAYER}3.mlp.down_proj.weight_packed" not in dst
    config, source = _config(out), _config(quantized)
    assert config["architectures"] == source["architectures"]  # --compensate none: the stock class serves it
    assert config["text_config"]["num_hidden_layers"] == 3
    assert config["quantization_config"] == source["quantization_config"]  # no entry names a decoder layer
    assert config["short_lvlm"]["previous"] == source["short_lvlm"]  # the quantization record is kept
    assert AutoConfig.from_pretrained(out).quantization_config["format"] == "pack-quantized"


def test_quantization_config_lists_are_renumbered(quantized):
    src = open_checkpoint(quantized)
    q = src.config["quantization_config"]
    q["ignore"] += [f"{LAYER}1.mlp.down_proj", f"{LAYER}3.self_attn.q_proj", "re:.*vision_tower.*"]
    q["config_groups"]["group_1"] = {"targets": [f"{LAYER}0.mlp.up_proj", f"{LAYER}2.mlp.up_proj"]}
    names = [t.name for t in src.tensors()]
    rewritten = pruned_quantization_config(q, src.adapter, names, layer_renumbering(4, [1]))
    assert rewritten["ignore"] == [*q["ignore"][:-3], f"{LAYER}2.self_attn.q_proj", "re:.*vision_tower.*"]
    assert rewritten["config_groups"]["group_1"]["targets"] == [f"{LAYER}0.mlp.up_proj", f"{LAYER}1.mlp.up_proj"]
    assert rewritten["config_groups"]["group_0"] == q["config_groups"]["group_0"]
    # A pattern that picks layers by index would select other modules after renumbering.
    q["ignore"].append(r"re:.*layers\.3\.mlp.*")
    with pytest.raises(ShortLVLMError, match=r"names decoder layers by index"):
        pruned_quantization_config(q, src.adapter, names, layer_renumbering(4, [1]))


def test_scp_on_a_quantized_checkpoint_stays_unfused(quantized, pruned_quantized):
    config = _config(pruned_quantized)
    assert config["architectures"] == [SHORT_LLAVA_ARCHITECTURE] and config["model_type"] == "llava"
    record = config["short_lvlm"]
    (pruned,) = record["pruned_layers"]
    (kept,) = record["compensation_pairs"].values()
    renumber = layer_renumbering(4, [pruned])
    assert record[CONFIG_KEY] == {"layers": [renumber[kept]], "rank": RANK, "dtype": "bfloat16"}
    src, dst = _tensors(quantized), _tensors(pruned_quantized)
    basis = dst.pop(f"{LAYER}{renumber[kept]}.{BASIS_KEY}")
    assert basis.dtype == torch.bfloat16 and basis.shape == (128, RANK)
    # orthonormal columns, up to bfloat16 rounding (8 bits of mantissa)
    assert torch.allclose(basis.float().T @ basis.float(), torch.eye(RANK), atol=2e-2)
    # Nothing is folded: every packed weight is the source's, bit for bit.
    expected = {_renamed(name, renumber): name for name in src if _renamed(name, renumber)}
    assert set(dst) == set(expected)
    assert all(torch.equal(dst[new], src[old]) for new, old in expected.items())
    assert "Compensation kept unfused" in (pruned_quantized / "README.md").read_text()


# Unfused compensation == folded compensation, on an unquantized model.


@pytest.fixture(scope="module")
def folded_and_unfused(tiny_llava, llava_calib, tmp_path_factory) -> tuple[Path, Path, Path]:
    """One plan (TIS 25%, SCP rank 16) written three ways: folded, unfused side paths, uncompensated."""
    src = open_checkpoint(tiny_llava)
    recipe = PruneRecipe(ratio=0.25, compensation=CompensationSettings(rank=16),
                         calibration=CalibrationSource(str(llava_calib), num_samples=24, heldout=0))
    plan = plan_pruning(src, recipe)
    out = tmp_path_factory.mktemp("compensation")
    folded = write_plan(src, out / "folded", recipe, plan)
    # The side paths a quantized source would get, written for this dense one.
    edits = plan.compensation.side_paths(src, layer_renumbering(src.num_layers, plan.pruned))
    unfused = write_pruned_checkpoint(src, out / "unfused", plan.pruned, edits.record, added=edits.added,
                                      architectures=edits.architectures)
    plan.compensation = None
    recipe.compensation = CompensationSettings("none")
    return folded, unfused, write_plan(src, out / "none", recipe, plan)


def _inputs(processor, seed: int, question: str) -> dict[str, torch.Tensor]:
    text = processor.apply_chat_template([template_image_turn(question)], add_generation_prompt=True)
    return processor(images=random_image(seed), text=text, return_tensors="pt")


@torch.no_grad()
def test_unfused_equals_folded_in_transformers(folded_and_unfused):
    folded_dir, unfused_dir, none_dir = folded_and_unfused
    processor = AutoProcessor.from_pretrained(folded_dir)
    unfused = with_side_paths(unfused_dir)
    folded = LlavaForConditionalGeneration.from_pretrained(folded_dir, dtype=torch.float32).eval()
    uncompensated = LlavaForConditionalGeneration.from_pretrained(none_dir, dtype=torch.float32).eval()
    # Folding the stored (bfloat16) bases gives the side path's outputs to float32 precision.
    refolded = LlavaForConditionalGeneration.from_pretrained(none_dir, dtype=torch.float32).eval()
    for layer, side_path in _side_path_modules(unfused).items():
        down_proj = LLAVA.decoder_layers(refolded)[layer].mlp.down_proj
        down_proj.weight.copy_(fold_output(down_proj.weight, side_path.basis.float()))
    for seed, question in enumerate(QUESTIONS):
        inputs = _inputs(processor, seed, question)
        logits = {name: model(**inputs).logits[0].float() for name, model in [
            ("unfused", unfused), ("folded", folded), ("refolded", refolded), ("none", uncompensated)]}
        scale = logits["folded"].abs().max()
        assert (logits["unfused"] - logits["refolded"]).abs().max() < 1e-5 * scale
        # Against the pipeline's fold (float32 bases) the only difference is the bases' bfloat16 rounding
        # (relative 2^-9 per entry, so well under 1% of the SCP term); SCP itself moves the logits far more.
        difference = (logits["unfused"] - logits["folded"]).abs().max()
        assert difference < 2e-3 * scale
        assert (logits["none"] - logits["folded"]).abs().max() > 20 * difference


class _LoRAWrapped(torch.nn.Module):
    """What vLLM's LoRA does to down_proj (RowParallelLinearWithLoRA): replace it by a module that holds it as
    `base_layer` and computes base + s B A x from its weight, without ever calling the original module."""

    def __init__(self, base_layer, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.base_layer, self.a, self.b = base_layer, a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.base_layer.weight) + x @ self.a.T @ self.b.T


@torch.no_grad()
def test_side_paths_survive_a_lora_wrapper_around_down_proj(folded_and_unfused):
    """The side path corrects the MLP's output, so it still applies when LoRA replaces down_proj: the model computes
    the compensated weight of the adapted layer, (I + V V^T)(W + B A)."""
    _, unfused_dir, none_dir = folded_and_unfused
    processor = AutoProcessor.from_pretrained(unfused_dir)
    unfused = with_side_paths(unfused_dir)
    reference = LlavaForConditionalGeneration.from_pretrained(none_dir, dtype=torch.float32).eval()
    uncompensated = LlavaForConditionalGeneration.from_pretrained(none_dir, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(3)
    for layer, side_path in _side_path_modules(unfused).items():
        down_proj = LLAVA.decoder_layers(unfused)[layer].mlp.down_proj
        a = torch.randn(4, down_proj.in_features, generator=generator) * 0.1
        b = torch.randn(down_proj.out_features, 4, generator=generator) * 0.1
        LLAVA.decoder_layers(unfused)[layer].mlp.down_proj = _LoRAWrapped(down_proj, a, b)
        for model, basis in ((reference, side_path.basis.float()), (uncompensated, None)):
            target = LLAVA.decoder_layers(model)[layer].mlp.down_proj
            adapted = target.weight + b @ a
            target.weight.copy_(adapted if basis is None else fold_output(adapted, basis))
    inputs = _inputs(processor, 0, QUESTIONS[0])
    logits = {name: model(**inputs).logits[0].float() for name, model in
              [("unfused", unfused), ("reference", reference), ("uncompensated", uncompensated)]}
    difference = (logits["unfused"] - logits["reference"]).abs().max()
    assert difference < 1e-5 * logits["reference"].abs().max()
    assert (logits["unfused"] - logits["uncompensated"]).abs().max() > 100 * difference


def _side_path_modules(model) -> dict:
    return {i: layer.mlp.down_proj.scp_side_path for i, layer in enumerate(LLAVA.decoder_layers(model))
            if hasattr(layer.mlp.down_proj, "scp_side_path")}


# vLLM: the plugin's class applies the side paths (one server per checkpoint, one after the other).


def _first_token_logprobs(client, seed: int, question: str) -> dict[int, float]:
    response = client.chat.completions.create(
        model="served", messages=image_message(data_url(random_image(seed)), question), max_tokens=1,
        temperature=0.0, logprobs=True, top_logprobs=5,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True, "add_special_tokens": True},
    )
    return {int(t.token.removeprefix("token_id:")): t.logprob
            for t in response.choices[0].logprobs.content[0].top_logprobs}


def _serve(checkpoint: Path, log_path: Path, dtype: str) -> VLLMServer:
    return VLLMServer(checkpoint, log_path=log_path, dtype=dtype, served_model_name="served",
                      extra_args=["--limit-mm-per-prompt", '{"image": 1}'])


@pytest.mark.vllm
@torch.no_grad()
def test_vllm_side_paths_match_the_folded_model(folded_and_unfused, tmp_path):
    folded_dir, unfused_dir, none_dir = folded_and_unfused
    processor = AutoProcessor.from_pretrained(folded_dir)
    references = {name: LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
                  for name, path in [("folded", folded_dir), ("none", none_dir)]}
    with _serve(unfused_dir, tmp_path / "vllm.log", "float32") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0)
        for seed, question in enumerate(QUESTIONS):
            served = _first_token_logprobs(client, seed, question)
            inputs = _inputs(processor, seed, question)
            gaps = {}
            for name, model in references.items():
                log_probs = model(**inputs).logits[0, -1].float().log_softmax(-1)
                gaps[name] = max(abs(lp - float(log_probs[token])) for token, lp in served.items())
            # vLLM's float32 CPU kernels agree with transformers to ~1e-4; the bases' bfloat16 rounding adds less
            # than 1e-2 nats. Without the side paths the served model would be the uncompensated one.
            assert gaps["folded"] < 1e-2 and gaps["none"] > 5 * gaps["folded"], gaps
        log = server.log_tail(10_000)
    assert f"Resolved architecture: {SHORT_LLAVA_ARCHITECTURE}" in log


@pytest.mark.vllm
@torch.no_grad()
def test_vllm_serves_the_pruned_quantized_checkpoint(pruned_quantized, tmp_path):
    processor = AutoProcessor.from_pretrained(pruned_quantized)
    with dequantized_copy(open_checkpoint(pruned_quantized)) as dense:
        reference = with_side_paths(dense.path, torch.bfloat16)
    # vLLM's CPU W4A16 kernel computes in bfloat16.
    with _serve(pruned_quantized, tmp_path / "vllm.log", "bfloat16") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0)
        for seed, question in enumerate(QUESTIONS):
            served = _first_token_logprobs(client, seed, question)
            hf_top = reference(**_inputs(processor, seed, question)).logits[0, -1].topk(5).indices.tolist()
            # Same weights, bfloat16 on both sides: the greedy choices agree up to rounding.
            assert max(served, key=served.get) in hf_top and hf_top[0] in served
        answer = client.chat.completions.create(
            model="served", messages=image_message(data_url(random_image(5)), QUESTIONS[0]), max_tokens=8)
        assert answer.usage.completion_tokens > 0 and answer.choices[0].message.content is not None
        log = server.log_tail(10_000)
    assert f"Resolved architecture: {SHORT_LLAVA_ARCHITECTURE}" in log and "compressed-tensors" in log


# Bad input: formats that cannot be pruned, and SCP targets a side path cannot implement.


@pytest.mark.parametrize(("change", "named"), [
    ({"quant_method": "bitsandbytes", "format": None, "config_groups": None}, "bitsandbytes"),
    ({"quant_method": "gptq", "format": None, "config_groups": None}, "gptq"),
    ({"quant_method": "awq", "format": "gemm", "config_groups": None}, "awq (gemm)"),
    ({"format": "marlin-24", "config_groups": None}, "compressed-tensors (marlin-24)"),
    ({"sparsity_config": {"format": "sparse-24-bitmask"}},
     "compressed-tensors (pack-quantized) with a sparsity_config"),
])
def test_unsupported_quantization_formats(quantized, tmp_path, capsys, change, named):
    source = shutil.copytree(quantized, tmp_path / "source")
    config = _config(source)
    config["quantization_config"] = {key: value for key, value in {**config["quantization_config"], **change}.items()
                                     if value is not None}
    (source / "config.json").write_text(json.dumps(config))
    assert main(["prune", str(source), "--drop-layers", "1", "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"is quantized as {named}, which cannot be pruned" in err
    assert "Supported: compressed-tensors with format pack-quantized" in err
    assert not (tmp_path / "out").exists()


def test_scp_target_other_than_down_proj_on_a_quantized_source(quantized, llava_calib, tmp_path, capsys):
    assert main(["prune", str(quantized), "--drop-layers", "1", "--calib", str(llava_calib), "--scp-target",
                 "inputs", "-o", str(tmp_path / "out")]) == 2
    assert "kept unfused at the down-projection output, which is --scp-target down_proj" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_with_side_paths_is_not_pruned_again(pruned_quantized, tmp_path, capsys):
    assert main(["prune", str(pruned_quantized), "--drop-layers", "0", "-o", str(tmp_path / "out")]) == 2
    assert "already carries unfused SCP side paths" in capsys.readouterr().err
