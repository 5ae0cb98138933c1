"""Loading calibration samples: LLaVA files, datasets sources, sampling and every user error."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import datasets
import pytest

from shortlvlm_vllm.data.calibration import CalibrationSample, load_calibration
from shortlvlm_vllm.errors import ShortLVLMError

from .conftest import random_image


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Keep load_dataset's cache inside the test's directory, not the user's home."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def llava_record(index: int, image: object = None) -> dict:
    record = {
        "id": f"{index:012d}",
        "conversations": [
            {"from": "human", "value": f"<image>\nWhat is in picture {index}?"},
            {"from": "gpt", "value": f"Shapes number {index}."},
            {"from": "human", "value": "And then?"},
            {"from": "gpt", "value": "Nothing else."},
        ],
    }
    if image is not None:
        record["image"] = image
    return record


def write_images(folder: Path, count: int) -> list[str]:
    """`count` PNG files under folder/imgs; their paths relative to `folder`."""
    (folder / "imgs").mkdir(parents=True, exist_ok=True)
    names = []
    for index in range(count):
        random_image(index).save(folder / "imgs" / f"{index}.png")
        names.append(f"imgs/{index}.png")
    return names


@pytest.fixture
def llava_json(tmp_path) -> Path:
    """Six image records and two text-only ones (LLaVA-665k mixes them)."""
    names = write_images(tmp_path, 6)
    records = [llava_record(index, names[index]) for index in range(6)]
    records.insert(2, llava_record(100))
    records.append(llava_record(101))
    path = tmp_path / "calib.json"
    path.write_text(json.dumps(records))
    return path


def test_llava_json_parses_first_exchange_and_skips_text_only(llava_json):
    samples = load_calibration(llava_json, num_samples=100)
    assert sorted(s.id for s in samples) == [f"{i:012d}" for i in range(6)]
    sample = next(s for s in samples if s.id == "000000000003")
    assert sample.question == "What is in picture 3?"
    assert sample.answer == "Shapes number 3."
    assert sample.image_ref == llava_json.parent / "imgs" / "3.png"
    image = sample.load_image()
    assert image.mode == "RGB" and image.size == (96, 80)
    assert image.tobytes() == random_image(3).tobytes()


def test_llava_jsonl_with_explicit_image_root(tmp_path):
    images = tmp_path / "images"
    names = write_images(images, 3)
    records = [llava_record(index, names[index]) for index in range(3)]
    records[1]["conversations"][0]["value"] = "Describe this.\n<image>"
    records[2]["conversations"].insert(0, {"from": "gpt", "value": "A stray reply before the question."})
    path = tmp_path / "data" / "calib.jsonl"
    path.parent.mkdir()
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    samples = {s.id: s for s in load_calibration(path, image_root=images)}
    assert samples["000000000001"].question == "Describe this."
    assert samples["000000000002"].answer == "Shapes number 2."
    assert samples["000000000000"].image_ref == images / "imgs" / "0.png"


def test_llava_image_list_takes_first_and_warns_once(tmp_path, caplog):
    names = write_images(tmp_path, 3)
    path = tmp_path / "calib.json"
    path.write_text(json.dumps([llava_record(0, names), llava_record(1, [names[1], names[2]]),
                                llava_record(2, [names[2]])]))
    with caplog.at_level(logging.WARNING):
        samples = load_calibration(path)
    assert {s.id: s.image_ref.name for s in samples} == {"000000000000": "0.png", "000000000001": "1.png",
                                                         "000000000002": "2.png"}
    warnings = [r for r in caplog.records if "several images" in r.getMessage()]
    assert len(warnings) == 1 and "2 calibration samples" in warnings[0].getMessage()


def test_sampling_is_deterministic_per_seed(llava_json, caplog):
    with caplog.at_level(logging.WARNING):
        first = [s.id for s in load_calibration(llava_json, num_samples=4, seed=1)]
        again = [s.id for s in load_calibration(llava_json, num_samples=4, seed=1)]
        every = [s.id for s in load_calibration(llava_json, num_samples=6, seed=1)]
        other = [s.id for s in load_calibration(llava_json, num_samples=6, seed=2)]
    assert first == again and len(set(first)) == 4
    assert sorted(every) == sorted(other) and every != other
    assert not caplog.records


def test_more_samples_than_available_takes_all_with_warning(llava_json, caplog):
    with caplog.at_level(logging.WARNING, logger="shortlvlm_vllm.data.calibration"):
        samples = load_calibration(llava_json, num_samples=50)
    assert len(samples) == 6
    assert "has 6 samples with images, fewer than the 50 asked for" in caplog.text


def test_datasets_save_to_disk_with_pil_images(tmp_path):
    rows = {"image": [random_image(i) for i in range(4)] + [None],
            "prompt": [f"<image>\nQuestion {i}?" for i in range(5)],
            "target": [f"Answer {i}." for i in range(5)]}
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).save_to_disk(str(saved))
    samples = load_calibration(saved, num_samples=10, question_column="prompt", answer_column="target")
    assert sorted(s.id for s in samples) == ["0", "1", "2", "3"]  # row 4 has no image
    sample = next(s for s in samples if s.id == "2")
    assert (sample.question, sample.answer) == ("Question 2?", "Answer 2.")
    assert sample.load_image().tobytes() == random_image(2).tobytes()


def test_datasets_save_to_disk_with_path_strings(tmp_path):
    names = write_images(tmp_path / "pics", 3)
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"img": names + [""], "question": ["q0", "q1", "q2", "q3"],
                                "answer": ["a0", "a1", "a2", "a3"]}).save_to_disk(str(saved))
    samples = load_calibration(saved, image_column="img", image_root=tmp_path / "pics")
    assert sorted(s.id for s in samples) == ["0", "1", "2"]  # an empty path means no image
    sample = next(s for s in samples if s.id == "1")
    assert sample.image_ref == tmp_path / "pics" / "imgs" / "1.png"
    assert sample.load_image().size == (96, 80)


def test_datasets_image_dicts_with_bytes_or_path(tmp_path):
    buffer = io.BytesIO()
    random_image(5).save(buffer, "PNG")
    names = write_images(tmp_path, 1)
    saved = tmp_path / "saved"
    images = [{"bytes": buffer.getvalue(), "path": None}, {"bytes": None, "path": names[0]}]
    table = datasets.Dataset.from_dict({"image": images, "question": ["q0", "q1"], "answer": ["a0", "a1"]})
    table.save_to_disk(str(saved))
    samples = {s.id: s for s in load_calibration(saved, image_root=tmp_path)}
    assert samples["0"].load_image().tobytes() == random_image(5).tobytes()
    assert samples["1"].image_ref == tmp_path / "imgs" / "0.png"


def test_datasets_dict_picks_split(tmp_path):
    def part(prefix: str, count: int) -> datasets.Dataset:
        return datasets.Dataset.from_dict({"image": [random_image(i) for i in range(count)],
                                           "question": [f"{prefix} {i}" for i in range(count)],
                                           "answer": ["x"] * count}).cast_column("image", datasets.Image())

    saved = tmp_path / "saved-dict"
    datasets.DatasetDict({"train": part("train", 3), "validation": part("val", 2)}).save_to_disk(str(saved))
    samples = load_calibration(saved, split="validation")
    assert sorted(s.question for s in samples) == ["val 0", "val 1"]
    with pytest.raises(ShortLVLMError, match=r"no split 'test'.*\['train', 'validation'\].*--split"):
        load_calibration(saved, split="test")


def test_parquet_file_through_load_dataset(tmp_path):
    names = write_images(tmp_path, 3)
    path = tmp_path / "calib.parquet"
    datasets.Dataset.from_dict({"image": names, "question": ["<image>\nq0", "q1", "q2"],
                                "answer": ["a0", "a1", "a2"]}).to_parquet(str(path))
    samples = load_calibration(path, image_root=tmp_path, seed=3)
    assert sorted((s.question, s.answer) for s in samples) == [("q0", "a0"), ("q1", "a1"), ("q2", "a2")]
    assert all(s.load_image().mode == "RGB" for s in samples)


def test_plain_json_table_through_load_dataset(tmp_path):
    names = write_images(tmp_path, 2)
    path = tmp_path / "table.json"
    path.write_text(json.dumps([{"image": name, "question": f"q{i}", "answer": f"a{i}"}
                                for i, name in enumerate(names)]))
    samples = load_calibration(path, image_root=tmp_path)
    assert sorted(s.answer for s in samples) == ["a0", "a1"]


def test_in_memory_pil_sample_loads_as_rgb():
    sample = CalibrationSample("s", "q", "a", random_image(0).convert("L"))
    assert sample.load_image().mode == "RGB"


def test_missing_image_file_names_sample_and_image_root(llava_json):
    (llava_json.parent / "imgs" / "4.png").unlink()
    with pytest.raises(ShortLVLMError, match=r"sample 000000000004: .*imgs/4.png.*--image-root"):
        load_calibration(llava_json)


def test_unreadable_image_raises_at_load_image(llava_json):
    (llava_json.parent / "imgs" / "1.png").write_bytes(b"not a png at all")
    sample = next(s for s in load_calibration(llava_json) if s.id == "000000000001")
    with pytest.raises(ShortLVLMError, match=r"sample 000000000001: cannot read image .*1.png"):
        sample.load_image()


def test_image_deleted_after_loading_names_sample(llava_json):
    sample = load_calibration(llava_json, num_samples=1)[0]
    sample.image_ref.unlink()
    with pytest.raises(ShortLVLMError, match=rf"sample {sample.id}: image .* not found.*--image-root"):
        sample.load_image()


@pytest.mark.parametrize("content", ["[]", ""], ids=["empty-list", "empty-file"])
def test_empty_source(tmp_path, content):
    path = tmp_path / ("calib.json" if content else "calib.jsonl")
    path.write_text(content)
    with pytest.raises(ShortLVLMError, match="has no samples with images"):
        load_calibration(path)


def test_source_without_images(tmp_path):
    path = tmp_path / "calib.json"
    path.write_text(json.dumps([llava_record(0), llava_record(1)]))
    with pytest.raises(ShortLVLMError, match="has no samples with images"):
        load_calibration(path)
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"image": [None, ""], "question": ["q", "q"], "answer": ["a", "a"]}).save_to_disk(
        str(saved))
    with pytest.raises(ShortLVLMError, match="has no samples with images"):
        load_calibration(saved)


def test_missing_column_lists_columns_and_option(tmp_path):
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"picture": ["x.png"], "question": ["q"], "answer": ["a"]}).save_to_disk(str(saved))
    with pytest.raises(ShortLVLMError, match=r"no column 'image'; its columns are picture, question, answer\. "
                                             r"Name the right one with --image-column"):
        load_calibration(saved)
    with pytest.raises(ShortLVLMError, match=r"no column 'reply'.*--answer-column"):
        load_calibration(saved, image_column="picture", answer_column="reply")


def test_non_text_answer_column(tmp_path):
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"image": [random_image(0)], "question": ["q"], "answers": [["a", "b"]]}).cast_column(
        "image", datasets.Image()).save_to_disk(str(saved))
    with pytest.raises(ShortLVLMError, match=r"sample 0: column 'answers' holds a list, not text.*--answer-column"):
        load_calibration(saved, answer_column="answers")


def test_bad_json_names_file(tmp_path):
    path = tmp_path / "calib.json"
    path.write_text('[{"id": "1",')
    with pytest.raises(ShortLVLMError, match=r"calib\.json is not valid JSON"):
        load_calibration(path)


def test_bad_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text(json.dumps(llava_record(0, "a.png")) + "\n{oops\n")
    with pytest.raises(ShortLVLMError, match=r"calib\.jsonl line 2 is not valid JSON"):
        load_calibration(path)


def test_record_without_answer(tmp_path):
    write_images(tmp_path, 1)
    record = llava_record(7, "imgs/0.png")
    record["conversations"] = record["conversations"][:1]
    path = tmp_path / "calib.json"
    path.write_text(json.dumps([record]))
    with pytest.raises(ShortLVLMError, match=r"record 000000000007 has no human turn followed by a gpt answer"):
        load_calibration(path)


def test_missing_source(tmp_path):
    with pytest.raises(ShortLVLMError, match=r"missing\.json not found: no such file or directory"):
        load_calibration(tmp_path / "missing.json")


def test_load_dataset_failure_names_source(tmp_path):
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    with pytest.raises(ShortLVLMError, match=rf"cannot load calibration source {empty} with datasets"):
        load_calibration(empty)


def test_hub_id_failure_is_wrapped(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ShortLVLMError, match=r"calibration source someone/calib-set .*ConnectionError: no network"):
        load_calibration("someone/calib-set")


def test_synthetic_calibration_split_is_generated_offline():
    samples = load_calibration("synthetic", num_samples=6, seed=3)
    assert len(samples) == 6 and len({s.id for s in samples}) == 6
    assert all(s.id.startswith("calibration-") and s.question and s.answer for s in samples)
    assert samples[0].load_image().size == (72, 72)  # version 2; "synthetic-v1" is the first toy's 64 px scenes
    assert [s.id for s in load_calibration("synthetic", num_samples=6, seed=3)] == [s.id for s in samples]
    assert load_calibration("synthetic-v1", num_samples=1, seed=3)[0].load_image().size == (64, 64)


def test_num_samples_must_be_positive(llava_json):
    with pytest.raises(ShortLVLMError, match="at least 1 sample"):
        load_calibration(llava_json, num_samples=0)

