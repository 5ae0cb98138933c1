"""`shortlvlm quantize`: W4A16 checkpoints made by llm-compressor in .venv-quant (rtn, gptq, awq) on a
tiny LLaVA, Qwen2-VL, Qwen2.5-VL and mPLUG-Owl2, their layout and numbers, vLLM serving the GPTQ one of each,
and bad input. Each method runs once per module and architecture."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import openai
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

from shortlvlm_vllm.chat import data_url, image_message, template_image_turn
from shortlvlm_vllm.checkpoint.reader import open_checkpoint
from shortlvlm_vllm.cli import main
from shortlvlm_vllm.data.calibration import calibration_inputs, load_calibration
from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.quantize import driver as quantize
from shortlvlm_vllm.quantize.dequantize import dequantized_copy
from shortlvlm_vllm.serving.launcher import VLLMServer, has_cuda
from shortlvlm_vllm.tiny_models import build_byte_tokenizer, build_tiny_llava, make_llava, save_hub_checkpoint
from tests.tiny_mplug_owl2 import build_tiny_mplug_owl2
from tests.tiny_qwen import build_tiny_qwen
from tests.tiny_qwen_vl import build_tiny_qwen_vl

from .conftest import random_image

METHODS = ["rtn", "gptq", "awq"]
GROUP = 128
SIDE_FILES = ["tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja",
              "generation_config.json"]
UNQUANTIZED = ("vision_tower.", "multi_modal_projector.", "language_model.lm_head.",
               "language_model.model.embed_tokens.", "language_model.model.norm.")
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """Two decoder layers, hidden 128, intermediate 256: shapes vLLM's CPU W4A16 kernel takes."""
    return build_tiny_llava(tmp_path_factory.mktemp("models") / "tiny-llava-2", num_layers=2)


@pytest.fixture(scope="module")
def quantized(source, tmp_path_factory):
    """method -> its quantized checkpoint, made on first use through the CLI with 8 calibration samples."""
    made = {}

    def get(method: str) -> Path:
        if method not in made:
            out = tmp_path_factory.mktemp("quantized") / f"tiny-{method}"
            assert main(["quantize", str(source), "-o", str(out), "--method", method, "--num-samples", "8"]) == 0
            made[method] = out
        return made[method]

    return get


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def _dequantize(tensors: dict[str, torch.Tensor], base: str) -> torch.Tensor:
    """compressed-tensors pack-quantized: 8 signed 4-bit values per int32 along the input dim, offset by 8."""
    packed, scale = tensors[f"{base}.weight_packed"], tensors[f"{base}.weight_scale"]
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    q = ((packed.unsqueeze(-1) >> shifts) & 0xF).reshape(packed.shape[0], -1) - 8
    return q.to(scale.dtype) * scale.repeat_interleave(GROUP, dim=1)


def _linear_bases(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k.removesuffix(".weight") for k in tensors if k.endswith(".weight") and
                  k.startswith("language_model.model.layers.") and k.split(".")[-2] in LINEAR)


def _dequantized_model(checkpoint: Path, source: Path, workdir: Path) -> LlavaForConditionalGeneration:
    """The quantized checkpoint with every weight dequantized, as a plain float32 transformers model."""
    tensors = _tensors(checkpoint)
    dense = {k: v for k, v in tensors.items() if not k.rsplit(".", 1)[-1].startswith("weight_")}
    for base in _linear_bases(_tensors(source)):
        dense[f"{base}.weight"] = _dequantize(tensors, base)
    shutil.copytree(source, workdir)
    save_file(dense, workdir / "model.safetensors", metadata={"format": "pt"})
    return LlavaForConditionalGeneration.from_pretrained(workdir, dtype=torch.float32).eval()


