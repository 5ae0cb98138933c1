"""Subspace-Compensated Pruning: pairing, subspace recovery, weight folding, and the checkpoint edit."""

from __future__ import annotations

import logging

import pytest
import torch

from shortlvlm_vllm.checkpoint.reader import open_checkpoint
from shortlvlm_vllm.checkpoint.safetensors_io import load_tensor
from shortlvlm_vllm.checkpoint.surgery import write_pruned_checkpoint
from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.prune.compensate import (
    SCP_TARGETS,
    Bridge,
    CompensationSettings,
    SubspaceCompensation,
    bridges,
    fold_input,
    fold_output,
    pair_layers,
    scp_basis,
    top_right_singular_vectors,
)
from shortlvlm_vllm.tiny_models import build_tiny_llava

NUM_LAYERS, NUM_SAMPLES, HIDDEN = 8, 20, 128
LAYER_KEY = "language_model.model.layers.{}.{}"
WEIGHTS = {
    "q_proj": "self_attn.q_proj.weight", "k_proj": "self_attn.k_proj.weight", "v_proj": "self_attn.v_proj.weight",
    "o_proj": "self_attn.o_proj.weight", "gate_proj": "mlp.gate_proj.weight", "up_proj": "mlp.up_proj.weight",
    "down_proj": "mlp.down_proj.weight",
}


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64)).Q


# --- pairing ---------------------------------------------------------------------------------


def test_nearest_ties_go_to_the_earlier_kept_layer():
    assert pair_layers([3], 8, "nearest") == {3: 2}
    assert pair_layers([3, 5], 8, "nearest") == {3: 2, 5: 4}


def test_nearest_reuses_kept_layers():
    # 4 -> 3; 5 is 2 from 3 and 2 from 7: the tie goes to 3; 6 -> 7.
    assert pair_layers([4, 5, 6], 8, "nearest") == {4: 3, 5: 3, 6: 7}


def test_pairing_of_a_run_in_the_middle():
    assert pair_layers([3, 4, 5], 8, "nearest") == {3: 2, 4: 2, 5: 6}
    assert pair_layers([3, 4, 5], 8, "unique") == {3: 2, 4: 6, 5: 7}
    assert bridges([3, 4, 5], 8, "block") == [Bridge(2, (3, 4, 5), 5)]


def test_pairing_of_a_run_at_the_end():
    assert pair_layers([5, 6, 7], 8, "nearest") == {5: 4, 6: 4, 7: 4}
    assert pair_layers([5, 6, 7], 8, "unique") == {5: 4, 6: 3, 7: 2}
    assert bridges([5, 6, 7], 8, "block") == [Bridge(4, (5, 6, 7), 7)]


def test_block_bridges_a_run_at_the_start_from_the_layer_after_it():
    assert bridges([0, 1], 5, "block") == [Bridge(2, (0, 1), 1)]
    assert pair_layers([0, 1], 5, "block") == {0: 2, 1: 2}
    assert bridges([1, 2, 5], 8, "block") == [Bridge(0, (1, 2), 2), Bridge(4, (5,), 5)]


def test_pairing_with_a_single_kept_layer():
    assert pair_layers([0, 1, 3], 4, "nearest") == {0: 2, 1: 2, 3: 2}
    assert bridges([0, 1, 3], 4, "block") == [Bridge(2, (0, 1), 1), Bridge(2, (3,), 3)]
    assert pair_layers([0, 1, 3], 4, "unique") == {0: 2, 1: None, 3: None}


def test_pairing_on_the_toy_models_30_percent():
    """The layers TIS prunes on the first toy (toy-v1) at 30%: `unique` sends the tail of the run to layers 7 and 6."""
    pruned = [9, 12, 13, 14, 15]
    assert pair_layers(pruned, 16, "unique") == {9: 8, 12: 11, 13: 10, 14: 7, 15: 6}
    assert pair_layers(pruned, 16, "nearest") == {9: 8, 12: 11, 13: 11, 14: 11, 15: 11}
    assert bridges(pruned, 16, "block") == [Bridge(8, (9,), 9), Bridge(11, (12, 13, 14, 15), 15)]


