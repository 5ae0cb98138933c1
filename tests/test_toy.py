"""The toy model's pieces: tokenizer coverage, captions, label alignment, and chance-level untrained accuracy."""

from __future__ import annotations

import json

import pytest

from shortlvlm_vllm.evaluate import accuracy, normalize_answer, synthetic_questions
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


def test_labels_cover_exactly_the_answer_and_eos(tokenizer, rows):
    split = encode_split(rows, tokenizer, image_tokens=16)
    index = [0, len(rows) - 1]  # a one-word answer and a caption
    input_ids, mask, labels, pixels, last = _batch(split, index, tokenizer.pad_token_id, tokenizer.eos_token_id, True)
    assert pixels.shape == (2, 3, 64, 64)
    for row, i in enumerate(index):
        answer = split.answers[i] + [tokenizer.eos_token_id]
        labelled = labels[row][labels[row] != -100].tolist()
        assert labelled == answer
        start = len(split.prompts[i])
        assert input_ids[row, start: start + len(answer)].tolist() == answer
        assert int(mask[row].sum()) == len(split.prompts[i]) + len(answer) and int(last[row]) == start + len(answer) - 1
    assert split.prompts[0].count(tokenizer.convert_tokens_to_ids("<image>")) == 16


def test_untrained_model_scores_near_chance(tokenizer):
    """The benchmark cannot be passed without looking: an untrained model is at or below chance."""
    model, _ = make_llava(tokenizer, num_layers=2, hidden_size=128, image_size=64, patch_size=16)
    split = encode_split(generate_split("test", SyntheticConfig(test_images=100)), tokenizer, image_tokens=16)
    result = answer_accuracy(model, split, tokenizer.pad_token_id)
    assert set(result) == {*FAMILIES, "overall"}
    assert result["overall"] < 0.45
    assert result["existence"] <= 0.6 and result["spatial"] <= 0.6


def test_answer_normalization_and_accuracy():
    assert [normalize_answer(t) for t in (" Yes.", "no", "B. blue square", "", None, "3 objects")] == [
        "yes", "no", "b", "", "", "3"]
    questions = synthetic_questions("test", limit=10)
    assert len({q.family for q in questions}) == len(FAMILIES)
    perfect = accuracy(questions, [q.answer.upper() + "." for q in questions])
    assert perfect["overall"] == 1.0
    wrong = accuracy(questions, ["zzz"] * 10)
    assert wrong["overall"] == 0.0 and set(wrong) == {*FAMILIES, "overall"}
