"""The calibration pass: Token Importance Scores on built inputs, and the hooks on a real model."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from shortlvlm_vllm.adapters import adapter_for_config
from shortlvlm_vllm.adapters.llava import LLAVA
from shortlvlm_vllm.data.calibration import CalibrationSample, calibration_inputs
from shortlvlm_vllm.prune.calibrate import (
    TokenLayout,
    _Accumulator,
    _SampleRecorder,
    collate,
    layer_hooks,
    run_calibration,
    select_top_tokens,
    tis_from_sums,
    token_importance_chunked,
)
from shortlvlm_vllm.prune.localize import LOCALIZERS
from shortlvlm_vllm.prune.pipeline import calibration_devices, load_model, split_device_map

from .conftest import IMAGE_SIZES, random_image


def token_importance_dense(attention: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """TIS from a full [T, T] head-averaged attention matrix: the reference the chunked form is checked against."""
    a = attention.to(torch.float64)
    return tis_from_sums(
        layout, a[layout.visual].sum(0), a[layout.text].sum(0), a[:, layout.visual].sum(1)
    )

IMG = 9

# Queries are rows. Position 0 is BOS (outside the pool), 1-2 are image tokens, 3-5 text.
HAND_ATTENTION = torch.tensor([
    [1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    [0.5, 0.5, 0.0, 0.0, 0.0, 0.0],
    [0.2, 0.3, 0.5, 0.0, 0.0, 0.0],
    [0.1, 0.2, 0.3, 0.4, 0.0, 0.0],
    [0.1, 0.1, 0.2, 0.2, 0.4, 0.0],
    [0.0, 0.1, 0.1, 0.2, 0.2, 0.4],
])


def test_layout_pool_excludes_tokens_before_the_image():
    layout = TokenLayout.from_input_ids(torch.tensor([[1, 5, IMG, IMG, 6, IMG, 7, 8]]), IMG)
    assert layout.visual.tolist() == [2, 3, 5]
    assert layout.text.tolist() == [4, 6, 7]
    assert layout.pool.tolist() == [2, 3, 4, 5, 6, 7]


def test_tis_of_a_hand_made_attention_matrix():
    layout = TokenLayout.from_input_ids(torch.tensor([1, IMG, IMG, 5, 6, 7]), IMG)
    scores = token_importance_dense(HAND_ATTENTION, layout)
    expected = [
        ((0.5 + 0.3) / 2 + (0.2 + 0.1 + 0.1) / 3) / 2,  # image 1: intra over queries 1, 2; cross over 3-5
        (0.5 / 1 + (0.3 + 0.2 + 0.1) / 3) / 2,  # image 2: only query 2 is causally valid among images
        ((0.2 + 0.3) / 2 + (0.4 + 0.2 + 0.2) / 3) / 2,  # text 3: cross to images 1-2; intra over 3-5
        ((0.1 + 0.2) / 2 + (0.4 + 0.2) / 2) / 2,  # text 4
        ((0.1 + 0.1) / 2 + 0.4 / 1) / 2,  # text 5
    ]
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float64))
    # BOS soaks up attention but is never scored nor selected; top 40% of 5 tokens = 2 tokens
    assert select_top_tokens(scores, layout.pool, 0.4).tolist() == [1, 2]
    assert select_top_tokens(scores, layout.pool, 0.01).tolist() == [2]  # at least one token


def _dense_attention(query, key, scaling):
    heads = query.shape[0]
    key = key.repeat_interleave(heads // key.shape[0], dim=0)
    scores = query @ key.transpose(1, 2) * scaling
    length = query.shape[1]
    scores.masked_fill_(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1).mean(0)


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_chunked_tis_equals_dense(chunk):
    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor([1, 5, 6, 7] + [IMG] * 16 + list(range(20, 40)))
    query = torch.randn(4, ids.numel(), 16, generator=gen)
    key = torch.randn(2, ids.numel(), 16, generator=gen)  # grouped-query attention: 2 kv heads
    layout = TokenLayout.from_input_ids(ids, IMG)
    dense = token_importance_dense(_dense_attention(query, key, 0.25), layout)
    chunked = token_importance_chunked(query, key, 0.25, layout, chunk=chunk)
    torch.testing.assert_close(chunked, dense, rtol=1e-5, atol=1e-7)


def _samples(n):
    """Images of two sizes: Qwen gives them different numbers of image tokens."""
    return [CalibrationSample(str(i), "What is in the image?", "A red square and a blue circle.",
                              random_image(i, IMAGE_SIZES[i % 2])) for i in range(n)]


def _adapter(model):
    return adapter_for_config(model.config.to_dict())


def test_qwen_layout_has_one_visual_token_per_merged_patch(tiny_qwen2_vl):
    """Dynamic resolution: each image's token run is as long as its merged patch grid, text follows the first."""
    processor = AutoProcessor.from_pretrained(tiny_qwen2_vl)
    image_token_id = processor.image_token_id
    vision_start = processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    counts = []
    for sample in _samples(2):
        inputs = calibration_inputs(processor, sample)
        layout = TokenLayout.from_input_ids(inputs["input_ids"], image_token_id)
        ids = inputs["input_ids"][0]
        expected = int(inputs["image_grid_thw"].prod()) // processor.image_processor.merge_size ** 2
        assert layout.visual.numel() == expected
        assert layout.visual.tolist() == list(range(int(layout.visual[0]), int(layout.visual[0]) + expected))
        assert int(ids[layout.visual[0] - 1]) == vision_start  # the system prompt and vision start are outside
        assert layout.text.numel() == ids.numel() - int(layout.visual[-1]) - 1
        counts.append(expected)
    assert counts == [9, 35]


