"""The Qwen-VL-Chat reference model, tokenizer and processor against the original remote code (hub Qwen/Qwen-VL-Chat:
modeling_qwen.py, visual.py, tokenization_qwen.py, qwen_generation_utils.py).

That code is not part of this repository and pins transformers 4.32, so it does not run in this environment. The
values below were recorded once by running it (the files as the public mirror x1ngzai/Qwen-VL-Chat-Int4, commit
1cd721a, holds them; transformers 4.32.0, torch 2.13, float32, in a separate virtual environment) on the tiny fixture
of tests/tiny_qwen.py (defaults, seed 0): QWenConfig.from_json_file, QWenLMHeadModel(config) with
`load_state_dict(strict=True)` from its model.safetensors, QWenTokenizer(qwen.tiktoken), the prompt from
`make_context(tokenizer, tokenizer.from_list_format([{"image": PATH}, {"text": question}]),
system="You are a helpful assistant.")` with the image `random_image(seed, size)` saved as PNG at PATH (the model
loads it itself, through its own image_transform), logits from `model(input_ids)`, greedy tokens from
`model.generate(input_ids, max_new_tokens=8, do_sample=False)` (the original's KV cache). The recording script stays
outside the repository.

The original writes the image's path into the 256 tokens between <img> and </img> (as byte ids, then <imgpad>s);
the model overwrites all 256 with the image's features, so only the ids outside the span are compared.

Pruning, calibration and serving of Qwen-VL-Chat are covered by the per-architecture tests (conftest ARCHITECTURES:
test_checkpoint, test_calibrate, test_prune, and test_vllm_serving's served checkpoints).
"""

from __future__ import annotations

import pytest
import tiktoken
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from shortlvlm_vllm.chat import template_image_turn
from shortlvlm_vllm.models.qwen import IMAGE_SPAN, PAT_STR, SPECIAL_TOKENS, read_tiktoken_ranks

from .conftest import random_image

PREFIX = [301, 115, 121, 115, 116, 101, 109, 10, 271, 32, 260, 32, 97, 32, 276, 32, 281, 46, 302, 10, 301, 117, 115,
          269, 10, 80, 105, 99, 116, 117, 256, 32, 49, 58, 514]  # up to <img>
ORIGINAL = [  # per prompt: the original's ids after the span (from </img>), image_transform's sums, logits, greedy
    {"question": "What is in the image?", "size": (96, 80),
     "after": [515, 10, 285, 32, 261, 32, 263, 32, 264, 32, 289, 63, 302, 10, 301, 281, 10],
     "pixel_sum": 4152.186, "pixel_abs_sum": 11346.257,
     "logits": {10: {"top_ids": [190, 423, 141, 523, 6], "top_logits": [3.40634, 2.74558, 2.59068, 2.55671, 2.44325],
                     "mean": 0.018268, "std": 1.131627},
                134: {"top_ids": [373, 307, 340, 494, 62], "top_logits": [3.97517, 3.21765, 3.21411, 2.79308, 2.71423],
                      "mean": 0.030634, "std": 1.134743},
                307: {"top_ids": [126, 277, 274, 249, 487], "top_logits": [3.29133, 3.29003, 3.02382, 2.76613, 2.72265],
                      "mean": 0.051546, "std": 1.104208}},
     "greedy": [126, 277, 274, 277, 274, 274, 373, 373]},
    {"question": "Describe the colours.", "size": (200, 150),
     "after": [515, 10, 296, 32, 264, 32, 298, 46, 302, 10, 301, 281, 10],
     "pixel_sum": -5226.901, "pixel_abs_sum": 7703.354,
     "logits": {10: {"top_ids": [190, 423, 141, 523, 6], "top_logits": [3.40634, 2.74558, 2.59068, 2.55671, 2.44325],
                     "mean": 0.018268, "std": 1.131627},
                134: {"top_ids": [130, 409, 69, 293, 547], "top_logits": [4.32321, 3.73134, 3.72582, 3.11782, 3.06132],
                      "mean": -0.048454, "std": 1.156867},
                303: {"top_ids": [130, 51, 532, 19, 209], "top_logits": [3.58575, 2.6953, 2.6345, 2.60797, 2.4226],
                      "mean": -0.048819, "std": 1.11253}},
     "greedy": [130, 130, 130, 130, 130, 130, 130, 130]},
]


def _inputs(processor, seed: int):
    record = ORIGINAL[seed]
    text = processor.apply_chat_template([template_image_turn(record["question"])], add_generation_prompt=True)
    return processor(images=random_image(seed, record["size"]), text=text, return_tensors="pt")


@pytest.mark.parametrize("text", ["You are a helpful assistant.", "Describe   the colours:\n\n 12345 ÿ€ naïve",
                                  "<|im_start|>user\nPicture 1:<img></img>\nHi<|im_end|>", "e\u0301\r\n\tend  "])