@pytest.mark.parametrize("method", METHODS)
def test_config_records_the_quantization(quantized, source, method):
    out = quantized(method)
    config = json.loads((out / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    weights = q["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["strategy"], weights["symmetric"]) == (
        4, GROUP, "group", True)
    assert q["config_groups"]["group_0"]["input_activations"] is None  # A16: activations stay 16-bit
    # The ignore list names modules in the hub layout, as vLLM's llava model calls them.
    assert {"language_model.lm_head", "multi_modal_projector.linear_1", "multi_modal_projector.linear_2"} <= set(
        q["ignore"])
    assert all(name.startswith(("vision_tower.vision_model.", "multi_modal_projector.", "language_model.lm_head"))
               for name in q["ignore"])

    record = config["short_lvlm"]["quantization"]
    assert (record["method"], record["scheme"], record["group_size"]) == (method, "W4A16", GROUP)
    assert record["source"] == str(source)
    if method == "rtn":
        assert record["calibration"] is None
    else:
        assert (record["calibration"]["source"], record["calibration"]["num_samples"]) == ("synthetic", 8)
    modifier = {"rtn": "QuantizationModifier", "gptq": "GPTQModifier", "awq": "AWQModifier"}[method]
    assert modifier in (out / "recipe.yaml").read_text()
    for name in SIDE_FILES:
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    assert "## Quantization" in (out / "README.md").read_text()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary leftovers

    read = AutoConfig.from_pretrained(out)  # stock transformers (the serving environment's) reads it
    assert read.quantization_config["format"] == "pack-quantized"
    assert read.text_config.num_hidden_layers == 2


@pytest.mark.parametrize("method", METHODS)
def test_layout_and_unquantized_tensors(quantized, source, method):
    src, out = _tensors(source), _tensors(quantized(method))
    bases = _linear_bases(src)
    expected = (set(src) - {f"{b}.weight" for b in bases}) | {
        f"{b}.weight_{part}" for b in bases for part in ("packed", "scale", "shape")}
    assert set(out) == expected  # the source's own key names, each linear weight replaced by its packed form
    for name, tensor in src.items():
        if name.startswith(UNQUANTIZED):
            assert out[name].dtype == tensor.dtype and torch.equal(out[name], tensor), name
    for base in bases:
        rows, cols = src[f"{base}.weight"].shape
        assert out[f"{base}.weight_packed"].shape == (rows, cols // 8)
        assert out[f"{base}.weight_scale"].shape == (rows, cols // GROUP)
        assert out[f"{base}.weight_shape"].tolist() == [rows, cols]
    norm = "language_model.model.layers.0.input_layernorm.weight"
    # AWQ folds its smoothing scales into the norms in front of the linears; the others leave them alone.
    assert torch.equal(out[norm], src[norm]) == (method != "awq")


def test_quantizing_a_pruned_checkpoint_keeps_its_record(pruned_llava, tmp_path):
    out = tmp_path / "pruned-w4a16"
    assert main(["quantize", str(pruned_llava), "-o", str(out), "--method", "rtn"]) == 0
    config = json.loads((out / "config.json").read_text())
    source = json.loads((pruned_llava / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == source["text_config"]["num_hidden_layers"] == 6
    assert config["short_lvlm"]["pruned_layers"] == source["short_lvlm"]["pruned_layers"]
    assert config["short_lvlm"]["quantization"]["method"] == "rtn"
    card = (out / "README.md").read_text()
    pruned_card = (pruned_llava / "README.md").read_text().splitlines()
    assert pruned_card[3] + ", W4A16 (rtn)" in card.splitlines() and "## Quantization" in card  # the title
    assert all(line in card.splitlines() for line in pruned_card[4:])  # and the pruning record, all of it
    assert set(_tensors(out)) >= {"language_model.model.layers.5.mlp.down_proj.weight_packed",
                                  "vision_tower.vision_model.post_layernorm.weight"}


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_weights_differ_within_the_4bit_error(quantized, source, method):
    src, out = _tensors(source), _tensors(quantized(method))
    for base in _linear_bases(src):
        weight, restored = src[f"{base}.weight"], _dequantize(out, base)
        error = (restored - weight).abs()
        assert error.max() > 0, base
        # Symmetric 4 bits: the scale is max|w| / 8 per group, so relative errors of ~10-20% are expected.
        assert error.norm() / weight.norm() < 0.3, base
        if method == "rtn":  # round to nearest: never more than half a step off
            half_step = out[f"{base}.weight_scale"].repeat_interleave(GROUP, dim=1) / 2
            assert bool((error <= half_step * (1 + 1e-5)).all()), base


@torch.no_grad()
def test_quantized_models_track_the_source_and_gptq_beats_rtn(quantized, source, tmp_path):
    processor = AutoProcessor.from_pretrained(source)
    reference = LlavaForConditionalGeneration.from_pretrained(source, dtype=torch.float32).eval()
    inputs = [calibration_inputs(processor, s) for s in load_calibration("synthetic", num_samples=4, seed=123)]
    expected = [reference(**x).logits for x in inputs]
    errors = {}
    for method in METHODS:
        model = _dequantized_model(quantized(method), source, tmp_path / method)
        errors[method] = sum(float((model(**x).logits - e).norm() / e.norm()) for x, e in zip(inputs, expected,
                                                                                                 strict=True)) / 4
    assert all(0 < error < 0.5 for error in errors.values()), errors
    # GPTQ minimises the layers' output error on the (image) calibration data; on held-out samples it is
    # well ahead of round-to-nearest (measured 0.13 against 0.35).
    assert errors["gptq"] < 0.75 * errors["rtn"], errors


@pytest.mark.vllm
@torch.no_grad()
def test_vllm_serves_the_gptq_checkpoint(quantized, source, tmp_path):
    checkpoint = quantized("gptq")
    processor = AutoProcessor.from_pretrained(checkpoint)
    dense = _dequantized_model(checkpoint, source, tmp_path / "dense")
    # vLLM's CPU W4A16 kernel computes in bfloat16 (it has no float32 path).
    with VLLMServer(checkpoint, log_path=tmp_path / "vllm.log", dtype="bfloat16", served_model_name="quantized",
                    extra_args=["--limit-mm-per-prompt", '{"image": 1}']) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0)
        for seed, question in enumerate(["What is in the image?", "Describe the colours."]):
            image = random_image(seed)
            response = client.chat.completions.create(
                model="quantized", messages=image_message(data_url(image), question), max_tokens=4, temperature=0.0,
                logprobs=True, top_logprobs=5, extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
            )
            assert response.usage.completion_tokens == 4
            first = response.choices[0].logprobs.content[0]
            vllm_top = [int(t.token.removeprefix("token_id:")) for t in first.top_logprobs]
            text = processor.apply_chat_template([template_image_turn(question)], add_generation_prompt=True)
            hf_top = dense(**processor(images=image, text=text, return_tensors="pt")).logits[0, -1].topk(5).indices
            # The served weights are the checkpoint's: greedy choices agree up to bfloat16 noise.
            assert vllm_top[0] in hf_top.tolist() and int(hf_top[0]) in vllm_top
        log = server.log_tail(10_000)
    assert "compressed-tensors" in log
    if not has_cuda():
        assert "CPUWNA16LinearKernel" in log


# Bad input: a clear message, exit code 2, nothing written.


def _fails(capsys, argv: list[str], message: str, dst: Path) -> None:
    existed = dst.exists()
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert dst.exists() == existed
    assert not [p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]


@pytest.mark.parametrize("option", [["--method", "hqq"], ["--scheme", "W8A8"], ["--group-size", "100"]])
def test_cli_rejects_unknown_choices(source, tmp_path, capsys, option):
    with pytest.raises(SystemExit) as exc:
        main(["quantize", str(source), "-o", str(tmp_path / "out"), *option])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("recipe", "message"), [
    (quantize.QuantizeRecipe(method="hqq"), "unknown quantization method 'hqq'"),
    (quantize.QuantizeRecipe(method="rtn", scheme="W8A8"), "unsupported quantization scheme 'W8A8'"),
    (quantize.QuantizeRecipe(method="rtn", group_size=100), "unsupported group size 100"),
    (quantize.QuantizeRecipe(method="gptq"), "gptq needs calibration data"),
])
def test_library_rejects_bad_recipes(source, tmp_path, recipe, message):
    with pytest.raises(ShortLVLMError, match=message):
        quantize.quantize_checkpoint(source, tmp_path / "out", recipe)
    assert not (tmp_path / "out").exists()


def test_missing_source(tmp_path, capsys):
    _fails(capsys, ["quantize", str(tmp_path / "nowhere"), "-o", str(tmp_path / "out")], "not found",
           tmp_path / "out")


def test_source_that_is_not_a_llava(tmp_path, capsys):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    _fails(capsys, ["quantize", str(tmp_path / "llama"), "-o", str(tmp_path / "out")],
           "is not a supported vision-language checkpoint", tmp_path / "out")


def test_existing_output_needs_overwrite(source, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    _fails(capsys, ["quantize", str(source), "-o", str(tmp_path / "out"), "--method", "rtn"],
           "already exists: choose another path or pass --overwrite", tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_already_quantized_source(quantized, tmp_path, capsys):
    _fails(capsys, ["quantize", str(quantized("rtn")), "-o", str(tmp_path / "out"), "--method", "rtn"],
           "is already quantized (compressed-tensors)", tmp_path / "out")


def test_shapes_the_cpu_kernel_cannot_take(tmp_path, capsys):
    model, processor = make_llava(build_byte_tokenizer(), num_layers=1, hidden_size=128, intermediate_size=200)
    odd = save_hub_checkpoint(model, processor, tmp_path / "odd")
    _fails(capsys, ["quantize", str(odd), "-o", str(tmp_path / "out"), "--method", "rtn"],
           "vLLM's W4A16 CPU kernel needs both dimensions to be multiples of 32", tmp_path / "out")


def test_missing_quantization_environment(source, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(quantize.QUANT_PYTHON_ENV, raising=False)
    monkeypatch.setattr(quantize, "QUANT_VENV", ".venv-quant-missing")
    _fails(capsys, ["quantize", str(source), "-o", str(tmp_path / "out"), "--method", "rtn"],
           "Run `bash setup.sh` (or `make setup`)", tmp_path / "out")
    monkeypatch.setenv(quantize.QUANT_PYTHON_ENV, str(tmp_path / "no-python"))
    _fails(capsys, ["quantize", str(source), "-o", str(tmp_path / "out"), "--method", "rtn"],
           "SHORTLVLM_QUANT_PYTHON", tmp_path / "out")


def test_python_without_llmcompressor(source, tmp_path, capsys, monkeypatch):
    """The serving environment's python has no llm-compressor: the worker's own message comes through."""
    monkeypatch.setenv(quantize.QUANT_PYTHON_ENV, sys.executable)
    _fails(capsys, ["quantize", str(source), "-o", str(tmp_path / "out"), "--method", "rtn"],
           "llm-compressor cannot be imported", tmp_path / "out")


def test_python_without_this_project(source, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(quantize.QUANT_PYTHON_ENV, str(Path(sys.base_prefix) / "bin" / "python3"))
    monkeypatch.chdir(tmp_path)  # `python -m` would find the package in the repository's root
    _fails(capsys, ["quantize", str(source), "-o", str(tmp_path / "out"), "--method", "rtn"],
           "cannot import this project. Run `bash setup.sh`", tmp_path / "out")


def test_worker_error_is_reported_and_leaves_nothing(source, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    _fails(capsys, ["quantize", str(source), "-o", str(tmp_path / "out"), "--method", "gptq",
                    "--calib", str(tmp_path / "missing.json"), "--num-samples", "8"],
           f"calibration source {tmp_path / 'missing.json'} not found", tmp_path / "out")


def test_worker_crash_is_reported_with_its_last_lines(source, tmp_path, capsys, caplog, monkeypatch):
    """Output streams through line by line (progress bars' carriage returns too); a crash shows the tail."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'loading the model'\nprintf 'pass 50%%\\rpass 100%%\\n'\n"
                    "echo 'RuntimeError: boom' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv(quantize.QUANT_PYTHON_ENV, str(fake))
    caplog.set_level(logging.INFO)
    _fails(capsys, ["quantize", str(source), "-o", str(tmp_path / "out"), "--method", "rtn"],
           "the quantization pass failed with exit code 3; nothing was written", tmp_path / "out")
    streamed = [r.getMessage() for r in caplog.records if r.name == "shortlvlm_vllm.quantize.worker"]
    assert streamed == ["loading the model", "pass 50%", "pass 100%", "RuntimeError: boom"]


# Qwen2-VL, Qwen2.5-VL, mPLUG-Owl2 and Qwen-VL-Chat: hidden 128, intermediate 256, key/value width 64 or 128, so
# every quantized matrix fits the CPU kernel and the group size.
ARCHITECTURE_SOURCES = {  # builder, the vision side's key prefixes, the decoder layers' key prefix
    "qwen2_vl": (lambda out: build_tiny_qwen_vl(out, "qwen2_vl", num_layers=2), ("visual.",), "model.layers."),
    "qwen2_5_vl": (lambda out: build_tiny_qwen_vl(out, "qwen2_5_vl", num_layers=2), ("visual.",), "model.layers."),
    "mplug_owl2": (lambda out: build_tiny_mplug_owl2(out, num_layers=2),
                   ("model.vision_model.", "model.visual_abstractor."), "model.layers."),
    "qwen": (lambda out: build_tiny_qwen(out, num_layers=2), ("transformer.visual.",), "transformer.h."),
}


@pytest.fixture(scope="module")
def other_source(tmp_path_factory):
    """architecture -> its two-layer source checkpoint, built on first use."""
    made = {}

    def get(architecture: str) -> Path:
        if architecture not in made:
            build = ARCHITECTURE_SOURCES[architecture][0]
            made[architecture] = build(tmp_path_factory.mktemp("models") / f"tiny-{architecture}")
        return made[architecture]

    return get


@pytest.fixture(scope="module")
def other_quantized(other_source, tmp_path_factory):
    """(architecture, method) -> its quantized checkpoint, made on first use through the CLI (8 calibration samples)."""
    made = {}

    def get(architecture: str, method: str) -> Path:
        if (architecture, method) not in made:
            out = tmp_path_factory.mktemp("quantized") / f"tiny-{architecture}-{method}"
            assert main(["quantize", str(other_source(architecture)), "-o", str(out), "--method", method,
                         "--num-samples", "8"]) == 0
            made[architecture, method] = out
        return made[architecture, method]

    return get


def _dense_copy(checkpoint: Path, dtype: torch.dtype = torch.float32):
    """A quantized checkpoint with every weight dequantized, loaded by its architecture's transformers class."""
    with dequantized_copy(open_checkpoint(checkpoint)) as dense:
        return AutoModelForImageTextToText.from_pretrained(dense.path, dtype=dtype).eval()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("architecture", list(ARCHITECTURE_SOURCES))
def test_other_architectures_quantize_every_decoder_linear_and_nothing_of_the_vision_side(
        other_source, other_quantized, architecture, method):
    """The worker loads each architecture's own class and takes its ignore list (and AWQ's mappings) from the
    adapter: every 2-D weight of the decoder layers (mPLUG-Owl2's text and image copies of k/v included) is packed,
    the vision side, embeddings, final norm and lm_head are copied unchanged, and the ignore list names the vision
    modules as the source does. AWQ folds its smoothing into the norms its mappings start from (Qwen2-VL's layer
    norms, Qwen-VL-Chat's ln_1 and ln_2; mPLUG-Owl2 smooths only up_proj -> down_proj, its norms being text and image
    copies)."""
    _, vision, decoder = ARCHITECTURE_SOURCES[architecture]
    source, out = other_source(architecture), other_quantized(architecture, method)
    src, written = _tensors(source), _tensors(out)
    linear = {k.removesuffix(".weight") for k, v in src.items() if k.startswith(decoder) and v.dim() == 2}
    assert linear and {k.removesuffix(".weight_packed") for k in written if k.endswith(".weight_packed")} == linear
    if architecture == "mplug_owl2":
        assert "model.layers.1.self_attn.k_proj.multiway.1" in linear
    adapter = open_checkpoint(source).adapter
    norms = tuple(f".{weight}" for _, weight in adapter.layer_norms)  # Qwen-VL-Chat's are ln_1 and ln_2
    smoothed_norms = method == "awq" and any(f".{smooth}.weight" in norms for smooth, _ in adapter.awq_mappings)
    changed = []
    for name, tensor in src.items():
        if name.removesuffix(".weight") not in linear and not torch.equal(written[name], tensor):
            changed.append(name)
    if smoothed_norms:
        assert changed and all(name.startswith(decoder) and name.endswith(norms) for name in changed), changed
    else:
        assert not changed, changed
    config = json.loads((out / "config.json").read_text())
    ignore = config["quantization_config"]["ignore"]
    assert "lm_head" in ignore and any(name.startswith(vision) for name in ignore)
    assert all(name == "lm_head" or name.startswith(vision) for name in ignore), ignore
    assert all(f"{name}.weight" in src for name in ignore)  # the source's own module names
    modifier = {"rtn": "QuantizationModifier", "gptq": "GPTQModifier", "awq": "AWQModifier"}[method]
    assert modifier in (out / "recipe.yaml").read_text()
    calibration = config["short_lvlm"]["quantization"]["calibration"]
    assert calibration is None if method == "rtn" else calibration["num_samples"] == 8


# vLLM serving them: test_prune_quantized_architectures serves each architecture's W4A16 checkpoint (with SCP side
# paths beside the packed weights, through the same compressed-tensors loader as a GPTQ one).
@pytest.mark.parametrize("architecture", list(ARCHITECTURE_SOURCES))
@torch.no_grad()
def test_other_architectures_track_the_source_and_gptq_beats_rtn(other_source, other_quantized, architecture):
    source = other_source(architecture)
    processor = AutoProcessor.from_pretrained(source)
    reference = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32).eval()
    inputs = [calibration_inputs(processor, s) for s in load_calibration("synthetic", num_samples=4, seed=123)]
    expected = [reference(**x).logits for x in inputs]
    errors = {}
    for method in METHODS:
        model = _dense_copy(other_quantized(architecture, method))
        errors[method] = sum(float((model(**x).logits - e).norm() / e.norm()) for x, e in zip(inputs, expected,
                                                                                                 strict=True)) / 4
    # Measured on held-out samples: Qwen2-VL rtn 0.38, gptq 0.13, awq 0.39; mPLUG-Owl2 rtn 0.45, gptq 0.22, awq 0.45.
    # AWQ's scales bring nothing on random weights (no outlier channels to protect): it only has to do no harm.
    assert all(0 < error < 0.6 for error in errors.values()), errors
    assert errors["gptq"] < 0.75 * errors["rtn"], errors
    assert errors["awq"] < 1.15 * errors["rtn"], errors

