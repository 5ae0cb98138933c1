"""Small stand-ins for the benchmarks' hub tables: real column names and types, hand-chosen rows, drawn images.

They exercise the loaders' local-path route offline (tests, a dry run of the eval matrix). A fixture of `n`
units cycles through the hand-written rows with fresh ids; the default `n` is those rows exactly, whose answers
the tests score by hand. A unit is a row, except for MME (an image and its two questions) and MMBench (a
question, stored with its circular copies at index + k * 1e6 as lmms-lab-encoder/MMBench stores them, unless
`circular_copies` is off).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw

from shortlvlm_vllm.data.synthetic import SOURCE_VERSIONS, SyntheticConfig, write_synthetic
from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.evaluation.benchmarks import BENCHMARKS
from shortlvlm_vllm.files import atomic_output_dir

FORMATS = ("disk", "parquet")  # Dataset.save_to_disk, or one parquet file named after the split
PALETTE = ((220, 40, 40), (40, 170, 70), (40, 80, 225), (240, 210, 40), (150, 60, 190), (30, 190, 200))

POPE_ROWS = (  # (setting, object, answer)
    ("adversarial", "dog", "yes"), ("adversarial", "cat", "no"),
    ("popular", "person", "yes"), ("popular", "car", "no"),
    ("random", "chair", "yes"), ("random", "bird", "no"),
)
MME_ROWS = (  # (subtask, yes question, no question): MME asks each image one of each
    ("existence", "Is there a red circle in this image?", "Is there a green square in this image?"),
    ("count", "Are there two shapes in this image?", "Are there five shapes in this image?"),
    ("OCR", "Does the sign say 'STOP'?", "Does the sign say 'GO'?"),
    ("code_reasoning", "Will the code print 3?", "Will the code print 4?"),
)
MMBENCH_ROWS = (  # (hint, question, options, answer, category, l2-category); missing options as None or "nan"
    ("The picture shows a park.", "Which season is it?", ("spring", "summer", "autumn", "winter"), "C",
     "image_scene", "coarse_perception"),
    (None, "Is the square blue?", ("no", "yes", None, None), "B",
     "attribute_recognition", "finegrained_perception (instance-level)"),
    ("nan", "What colour is the circle?", ("red", "green", "blue", "nan"), "A",
     "attribute_recognition", "finegrained_perception (instance-level)"),
    (None, "Where is the circle?", ("left of the square", "right of the square", "above the square",
                                    "below the square"), "D", "spatial_relationship", "relation_reasoning"),
)
SEED_ROWS = (  # (data_type, question_type_id, question, choices, answer)
    ("image", 1, "What is the overall scene?", ("a beach", "a kitchen", "a street", "a forest"), "C"),
    ("image", 5, "How many circles are there?", ("1", "2", "3", "4"), "B"),
    ("video", 10, "What is the person doing?", ("running", "sitting", "cooking", "reading"), "A"),
    ("image", 5, "How many squares are there?", ("0", "1", "2", "3"), "A"),
    ("image", 9, "What does the sign say?", ("OPEN", "CLOSED", "EXIT", "SALE"), "D"),
)
SCIENCEQA_ROWS = (  # (hint, question, choices, answer index): 2 to 5 choices
    ("", "Which shape is red?", ("circle", "square"), 0),
    ("The map shows three states.", "Which state is farthest north?", ("Ohio", "Texas", "Maine"), 2),
    ("", "Which animal is a mammal?", ("frog", "whale", "shark", "trout"), 1),
    ("Look at the picture.", "Which word fits the picture best?", ("hot", "cold", "wet", "dry", "windy"), 3),
)
AOKVQA_ROWS = (  # (question, choices, correct index)
    ("What is the man holding?", ("umbrella", "phone", "bat", "cup"), 2),
    ("Why is the street wet?", ("rain", "flood", "cleaning", "spill"), 0),
    ("What season is it?", ("summer", "winter", "spring", "autumn"), 1),
)


def picture(k: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A distinct small image per k: a coloured background with a shape of another colour."""
    image = Image.new("RGB", size, PALETTE[k % len(PALETTE)])
    draw = ImageDraw.Draw(image)
    box = (8 + k % 5, 8, 8 + k % 5 + size[1] // 2, 8 + size[1] // 2)
    fill = PALETTE[(k + 2) % len(PALETTE)]
    (draw.ellipse if k % 2 else draw.rectangle)(box, fill=fill)
    return image


def write_fixture(name: str, out_dir: str | Path, n: int | None = None, fmt: str = "disk",
                  overwrite: bool = False, circular_copies: bool = True) -> Path:
    """Write benchmark `name`'s fixture of `n` units to `out_dir`; returns the path to pass as the source.

    `fmt` "disk" writes `Dataset.save_to_disk`; "parquet" writes one parquet file named after the split (read
    with `datasets.load_dataset(out_dir)`). The synthetic fixture is `synthetic.write_synthetic` with `n` test images
    (default 10).
    """
    import datasets

    if fmt not in FORMATS:
        raise ShortLVLMError(f"unknown fixture format {fmt!r}; use one of {', '.join(FORMATS)}.")
    if n is not None and n < 1:
        raise ShortLVLMError(f"a fixture of {n} units holds nothing; use n >= 1.")
    if name in SOURCE_VERSIONS:
        if fmt != "disk":
            raise ShortLVLMError("the synthetic fixture is written by synthetic.write_synthetic only; use fmt 'disk'.")
        config = SyntheticConfig(version=SOURCE_VERSIONS[name], train_images=1, calib_images=1,
                                 test_images=n or 10, validation_images=1)
        return write_synthetic(out_dir, config, overwrite=overwrite)
    if name not in _ROWS:
        raise ShortLVLMError(f"no fixture for {name!r}; fixtures exist for {', '.join([*_ROWS, *SOURCE_VERSIONS])}.")
    rows_of, base = _ROWS[name]
    rows = [row for k in range(len(base) if n is None else n) for row in rows_of(k)]
    if name == "mmbench" and circular_copies:
        rows += [copy for row in list(rows) for copy in _mmbench_copies(row)]
    table = datasets.Dataset.from_list(rows, features=datasets.Features(_features()[name]))
    split = BENCHMARKS[name].split
    out = Path(out_dir).absolute()
    with atomic_output_dir(out, overwrite) as tmp:
        if fmt == "disk":
            table.save_to_disk(str(tmp))
        else:
            table.to_parquet(str(tmp / f"{split}-00000-of-00001.parquet"))
    return out


def _pope(k: int) -> list[dict]:
    setting, thing, answer = POPE_ROWS[k % len(POPE_ROWS)]
    return [{"id": str(k), "question_id": str(k + 1), "question": f"Is there a {thing} in the image?",
             "answer": answer, "image_source": f"COCO_val2014_{k:012d}", "image": picture(k), "category": setting}]


def _mme(k: int) -> list[dict]:
    category, yes, no = MME_ROWS[k % len(MME_ROWS)]
    image_name = f"{category}/{k:04d}.png"
    return [{"question_id": image_name, "image": picture(k), "question": f"{question} Please answer yes or no.",
             "answer": answer, "category": category} for question, answer in ((yes, "Yes"), (no, "No"))]


def _mmbench(k: int) -> list[dict]:
    hint, question, options, answer, category, l2 = MMBENCH_ROWS[k % len(MMBENCH_ROWS)]
    return [{"index": k, "question": question, "hint": hint, **dict(zip("ABCD", options, strict=True)),
             "answer": answer, "category": category, "image": picture(k), "source": "fixture", "L2-category": l2,
             "comment": None, "split": "dev"}]


def _mmbench_copies(row: dict) -> list[dict]:
    """Question `row` stored again once per further rotation of its present options, at index + k * 1e6, as
    VLMEvalKit's circular tables do (in copy k, letter i holds option i + k; missing options stay missing)."""
    present = [letter for letter in "ABCD" if row[letter] not in (None, "nan")]
    texts = [row[letter] for letter in present]
    n, gold = len(texts), present.index(row["answer"])
    return [{**row, "index": row["index"] + k * 1_000_000,
             **{letter: texts[(i + k) % n] for i, letter in enumerate(present)}, "answer": present[(gold - k) % n]}
            for k in range(1, n)]


def _seed(k: int) -> list[dict]:
    data_type, type_id, question, choices, answer = SEED_ROWS[k % len(SEED_ROWS)]
    frames = [picture(k), picture(k + 1)] if data_type == "video" else [picture(k)]
    return [{"answer": answer, **{f"choice_{letter}": text for letter, text in zip("abcd", choices, strict=True)},
             "data_id": f"{k}.jpg", "data_type": data_type, "question": question, "question_id": str(100 + k),
             "question_type_id": type_id, "image": frames, "segment": [0, 8] if data_type == "video" else []}]


def _scienceqa(k: int) -> list[dict]:
    hint, question, choices, answer = SCIENCEQA_ROWS[k % len(SCIENCEQA_ROWS)]
    return [{"image": picture(k), "question": question, "choices": list(choices), "answer": answer, "hint": hint,
             "task": "closed choice", "grade": "grade4", "subject": "natural science", "topic": "fixture",
             "category": "fixture", "skill": "fixture", "lecture": "", "solution": ""}]


def _aokvqa(k: int) -> list[dict]:
    question, choices, correct = AOKVQA_ROWS[k % len(AOKVQA_ROWS)]
    return [{"image": picture(k), "question_id": f"aok{k:04d}", "question": question, "choices": list(choices),
             "correct_choice_idx": correct, "direct_answers": [choices[correct]] * 10,
             "difficult_direct_answer": False, "rationales": [f"The answer is {choices[correct]}."]}]


def _features() -> dict[str, dict]:
    """Each fixture's column types, as on the hub (lmms-lab/* and HuggingFaceM4/A-OKVQA dataset cards)."""
    import datasets

    text, image = datasets.Value("string"), datasets.Image()
    texts = datasets.List(text)
    return {
        "pope": {"id": text, "question_id": text, "question": text, "answer": text, "image_source": text,
                 "image": image, "category": text},
        "mme": {"question_id": text, "image": image, "question": text, "answer": text, "category": text},
        "mmbench": {"index": datasets.Value("int64"), "question": text, "hint": text, "A": text, "B": text,
                    "C": text, "D": text, "answer": text, "category": text, "image": image, "source": text,
                    "L2-category": text, "comment": text, "split": text},
        "seedbench": {"answer": text, "choice_a": text, "choice_b": text, "choice_c": text, "choice_d": text,
                      "data_id": text, "data_type": text, "question": text, "question_id": text,
                      "question_type_id": datasets.Value("int64"), "image": datasets.List(image),
                      "segment": datasets.List(datasets.Value("int64"))},
        "scienceqa": {"image": image, "question": text, "choices": texts, "answer": datasets.Value("int8"),
                      "hint": text, "task": text, "grade": text, "subject": text, "topic": text, "category": text,
                      "skill": text, "lecture": text, "solution": text},
        "aokvqa": {"image": image, "question_id": text, "question": text, "choices": texts,
                   "correct_choice_idx": datasets.Value("int8"), "direct_answers": texts,
                   "difficult_direct_answer": datasets.Value("bool"), "rationales": texts},
    }


_ROWS: dict[str, tuple[Callable[[int], list[dict]], tuple]] = {  # rows of unit k, and the hand-written units
    "pope": (_pope, POPE_ROWS),
    "mme": (_mme, MME_ROWS),
    "mmbench": (_mmbench, MMBENCH_ROWS),
    "seedbench": (_seed, SEED_ROWS),
    "scienceqa": (_scienceqa, SCIENCEQA_ROWS),
    "aokvqa": (_aokvqa, AOKVQA_ROWS),
}
