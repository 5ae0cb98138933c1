"""The mPLUG-Owl2 reference model against the original code (X-PLUG/mPLUG-Owl, mPLUG-Owl2/mplug_owl2).

The original modules need transformers 4.31 (they patch its Llama classes and call methods transformers 5 no longer
has), so they cannot run in this environment, and their code is not part of this repository. The values below were
recorded once by running the original MPLUGOwl2LlamaForCausalLM (commit 0f3068f of X-PLUG/mPLUG-Owl, transformers
4.31.0, torch 2.13, float32) on the tiny fixture of tests/tiny_mplug_owl2.py (defaults, seed 0), loaded with
`load_state_dict(strict=True)` from its model.safetensors, with the original `tokenizer_image_token` and
`process_images` ("resize") on the two images `random_image(0, (96, 80))` and `random_image(1, (200, 150))`; the
logits were computed from the pixel values this project's processor gives (the original processor's sums are
recorded too: transformers 5's CLIP resize differs from 4.31's in the last digits). The recording script stays
outside the repository.

Pruning, calibration and serving of mPLUG-Owl2 are covered by the per-architecture tests (conftest ARCHITECTURES:
test_checkpoint, test_calibrate, test_prune, and test_vllm_serving's served checkpoints).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from shortlvlm_vllm.chat import template_image_turn

from .conftest import random_image

IMAGE_TOKEN_INDEX = -200  # the original's mark for an image in input_ids
ORIGINAL = [  # per prompt: the original's input_ids, process_images' pixel sums, and logits at two positions
    {"question": "What is in the image?", "size": (96, 80),
     "input_ids": [1, 55, 53, 39, 52, 28, 223, -200, 57, 74, 67, 86, 223, 75, 85, 223, 75, 80, 223, 86, 74, 71, 223,
                   75, 79, 67, 73, 71, 33, 223, 35, 53, 53, 43, 53, 54, 35, 48, 54, 28],
     "pixel_sum": 4152.887, "pixel_abs_sum": 11341.516,
     "logits": {16: {"top_ids": [280, 268, 257, 262, 278], "top_logits": [3.42085, 3.06559, 2.75965, 2.58424, 2.52917],
                     "mean": -0.00561, "std": 1.225118},
                47: {"top_ids": [210, 207, 238, 81, 202], "top_logits": [2.99313, 2.79204, 2.5118, 2.31645, 2.10019],
                     "mean": -0.038884, "std": 1.132181}}},
    {"question": "Describe the colours.", "size": (200, 150),
     "input_ids": [1, 55, 53, 39, 52, 28, 223, -200, 38, 71, 85, 69, 84, 75, 68, 71, 223, 86, 74, 71, 223, 69, 81, 78,
                   81, 87, 84, 85, 16, 223, 35, 53, 53, 43, 53, 54, 35, 48, 54, 28],
     "pixel_sum": -5226.918, "pixel_abs_sum": 7703.226,
     "logits": {16: {"top_ids": [128, 30, 277, 208, 29], "top_logits": [3.66854, 2.56817, 2.55725, 2.49803, 2.43241],
                     "mean": 0.042842, "std": 1.123914},
                47: {"top_ids": [50, 14, 23, 257, 244], "top_logits": [2.54217, 2.48448, 2.30141, 2.17818, 2.07493],
                     "mean": -0.034988, "std": 1.125026}}},
]


def _inputs(processor, seed: int):
    record = ORIGINAL[seed]
    text = processor.apply_chat_template([template_image_turn(record["question"])], add_generation_prompt=True)
    return processor(images=random_image(seed, record["size"]), text=text, return_tensors="pt")


def test_prompt_and_pixels_are_the_originals(tiny_mplug_owl2):
    """The chat template gives the original conversation format, and the processor the original's tokens (each
    -200 expanded to the image's 9 tokens) and, to the resize's last digits, its pixels."""
    processor = AutoProcessor.from_pretrained(tiny_mplug_owl2)
    assert processor.apply_chat_template([template_image_turn("Hi?")], add_generation_prompt=True) == \
        "USER: <|image|>Hi? ASSISTANT:"
    for seed, record in enumerate(ORIGINAL):
        inputs = _inputs(processor, seed)
        expanded = [t for i in record["input_ids"] for t in ([0] * 9 if i == IMAGE_TOKEN_INDEX else [i])]
        assert inputs["input_ids"][0].tolist() == expanded
        pixels = inputs["pixel_values"]
        assert pixels.shape == (1, 3, 56, 56)
        assert pixels.abs().sum().item() == pytest.approx(record["pixel_abs_sum"], rel=1e-4)
        assert pixels.sum().item() == pytest.approx(record["pixel_sum"], rel=1e-4)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@torch.no_grad()
def test_reference_logits_equal_the_original_code(tiny_mplug_owl2, attention):
    processor = AutoProcessor.from_pretrained(tiny_mplug_owl2)
    model = AutoModelForImageTextToText.from_pretrained(tiny_mplug_owl2, dtype=torch.float32,
                                                        attn_implementation=attention).eval()
    for seed, record in enumerate(ORIGINAL):
        logits = model(**_inputs(processor, seed)).logits[0]
        assert logits.shape == (len(record["input_ids"]) + 8, 288)
        for position, expected in record["logits"].items():
            top = logits[position].topk(5)
            assert top.indices.tolist() == expected["top_ids"]
            torch.testing.assert_close(top.values, torch.tensor(expected["top_logits"]), rtol=0, atol=2e-5)
            assert logits[position].mean().item() == pytest.approx(expected["mean"], abs=2e-6)
            assert logits[position].std().item() == pytest.approx(expected["std"], abs=2e-6)
