"""The drift measurement and the in-memory pruned view it runs on."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from shortlvlm_vllm.adapters.llava import LLAVA
from shortlvlm_vllm.data.calibration import CalibrationSample
from shortlvlm_vllm.prune.drift import drift, pruned_view, reference_outputs

from .conftest import random_image


def _samples(n):
    return [CalibrationSample(str(i), "What is in the image?", "Shapes.", random_image(50 + i)) for i in range(n)]


@pytest.fixture(scope="module")
def loaded(tiny_llava):
    model = AutoModelForImageTextToText.from_pretrained(tiny_llava, attn_implementation="sdpa").eval()
    processor = AutoProcessor.from_pretrained(tiny_llava)
    return model, processor, reference_outputs(model, processor, LLAVA, _samples(3))


def test_the_full_model_has_no_drift(loaded):
    model, _, reference = loaded
    measured = drift(model, reference)
    assert measured.kl == pytest.approx(0.0, abs=1e-7) and measured.hidden_distance == pytest.approx(0.0, abs=1e-6)


def test_removing_an_identity_layer_has_no_drift_and_the_view_restores_the_model(loaded):
    model, _, reference = loaded
    layer = LLAVA.decoder_layers(model)[5]
    saved = {n: p.detach().clone() for n, p in layer.named_parameters()}
    zero = {f"language_model.model.layers.5.{n}": torch.zeros_like(saved[n])
            for n in ("self_attn.o_proj.weight", "mlp.down_proj.weight")}
    with pruned_view(model, LLAVA, [3], zero):  # layer 5 made an identity, layer 3 removed
        inside = drift(model, reference)
        assert len(LLAVA.decoder_layers(model)) == 7
    with pruned_view(model, LLAVA, [3, 5], zero):
        assert drift(model, reference) == pytest.approx(inside)  # dropping an identity layer changes nothing
    assert inside.kl > 1e-4 and inside.hidden_distance > 1e-3
    assert len(LLAVA.decoder_layers(model)) == 8
    assert all(torch.equal(p, saved[n]) for n, p in layer.named_parameters())
    assert drift(model, reference).kl == pytest.approx(0.0, abs=1e-7)


@torch.no_grad()
def test_the_written_checkpoint_equals_the_in_memory_view(loaded, tiny_llava, scp_pruned_llava):
    """The folded SCP edit on disk is exactly what was measured in memory."""
    from shortlvlm_vllm.checkpoint.reader import open_checkpoint
    from shortlvlm_vllm.checkpoint.safetensors_io import load_tensor

    model, processor, reference = loaded
    record = json.loads((scp_pruned_llava / "config.json").read_text())["short_lvlm"]
    pruned = record["pruned_layers"]
    pairs = {int(p): r for p, r in record["compensation_pairs"].items()}
    src = open_checkpoint(tiny_llava)
    written = open_checkpoint(scp_pruned_llava)
    renumber = {old: new for new, old in enumerate(i for i in range(8) if i not in pruned)}
    replaced = {}
    for kept in pairs.values():
        key = LLAVA.layer_weight_key([t.name for t in src.tensors()], kept, "down_proj")
        new_key = LLAVA.layer_weight_key([t.name for t in written.tensors()], renumber[kept], "down_proj")
        replaced[key] = load_tensor(written.tensor_info(new_key))
        assert not torch.equal(replaced[key], load_tensor(src.tensor_info(key)))  # SCP did edit it
    on_disk = AutoModelForImageTextToText.from_pretrained(scp_pruned_llava, attn_implementation="sdpa").eval()
    inputs = reference.inputs[0]
    with pruned_view(model, LLAVA, pruned, replaced):
        torch.testing.assert_close(on_disk(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-5)
    card = (scp_pruned_llava / "README.md").read_text()
    assert "Drift from the full model" in card and "| scp |" in card and "| none |" in card
    assert set(record["heldout_drift"]) == {"none", "scp"}
