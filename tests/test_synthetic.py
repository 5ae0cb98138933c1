"""The synthetic VQA set: determinism, disjoint splits, balanced answers, answers true to the scene, files."""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter, defaultdict
from pathlib import Path

import datasets
import pytest

from shortlvlm_vllm.data.calibration import load_calibration
from shortlvlm_vllm.data.synthetic import (
    COLOURS,
    FAMILIES,
    LETTERS,
    OBJECTS,
    POPE_SETTINGS,
    POPULAR_TOP_K,
    SPLITS,
    SyntheticConfig,
    answer_vocabulary,
    build_dataset,
    generate_split,
    object_patches,
    question_vocabulary,
    words,
    write_synthetic,
)
from shortlvlm_vllm.errors import ShortLVLMError

SMALL = SyntheticConfig(version=2, train_images=40, calib_images=20, test_images=30, validation_images=25)


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    """Enough questions for balance checks: 600 images, so 600 questions per family and 200 per POPE setting."""
    return generate_split("test", SyntheticConfig(version=2, test_images=600, seed=3))


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def comparable(rows: list[dict]) -> list[dict]:
    return [{**row, "image": png(row["image"])} for row in rows]


def share(answers: list[str], value: str) -> float:
    return answers.count(value) / len(answers)


def of(rows: list[dict], family: str, **fields) -> list[dict]:
    return [r for r in rows if r["family"] == family and all(r[k] == v for k, v in fields.items())]


def test_same_seed_gives_identical_bytes_and_fields():
    for split in SPLITS:
        assert comparable(generate_split(split, SMALL)) == comparable(generate_split(split, SMALL))


def test_different_seed_gives_different_images_and_questions():
    first = comparable(generate_split("train", SMALL))
    other = comparable(generate_split("train", SyntheticConfig(version=2, train_images=40, seed=1)))
    assert {r["image"] for r in first}.isdisjoint(r["image"] for r in other)
    assert [r["question"] for r in first] != [r["question"] for r in other]


def test_splits_share_no_image_and_no_id():
    hashes, image_ids, ids = {}, {}, set()
    for split in SPLITS:
        split_rows = generate_split(split, SMALL)
        hashes[split] = {hashlib.sha256(png(r["image"])).hexdigest() for r in split_rows}
        image_ids[split] = {r["image_id"] for r in split_rows}
        assert len(image_ids[split]) == SMALL.num_images(split) == len(hashes[split])
        assert ids.isdisjoint(r["id"] for r in split_rows)
        ids.update(r["id"] for r in split_rows)
    for a, b in (("train", "calibration"), ("train", "test"), ("calibration", "test")):
        assert hashes[a].isdisjoint(hashes[b])
        assert image_ids[a].isdisjoint(image_ids[b])


def test_every_image_gets_one_question_per_family(rows):
    assert Counter(r["family"] for r in rows) == {family: 600 for family in FAMILIES}
    by_image = defaultdict(list)
    for r in rows:
        by_image[r["image_id"]].append(r["family"])
    assert all(families == list(FAMILIES) for families in by_image.values())


def test_fewer_questions_per_image_rotate_over_families():
    rows = generate_split("train", SyntheticConfig(version=2, train_images=50, questions_per_image=2))
    assert Counter(r["family"] for r in rows) == {family: 20 for family in FAMILIES}
    assert len({r["id"] for r in rows}) == len(rows)


def test_yes_no_answers_are_balanced(rows):
    for setting in POPE_SETTINGS:
        answers = [r["answer"] for r in of(rows, "existence", pope_setting=setting)]
        assert len(answers) == 200
        assert abs(share(answers, "yes") - 0.5) <= 0.05, setting
    answers = [r["answer"] for r in of(rows, "spatial")]
    assert abs(share(answers, "yes") - 0.5) <= 0.05
    for relation in ("left of", "right of", "above", "below"):
        answers = [r["answer"] for r in of(rows, "spatial") if f" {relation} " in r["question"]]
        assert len(answers) >= 140 and abs(share(answers, "yes") - 0.5) <= 0.05, relation