class _KeepScores(_SampleRecorder):
    """Records each candidate layer's TIS instead of only the selection."""

    def __init__(self, *args):
        super().__init__(*args)
        self.scores = {}

    def on_attention(self, layer, query, key, scaling):
        if layer in self.candidates:
            self.scores[layer] = token_importance_chunked(query[0], key[0], scaling, self.layouts[0])
        super().on_attention(layer, query, key, scaling)


@torch.no_grad()
def test_hooked_sdpa_scores_equal_eager_attention_weights(tiny_vlm):
    """The scores from the post-RoPE queries and keys (M-RoPE for Qwen) equal those of the model's own
    attention weights, for each image size."""
    processor = AutoProcessor.from_pretrained(tiny_vlm)
    sdpa = AutoModelForImageTextToText.from_pretrained(tiny_vlm, attn_implementation="sdpa").eval()
    eager = AutoModelForImageTextToText.from_pretrained(tiny_vlm, attn_implementation="eager").eval()
    adapter = _adapter(sdpa)
    for sample in _samples(2):
        inputs = calibration_inputs(processor, sample)
        layout = TokenLayout.from_input_ids(inputs["input_ids"], getattr(sdpa.config, adapter.image_token_config_key))
        recorder = _KeepScores(_Accumulator(8, [4, 5, 6, 7], 1, 128), 0.1)
        recorder.start(0, [layout], [inputs["input_ids"].shape[1]])
        with layer_hooks(sdpa, adapter, recorder):
            hooked_logits = sdpa(**inputs).logits
        torch.testing.assert_close(hooked_logits, sdpa(**inputs).logits)  # the hooks change nothing
        attentions = eager(**inputs, output_attentions=True).attentions
        assert sorted(recorder.scores) == [4, 5, 6, 7]
        for layer, scores in recorder.scores.items():
            reference = token_importance_dense(attentions[layer][0].mean(0), layout)
            torch.testing.assert_close(scores, reference, rtol=1e-4, atol=1e-6)


@torch.no_grad()
def test_identity_layer_is_most_redundant_for_every_cosine_method(tiny_vlm):
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm, attn_implementation="sdpa").eval()
    adapter = _adapter(model)
    layer = adapter.decoder_layers(model)[5]
    weights = dict(adapter.layer_weights)
    for role in ("o_proj", "down_proj"):  # the layer now returns its input unchanged
        layer.get_parameter(weights[role]).zero_()
    processor = AutoProcessor.from_pretrained(tiny_vlm)
    stats = run_calibration(model, processor, adapter, _samples(3), candidates=[4, 5, 6, 7])
    assert stats.num_samples == 3 and stats.features.shape == (8, 3, 128)
    for name in ("tis", "all-tokens", "text-only", "visual-only"):
        assert stats.cosine[name][5] == pytest.approx(1.0, abs=1e-6), name
        assert max(stats.cosine[name][other] for other in (4, 6, 7)) < 0.999, name
        pruned = LOCALIZERS[name].select(stats, 1, [4, 5, 6, 7], 0)
        assert pruned == [5], name
    assert stats.angular[5, 5] == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(stats.angular[6, 5]) and stats.angular[4, 6] > 0


