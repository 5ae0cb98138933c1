"""Calibration samples for the pruning pass: image + question + reference answer.

Sources: a LLaVA-format conversation file (.json / .jsonl, the LLaVA-665k format the paper
calibrates on), or a `datasets` source (a `save_to_disk` directory, a local data file or
directory, or a hub id) with configurable columns.
"""

from __future__ import annotations

import io
import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from shortlvlm_vllm.chat import template_image_turn
from shortlvlm_vllm.checkpoint.hub import is_hub_id
from shortlvlm_vllm.data.synthetic import SOURCE_VERSIONS, SyntheticConfig, generate_split
from shortlvlm_vllm.errors import ShortLVLMError

log = logging.getLogger(__name__)

# "<image>" and the newlines around it: LLaVA puts the placeholder on its own line before or after the text.
PLACEHOLDER = re.compile(r"\n*<image>\n*")


@dataclass
class CalibrationSource:
    """Where calibration samples come from (see load_calibration): what a recipe records."""

    source: str
    num_samples: int = 256
    heldout: int = 16  # further samples, never calibrated on, for measuring the pruned model's drift
    seed: int = 0
    image_root: str | None = None
    split: str = "train"
    image_column: str = "image"
    question_column: str = "question"
    answer_column: str = "answer"
    batch_size: int = 1  # samples per forward pass of the calibration (the statistics do not depend on it)

    def load(self, num_samples: int) -> list[CalibrationSample]:
        """`num_samples` samples drawn with the source's seed."""
        return load_calibration(
            self.source, num_samples=num_samples, seed=self.seed, image_root=self.image_root, split=self.split,
            image_column=self.image_column, question_column=self.question_column, answer_column=self.answer_column)


@dataclass(frozen=True)
class CalibrationSample:
    """One calibration sample; the image stays a path or compressed bytes until the pass needs pixels."""

    id: str
    question: str
    answer: str
    image_ref: object  # a Path, a PIL image, or a datasets image dict {"bytes": ..., "path": ...}

    def load_image(self) -> Image.Image:
        """The image in RGB, the mode vision towers expect; a bad file is named with the sample's id."""
        ref = self.image_ref
        if isinstance(ref, Image.Image):
            return ref.convert("RGB")
        if isinstance(ref, Path) and not ref.is_file():
            raise ShortLVLMError(
                f"calibration sample {self.id}: image {ref} not found. If the image paths are relative to "
                f"another directory, pass it with --image-root."
            )
        where = ref if isinstance(ref, Path) else ref.get("path") or "(bytes held in the dataset)"
        try:
            with Image.open(ref if isinstance(ref, Path) else io.BytesIO(ref["bytes"])) as image:
                return image.convert("RGB")
        except OSError as exc:  # PIL's UnidentifiedImageError and truncated-file errors are OSErrors
            raise ShortLVLMError(
                f"calibration sample {self.id}: cannot read image {where} ({exc}). Replace the file or drop "
                f"the sample from the calibration set."
            ) from exc


def calibration_inputs(processor, sample: CalibrationSample) -> dict:
    """Prompt and reference answer in one sequence, through the model's own chat template (teacher forcing)."""
    messages = [
        template_image_turn(sample.question),
        {"role": "assistant", "content": [{"type": "text", "text": sample.answer}]},
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=False)
    return processor(images=sample.load_image(), text=text, return_tensors="pt")


def load_calibration(
    source: str | Path,
    *,
    num_samples: int = 256,
    seed: int = 0,
    image_root: str | Path | None = None,
    split: str = "train",
    image_column: str = "image",
    question_column: str = "question",
    answer_column: str = "answer",
) -> list[CalibrationSample]:
    """`num_samples` random samples with images from `source`, the same ones for the same seed.

    Relative image paths resolve against `image_root`; for a LLaVA file it defaults to the file's directory.
    A .json/.jsonl file whose records have no "conversations" is read as a plain table with `datasets`.
    """
    if num_samples < 1:
        raise ShortLVLMError(f"the calibration set needs at least 1 sample, not {num_samples}; raise --num-samples.")
    if str(source) in SOURCE_VERSIONS:
        return _from_synthetic(SOURCE_VERSIONS[str(source)], num_samples, seed)
    path = Path(source).expanduser()
    root = Path(image_root).expanduser() if image_root is not None else None
    if path.is_file() and path.suffix.lower() in (".json", ".jsonl"):
        records = _read_json_records(path)
        if not records or "conversations" in records[0]:  # an empty file has no format; report it as empty
            llava_root = root or path.parent
            return _check_image_files(_from_llava(records, path, llava_root, num_samples, seed), llava_root)
    dataset = _open_dataset(source, path, split)
    samples = _from_dataset(
        dataset, source, root, num_samples, seed, image_column, question_column, answer_column
    )
    return _check_image_files(samples, root)


