"""The toy model's pieces: tokenizer coverage, captions, label alignment, and chance-level untrained accuracy."""

from __future__ import annotations

import json

import pytest

from shortlvlm_vllm.fixtures import make_llava
from shortlvlm_vllm.images import template_image_turn
from shortlvlm_vllm.synthetic import FAMILIES, SyntheticConfig, generate_split, words
from shortlvlm_vllm.toy import (
    CAPTION_QUESTION,
    _batch,
    answer_accuracy,
    build_word_tokenizer,
    caption,
    encode_split,
    prompt_text,
    with_captions,
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer()


@pytest.fixture(scope="module")
def rows():
    return with_captions(generate_split("test", SyntheticConfig(test_images=60)))


def test_every_word_of_the_set_is_one_known_token(tokenizer, rows):
    unk = tokenizer.unk_token_id
    for row in rows:
        for text in (prompt_text(tokenizer, row["question"]), row["answer"]):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert unk not in ids, text
        if row["family"] != "caption":
            assert len(tokenizer(row["answer"], add_special_tokens=False)["input_ids"]) == 1
    assert tokenizer.decode(tokenizer("yes", add_special_tokens=False)["input_ids"]) == "yes"


def test_one_bos_from_the_template_on_every_path(tokenizer):
    """Training ids, transformers' processor and vLLM's chat path (template, no special tokens) agree."""
    from PIL import Image

    question = "Is there a red circle in the image?"
    text = prompt_text(tokenizer, question)
    assert text == f"<s>USER: <image>\n{question} ASSISTANT:"
    served = tokenizer(text, add_special_tokens=False)["input_ids"]  # what vLLM's chat endpoint tokenizes
    assert served.count(tokenizer.bos_token_id) == 1 and served[0] == tokenizer.bos_token_id
    assert tokenizer(text)["input_ids"] == served  # the tokenizer adds nothing of its own
    _, processor = make_llava(tokenizer, num_layers=1, hidden_size=128, patch_size=16)
    rendered = processor.apply_chat_template(
        [template_image_turn(question)],
        add_generation_prompt=True,
    )
    ids = processor(images=Image.new("RGB", (64, 64)), text=rendered, return_tensors="pt")["input_ids"][0].tolist()
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id


def test_caption_lists_objects_row_by_row():
    scene = json.dumps([
        {"colour": "blue", "shape": "square", "size": "small", "cell": [1, 1]},
        {"colour": "red", "shape": "circle", "size": "large", "cell": [0, 2]},
    ])
    assert caption(scene) == "large red circle top right , small blue square middle center"


def test_one_caption_per_image(rows):
    captions = [r for r in rows if r["family"] == "caption"]
    assert len(captions) == len({r["image_id"] for r in rows}) == 60
    assert all(r["question"] == CAPTION_QUESTION for r in captions)
    assert all(words(r["answer"])[1] in ("red", "green", "blue", "yellow") for r in captions)


def test_a_packed_row_computes_exactly_its_single_turn_prompts(tokenizer, rows):
    """Training packs an image's questions after one image prefix; each must see what it would see alone."""
    import torch

    model, processor = make_llava(tokenizer, num_layers=2, hidden_size=128, image_size=48, patch_size=16)
    split = encode_split(rows, tokenizer, processor.image_processor, image_tokens=9)
    conversations = split.conversations()
    assert len(conversations) == 60 and all(len(c) == 6 for c in conversations)  # 5 families + the caption
    turns = [conversations[0][5], conversations[0][3], conversations[0][4]]  # caption first: it must not leak
    eos = tokenizer.eos_token_id
    packed = _batch(split, [turns], tokenizer.pad_token_id, eos, with_answers=True)
    assert packed["pixel_values"].shape == (1, 3, 48, 48)
    labelled = packed["labels"][0][packed["labels"][0] != -100].tolist()
    assert labelled == [t for i in turns for t in split.answers[i] + [eos]]
    single = _batch(split, [[i] for i in turns], tokenizer.pad_token_id, eos, with_answers=True)
    assert single["input_ids"][0, : len(split.prompts[turns[0]])].tolist() == split.prompts[turns[0]]
    with torch.no_grad():
        packed_logits = model(**{k: v for k, v in packed.items() if k not in ("last", "labels")}).logits[0]
        single_logits = model(**{k: v for k, v in single.items() if k not in ("last", "labels")}).logits
    packed_at = (packed["labels"][0] != -100).nonzero().flatten() - 1  # positions that predict a label
    single_at = [(row != -100).nonzero().flatten() - 1 for row in single["labels"]]
    expected = torch.cat([single_logits[r, at] for r, at in enumerate(single_at)])
    torch.testing.assert_close(packed_logits[packed_at], expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # and it is not so by accident: a plain causal row (turns see each other) differs
        causal = model(input_ids=packed["input_ids"], pixel_values=packed["pixel_values"]).logits[0]
    assert not torch.allclose(causal[packed_at], expected, atol=1e-3)


def test_untrained_model_scores_near_chance(tokenizer):
    """The benchmark cannot be passed without looking: an untrained model is at or below chance."""
    model, processor = make_llava(tokenizer, num_layers=2, hidden_size=128, image_size=48, patch_size=16)
    rows = generate_split("test", SyntheticConfig(test_images=100))
    split = encode_split(rows, tokenizer, processor.image_processor, image_tokens=9)
    result = answer_accuracy(model, split, tokenizer.pad_token_id)
    assert set(result) == {*FAMILIES, "overall"}
    assert result["overall"] < 0.45
    assert result["existence"] <= 0.6 and result["spatial"] <= 0.6
