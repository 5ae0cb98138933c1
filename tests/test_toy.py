"""The toy model's pieces: tokenizer coverage, captions, label alignment, and chance-level untrained accuracy."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import torch

from shortlvlm_vllm.chat import template_image_turn
from shortlvlm_vllm.data.synthetic import (
    COLOURS,
    FAMILIES,
    OBJECTS,
    SHAPES,
    SIZES,
    SyntheticConfig,
    generate_split,
    object_patches,
    words,
)
from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.tiny_models import make_llava
from shortlvlm_vllm.toy.training import (
    CAPTION_QUESTION,
    ToyTrainingConfig,
    _batch,
    answer_accuracy,
    background_visibility,
    build_word_tokenizer,
    caption,
    cls_attention_loss,
    cls_attention_on_objects,
    compacted_rows,
    encode_split,
    hidden_background,
    prompt_text,
    train_toy_model,
    vision_targets,
    warm_up_vision,
    with_training_turns,
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer()


@pytest.fixture(scope="module")
def rows():
    return with_training_turns(generate_split("test", SyntheticConfig(version=2, test_images=60)))


def test_every_word_of_the_set_is_one_known_token(tokenizer, rows):
    unk = tokenizer.unk_token_id
    for row in rows:
        for text in (prompt_text(tokenizer, row["question"]), row["answer"]):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert unk not in ids, text
        if row["family"] in FAMILIES:  # scored answers are one token; the training-only turns' are longer
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


def test_one_locate_turn_per_object_names_its_cell(rows):
    located = {(r["image_id"], r["question"]): r["answer"] for r in rows if r["family"] == "locate"}
    expected = {(r["image_id"], f"Where is the {o['colour']} {o['shape']}?"):
                f"{('top', 'middle', 'bottom')[o['cell'][0]]} {('left', 'center', 'right')[o['cell'][1]]}"
                for r in rows for o in json.loads(r["scene"])}
    assert located == expected


OBJECT_NAME = rf"(?:{'|'.join(COLOURS)}) (?:{'|'.join(SHAPES)})"


def test_the_drill_asks_one_pair_both_ways_and_its_answers_follow_the_scene(rows):
    by_image = {}
    for r in rows:
        if r["family"] == "drill":
            by_image.setdefault(r["image_id"], []).append(r)
    assert by_image and all(len(drill) == 4 for drill in by_image.values())
    for drill in by_image.values():
        cells = {f"{o['colour']} {o['shape']}": o["cell"] for o in json.loads(drill[0]["scene"])}
        named = [re.findall(OBJECT_NAME, r["question"]) for r in drill]
        assert len({frozenset(n) for n in named}) == 1  # one pair of objects
        for r, (a, b) in zip(drill, named, strict=True):
            west = cells[a][1] < cells[b][1]
            assert r["answer"] == ("yes" if west == ("left" in r["question"]) else "no"), r["question"]
    assert Counter(r["answer"] for d in by_image.values() for r in d) == {"yes": 2 * len(by_image),
                                                                         "no": 2 * len(by_image)}


def test_a_packed_row_computes_exactly_its_single_turn_prompts(tokenizer, rows):
    """Training packs an image's questions after one image prefix; each must see what it would see alone."""
    import torch

    model, processor = make_llava(tokenizer, num_layers=2, hidden_size=128, image_size=48, patch_size=16)
    split = encode_split(rows, tokenizer, processor.image_processor, image_tokens=9)
    conversations = split.conversations()
    scenes = [json.loads(r["scene"]) for r in {r["image_id"]: r for r in rows}.values()]
    drills = [4 * (len({o["cell"][1] for o in scene}) > 1) for scene in scenes]
    # 5 families, the caption, one locate turn per object and the left/right drill
    assert [len(c) for c in conversations] == [6 + len(scene) + d for scene, d in zip(scenes, drills, strict=True)]
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


