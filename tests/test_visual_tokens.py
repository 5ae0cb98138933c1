"""Visual-token selection (VisionZip-style) and `shortlvlm prune --visual-tokens`: math, checkpoint, bad input."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoConfig

from shortlvlm_vllm.cli import main
from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.serving.visual_tokens import (
    cls_attention,
    configured_selection,
    key_metric,
    key_sums,
    random_visual_tokens,
    select_visual_tokens,
    split_budget,
)
from shortlvlm_vllm.serving.vllm_plugin import SHORT_LLAVA_ARCHITECTURE, budget_architecture, budget_overrides, register

TINY_TOKENS = 64  # the tiny fixture: 64 px images, 8 px patches


@pytest.mark.parametrize(("budget", "split"), [(1, (1, 0)), (2, (1, 1)), (4, (3, 1)), (9, (8, 1)), (64, (54, 10)),
                                                (144, (122, 22))])
def test_budget_split_follows_visionzip(budget, split):
    assert split_budget(budget) == split


def test_full_budget_keeps_every_token_in_order():
    features = torch.randn(2, 9, 4)
    assert torch.equal(select_visual_tokens(features, torch.rand(2, 9), torch.randn(2, 9, 3), 9), features)


def test_dominant_tokens_by_cls_attention_then_one_merged_contextual_token():
    features = torch.arange(12.0).view(1, 6, 2)
    attention = torch.tensor([[0.1, 0.9, 0.0, 0.5, 0.2, 0.3]])
    selected = select_visual_tokens(features, attention, torch.randn(1, 6, 3), 3)  # 2 dominant + 1 contextual
    rest = features[0, [2, 4, 5]].mean(dim=0)
    expected = torch.stack([features[0, 1], features[0, 3], features[0, 0] + rest])
    assert torch.allclose(selected[0], expected)


def test_contextual_tokens_merge_by_key_similarity():
    features = torch.randn(1, 14, 4)
    attention = torch.zeros(1, 14)
    attention[0, :11] = 1 + torch.arange(11.0)  # tokens 0..10 dominant; 11, 12, 13 left for 2 contextual tokens
    keys = torch.zeros(1, 14, 2)
    keys[0, :, 0] = 1
    keys[0, 12:, :] = torch.tensor([0.0, 1.0])  # token 13 is like target 12, not like target 11
    selected = select_visual_tokens(features, attention, keys, 13)
    assert torch.allclose(selected[0, :11], features[0, :11])
    assert torch.allclose(selected[0, 11], features[0, 11])
    assert torch.allclose(selected[0, 12], features[0, 12] + features[0, 13])


def _rank_scores(x, qkv_weight, heads: int, ranks: int, rank: int):
    """What one tensor-parallel rank computes: vLLM's QKVParallelLinear gives rank r the rows of heads
    r * heads / ranks ... of each of q, k and v, so its output chunks into its own q, k, v."""
    hidden, local = x.shape[-1], heads // ranks
    rows = [w.view(heads, -1, hidden)[rank * local:(rank + 1) * local].reshape(-1, hidden) for w in qkv_weight.chunk(3)]
    query, key, _ = (x @ torch.cat(rows).T).chunk(3, dim=-1)
    return cls_attention(query, key, local), key_sums(key, local)


def test_heads_split_over_tensor_parallel_ranks_select_the_single_rank_tokens():
    """Summing the ranks' head sums (the plugin's all-reduce) gives the single-rank scores, and so the same tokens;
    each rank scoring with its own heads alone (the plugin before issue 16) picks other tokens."""
    torch.manual_seed(0)
    heads, head_dim, patches, budget = 8, 16, 100, 24
    x = torch.randn(2, 1 + patches, 64)
    qkv_weight = torch.randn(3 * heads * head_dim, 64) / 8
    features = torch.randn(2, patches, 32)
    attention, keys = _rank_scores(x, qkv_weight, heads, 1, 0)
    single = select_visual_tokens(features, attention, key_metric(keys, heads)[:, 1:], budget)
    for ranks in (2, 4):
        shares = [_rank_scores(x, qkv_weight, heads, ranks, rank) for rank in range(ranks)]
        attention_sum = sum(share[0] for share in shares)
        key_sum = sum(share[1] for share in shares)
        torch.testing.assert_close(attention_sum, attention)
        torch.testing.assert_close(key_sum, keys)
        assert torch.equal(select_visual_tokens(features, attention_sum, key_metric(key_sum, heads)[:, 1:], budget),
                           single)
        own = [select_visual_tokens(features, a, key_metric(k, heads // ranks)[:, 1:], budget) for a, k in shares]
        assert not all(torch.equal(selected, single) for selected in own)


def test_prune_visual_tokens_alone_keeps_the_weights_and_names_the_class(tiny_llava, tmp_path, capsys):
    out = tmp_path / "k16"
    assert main(["prune", str(tiny_llava), "--visual-tokens", "16", "-o", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [SHORT_LLAVA_ARCHITECTURE] and config["model_type"] == "llava"
    assert config["short_lvlm"]["visual_tokens"] == 16 and config["short_lvlm"]["pruned_layers"] == []
    source_weights = sorted(p.name for p in tiny_llava.glob("*.safetensors"))
    for name in source_weights:
        assert (out / name).read_bytes() == (tiny_llava / name).read_bytes()
    assert AutoConfig.from_pretrained(out).model_type == "llava"
    assert "16 of the 64 tokens" in (out / "README.md").read_text()


def test_prune_layers_and_visual_tokens_together(tiny_llava, tmp_path):
    out = tmp_path / "both"
    assert main(["prune", str(tiny_llava), "--drop-layers", "3,5", "--visual-tokens", "32", "-o", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 6 and config["short_lvlm"]["visual_tokens"] == 32
    assert config["architectures"] == [SHORT_LLAVA_ARCHITECTURE]


def _siglip_tower(tmp_path, tiny):
    import shutil

    model = shutil.copytree(tiny, tmp_path / "siglip")
    config = json.loads((model / "config.json").read_text())
    config["vision_config"]["model_type"] = "siglip_vision_model"
    (model / "config.json").write_text(json.dumps(config))
    return model


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--visual-tokens", "0"], "visual_tokens 0 leaves no image token: keep between 1 and 64"),
        (["--visual-tokens", "65"], "visual_tokens 65 is more than the 64 tokens an image has"),
        (["--visual-tokens", "8", "--compensate", "scp"], "none are removed: pass --compensate none"),
        (["--drop-layers", ""], "--drop-layers names no layers"),
        ([], "give --ratio .*, --drop-layers .* or --visual-tokens K"),
        (_siglip_tower, "needs a CLIP vision tower"),
    ],
    ids=["zero", "above-count", "scp-without-layers", "empty-drop", "nothing", "not-clip"],
)
def test_bad_visual_token_input_is_a_clear_error(tiny_llava, tmp_path, capsys, extra, message):
    model = tiny_llava
    if callable(extra):
        model, extra = extra(tmp_path, tiny_llava), ["--visual-tokens", "8"]
    assert main(["prune", str(model), "-o", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_budget_on_a_model_type_without_a_registered_class_is_refused(tiny_llava):
    config = json.loads((tiny_llava / "config.json").read_text()) | {"model_type": "mplug_owl2"}
    for check in (lambda: budget_architecture(config, 8), lambda: budget_overrides(config, 8)):
        with pytest.raises(ShortLVLMError, match="there is none for model type 'mplug_owl2'"):
            check()


def test_serving_overrides_keep_the_rest_of_the_section(tiny_llava):
    config = json.loads((tiny_llava / "config.json").read_text()) | {"short_lvlm": {"pruned_layers": [3]}}
    assert budget_overrides(config, 16) == {"architectures": [SHORT_LLAVA_ARCHITECTURE],
                                            "short_lvlm": {"pruned_layers": [3], "visual_tokens": 16}}


def test_random_selection_is_seeded_by_the_image_and_differs_from_visionzips():
    """The test arm: K of the N tokens, in order, the same for the same image and seed whatever the batch."""
    features = torch.arange(2 * 81 * 3.0).view(2, 81, 3)
    pixels = torch.randn(2, 3, 72, 72)
    chosen = random_visual_tokens(features, pixels, 20, seed=0)
    assert chosen.shape == (2, 20, 3)
    rows = chosen[..., 0] // 3 - torch.tensor([[0], [81]])  # which token each kept row is
    assert all(sorted(set(r.tolist())) == r.tolist() for r in rows)  # 20 distinct tokens, in original order
    assert torch.equal(random_visual_tokens(features, pixels, 20, seed=0), chosen)  # deterministic
    alone = random_visual_tokens(features[1:], pixels[1:], 20, seed=0)
    assert torch.equal(alone[0], chosen[1])  # an image's choice does not depend on its batch
    assert not torch.equal(rows[0], rows[1])  # another image, another draw
    assert not torch.equal(random_visual_tokens(features, pixels, 20, seed=1), chosen)  # another seed too
    attention = torch.zeros(2, 81)
    attention[:, 40:60] = 1.0  # VisionZip keeps its 17 dominant tokens among 40..59
    visionzip = select_visual_tokens(features, attention, torch.randn(2, 81, 4), 20)
    assert not torch.equal(visionzip, chosen)
    assert torch.equal(random_visual_tokens(features, pixels, 81, seed=0), features)


def test_the_selection_is_read_from_the_config_and_checked():
    assert configured_selection({}) == ("visionzip", 0)
    section = {"visual_tokens": 20, "visual_token_selection": "random", "visual_token_seed": 3}
    assert configured_selection({"short_lvlm": section}) == ("random", 3)
    for bad, message in (({"visual_token_selection": "best"}, "unknown"), ({"visual_token_seed": -1}, ">= 0")):
        with pytest.raises(ShortLVLMError, match=message):
            configured_selection({"short_lvlm": bad})


def test_serving_overrides_can_switch_the_selection(tiny_llava):
    config = json.loads((tiny_llava / "config.json").read_text())
    assert budget_overrides(config, 16, "random")["short_lvlm"] == {"visual_tokens": 16,
                                                                    "visual_token_selection": "random"}
    with pytest.raises(ShortLVLMError, match="unknown"):
        budget_overrides(config, 16, "best")


def test_register_is_idempotent_and_lazy():
    from vllm import ModelRegistry
    from vllm.model_executor.models.registry import _LazyRegisteredModel

    register()
    registered = ModelRegistry.models[SHORT_LLAVA_ARCHITECTURE]
    register()
    assert ModelRegistry.models[SHORT_LLAVA_ARCHITECTURE] is registered
    assert isinstance(registered, _LazyRegisteredModel)  # imported only when a checkpoint names it
    assert registered.module_name == "shortlvlm_vllm.serving.vllm_plugin.llava"
