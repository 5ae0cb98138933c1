"""The evaluation benchmarks: loading the schema fixtures offline, prompts, reply parsing and hand-computed metrics."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest

from shortlvlm_vllm.data.synthetic import SyntheticConfig, generate_split
from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.evaluation.benchmarks import BENCHMARKS, Item, get_benchmark
from shortlvlm_vllm.evaluation.benchmarks.extract import extract_choice, extract_yes_no
from shortlvlm_vllm.evaluation.benchmarks.metrics import yes_no_metrics
from shortlvlm_vllm.evaluation.benchmarks.synthetic import Synthetic
from tests.benchmark_fixtures import picture, write_fixture

INSTRUCTION = "Answer with the option's letter from the given choices directly."
SHORT = "Answer the question using a single word or phrase."


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> dict[str, Path]:
    """Every benchmark's default fixture, written once, and POPE's also as parquet."""
    root = tmp_path_factory.mktemp("benchmarks")
    paths = {name: write_fixture(name, root / name) for name in BENCHMARKS}
    paths["pope-parquet"] = write_fixture("pope", root / "pope-parquet", fmt="parquet")
    return paths


def load(fixtures, name: str, **kwargs) -> dict[str, Item]:
    return {item.id: item for item in get_benchmark(name).load(str(fixtures[name]), **kwargs)}


def parse_all(name: str, items: dict[str, Item], replies: dict[str, str]) -> dict[str, str]:
    return {item_id: get_benchmark(name).parse(items[item_id], reply) for item_id, reply in replies.items()}


def test_registry_and_unknown_name():
    assert set(BENCHMARKS) == {"pope", "mme", "mmbench", "scienceqa", "seedbench", "aokvqa", "synthetic",
                               "synthetic-v1"}
    assert all(get_benchmark(name).name == name for name in BENCHMARKS)
    with pytest.raises(ShortLVLMError, match="unknown benchmark 'gqa'.*pope, mme, mmbench"):
        get_benchmark("gqa")


@pytest.mark.parametrize(("reply", "expected"), [
    ("Yes", "yes"), ("no.", "no"), ("NO", "no"), ("y", "yes"), ("N", "no"), (" Yes, there is a dog.", "yes"),
    ("No, there is no bird.", "no"), ("There is no dog in the image.", "no"), ("Yes, no", ""), ("", ""),
    (None, ""), ("Yesterday", ""), ("I cannot tell from this picture", ""),
])
def test_extract_yes_no(reply, expected):
    assert extract_yes_no(reply) == expected


SHAPES = {"A": "red circle", "B": "blue square", "C": "green triangle", "D": "yellow circle"}


@pytest.mark.parametrize(("reply", "expected"), [
    ("B", "B"), ("B.", "B"), ("(B)", "B"), (" b ", "B"), ("(b)", "B"), ("**C**", "C"), ("The answer is B", "B"),
    ("The answer is B.", "B"), ("B. blue square", "B"), ("blue square", "B"), ("Blue Square.", "B"),
    ("It is the green triangle.", "C"), ("A", "A"), ("A red circle is in the picture", "A"),
    ("C, since D is wrong", "C"), ("E", ""), ("The answer is E", ""), ("B or C", ""), ("", ""), (None, ""),
    ("xq zzv", ""), ("A dog", ""), ("the answer is b", ""), ("circle", ""),
    ("Looking at the image carefully, I would say that the correct option must be D because it is yellow", "D"),
])
def test_extract_choice(reply, expected):
    assert extract_choice(reply, SHAPES) == expected


def test_extract_choice_prefers_the_longest_matching_text():
    assert extract_choice("a red square", {"A": "red", "B": "red square"}) == "B"
    assert extract_choice("red", {"A": "red", "B": "red square"}) == "A"


def test_yes_no_metrics_by_hand():
    golds = ["yes", "yes", "no", "no"]
    # TP 1 (first), predicted yes 3 -> precision 1/3; gold yes 2 -> recall 1/2; F1 = 2PR/(P+R) = 0.4.
    metrics = yes_no_metrics(golds, ["yes", "no", "yes", "yes"])
    assert metrics == pytest.approx({"accuracy": 0.25, "precision": 1 / 3, "recall": 0.5, "f1": 0.4,
                                     "yes_ratio": 0.75})
    # An unparsed reply is wrong whatever the gold, and a negative prediction: a false negative for a gold "yes".
    assert yes_no_metrics(golds, ["", "yes", "no", ""]) == pytest.approx(
        {"accuracy": 0.5, "precision": 1.0, "recall": 0.5, "f1": 2 / 3, "yes_ratio": 0.25})


def test_pope(fixtures):
    items = load(fixtures, "pope")
    assert list(items) == ["adversarial-1", "adversarial-2", "popular-3", "popular-4", "random-5", "random-6"]
    first = items["adversarial-1"]
    assert first.prompt == f"Is there a dog in the image?\n{SHORT}"
    assert (first.answer, first.meta["setting"], first.image.mode) == ("yes", "adversarial", "RGB")
    assert [item.id for item in get_benchmark("pope").load(str(fixtures["pope-parquet"]))] == list(items)
    parsed = parse_all("pope", items, {
        "adversarial-1": "Yes", "adversarial-2": "Yes, no", "popular-3": "", "popular-4": "yes.",
        "random-5": "YES", "random-6": "No, there is no bird.",
    })
    assert parsed == {"adversarial-1": "yes", "adversarial-2": "", "popular-3": "", "popular-4": "yes",
                      "random-5": "yes", "random-6": "no"}
    scores = get_benchmark("pope").score(list(items.values()), parsed)
    # adversarial: right, unparsed -> acc 1/2, P = R = F1 = 1, yes-ratio 1/2.
    # popular: unparsed on a yes, yes on a no -> acc 0, P = R = F1 = 0, yes-ratio 1/2. random: both right.
    expected = {
        "accuracy/adversarial": 0.5, "precision/adversarial": 1.0, "recall/adversarial": 1.0, "f1/adversarial": 1.0,
        "yes_ratio/adversarial": 0.5,
        "accuracy/popular": 0.0, "precision/popular": 0.0, "recall/popular": 0.0, "f1/popular": 0.0,
        "yes_ratio/popular": 0.5,
        "accuracy/random": 1.0, "precision/random": 1.0, "recall/random": 1.0, "f1/random": 1.0,
        "yes_ratio/random": 0.5,
        "accuracy": 0.5, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "yes_ratio": 0.5,
    }
    assert scores == pytest.approx(expected)
    # A missing reply counts as wrong.
    assert get_benchmark("pope").score(list(items.values()), {})["accuracy"] == 0.0


def test_mme(tmp_path):
    # Five images: the four hand-written subtasks, then a second existence image.
    items = {item.id: item for item in get_benchmark("mme").load(str(write_fixture("mme", tmp_path / "mme", n=5)))}
    assert len(items) == 10
    first = items["existence:existence/0000.png:0"]
    # The dataset's " Please answer yes or no." gives way to lmms-eval's instruction.
    assert first.prompt == f"Is there a red circle in this image?\n{SHORT}"
    assert (first.answer, items["existence:existence/0000.png:1"].answer) == ("yes", "no")
    replies = {
        "existence:existence/0000.png:0": "Yes", "existence:existence/0000.png:1": "No",  # both right
        "existence:existence/0004.png:0": "Yes", "existence:existence/0004.png:1": "Yes",  # one right
        "count:count/0001.png:0": "yes", "count:count/0001.png:1": "Yes.",  # one right
        "OCR:OCR/0002.png:0": "Yes, no", "OCR:OCR/0002.png:1": "no",  # ambiguous, right
        "code_reasoning:code_reasoning/0003.png:0": "y",  # right; its pair has no reply at all
    }
    scores = get_benchmark("mme").score(list(items.values()), parse_all("mme", items, replies))
    # existence: 3 of 4 right, 1 of 2 images -> (0.75 + 0.5) * 100; the others: 1 of 2, 0 of 1 -> 50.
    assert scores == pytest.approx({
        "accuracy/existence": 0.75, "accuracy_plus/existence": 0.5, "score/existence": 125.0,
        "accuracy/count": 0.5, "accuracy_plus/count": 0.0, "score/count": 50.0,
        "accuracy/OCR": 0.5, "accuracy_plus/OCR": 0.0, "score/OCR": 50.0,
        "accuracy/code_reasoning": 0.5, "accuracy_plus/code_reasoning": 0.0, "score/code_reasoning": 50.0,
        "perception": 225.0, "cognition": 50.0,
    })


def test_mme_subsets_keep_image_pairs(tmp_path):
    source = str(write_fixture("mme", tmp_path / "mme", n=12))
    mme = get_benchmark("mme")
    subset = mme.load(source, limit=5, seed=7)
    assert len(subset) == 10
    assert all(sum(other.meta["group"] == item.meta["group"] for other in subset) == 2 for item in subset)
    assert [item.id for item in mme.load(source, limit=5, seed=7)] == [item.id for item in subset]
    assert [item.id for item in mme.load(source, limit=5, seed=8)] != [item.id for item in subset]


def test_mmbench_rotations_and_prompt(fixtures):
    items = load(fixtures, "mmbench")
    # 4 + 2 + 3 + 4 rotations: the stored copies (index + k * 1e6) are asked as rotation k.
    assert list(items) == ["0@0", "0@1", "0@2", "0@3", "1@0", "1@1", "2@0", "2@1", "2@2", "3@0", "3@1", "3@2", "3@3"]
    assert [items[f"0@{k}"].answer for k in range(4)] == ["C", "B", "A", "D"]
    assert [items[f"2@{k}"].answer for k in range(3)] == ["A", "C", "B"]
    assert items["0@0"].prompt == (
        "The picture shows a park. Which season is it? There are several options:\n"
        f"A. spring\nB. summer\nC. autumn\nD. winter\n\n{INSTRUCTION}"
    )
    # No hint (None), two options; rotated once.
    assert items["1@1"].prompt == f"Is the square blue? There are several options:\nA. yes\nB. no\n\n{INSTRUCTION}"
    # Hint "nan" and option D "nan" are missing values.
    assert items["2@1"].prompt.startswith("What colour is the circle? There are several options:\nA. green\nB. blue\n")
    assert items["2@1"].meta["options"] == {"A": "green", "B": "blue", "C": "red"}
    assert items["3@0"].meta["l2_category"] == "relation_reasoning"
    assert {item.meta["group"] for item in items.values()} == {"0", "1", "2", "3"}


def test_mmbench_stored_copies_agree_with_rotations_built_here(fixtures, tmp_path):
    built = get_benchmark("mmbench").load(str(write_fixture("mmbench", tmp_path / "bare", circular_copies=False)))
    stored = get_benchmark("mmbench").load(str(fixtures["mmbench"]))
    assert len(datasets.load_from_disk(str(fixtures["mmbench"]))) == 13  # 4 questions and their 9 stored copies
    assert [(i.id, i.prompt, i.answer, i.meta) for i in stored] == [(i.id, i.prompt, i.answer, i.meta) for i in built]


def test_mmbench_scores_the_stored_copies_where_present(fixtures, tmp_path):
    """A copy stored with other options than a rotation built here would have is asked as stored."""
    table = datasets.load_from_disk(str(fixtures["mmbench"]))
    swapped = table.map(lambda row: {"A": row["B"], "B": row["A"], "answer": "A"} if row["index"] == 1_000_001
                        else {})
    swapped.save_to_disk(str(tmp_path / "swapped"))
    items = {item.id: item for item in get_benchmark("mmbench").load(str(tmp_path / "swapped"))}
    assert items["1@1"].meta["options"] == {"A": "no", "B": "yes"} and items["1@1"].answer == "A"
    assert [item.meta["rotation"] for item in items.values() if item.meta["group"] == "1"] == [0, 1]


def test_mmbench_units_are_questions(fixtures):
    items = list(load(fixtures, "mmbench").values())
    parsed = {item.id: item.answer for item in items} | {"1@1": "B"}  # question 1's second rotation wrong
    units = get_benchmark("mmbench").units(items, parsed)
    assert units == [("0", "image_scene", True), ("1", "attribute_recognition", False),
                     ("2", "attribute_recognition", True), ("3", "spatial_relationship", True)]


def test_mmbench_circular_score(fixtures):
    items = load(fixtures, "mmbench")
    replies = {
        "0@0": "C", "0@1": "(B)", "0@2": "autumn", "0@3": "D.",  # every rotation right (one by option text)
        "1@0": "B", "1@1": "B",  # second rotation wrong -> question wrong
        "2@0": "The answer is A", "2@1": "C. red", "2@2": "D",  # D is not among three options
        "3@0": "A", "3@1": "C", "3@2": "B", "3@3": "A",  # first rotation wrong
    }
    parsed = parse_all("mmbench", items, replies)
    assert (parsed["0@2"], parsed["2@2"]) == ("A", "")
    scores = get_benchmark("mmbench").score(list(items.values()), parsed)
    assert scores == pytest.approx({
        "accuracy": 0.25, "first_rotation_accuracy": 0.75,
        "accuracy/attribute_recognition": 0.0, "accuracy/image_scene": 1.0, "accuracy/spatial_relationship": 0.0,
        "accuracy_l2/coarse_perception": 1.0, "accuracy_l2/finegrained_perception (instance-level)": 0.0,
        "accuracy_l2/relation_reasoning": 0.0,
    })


def test_mmbench_subsets_keep_all_rotations(tmp_path):
    source = str(write_fixture("mmbench", tmp_path / "mmbench", n=8))
    subset = get_benchmark("mmbench").load(source, limit=3, seed=1)
    groups = {item.meta["group"] for item in subset}
    assert len(groups) == 3  # limit counts questions
    for group in groups:
        question = [item for item in subset if item.meta["group"] == group]
        assert [item.meta["rotation"] for item in question] == list(range(len(question[0].meta["options"])))
    assert [i.id for i in get_benchmark("mmbench").load(source, limit=3, seed=1)] == [i.id for i in subset]


def test_scienceqa(fixtures):
    items = load(fixtures, "scienceqa")
    assert list(items) == ["sqa-0", "sqa-1", "sqa-2", "sqa-3"]
    assert [len(item.meta["options"]) for item in items.values()] == [2, 3, 4, 5]
    assert [item.answer for item in items.values()] == ["A", "C", "B", "D"]
    assert items["sqa-1"].prompt == (
        "Context: The map shows three states.\nWhich state is farthest north?\nA. Ohio\nB. Texas\nC. Maine\n"
        f"{INSTRUCTION}"
    )
    assert items["sqa-0"].prompt == f"Which shape is red?\nA. circle\nB. square\n{INSTRUCTION}"
    parsed = parse_all("scienceqa", items, {"sqa-0": "A", "sqa-1": "Maine", "sqa-2": "C", "sqa-3": "E"})
    assert parsed == {"sqa-0": "A", "sqa-1": "C", "sqa-2": "C", "sqa-3": "E"}  # E is an option of sqa-3 only
    assert get_benchmark("scienceqa").parse(items["sqa-0"], "E") == ""
    assert get_benchmark("scienceqa").score(list(items.values()), parsed) == {"accuracy": 0.5}


def test_seedbench_drops_video_rows(fixtures):
    items = load(fixtures, "seedbench")
    assert list(items) == ["100", "101", "103", "104"]  # 102 is a video question
    assert items["100"].prompt == (
        f"What is the overall scene?\nA. a beach\nB. a kitchen\nC. a street\nD. a forest\n{INSTRUCTION}"
    )
    parsed = parse_all("seedbench", items, {
        "100": "C", "101": "3", "103": "There are no squares, so the answer is A.", "104": "E",
    })
    assert parsed == {"100": "C", "101": "C", "103": "A", "104": ""}
    assert get_benchmark("seedbench").score(list(items.values()), parsed) == pytest.approx({
        "accuracy": 0.5, "accuracy/Instances Counting": 0.5, "accuracy/Scene Understanding": 1.0,
        "accuracy/Text Understanding": 0.0,
    })


def test_aokvqa(fixtures):
    items = load(fixtures, "aokvqa")
    assert list(items) == ["aok0000", "aok0001", "aok0002"]
    assert items["aok0000"].prompt == f"What is the man holding?\nA. umbrella\nB. phone\nC. bat\nD. cup\n{INSTRUCTION}"
    rambling = ("Well, it could be many things; the street looks wet because it rained earlier, which I think "
                "is the most likely explanation overall.")
    parsed = parse_all("aokvqa", items, {"aok0000": "C", "aok0001": rambling, "aok0002": "winter"})
    assert parsed == {"aok0000": "C", "aok0001": "", "aok0002": "B"}
    assert get_benchmark("aokvqa").score(list(items.values()), parsed) == pytest.approx({"accuracy": 2 / 3})


def test_synthetic_local_copy_and_limit(fixtures):
    synthetic = get_benchmark("synthetic")
    items = synthetic.load(str(fixtures["synthetic"]))
    rows = datasets.load_from_disk(str(fixtures["synthetic"] / "dataset"))["test"]
    assert [item.id for item in items] == rows["id"]
    first = items[0]
    assert first.prompt == rows[0]["question"]  # the question alone, as the toy model was trained
    assert first.answer == rows[0]["answer"].lower()
    assert [item.id for item in synthetic.load(str(fixtures["synthetic"]), limit=7)] == rows["id"][:7]
    assert [item.meta["family"] for item in items[:5]] == ["existence", "attribute", "counting", "spatial",
                                                           "multiple_choice"]


def test_synthetic_in_memory_uses_the_seed():
    rows = generate_split("test", SyntheticConfig(seed=2, test_images=3))
    items = Synthetic(images=3).load(limit=4, seed=2)
    assert [(i.id, i.prompt, i.answer) for i in items] == [(r["id"], r["question"], r["answer"].lower())
                                                            for r in rows[:4]]


def test_synthetic_names_its_version_and_v1_stays_reproducible():
    """"synthetic" is version 2 (the shipped toy's 72 px scenes), "synthetic-v1" the first toy's 64 px ones."""
    for name, version, side in (("synthetic", 2, 72), ("synthetic-v1", 1, 64)):
        benchmark = get_benchmark(name)
        rows = generate_split("test", SyntheticConfig(version=version, test_images=2))
        items = benchmark.load(limit=3)
        assert benchmark.version == version and items[0].image.size == (side, side)
        assert [i.id for i in items] == [r["id"] for r in rows[:3]]
    with pytest.raises(ShortLVLMError, match="unknown synthetic version 3; use one of 2, 1"):
        Synthetic(version=3)


def test_synthetic_score_by_hand():
    image = picture(0)

    def item(item_id: str, family: str, answer: str, setting: str = "") -> Item:
        return Item(item_id, image, "q", answer, {"family": family, "setting": setting})

    items = [item("e1", "existence", "yes", "random"), item("e2", "existence", "no", "random"),
             item("e3", "existence", "yes", "random"), item("e4", "existence", "no", "adversarial"),
             item("c1", "counting", "2"), item("m1", "multiple_choice", "b")]
    replies = {"e1": "Yes.", "e2": "yes", "e3": "no", "e4": "No", "c1": "2 circles", "m1": "B"}
    synthetic = get_benchmark("synthetic")
    parsed = {i.id: synthetic.parse(i, replies[i.id]) for i in items}
    assert parsed == {"e1": "yes", "e2": "yes", "e3": "no", "e4": "no", "c1": "2", "m1": "b"}
    # random: TP 1, said yes 2, gold yes 2 -> P = R = F1 = 1/2, accuracy 1/3, yes-ratio 2/3.
    assert synthetic.score(items, parsed) == pytest.approx({
        "accuracy": 4 / 6, "accuracy/existence": 0.5, "accuracy/counting": 1.0, "accuracy/multiple_choice": 1.0,
        "pope_accuracy/random": 1 / 3, "pope_precision/random": 0.5, "pope_recall/random": 0.5,
        "pope_f1/random": 0.5, "pope_yes_ratio/random": 2 / 3,
        "pope_accuracy/adversarial": 1.0, "pope_precision/adversarial": 0.0, "pope_recall/adversarial": 0.0,
        "pope_f1/adversarial": 0.0, "pope_yes_ratio/adversarial": 0.0,
    })


def test_subsets_are_seeded_and_in_dataset_order(tmp_path):
    source = str(write_fixture("pope", tmp_path / "pope", n=30))
    pope = get_benchmark("pope")
    ids = [item.id for item in pope.load(source, limit=5, seed=3)]
    assert len(ids) == 5
    assert ids == [item.id for item in pope.load(source, limit=5, seed=3)]
    assert ids != [item.id for item in pope.load(source, limit=5, seed=4)]
    order = [item.id for item in pope.load(source)]
    assert ids == sorted(ids, key=order.index)
    assert len(pope.load(source, limit=100)) == 30
    with pytest.raises(ShortLVLMError, match="limit 0"):
        pope.load(source, limit=0)


def test_missing_path(tmp_path):
    with pytest.raises(ShortLVLMError, match=r"does not exist.*--data PATH"):
        get_benchmark("mme").load(str(tmp_path / "nowhere"))


def test_missing_column(fixtures, tmp_path):
    table = datasets.load_from_disk(str(fixtures["scienceqa"])).remove_columns("choices")
    table.save_to_disk(str(tmp_path / "sqa"))
    with pytest.raises(ShortLVLMError, match="lacks column\\(s\\) choices.*lmms-lab-encoder/ScienceQA"):
        get_benchmark("scienceqa").load(str(tmp_path / "sqa"))


def test_unreachable_hub(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ShortLVLMError, match=r"lmms-lab-encoder/POPE.*no route.*--data PATH"):
        get_benchmark("pope").load()


def test_hub_ids_are_lmms_evals_current_ones_and_the_old_ones_are_accepted(fixtures, monkeypatch, caplog):
    """lmms-eval moved them to lmms-lab-encoder/* (PR #1416); a cache or mirror under the old id still loads."""
    assert {name: get_benchmark(name).hub_id for name in ("pope", "mme", "mmbench", "scienceqa", "seedbench")} == {
        "pope": "lmms-lab-encoder/POPE", "mme": "lmms-lab-encoder/MME", "mmbench": "lmms-lab-encoder/MMBench",
        "scienceqa": "lmms-lab-encoder/ScienceQA", "seedbench": "lmms-lab-encoder/SEED-Bench"}
    asked = []

    def only_the_old_id(name, config=None, split=None):
        asked.append(name)
        if name != "lmms-lab/POPE":
            raise FileNotFoundError(f"{name} is not in the offline cache")
        return datasets.load_from_disk(str(fixtures["pope"]))

    monkeypatch.setattr(datasets, "load_dataset", only_the_old_id)
    with caplog.at_level("WARNING"):
        items = get_benchmark("pope").load()
    assert asked == ["lmms-lab-encoder/POPE", "lmms-lab/POPE"] and len(items) == 6
    assert "old id lmms-lab/POPE" in caplog.text


def test_seedbench_question_type_given_as_a_string(fixtures, tmp_path):
    table = datasets.load_from_disk(str(fixtures["seedbench"]))
    as_text = table.cast_column("question_type_id", datasets.Value("string"))
    assert as_text[0]["question_type_id"] == "1"
    as_text.save_to_disk(str(tmp_path / "seed"))
    items = get_benchmark("seedbench").load(str(tmp_path / "seed"))
    assert [item.meta["question_type"] for item in items] == [
        "Scene Understanding", "Instances Counting", "Instances Counting", "Text Understanding"]


def test_parquet_file_and_bad_gold(tmp_path):
    out = write_fixture("aokvqa", tmp_path / "aok", fmt="parquet")
    (file,) = out.glob("*.parquet")
    assert [item.id for item in get_benchmark("aokvqa").load(str(file))] == ["aok0000", "aok0001", "aok0002"]
    table = datasets.load_from_disk(str(write_fixture("mmbench", tmp_path / "mmb")))
    table.map(lambda row: {"answer": "D" if row["index"] == 1 else row["answer"]}).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(ShortLVLMError, match="MMBench question 1 has answer 'D' but options A, B"):
        get_benchmark("mmbench").load(str(tmp_path / "bad"))