def test_the_curriculum_hides_image_tokens_from_every_other_token_and_only_those(tokenizer, rows):
    """Hidden background tokens are keys no other position may read (each still sees itself, as padding does)."""
    _, processor = make_llava(tokenizer, num_layers=2, hidden_size=128, image_size=48, patch_size=16)
    split = encode_split(rows, tokenizer, processor.image_processor, image_tokens=9)
    conversations = split.conversations()[:2]
    hidden = torch.zeros(2, 9, dtype=torch.bool)
    hidden[0, [0, 3, 5]] = True
    eos = tokenizer.eos_token_id
    plain = _batch(split, conversations, tokenizer.pad_token_id, eos, with_answers=True)["attention_mask"][:, 0]
    masked = _batch(split, conversations, tokenizer.pad_token_id, eos, with_answers=True,
                    hidden=hidden)["attention_mask"][:, 0]
    end = split.prefix_lengths[conversations[0][0]]
    columns = [end - 9 + k for k in (0, 3, 5)]
    changed = (plain != masked).nonzero().tolist()
    assert changed and all(row == 0 and key in columns and query != key for row, query, key in changed)
    assert not masked[0][:, columns].logical_and(~torch.eye(masked.shape[1], dtype=torch.bool)[:, columns]).any()
    assert torch.equal(plain[1], masked[1])