def _from_synthetic(version: int, num_samples: int, seed: int) -> list[CalibrationSample]:
    """The calibration split of the project's synthetic VQA set (that version's), generated in memory (offline,
    seconds)."""
    rows = generate_split("calibration", SyntheticConfig(version=version))
    drawn = _draw(list(range(len(rows))), num_samples, seed, "synthetic")
    return [CalibrationSample(rows[i]["id"], rows[i]["question"], rows[i]["answer"], rows[i]["image"]) for i in drawn]


def _read_json_records(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ShortLVLMError(f"cannot read calibration file {path} ({exc}).") from exc
    if path.suffix.lower() == ".jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ShortLVLMError(
                    f"{path} line {lineno} is not valid JSON ({exc}); a .jsonl file holds one JSON record a line."
                ) from exc
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ShortLVLMError(f"{path} is not valid JSON ({exc}); fix the file or regenerate it.") from exc
        if not isinstance(records, list):
            raise ShortLVLMError(f"{path} holds a JSON {type(records).__name__}; expected a list of records.")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise ShortLVLMError(f"{path}: record {index} is a JSON {type(record).__name__}, not an object.")
    return records


def _draw(candidates: list[int], num_samples: int, seed: int, source: str | Path) -> list[int]:
    """Indices of the chosen samples, in drawn order, so a seed fixes both the set and its order."""
    if not candidates:
        raise ShortLVLMError(
            f"calibration source {source} has no samples with images; the calibration pass needs image + text "
            f"pairs (for a datasets source, check --image-column)."
        )
    if len(candidates) < num_samples:
        log.warning(
            "calibration source %s has %d samples with images, fewer than the %d asked for; using all of them",
            source, len(candidates), num_samples,
        )
    return random.Random(seed).sample(candidates, min(num_samples, len(candidates)))


def _from_llava(records: list[dict], path: Path, root: Path, num_samples: int, seed: int) -> list[CalibrationSample]:
    candidates = [index for index, record in enumerate(records) if record.get("image")]
    samples, several_images = [], 0
    for index in _draw(candidates, num_samples, seed, path):
        record = records[index]
        sample_id = str(record.get("id", index))
        image = record["image"]
        if isinstance(image, list):
            several_images += len(image) > 1
            image = image[0]
        question, answer = _first_exchange(record, sample_id, path)
        samples.append(CalibrationSample(sample_id, question, answer, root / image))
    if several_images:
        log.warning("%d calibration samples from %s have several images; only the first of each is used",
                    several_images, path)
    return samples


def _first_exchange(record: dict, sample_id: str, path: Path) -> tuple[str, str]:
    """The first human turn and the first gpt turn after it: one question, one teacher-forced answer."""
    turns = record.get("conversations") or []
    for position, turn in enumerate(turns):
        if turn.get("from") == "human":
            answer = next((later["value"] for later in turns[position + 1:] if later.get("from") == "gpt"), None)
            if answer is not None:
                return _clean_question(turn["value"]), answer
            break
    raise ShortLVLMError(
        f"{path}: record {sample_id} has no human turn followed by a gpt answer; fix or remove the record."
    )


def _clean_question(text: str) -> str:
    return PLACEHOLDER.sub("\n", text).strip()