def test_choice_answers_are_roughly_uniform(rows):
    letters = [r["answer"] for r in of(rows, "multiple_choice")]
    assert all(abs(share(letters, letter) - 0.25) <= 0.05 for letter in LETTERS)
    shape_counts = [r["answer"] for r in of(rows, "counting") if "objects" not in r["question"]]
    colour_counts = [r["answer"] for r in of(rows, "counting") if "objects" in r["question"]]
    assert all(abs(share(shape_counts, str(n)) - 0.2) <= 0.05 for n in range(5))
    assert all(abs(share(colour_counts, str(n)) - 0.25) <= 0.05 for n in range(4))


def test_majority_answer_is_near_chance(rows):
    """A model that reads only the question does no better than chance: it has to look at the image."""
    def majority(answers: list[str]) -> float:
        return Counter(answers).most_common(1)[0][1] / len(answers)

    assert majority([r["answer"] for r in of(rows, "existence")]) <= 0.55
    assert majority([r["answer"] for r in of(rows, "spatial")]) <= 0.55
    assert majority([r["answer"] for r in of(rows, "counting")]) <= 0.25
    assert majority([r["answer"] for r in of(rows, "multiple_choice")]) <= 0.30
    for template, choices in (("colour", 4), ("shape", 3), ("size", 2)):
        answers = [r["answer"] for r in of(rows, "attribute") if r["question"].startswith(f"What {template} ")]
        assert len(answers) >= 150 and majority(answers) <= 1 / choices + 0.05, template