def test_a_compacted_row_computes_the_prompt_without_its_hidden_tokens(tokenizer, rows):
    """What visual-token pruning serves: the hidden tokens out of the sequence, the rest at consecutive positions."""
    model, processor = make_llava(tokenizer, num_layers=2, hidden_size=128, image_size=48, patch_size=16)
    split = encode_split(rows, tokenizer, processor.image_processor, image_tokens=9)
    question = split.conversations()[0][0]
    hidden = torch.zeros(1, 9, dtype=torch.bool)
    hidden[0, [0, 3, 5]] = True
    eos = tokenizer.eos_token_id
    captured = {}
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True)

    def answer_logits(compact: bool) -> torch.Tensor:
        batch = _batch(split, [[question]], tokenizer.pad_token_id, eos, with_answers=True, hidden=hidden,
                       compact=torch.tensor([compact]))
        at = (batch["labels"][0] != -100).nonzero().flatten() - 1
        with torch.no_grad():
            return model(**{k: v for k, v in batch.items() if k not in ("last", "labels")}).logits[0, at]

    compacted, intact = answer_logits(True), answer_logits(False)
    hook.remove()
    end = split.prefix_lengths[question]
    kept = torch.ones(captured["embeds"].shape[1], dtype=torch.bool)
    kept[end - 9 + torch.tensor([0, 3, 5])] = False
    with torch.no_grad():  # the same embeddings with the hidden tokens taken out, a plain causal prompt
        shorter = model.lm_head(model.model.language_model(inputs_embeds=captured["embeds"][:, kept]).last_hidden_state)
    at = (_batch(split, [[question]], tokenizer.pad_token_id, eos, with_answers=True)["labels"][0] != -100)
    expected = shorter[0, at[kept].nonzero().flatten() - 1]
    torch.testing.assert_close(compacted, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(intact, expected, atol=1e-4)  # positions intact is another computation


def test_compacted_rows_are_the_configured_share():
    generator = torch.Generator().manual_seed(0)
    assert abs(compacted_rows(ToyTrainingConfig(compact_share=0.5), 4000, generator).float().mean().item() - 0.5) < 0.03
    state = generator.get_state()
    assert compacted_rows(ToyTrainingConfig(compact_share=0.0), 100, generator) is None
    assert torch.equal(generator.get_state(), state)  # share 0 draws nothing: such a run's stream is unchanged


def test_background_becomes_visible_linearly_after_the_hidden_steps():
    config = ToyTrainingConfig(background_hidden_steps=100, background_reveal_steps=50)
    assert [background_visibility(config, s) for s in (1, 100, 125, 150, 400)] == [0.0, 0.0, 0.5, 1.0, 1.0]


def test_each_row_sees_a_drawn_share_of_its_background_after_the_hidden_steps():
    background = torch.rand(400, 81) < 0.9
    generator = torch.Generator().manual_seed(0)
    config = ToyTrainingConfig(background_hidden_steps=100, background_reveal_steps=50)
    assert torch.equal(hidden_background(config, 100, background, generator), background)
    hidden = hidden_background(config, 400, background, generator)
    assert not (hidden & ~background).any()
    shares = 1 - hidden.sum(-1) / background.sum(-1)  # per row, the share of its background visible
    assert shares.min() < 0.1 and shares.max() > 0.9 and abs(shares.mean().item() - 0.5) < 0.05
    plain = ToyTrainingConfig(background_hidden_steps=100, background_reveal_steps=50, background_dropout=False)
    assert hidden_background(plain, 400, background, generator) is None
    assert abs(hidden_background(plain, 125, background, generator).sum() / background.sum() - 0.5) < 0.02


def test_untrained_model_scores_near_chance(tokenizer):
    """The benchmark cannot be passed without looking: an untrained model is at or below chance."""
    model, processor = make_llava(tokenizer, num_layers=2, hidden_size=128, image_size=48, patch_size=16)
    rows = generate_split("test", SyntheticConfig(version=2, test_images=100))
    split = encode_split(rows, tokenizer, processor.image_processor, image_tokens=9)
    result = answer_accuracy(model, split, tokenizer.pad_token_id)
    assert set(result) == {*FAMILIES, "overall"}
    assert result["overall"] < 0.45
    assert result["existence"] <= 0.6 and result["spatial"] <= 0.6


def test_vision_targets_name_each_patchs_object_and_one_centre_per_object(rows):
    targets = vision_targets(rows, 72, 9)
    scenes = list({r["image_id"]: r["scene"] for r in rows}.values())
    assert targets.patches.shape == (len(scenes), 81, 6) and targets.presence.shape == (len(scenes), len(OBJECTS))
    for image, scene in enumerate(scenes):
        objects = json.loads(scene)
        owner = torch.from_numpy(object_patches(scene, 72, 9)).flatten()
        labels = targets.patches[image]
        assert (labels[:, -1] == 2).sum() == len(objects)  # one centre patch per object
        assert targets.presence[image].sum() == len(objects)
        for o in objects:
            x0, y0, x1, y1 = o["bbox"]
            centre = labels[int((y0 + y1) / 2 // 8) * 9 + int((x0 + x1) / 2 // 8)].tolist()
            shape, colour, size, row, column, is_centre = centre
            named = (SHAPES[shape - 1], list(COLOURS)[colour - 1], SIZES[size - 1], row - 1, column - 1, is_centre)
            assert named == (o["shape"], o["colour"], o["size"], *o["cell"], 2)
            assert targets.presence[image, OBJECTS.index((o["colour"], o["shape"]))] == 1
        covered = labels[:, 0] > 0  # an object's patches and its centre; background patches all 0
        assert (covered == ((owner > 0) | (labels[:, -1] == 2))).all() and (labels[~covered] == 0).all()


def test_vision_targets_need_whole_patches(rows):
    with pytest.raises(ShortLVLMError, match="whole patches"):
        vision_targets(rows, 72, 7)


def test_vision_warm_up_teaches_the_tower_what_each_patch_holds(tokenizer):
    """A few steps already beat guessing on held-out images: the labels line up with the patches."""
    config = ToyTrainingConfig(vision_warmup_steps=60, vision_warmup_batch_size=32)
    model, processor = make_llava(tokenizer, num_layers=1, hidden_size=128, vision_hidden_size=128, vision_layers=2,
                                  image_size=72, patch_size=8)
    data = SyntheticConfig(version=2, train_images=300, test_images=100)
    train, test = (generate_split(split, data) for split in ("train", "test"))
    pixels = [encode_split(r, tokenizer, processor.image_processor, 81).pixels for r in (train, test)]
    _, accuracy = warm_up_vision(model, config, (pixels[0], vision_targets(train, 72, 9)),
                                 (pixels[1], vision_targets(test, 72, 9)))
    assert set(accuracy) == {"shape", "colour", "size", "row", "column", "centre", "presence"}
    assert accuracy["colour"] > 0.5  # chance: 1/4 of the covered patches (and it must first find them)


@pytest.fixture()
def eager_model(tokenizer):
    """A small random LLaVA whose tower returns its attention probabilities (eager attention)."""
    model, _ = make_llava(tokenizer, num_layers=1, hidden_size=128, vision_hidden_size=64, vision_layers=3,
                          image_size=32, patch_size=8, seed=3)
    model.model.vision_tower.config._attn_implementation = "eager"
    return model


def test_cls_attention_on_objects_is_the_cls_rows_attention_mass(eager_model):
    """Checked against the tower's own eager attention probabilities at the feature layer, summed over heads."""
    model = eager_model
    pixels = torch.randn(5, 3, 32, 32)
    covered = torch.rand(5, 16) < 0.3
    covered[0] = False
    covered[0, 3] = True
    measured = cls_attention_on_objects(model, pixels, covered, batch_size=2)
    with torch.no_grad():
        out = model.model.vision_tower(pixel_values=pixels, output_attentions=True)
    feature = model.config.vision_feature_layer % 4  # hidden_states[2] is the output of layer 1
    attention = out.attentions[feature - 1][:, :, 0, 1:].sum(dim=1)  # [CLS] row, patches, summed over heads
    expected = ((attention * covered).sum(-1) / attention.sum(-1)).mean().item()
    assert measured["attention"] == pytest.approx(expected, rel=1e-4)
    assert measured["patches"] == pytest.approx(covered.float().mean().item())
    shares = [covered[i, attention[i].topk(int(covered[i].sum())).indices].float().mean().item() if covered[i].any()
              else 0.0 for i in range(5)]
    assert measured["top_k"] == pytest.approx(sum(shares) / 5, rel=1e-4)


def test_cls_attention_loss_is_the_cross_entropy_from_uniform_over_the_objects(eager_model):
    """Against the tower's eager attention at the feature layer; it trains the tower (gradients reach the keys)."""
    model = eager_model
    pixels = torch.randn(4, 3, 32, 32)
    covered = torch.rand(4, 16) < 0.3
    covered[:, 0] = True
    out = model.model.vision_tower(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
    loss = cls_attention_loss(model, out.hidden_states, covered)
    attention = out.attentions[model.config.vision_feature_layer % 4 - 1][:, :, 0, 1:].sum(dim=1)
    attention = attention / attention.sum(-1, keepdim=True)
    expected = -torch.stack([attention[i, covered[i]].log().mean() for i in range(4)]).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    loss.backward()
    layer = model.model.vision_tower.encoder.layers[model.config.vision_feature_layer % 4 - 1]
    assert layer.self_attn.k_proj.weight.grad.abs().sum() > 0


def test_training_is_deterministic_for_a_seed(tmp_path):
    """The shipped model is reproduced by its command: the same config gives the same bytes, another seed not."""
    tiny = {"num_layers": 2, "train_images": 64, "batch_size": 8, "max_steps": 3, "eval_every": 3,
            "eval_questions": 40, "vision_warmup_steps": 2, "vision_warmup_batch_size": 8, "warmup_steps": 1}
    weights = []
    for run, seed in enumerate((0, 0, 1)):
        train_toy_model(ToyTrainingConfig(seed=seed, **tiny), tmp_path / str(run))
        weights.append((tmp_path / str(run) / "model.safetensors").read_bytes())
    assert weights[0] == weights[1]
    assert weights[0] != weights[2]


def test_the_vision_tower_is_frozen_after_the_warm_up(tokenizer, tmp_path):
    """With no warm-up steps the saved tower is the initial one (in bfloat16), the decoder trained."""
    from safetensors.torch import load_file

    tiny = {"num_layers": 2, "train_images": 64, "batch_size": 8, "max_steps": 3, "eval_every": 3,
            "eval_questions": 40, "vision_warmup_steps": 0, "warmup_steps": 1}
    config = ToyTrainingConfig(**tiny)
    train_toy_model(config, tmp_path / "toy")
    saved = load_file(tmp_path / "toy" / "model.safetensors")
    initial, _ = make_llava(tokenizer, num_layers=2, hidden_size=config.hidden_size,
                            intermediate_size=config.intermediate_size, vision_hidden_size=config.vision_hidden_size,
                            vision_layers=config.vision_layers, image_size=config.image_size,
                            patch_size=config.patch_size, seed=config.seed)
    tower = {"vision_tower.vision_model." + k: v for k, v in initial.model.vision_tower.named_parameters()}
    decoder = {"language_model.model." + k: v for k, v in initial.model.language_model.named_parameters()}
    assert tower.keys() <= saved.keys() and decoder.keys() <= saved.keys()
    assert all(torch.equal(saved[k], v.to(torch.bfloat16)) for k, v in tower.items())
    assert not all(torch.equal(saved[k], v.to(torch.bfloat16)) for k, v in decoder.items())


def test_train_toy_on_cuda_without_one_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    from shortlvlm_vllm.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["train-toy", "-o", str(tmp_path / "toy"), "--device", "cuda"]) == 2
    assert "sees no CUDA device" in capsys.readouterr().err and not (tmp_path / "toy").exists()