def test_unique_walks_pruned_layers_in_ascending_order():
    pairs = pair_layers([6, 4, 5], 8, "unique")
    assert list(pairs) == [4, 5, 6]
    assert pairs == {4: 3, 5: 7, 6: 2}


def test_unique_none_left_goes_uncompensated_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="shortlvlm_vllm.prune.compensate"):
        assert pair_layers([1, 2, 3], 4, "unique") == {1: 0, 2: None, 3: None}
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 2 and "pruned layer 2" in warned[0] and "uncompensated" in warned[0]


def test_unknown_pairing_lists_the_rules():
    with pytest.raises(ShortLVLMError, match="--scp-pairing 'far'.*nearest, unique, block"):
        SubspaceCompensation(CompensationSettings(pairing="far"))


# --- the subspace ----------------------------------------------------------------------------


def test_scp_basis_recovers_a_planted_low_rank_difference():
    n, d, k = 64, 32, 4
    generator = torch.Generator().manual_seed(0)
    kept = torch.randn(n, d, generator=generator)
    a, b = torch.randn(n, k, generator=generator), torch.randn(k, d, generator=generator)
    pruned = kept + a @ b + 1e-4 * torch.randn(n, d, generator=generator)
    basis = scp_basis(pruned, kept, k)
    assert basis.shape == (d, k) and basis.dtype == torch.float32
    torch.testing.assert_close(basis.T @ basis, torch.eye(k), atol=1e-5, rtol=0)
    q = torch.linalg.qr(b.T).Q  # orthonormal basis of B's row space
    cosines = torch.linalg.svdvals(basis.T @ q)  # cosines of the principal angles
    assert cosines.min() > 0.9999


def test_scp_basis_takes_the_top_directions_first():
    kept = torch.zeros(10, 6)
    pruned = torch.zeros(10, 6)
    pruned[:5, 4] = 3.0  # the strongest direction: e_4
    pruned[5:, 1] = 1.0  # the weaker one: e_1
    basis = scp_basis(pruned, kept, 1)
    torch.testing.assert_close(basis.abs().squeeze(1), torch.eye(6)[4])


def test_scp_basis_computes_in_float32():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(12, 8, generator=generator).bfloat16()
    assert scp_basis(x, torch.zeros_like(x), 3).dtype == torch.float32


@pytest.mark.parametrize("rank", [0, -1, 11])
def test_scp_basis_rank_out_of_range(rank):
    x = torch.randn(10, 32)
    with pytest.raises(ShortLVLMError, match=r"--rank.*min\(10, 32\)"):
        scp_basis(x, torch.zeros_like(x), rank)


def test_scp_basis_rank_at_the_limit():
    x = torch.randn(10, 32)
    assert scp_basis(x, torch.zeros_like(x), 10).shape == (32, 10)


# --- folding ---------------------------------------------------------------------------------