def test_scenes_are_well_formed(rows):
    for scene in {r["image_id"]: (json.loads(r["scene"]), r["image"]) for r in rows}.values():
        objects, image = scene
        assert 1 <= len(objects) <= 4
        assert len({(o["colour"], o["shape"]) for o in objects}) == len(objects)
        assert len({tuple(o["cell"]) for o in objects}) == len(objects)
        for o in objects:
            x0, y0, x1, y1 = o["bbox"]
            assert 0 <= x0 < x1 < 72 and 0 <= y0 < y1 < 72
            assert x1 - x0 + 1 == {"small": 7, "large": 15}[o["size"]]
            assert image.getpixel(((x0 + x1) // 2, (y0 + y1) // 2)) == COLOURS[o["colour"]]
        for a in objects:
            for b in objects:
                if a is not b:  # disjoint boxes: no overlap
                    ax0, ay0, ax1, ay1 = a["bbox"]
                    bx0, by0, bx1, by1 = b["bbox"]
                    assert ax1 < bx0 or bx1 < ax0 or ay1 < by0 or by1 < ay0


def test_every_answer_follows_from_the_scene(rows):
    for r in rows:
        objects = json.loads(r["scene"])
        names = [f"{o['colour']} {o['shape']}" for o in objects]
        q, answer = r["question"], r["answer"]
        if r["family"] == "existence":
            name = q.removeprefix("Is there a ").removesuffix(" in the image?")
            assert answer == ("yes" if name in names else "no"), q
        elif r["family"] == "attribute":
            template, ref = q.split()[1], q.split(" is the ", 1)[1].rstrip("?")
            refs = {"colour": "{shape}", "shape": "{colour} object", "size": "{colour} {shape}"}[template]
            matches = [o for o in objects if refs.format(**o) == ref]
            assert len(matches) == 1 and answer == matches[0][template], q
        elif r["family"] == "counting":
            value = q.removeprefix("How many ").split()[0]
            counted = [o for o in objects if value in (o["colour"], o["shape"] + "s")]
            assert answer == str(len(counted)), q
        elif r["family"] == "spatial":
            assert answer == spatial_truth(q, objects), q
        else:
            assert q == ("Which object is in the image?\n" + "\n".join(
                f"{letter}. {option}" for letter, option in zip(LETTERS, r["options"], strict=True)
            ) + "\nAnswer with the option's letter from the given choices directly.")
            present = [letter for letter, option in zip(LETTERS, r["options"], strict=True) if option in names]
            assert present == [answer] and len(set(r["options"])) == 4, q
        assert (r["pope_setting"] in POPE_SETTINGS) == (r["family"] == "existence") != (r["pope_setting"] == "")
        assert (r["options"] != []) == (r["family"] == "multiple_choice")


def spatial_truth(question: str, objects: list[dict]) -> str:
    """The relation read from the bounding boxes; the two boxes never overlap along the asked axis."""
    for relation in ("to the left of", "to the right of", "above", "below"):
        if f" {relation} " in question:
            a_name, b_name = question.removeprefix("Is the ").rstrip("?").split(f" {relation} the ")
            break
    box = {f"{o['colour']} {o['shape']}": o["bbox"] for o in objects}
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = box[a_name], box[b_name]
    before, after = {"to the left of": (ax1 < bx0, bx1 < ax0), "to the right of": (bx1 < ax0, ax1 < bx0),
                     "above": (ay1 < by0, by1 < ay0), "below": (by1 < ay0, ay1 < by0)}[relation]
    assert before or after, question  # unambiguous: the boxes are apart along the asked axis
    return "yes" if before else "no"


def test_pope_negatives_follow_their_settings(rows):
    scenes = {r["image_id"]: [(o["colour"], o["shape"]) for o in json.loads(r["scene"])] for r in rows}
    frequency = Counter(pair for pairs in scenes.values() for pair in pairs)
    ranking = sorted(OBJECTS, key=lambda pair: (-frequency[pair], OBJECTS.index(pair)))
    for r in of(rows, "existence", answer="no"):
        present = scenes[r["image_id"]]
        colour, shape = r["question"].split()[3:5]
        assert (colour, shape) not in present
        if r["pope_setting"] == "popular":
            assert (colour, shape) in [pair for pair in ranking if pair not in present][:POPULAR_TOP_K]
        if r["pope_setting"] == "adversarial":
            assert any(colour == c or shape == s for c, s in present), r["question"]


def test_vocabularies_cover_every_question_and_answer(rows):
    question_words, answers = set(question_vocabulary()), set(answer_vocabulary())
    assert len(question_words) == len(question_vocabulary())
    for r in rows:
        assert set(words(r["question"])) <= question_words, r["question"]
        assert r["answer"] in answers
    assert words("the option's letter?") == ["the", "option", "'", "s", "letter", "?"]


def test_image_size_scales_the_scene():
    rows = generate_split("test", SyntheticConfig(image_size=108, test_images=10))
    assert rows[0]["image"].size == (108, 108)
    assert all(0 <= v < 108 for r in rows for o in json.loads(r["scene"]) for v in o["bbox"])


def test_build_dataset_columns():
    dataset = build_dataset(SMALL)
    assert list(dataset) == list(SPLITS)
    assert dataset["test"].num_rows == 5 * SMALL.test_images
    features = dataset["train"].features
    assert isinstance(features["image"], datasets.Image)
    assert features["options"] == datasets.List(datasets.Value("string"))
    row = dataset["train"][4]
    assert row["family"] == "multiple_choice" and len(row["options"]) == 4 and row["image"].size == (72, 72)


def test_write_synthetic_reads_back(tmp_path):
    out = write_synthetic(tmp_path / "synthetic", SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic"]  # no temporary directory left
    dataset = datasets.load_from_disk(str(out / "dataset"))
    assert {split: dataset[split].num_rows for split in SPLITS} == {"train": 200, "calibration": 100, "test": 150,
                                                                       "validation": 125}
    records = json.loads((out / "calibration" / "llava.json").read_text())
    assert len(records) == 100 and len({r["id"] for r in records}) == 100
    assert len(list((out / "calibration" / "images").glob("*.png"))) == 20
    samples = load_calibration(out / "calibration" / "llava.json", num_samples=5)
    assert len(samples) == 5
    for sample in samples:
        assert "<image>" not in sample.question and sample.answer
        assert isinstance(sample.image_ref, Path) and sample.load_image().size == (72, 72)
    with pytest.raises(ShortLVLMError, match="already exists"):
        write_synthetic(out, SMALL)
    write_synthetic(out, SyntheticConfig(version=2, train_images=5, calib_images=5, test_images=5, validation_images=5),
                    overwrite=True)
    assert datasets.load_from_disk(str(out / "dataset"))["train"].num_rows == 25


# sha256 of the version-1 test split at the default seed (every row's fields, then each image's raw pixels),
# as the first toy model was trained and measured on it: version 2 must leave version 1 as it was.
VERSION_1_TEST_SPLIT = "0191d237f0bdcaebcaba1e643bfb44872c957df12e4c85a96f3ee32bdfeebdf5"


def split_digest(rows: list[dict]) -> str:
    digest, seen = hashlib.sha256(), set()
    for r in rows:
        digest.update(json.dumps({k: v for k, v in r.items() if k != "image"}, sort_keys=True).encode())
        if r["image_id"] not in seen:
            seen.add(r["image_id"])
            digest.update(r["image"].tobytes())
    return digest.hexdigest()


def test_version_1_test_split_is_unchanged():
    rows = generate_split("test", SyntheticConfig(version=1))
    assert len(rows) == 5000 and rows[0]["image"].size == (64, 64)
    assert split_digest(rows) == VERSION_1_TEST_SPLIT


def test_version_2_is_the_default_and_differs_from_version_1():
    assert SyntheticConfig() == SyntheticConfig(version=2, image_size=72)
    assert SyntheticConfig(version=2).image_size == 72
    assert SyntheticConfig(version=1).image_size == 64
    v1, v2 = (generate_split("test", SyntheticConfig(version=v, test_images=20)) for v in (1, 2))
    assert [r["family"] for r in v1] == [r["family"] for r in v2]  # same families, same API
    assert v2[0]["image"].size == (72, 72) and split_digest(v1) != split_digest(v2)


def test_version_2_objects_cover_a_minority_of_the_patches_and_the_rest_is_cluttered():
    """At the toy's 9 x 9 patches of 8 px: objects on about a tenth of them, a small one on 1 patch and a large
    one on 2 x 2; background patches vary (clutter), so they are neither empty nor all alike."""
    import numpy as np

    rows = generate_split("test", SyntheticConfig(version=2, test_images=200))
    images = list({r["image_id"]: r for r in rows}.values())
    covered, spans, background_spread = [], [], []
    for r in images:
        owner = object_patches(r["scene"], 72, 9)
        objects = json.loads(r["scene"])
        spans += [int((owner == k + 1).sum()) for k in range(len(objects))]
        covered.append((owner > 0).mean())
        pixels = np.asarray(r["image"], dtype=np.float64).reshape(9, 8, 9, 8, 3).mean(axis=(1, 3))
        background = pixels[owner == 0]
        background_spread.append(np.abs(background - np.median(background, axis=0)).max())
        for k, o in enumerate(objects):  # a covered patch holds the object's colour
            x0, y0, x1, y1 = o["bbox"]
            assert (owner[y0 // 8: y1 // 8 + 1, x0 // 8: x1 // 8 + 1] == k + 1).any()
            assert set(np.unique(owner[owner == k + 1])) == {k + 1}
    assert 0.06 < np.mean(covered) < 0.15 and max(covered) <= 16 / 81
    assert set(spans) == {1, 4}
    assert np.median(background_spread) > 15  # clutter: some background patch far from the image's background


def test_object_patches_needs_whole_patches():
    with pytest.raises(ShortLVLMError, match="whole patches"):
        object_patches("[]", 72, 7)


@pytest.mark.parametrize("bad", [
    {"version": 3}, {"image_size": 16}, {"version": 2, "image_size": 64}, {"seed": -1}, {"train_images": 0},
    {"questions_per_image": 0}, {"questions_per_image": 6},
])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ShortLVLMError):
        SyntheticConfig(**bad)


def test_unknown_split_is_named():
    with pytest.raises(ShortLVLMError, match="unknown split 'dev'"):
        generate_split("dev", SMALL)
