"""Visual-token pruning for Qwen2-VL / Qwen2.5-VL without a server: the attention score, the selection, the M-RoPE
bookkeeping (against transformers' own positions of the full prompt, and through vLLM's correction hook, chunked
or not), and `shortlvlm prune --visual-tokens` on a Qwen checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from shortlvlm_vllm.chat import template_image_turn
from shortlvlm_vllm.cli import main
from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.serving.launcher import server_command
from shortlvlm_vllm.serving.visual_tokens import (
    configured_budget,
    keep_most_attended,
    merge_group_scores,
    merged_grid_positions,
    position_channels,
    prompt_mrope_positions,
    received_attention,
)
from shortlvlm_vllm.serving.vllm_plugin import (
    MROPE_RECOMPUTE_ARGS,
    SHORT_QWEN2_5_VL_ARCHITECTURE,
    SHORT_QWEN2_VL_ARCHITECTURE,
    budget_architecture,
)

from .conftest import IMAGE_SIZES, random_image


def _naive_received(query, key, cu_seqlens):
    out = []
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True):
        q, k = query[start:end].transpose(0, 1), key[start:end].transpose(0, 1)  # [H, n, d]
        probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)  # [H, queries, keys]
        out.append(probs.mean(dim=1).sum(dim=0))
    return torch.cat(out)


def test_received_attention_is_per_image_and_sums_over_ranks(monkeypatch):
    torch.manual_seed(0)
    query, key = torch.randn(30, 4, 8), torch.randn(30, 4, 8)
    cu_seqlens = torch.tensor([0, 12, 30])  # two images: attention never crosses between them
    whole = received_attention(query, key, cu_seqlens)
    assert torch.allclose(whole, _naive_received(query, key, cu_seqlens), atol=1e-6)
    assert torch.allclose(whole[:12].sum(), torch.tensor(4.0)) and torch.allclose(whole[12:].sum(), torch.tensor(4.0))
    halves = [received_attention(query[:, h:h + 2], key[:, h:h + 2], cu_seqlens) for h in (0, 2)]
    assert torch.allclose(halves[0] + halves[1], whole, atol=1e-6)  # tensor parallelism: all-reduce of the ranks
    monkeypatch.setattr("shortlvlm_vllm.serving.visual_tokens.QUERY_CHUNK", 5)
    assert torch.allclose(received_attention(query, key, cu_seqlens), whole, atol=1e-6)  # chunking changes nothing


def test_the_most_attended_merged_tokens_are_kept_in_their_order():
    patch_scores = torch.tensor([0.0, 0, 0, 1, 5, 0, 0, 0, 0, 0, 0, 2, 0, 3, 0, 0])  # 4 merged tokens of 4 patches
    scores = merge_group_scores(patch_scores, 4)
    assert scores.tolist() == [1, 5, 2, 3]
    assert keep_most_attended(scores, 2).tolist() == [1, 3]
    assert keep_most_attended(scores, 4).tolist() == keep_most_attended(scores, 9).tolist() == [0, 1, 2, 3]
    assert keep_most_attended(torch.zeros(5), 2).tolist() == [0, 1]  # ties go to the earlier tokens


def test_qwen_budgets_fit_any_image_size_and_are_checked():
    config = {"model_type": "qwen2_vl"}
    assert configured_budget(config) is None
    assert configured_budget(config | {"short_lvlm": {"visual_tokens": 5000}}) == 5000
    with pytest.raises(ShortLVLMError, match="visual_tokens 0 leaves no image token: keep at least 1"):
        configured_budget(config | {"short_lvlm": {"visual_tokens": 0}})
    assert budget_architecture({"model_type": "qwen2_5_vl"}, 16) == SHORT_QWEN2_5_VL_ARCHITECTURE


@pytest.fixture(scope="module", params=["tiny_qwen2_vl", "tiny_qwen2_5_vl"])
def qwen(request):
    path = request.getfixturevalue(request.param)
    return (AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval(),
            AutoProcessor.from_pretrained(path))


def _prompt(processor, size):
    text = processor.apply_chat_template([template_image_turn("What is it?"), ], add_generation_prompt=True)
    return processor(images=[random_image(0, size)], text=text, return_tensors="pt")


@pytest.mark.parametrize("size", [*IMAGE_SIZES, (224, 224)], ids=["9-tokens", "35-tokens", "64-tokens"])
def test_kept_tokens_and_the_text_keep_their_positions_in_the_full_prompt(qwen, size):
    """prompt_mrope_positions on the pruned prompt == transformers' positions of the full prompt, dropped tokens out;
    vLLM's correction (recompute_mrope_positions, as the runner calls it, in one prefill or chunked) gets there from
    the stand-in positions the class gives on arrival."""
    from vllm.multimodal.video_prune.evs import recompute_mrope_positions

    model, processor = qwen
    inputs = _prompt(processor, size)
    ids, grid_thw = inputs["input_ids"][0], inputs["image_grid_thw"][0].tolist()
    full, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                         image_grid_thw=inputs["image_grid_thw"])
    image_slots = (ids == model.config.image_token_id).nonzero()[:, 0]
    assert len(image_slots) == len(merged_grid_positions(grid_thw, 2))
    kept = torch.randperm(len(image_slots), generator=torch.Generator().manual_seed(1))[:7].sort().values
    keep = torch.ones(len(ids), dtype=torch.bool)
    keep[image_slots] = False
    keep[image_slots[kept]] = True
    expected = full[:, 0, keep]
    pruned_ids, offset = ids[keep], int(image_slots[0])
    channels = position_channels(grid_thw, 2, kept)
    positions, delta = prompt_mrope_positions(len(pruned_ids), [(offset, channels)])
    assert torch.equal(positions, expected)
    assert delta == int(expected.max()) + 1 - len(pruned_ids)
    stand_in, _ = prompt_mrope_positions(len(pruned_ids), [(offset, position_channels(grid_thw, 2,
                                                                                      torch.arange(len(kept))))])
    config = model.config
    tokens = (config.vision_start_token_id, config.image_token_id, config.video_token_id)
    whole, whole_delta = recompute_mrope_positions(pruned_ids, [channels.T], stand_in, 0, *tokens)
    assert torch.equal(whole, expected) and whole_delta == delta
    # chunked prefill: the first chunk ends 3 tokens into the image, the second brings the other kept tokens
    first, _ = recompute_mrope_positions(pruned_ids, [channels[:3].T], stand_in, 0, *tokens)
    second, second_delta = recompute_mrope_positions(pruned_ids, [channels[3:].T], first, offset + 3, *tokens)
    assert torch.equal(second, expected) and second_delta == delta


def test_prune_writes_a_qwen_budget_and_serving_adds_the_switch(tiny_qwen2_vl, tmp_path):
    out = tmp_path / "k16"
    assert main(["prune", str(tiny_qwen2_vl), "--visual-tokens", "16", "-o", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [SHORT_QWEN2_VL_ARCHITECTURE] and config["model_type"] == "qwen2_vl"
    assert config["short_lvlm"]["visual_tokens"] == 16
    command = server_command(out)
    at = command.index(MROPE_RECOMPUTE_ARGS[0])
    assert command[at:at + 2] == list(MROPE_RECOMPUTE_ARGS)
    given = server_command(out, extra_args=[MROPE_RECOMPUTE_ARGS[0], "0.2"])
    assert given.count(MROPE_RECOMPUTE_ARGS[0]) == 1 and given[-1] == "0.2"
    assert MROPE_RECOMPUTE_ARGS[0] not in server_command(tiny_qwen2_vl)


def test_register_turns_on_the_cpu_runners_pruning_path_once():
    from vllm.platforms import current_platform
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    from shortlvlm_vllm.serving.vllm_plugin import register
    from shortlvlm_vllm.serving.vllm_plugin.cpu_runner import PATCHED

    register()
    wrapped = CPUModelRunner.load_model
    register()
    assert CPUModelRunner.load_model is wrapped
    assert getattr(wrapped, PATCHED, False) == current_platform.is_cpu()
    if current_platform.is_cpu():
        assert not getattr(wrapped.__wrapped__, PATCHED, False)  # wrapped once, around vLLM's own