def test_fold_output_is_identity_plus_projection_times_w():
    d, inner = 16, 24
    w = torch.randn(d, inner, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    v = orthonormal(d, 3, seed=3)
    expected = (torch.eye(d, dtype=torch.float64) + v @ v.T) @ w
    out = fold_output(w.float(), v.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_fold_input_is_w_times_identity_plus_projection():
    d, outer = 16, 24
    w = torch.randn(outer, d, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    v = orthonormal(d, 3, seed=5)
    expected = w @ (torch.eye(d, dtype=torch.float64) + v @ v.T)
    out = fold_input(w.float(), v.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("fold", "shape"), [(fold_output, (16, 24)), (fold_input, (24, 16))])
def test_fold_keeps_bfloat16(fold, shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(6)).bfloat16()
    v = orthonormal(16, 2, seed=7).float()
    eye = torch.eye(16, dtype=torch.float64)
    projection = eye + v.double() @ v.double().T
    expected = projection @ w.double() if fold is fold_output else w.double() @ projection
    out = fold(w, v)
    assert out.dtype == torch.bfloat16 and out.shape == w.shape
    torch.testing.assert_close(out.double(), expected, atol=1e-2, rtol=1e-2)


def test_fold_leaves_the_orthogonal_complement_alone():
    v = orthonormal(16, 2, seed=8)
    w = torch.eye(16, dtype=torch.float64) - v @ v.T  # columns lie outside span(V)
    torch.testing.assert_close(fold_output(w, v), w, atol=1e-6, rtol=0)
    torch.testing.assert_close(fold_input(w, v), w, atol=1e-6, rtol=0)


# --- compensate on a checkpoint ------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_llava(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("scp") / "tiny-llava-bf16", dtype=torch.bfloat16,
                            num_layers=NUM_LAYERS, hidden_size=HIDDEN)


@pytest.fixture(scope="module")
def features():
    return torch.randn(NUM_LAYERS, NUM_SAMPLES, HIDDEN, generator=torch.Generator().manual_seed(9))


def original(src, layer: int, role: str) -> torch.Tensor:
    return load_tensor(src.tensor_info(LAYER_KEY.format(layer, WEIGHTS[role])))


def test_compensate_down_proj(bf16_llava, features):
    src = open_checkpoint(bf16_llava)
    comp = SubspaceCompensation(CompensationSettings(rank=8, pairing="nearest")).compensate(src, [5, 3], features)
    assert comp.pairs == {3: 2, 5: 4}
    assert set(comp.replaced) == {LAYER_KEY.format(r, WEIGHTS["down_proj"]) for r in (2, 4)}
    assert set(comp.bases) == {2, 4}
    for p, r in comp.pairs.items():
        (basis,) = comp.bases[r]
        torch.testing.assert_close(basis, scp_basis(features[p], features[r], 8))
        assert basis.shape == (HIDDEN, 8) and basis.dtype == torch.float32
        before = original(src, r, "down_proj")
        after = comp.replaced[LAYER_KEY.format(r, WEIGHTS["down_proj"])]
        assert after.dtype == before.dtype == torch.bfloat16 and after.shape == before.shape
        assert torch.equal(after, fold_output(before, basis))
        assert not torch.equal(after, before)


def test_compensate_down_proj_and_o_proj(bf16_llava, features):
    src = open_checkpoint(bf16_llava)
    comp = SubspaceCompensation(CompensationSettings(rank=4, target="down_proj+o_proj")).compensate(src, [3], features)
    assert set(comp.replaced) == {LAYER_KEY.format(2, WEIGHTS[role]) for role in ("down_proj", "o_proj")}
    for role in ("down_proj", "o_proj"):
        after = comp.replaced[LAYER_KEY.format(2, WEIGHTS[role])]
        assert torch.equal(after, fold_output(original(src, 2, role), comp.bases[2]))


def test_compensate_inputs_folds_the_norm_gains(bf16_llava, features):
    src = open_checkpoint(bf16_llava)
    comp = SubspaceCompensation(CompensationSettings(rank=4, target="inputs")).compensate(src, [6], features)
    roles = {"q_proj": "input_layernorm", "k_proj": "input_layernorm", "v_proj": "input_layernorm",
             "gate_proj": "post_attention_layernorm", "up_proj": "post_attention_layernorm"}
    norms = {"input_layernorm": "input_layernorm.weight", "post_attention_layernorm": "post_attention_layernorm.weight"}
    assert comp.pairs == {6: 5}
    assert set(comp.replaced) == ({LAYER_KEY.format(5, WEIGHTS[role]) for role in roles}
                                  | {LAYER_KEY.format(5, name) for name in norms.values()})
    for role, norm in roles.items():
        before = original(src, 5, role)
        gain = load_tensor(src.tensor_info(LAYER_KEY.format(5, norms[norm])))
        after = comp.replaced[LAYER_KEY.format(5, WEIGHTS[role])]
        assert after.shape == before.shape and after.dtype == before.dtype
        assert torch.equal(after, fold_input(before, comp.bases[5], gain))
    for name in norms.values():
        assert torch.equal(comp.replaced[LAYER_KEY.format(5, name)], torch.ones(HIDDEN, dtype=torch.bfloat16))


def test_unique_skips_unpaired_layers(bf16_llava, features, caplog):
    src = open_checkpoint(bf16_llava)
    with caplog.at_level(logging.WARNING, logger="shortlvlm_vllm.prune.compensate"):
        comp = SubspaceCompensation(CompensationSettings(rank=2, pairing="unique")).compensate(
            src, [2, 3, 4, 5, 6], features)
    assert comp.pairs == {2: 1, 3: 0, 4: 7, 5: None, 6: None}
    assert set(comp.bases) == {0, 1, 7}
    assert set(comp.replaced) == {LAYER_KEY.format(r, WEIGHTS["down_proj"]) for r in (0, 1, 7)}
    assert "uncompensated" in caplog.text


def test_shared_kept_layer_stack_takes_one_basis_from_the_stacked_gaps(bf16_llava, features):
    src = open_checkpoint(bf16_llava)
    comp = SubspaceCompensation(CompensationSettings(rank=6, pairing="nearest", shared="stack")).compensate(
        src, [5, 6, 7], features)
    assert comp.pairs == {5: 4, 6: 4, 7: 4}
    (basis,) = comp.bases[4]
    stacked = torch.cat([features[p] - features[4] for p in (5, 6, 7)])
    torch.testing.assert_close(basis, top_right_singular_vectors(stacked, 6))
    after = comp.replaced[LAYER_KEY.format(4, WEIGHTS["down_proj"])]
    assert torch.equal(after, fold_output(original(src, 4, "down_proj"), basis))


def test_shared_kept_layer_compose_applies_each_projection_in_turn(bf16_llava, features):
    src = open_checkpoint(bf16_llava)
    comp = SubspaceCompensation(CompensationSettings(rank=6, pairing="nearest", shared="compose")).compensate(
        src, [5, 6, 7], features)
    bases = comp.bases[4]
    assert len(bases) == 3
    for p, basis in zip((5, 6, 7), bases, strict=True):
        torch.testing.assert_close(basis, scp_basis(features[p], features[4], 6))
    w = original(src, 4, "down_proj").double()
    eye = torch.eye(HIDDEN, dtype=torch.float64)
    t = eye
    for v in bases:
        t = (eye + v.double() @ v.double().T) @ t
    after = comp.replaced[LAYER_KEY.format(4, WEIGHTS["down_proj"])]
    torch.testing.assert_close(after.double(), t @ w, atol=2e-2, rtol=2e-2)


def test_block_bridges_each_run_once(bf16_llava, features):
    src = open_checkpoint(bf16_llava)
    comp = SubspaceCompensation(CompensationSettings(rank=4, pairing="block")).compensate(src, [2, 3, 4, 6], features)
    assert comp.pairs == {2: 1, 3: 1, 4: 1, 6: 5}
    torch.testing.assert_close(comp.bases[1][0], scp_basis(features[4], features[1], 4))
    torch.testing.assert_close(comp.bases[5][0], scp_basis(features[6], features[5], 4))


def test_compensated_weights_fit_the_checkpoint_writer(bf16_llava, features, tmp_path):
    src = open_checkpoint(bf16_llava)
    comp = SubspaceCompensation(CompensationSettings(rank=8)).compensate(src, [3, 5], features)
    out = open_checkpoint(write_pruned_checkpoint(src, tmp_path / "pruned", [3, 5], replaced=comp.replaced))
    # Layer 4 of the source is layer 3 after pruning layer 3.
    written = load_tensor(out.tensor_info(LAYER_KEY.format(3, WEIGHTS["down_proj"])))
    assert torch.equal(written, comp.replaced[LAYER_KEY.format(4, WEIGHTS["down_proj"])])


def test_compensate_unknown_target_lists_options(bf16_llava, features):
    with pytest.raises(ShortLVLMError, match="unknown --scp-target 'mlp'") as info:
        SubspaceCompensation(CompensationSettings(rank=4, target="mlp")).compensate(
            open_checkpoint(bf16_llava), [3], features)
    assert all(name in str(info.value) for name in SCP_TARGETS)


# --- the input-side fold equals the unfolded computation ------------------------------------------


class _ProjectedNorm(torch.nn.Module):
    """The unfolded computation the input-side fold stands for: gain * T(x / rms(x)), T = (I + V_m V_m^T)...(I + V_1
    V_1^T), computed from the layer's own RMSNorm (its gain and epsilon)."""

    def __init__(self, norm, bases) -> None:
        super().__init__()
        self.norm, self.bases = norm, bases

    def forward(self, x):
        n = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.norm.variance_epsilon)
        for v in self.bases:
            n = n + (n @ v) @ v.T
        return self.norm.weight.float() * n.to(x.dtype)


@pytest.fixture(scope="module")
def gained_llava(tmp_path_factory):
    """The tiny LLaVA (float32) with random RMSNorm gains, so that folding the gain matters."""
    from shortlvlm_vllm.tiny_models import build_byte_tokenizer, make_llava, save_hub_checkpoint

    model, processor = make_llava(build_byte_tokenizer(), num_layers=NUM_LAYERS, hidden_size=HIDDEN, seed=3,
                                  initializer_range=0.1)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.copy_(0.5 + torch.rand(HIDDEN, generator=generator) * 1.5)
    return save_hub_checkpoint(model, processor, tmp_path_factory.mktemp("scp") / "tiny-llava-gains")


@pytest.mark.parametrize("shared", ["stack", "compose"])
@torch.no_grad()
def test_inputs_fold_equals_the_unfolded_forward(gained_llava, tmp_path, shared):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from shortlvlm_vllm.adapters.llava import LLAVA
    from shortlvlm_vllm.prune.drift import pruned_view

    from .conftest import random_image

    src = open_checkpoint(gained_llava)
    pruned = [4, 5, 7]  # nearest: 4 -> 3, 5 -> 6 (|6-5| = 1), 7 -> 6: layer 6 bridges two gaps
    features = torch.randn(NUM_LAYERS, NUM_SAMPLES, HIDDEN, generator=torch.Generator().manual_seed(12))
    comp = SubspaceCompensation(CompensationSettings(rank=8, target="inputs", pairing="nearest", shared=shared)
                                ).compensate(src, pruned, features)
    assert comp.pairs == {4: 3, 5: 6, 7: 6}
    folded = AutoModelForImageTextToText.from_pretrained(
        write_pruned_checkpoint(src, tmp_path / "folded", pruned, replaced=comp.replaced)).eval()
    full = AutoModelForImageTextToText.from_pretrained(gained_llava).eval()
    processor = AutoProcessor.from_pretrained(gained_llava)
    layers = LLAVA.decoder_layers(full)
    for r, bases in comp.bases.items():
        layers[r].input_layernorm = _ProjectedNorm(layers[r].input_layernorm, bases)
        layers[r].post_attention_layernorm = _ProjectedNorm(layers[r].post_attention_layernorm, bases)
    text = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "What is in the image?"}]}], add_generation_prompt=True)
    inputs = processor(images=random_image(7), text=text, return_tensors="pt")
    with pruned_view(full, LLAVA, pruned):
        unfolded = full(**inputs).logits
    torch.testing.assert_close(folded(**inputs).logits, unfolded, rtol=1e-4, atol=1e-4)
    unedited = AutoModelForImageTextToText.from_pretrained(
        write_pruned_checkpoint(src, tmp_path / "plain", pruned)).eval()
    assert (unedited(**inputs).logits - unfolded).abs().max() > 1e-2  # the compensation does change the output