def _open_dataset(source: str | Path, path: Path, split: str):
    """A `datasets.Dataset`: from a save_to_disk directory, else through `datasets.load_dataset`."""
    import datasets

    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ShortLVLMError(
                    f"calibration source {source} has no split {split!r}; it has {sorted(loaded)}. Pick one "
                    f"with --split."
                )
            return loaded[split]
        return loaded
    text = str(source)
    if not path.exists() and not is_hub_id(text):
        raise ShortLVLMError(f"calibration source {source} not found: no such file or directory, and not a hub id.")
    # load_dataset takes a directory or a hub id, not a file: a file goes in as its directory's data_files.
    args, kwargs = ((str(path.parent),), {"data_files": path.name}) if path.is_file() else ((text,), {})
    try:
        return datasets.load_dataset(*args, split=split, **kwargs)
    except Exception as exc:  # datasets raises many types; all mean "could not load"
        raise ShortLVLMError(
            f"cannot load calibration source {source} with datasets ({type(exc).__name__}: {exc}). Pass a "
            f"LLaVA-format .json/.jsonl file, a save_to_disk directory, a data file or directory, or a hub id "
            f"(check the id, the --split, your network or HF_TOKEN)."
        ) from exc


def _from_dataset(
    dataset, source: str | Path, root: Path | None, num_samples: int, seed: int,
    image_column: str, question_column: str, answer_column: str,
) -> list[CalibrationSample]:
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc

    for column, option in ((image_column, "--image-column"), (question_column, "--question-column"),
                           (answer_column, "--answer-column")):
        if column not in dataset.column_names:
            raise ShortLVLMError(
                f"calibration source {source} has no column {column!r}; its columns are "
                f"{', '.join(dataset.column_names)}. Name the right one with {option}."
            )
    # Which rows have an image, read from Arrow so no image is decoded or copied into Python.
    images = dataset.select_columns([image_column]).with_format("arrow")[:].column(0)
    present = images.is_valid()
    if pa.types.is_string(images.type) or pa.types.is_large_string(images.type):
        present = pc.and_kleene(present, pc.not_equal(images, ""))
    candidates = [index for index, ok in enumerate(present.to_pylist()) if ok]
    drawn = _draw(candidates, num_samples, seed, source)
    rows = dataset.select(drawn)
    if isinstance(rows.features[image_column], datasets.Image):
        rows = rows.cast_column(image_column, datasets.Image(decode=False))  # keep bytes; decode in load_image
    samples = []
    for index, row in zip(drawn, rows, strict=True):
        sample_id = str(index)
        question = _text(row, question_column, "--question-column", sample_id, source)
        answer = _text(row, answer_column, "--answer-column", sample_id, source)
        image_ref = _image_ref(row[image_column], root, image_column, sample_id, source)
        samples.append(CalibrationSample(sample_id, _clean_question(question), answer, image_ref))
    return samples


def _text(row: dict, column: str, option: str, sample_id: str, source: str | Path) -> str:
    value = row[column]
    if not isinstance(value, str):
        raise ShortLVLMError(
            f"calibration source {source}, sample {sample_id}: column {column!r} holds a "
            f"{type(value).__name__}, not text. Name a text column with {option}."
        )
    return value


def _image_ref(value: object, root: Path | None, column: str, sample_id: str, source: str | Path) -> object:
    if isinstance(value, dict) and value.get("bytes") is None and value.get("path"):
        value = value["path"]  # an image stored by reference: resolve it like a path column
    if isinstance(value, str):
        return root / value if root is not None else Path(value)
    if isinstance(value, dict) and value.get("bytes") is not None:
        return value
    raise ShortLVLMError(
        f"calibration source {source}, sample {sample_id}: column {column!r} holds a {type(value).__name__}; "
        f"expected an image, a {{'bytes', 'path'}} dict or a path. Name the image column with --image-column."
    )


def _check_image_files(samples: list[CalibrationSample], root: Path | None) -> list[CalibrationSample]:
    """Fail before the calibration pass starts, not hours into it, when image files are missing."""
    missing = [s for s in samples if isinstance(s.image_ref, Path) and not s.image_ref.is_file()]
    if missing:
        where = f"against {root}" if root is not None else "as given (relative to the current directory)"
        raise ShortLVLMError(
            f"{len(missing)} of {len(samples)} calibration images not found, e.g. sample {missing[0].id}: "
            f"{missing[0].image_ref}. Relative image paths are resolved {where}; pass the directory they are "
            f"relative to with --image-root."
        )
    return samples