def test_tokenizer_equals_the_original_tiktoken_encoding(tiny_qwen, text):
    """The fast tokenizer built from qwen.tiktoken encodes as the original's tiktoken.Encoding (its pattern, ranks,
    special tokens at the original's ids, NFC first, special tokens allowed in text) and decodes back."""
    ranks = read_tiktoken_ranks(tiny_qwen / "qwen.tiktoken")
    original = tiktoken.Encoding("Qwen", pat_str=PAT_STR, mergeable_ranks=ranks,
                                 special_tokens={t: len(ranks) + i for i, t in enumerate(SPECIAL_TOKENS)})
    import unicodedata

    expected = original.encode(unicodedata.normalize("NFC", text), allowed_special="all")
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen)
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == expected
    assert tokenizer.decode(expected) == original.decode(expected)
    assert tokenizer.eos_token_id == len(ranks) == tokenizer.convert_tokens_to_ids("<|endoftext|>")


def test_prompt_and_pixels_are_the_originals(tiny_qwen):
    """The chat template gives make_context's chatml prompt with from_list_format's image line, the processor the
    original's ids around a span of 256 image pads, and image_transform's pixels."""
    processor = AutoProcessor.from_pretrained(tiny_qwen)
    assert processor.apply_chat_template([template_image_turn("Hi?")], add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "Picture 1:<img></img>\nHi?<|im_end|>\n<|im_start|>assistant\n")
    pad = PREFIX[-1] + 2
    for seed, record in enumerate(ORIGINAL):
        inputs = _inputs(processor, seed)
        assert inputs["input_ids"][0].tolist() == PREFIX + [pad] * IMAGE_SPAN + record["after"]
        pixels = inputs["pixel_values"]
        assert pixels.shape == (1, 3, 56, 56)
        assert pixels.abs().sum().item() == pytest.approx(record["pixel_abs_sum"], abs=2e-3)
        assert pixels.sum().item() == pytest.approx(record["pixel_sum"], abs=2e-3)


def test_a_path_between_the_tags_is_replaced_by_the_span(tiny_qwen):
    """A prompt in the original's own form (the image's path between the tags) gives the same ids."""
    processor = AutoProcessor.from_pretrained(tiny_qwen)
    text = processor.apply_chat_template([template_image_turn("Hi?")], add_generation_prompt=True)
    with_path = text.replace("<img></img>", "<img>/tmp/picture.png</img>")
    image = random_image(0)
    assert processor(images=image, text=with_path)["input_ids"].tolist() == \
        processor(images=image, text=text)["input_ids"].tolist()
    with pytest.raises(ValueError, match="1 image spans and 2 images"):
        processor(images=[image, image], text=text)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@torch.no_grad()
def test_reference_logits_equal_the_original_code(tiny_qwen, attention):
    processor = AutoProcessor.from_pretrained(tiny_qwen)
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen, dtype=torch.float32,
                                                        attn_implementation=attention).eval()
    for seed, record in enumerate(ORIGINAL):
        inputs = _inputs(processor, seed)
        logits = model(**inputs).logits[0]
        assert logits.shape == (len(PREFIX) + IMAGE_SPAN + len(record["after"]), 576)
        for position, expected in record["logits"].items():
            top = logits[position].topk(5)
            assert top.indices.tolist() == expected["top_ids"]
            torch.testing.assert_close(top.values, torch.tensor(expected["top_logits"]), rtol=0, atol=2e-5)
            assert logits[position].mean().item() == pytest.approx(expected["mean"], abs=2e-6)
            assert logits[position].std().item() == pytest.approx(expected["std"], abs=2e-6)
        out = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert out[0, inputs["input_ids"].shape[1]:].tolist() == record["greedy"]


LONG = {  # the original on the text-only ids [(7 * i) % 300 for i in range(4200)]: dynamic NTK (alpha 7) and log-n
    100: {"top_ids": [501, 114, 1, 344, 175], "top_logits": [3.55971, 3.09485, 3.0243, 2.9856, 2.61521],
          "mean": 0.053881, "std": 1.175994},
    2050: {"top_ids": [307, 65, 71, 353, 338], "top_logits": [3.59337, 3.25625, 3.10819, 3.04537, 2.73896],
           "mean": 0.013903, "std": 1.139879},
    4199: {"top_ids": [475, 134, 421, 483, 461], "top_logits": [3.2597, 3.03343, 2.9347, 2.9327, 2.92717],
           "mean": 0.046958, "std": 1.147857},
}


@torch.no_grad()
def test_beyond_seq_length_the_reference_scales_as_the_original(tiny_qwen):
    """Past `seq_length` (2048) tokens the original grows the rotary base (dynamic NTK) and scales queries by
    log-n; the reference does the same (recorded the same way as ORIGINAL, on a text-only prompt)."""
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen, dtype=torch.float32).eval()
    logits = model(torch.tensor([[(7 * i) % 300 for i in range(4200)]])).logits[0]
    for position, expected in LONG.items():
        top = logits[position].topk(5)
        assert top.indices.tolist() == expected["top_ids"]
        torch.testing.assert_close(top.values, torch.tensor(expected["top_logits"]), rtol=0, atol=5e-5)
        assert logits[position].mean().item() == pytest.approx(expected["mean"], abs=5e-6)
        assert logits[position].std().item() == pytest.approx(expected["std"], abs=5e-6)