def _statistics_close(a, b) -> None:
    assert a.num_samples == b.num_samples
    for name, scores in a.cosine.items():
        assert scores == pytest.approx(b.cosine[name], abs=1e-6), name
    torch.testing.assert_close(a.angular, b.angular, equal_nan=True, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.features, b.features, rtol=1e-4, atol=1e-5)


def _uneven_samples(n):
    """Answers of different lengths (and, for Qwen, images of two token counts): batches need padding."""
    return [CalibrationSample(str(i), "What is in the image?", "A red square" + " and a blue circle" * (i % 4),
                              random_image(i, IMAGE_SIZES[i % 2])) for i in range(n)]


@torch.no_grad()
def test_batches_give_the_statistics_of_one_sample_at_a_time(tiny_vlm):
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm, attn_implementation="sdpa").eval()
    processor = AutoProcessor.from_pretrained(tiny_vlm)
    samples = _uneven_samples(7)
    lengths = {calibration_inputs(processor, sample)["input_ids"].shape[1] for sample in samples}
    assert len(lengths) > 2  # padding is exercised
    one = run_calibration(model, processor, _adapter(model), samples, [4, 5, 6, 7])
    batched = run_calibration(model, processor, _adapter(model), samples, [4, 5, 6, 7], batch_size=3)
    _statistics_close(batched, one)
    assert batched.features.shape == (8, 7, 128)


def test_batch_padding_is_on_the_right_and_masked():
    first = {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "pixel_values": torch.zeros(1, 3, 4, 4)}
    second = {"input_ids": torch.tensor([[1, 2, 3, 4, 5]]), "attention_mask": torch.ones(1, 5, dtype=torch.long),
              "pixel_values": torch.ones(1, 3, 4, 4)}
    batch = collate([first, second], pad_token_id=9)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 9, 9], [1, 2, 3, 4, 5]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["pixel_values"].shape == (2, 3, 4, 4) and batch["pixel_values"][1].eq(1).all()


def test_a_device_map_splits_the_decoder_layers_in_contiguous_groups(tiny_llava):
    from transformers import AutoConfig

    with torch.device("meta"):
        skeleton = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(tiny_llava))
    device_map = split_device_map(skeleton, LLAVA.decoder_layers_module, ["cuda:0", "cuda:1"])
    layers = {int(k.rsplit(".", 1)[1]): v for k, v in device_map.items() if k.startswith(LLAVA.decoder_layers_module)}
    assert layers == {i: "cuda:0" if i < 4 else "cuda:1" for i in range(8)}
    assert {v for k, v in device_map.items() if not k.startswith(LLAVA.decoder_layers_module)} == {"cuda:0"}
    # every weight is placed exactly once: by its own entry or an ancestor's
    for name, _ in skeleton.named_parameters():
        owners = [k for k in device_map if name == k or name.startswith(k + ".")]
        assert len(owners) == 1, (name, owners)
    assert calibration_devices("cuda:0, cuda:1") == ["cuda:0", "cuda:1"] and calibration_devices("cpu") == ["cpu"]


def test_calibration_over_a_device_map_gives_the_single_device_statistics(tiny_llava, monkeypatch):
    """The path `--device auto` takes with several GPUs, on what this machine has: load_model builds the split map
    (here over "cpu,cpu"), and accelerate's dispatch hooks (what moves hidden states between GPUs) run around every
    module, forced on since both groups are on one device. Statistics are accumulated on the CPU either way."""
    from accelerate import dispatch_model
    from transformers import AutoModelForImageTextToText as Auto

    maps = []
    original = Auto.from_pretrained.__func__
    monkeypatch.setattr(Auto, "from_pretrained",
                        classmethod(lambda cls, *a, **kw: maps.append(kw.get("device_map")) or original(cls, *a, **kw)))
    samples = _uneven_samples(4)
    single, processor = load_model(tiny_llava, "cpu", "float32")
    split, _ = load_model(tiny_llava, "cpu,cpu", "float32")
    assert maps[0] is None and sum(k.startswith(LLAVA.decoder_layers_module + ".") for k in maps[1]) == 8
    dispatch_model(split, maps[1], force_hooks=True)
    assert hasattr(LLAVA.decoder_layers(split)[5], "_hf_hook")
    stats = {name: run_calibration(model, processor, LLAVA, samples, [4, 5, 6, 7], batch_size=2)
             for name, model in (("single", single), ("split", split))}
    _statistics_close(stats["split"], stats["single"])
