"""An offline stand-in for LLaVA-1.5's benchmarks: procedurally generated visual question answering.

No hub is reachable here and a random-weight model answers nothing, so pruning cannot be judged on the
real benchmarks. This module draws small scenes of coloured shapes on a cluttered background and asks
about them in the phrasing of real benchmarks: POPE (existence, with its random / popular / adversarial
negatives), attribute, counting and spatial questions, and MMBench/ScienceQA-style multiple choice.

Two properties make it a usable yardstick for a small model trained from scratch:
- every question refers to something unambiguous in its image (a named object is the only one of its
  kind; objects sit in distinct cells of a 3x3 grid, so left/right/above/below never hinge on a pixel);
- answers are balanced (each choice is the least used so far among those the scene allows), so the
  prompt alone is worth chance and a model must look at the image.

Two versions of the scenes (`SyntheticConfig.version`), same questions and API; as a benchmark and a calibration
source, "synthetic" is version 2 and "synthetic-v1" version 1 (SOURCE_VERSIONS):
- version 1 (the first toy's, shipped as `toy-v1`): 64 px, objects filling most of their cells, a faint
  background; at that toy's 3x3 patches every token holds an object or nothing;
- version 2 (the default: the shipped `toy`'s, `shortlvlm train-toy`), redundant the way photos are: 72 px, meant
  to be seen at 8 px patches
  (9x9 = 81 tokens, 3x3 per cell); a small object fills one patch and a large one a block of 2x2, so that
  objects hold about a twelfth of the patches, the rest background with low-saturation clutter (grey
  blobs, bars and strokes that are no named object), so that a background patch is neither empty nor
  uniform. Objects sit on the patch grid: a patch that straddled an object's edge at random offsets saw
  a sliver of a shape, and at 8 px the first 81-token toy's tower read shape from patches at 50-60%.

Everything derives from `SyntheticConfig.seed`: each split has its own seed and image ids, so splits
never share an image. `validation` is a development split beside `test` (for choices such as `shortlvlm search`'s,
confirmed on `test`, which they never saw); it comes last so that adding it left the other splits' streams as
they were.
"""

from __future__ import annotations

import io
import json
import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.files import atomic_output_dir

if TYPE_CHECKING:
    import datasets

FAMILIES = ("existence", "attribute", "counting", "spatial", "multiple_choice")
SPLITS = ("train", "calibration", "test", "validation")
POPE_SETTINGS = ("random", "popular", "adversarial")
# Saturated colours, far from the grey clutter of the background.
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 80, 225), "yellow": (240, 210, 40)}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
OBJECTS = tuple((colour, shape) for colour in COLOURS for shape in SHAPES)  # POPE's "objects"
RELATIONS = ("left", "right", "above", "below")
LETTERS = ("A", "B", "C", "D")
GRID = 3  # objects sit in distinct cells of a GRID x GRID grid
MAX_OBJECTS = 4
POPULAR_TOP_K = 3  # POPE's popular negatives: the k most frequent objects absent from the image
VERSIONS = (1, 2)
SOURCE_VERSIONS = {"synthetic": 2, "synthetic-v1": 1}  # benchmark and calibration-source names -> version
IMAGE_SIZE = {1: 64, 2: 72}  # each version's default image side
# Version 1: object sides as fractions of the image side (10 and 18 px at 64 px), anywhere in their cell.
SIZE_FRACTION = {"small": 0.16, "large": 0.28}
# Version 2: each cell is PATCHES_PER_CELL x PATCHES_PER_CELL patches (8 px at 72 px); a small object fills
# one patch, a large one a block of 2 x 2 (7 and 15 px at 72 px, a 1 px margin on the block's top and left),
# at a random patch of the cell, so that every patch holds one whole object, a quarter of one, or none.
PATCHES_PER_CELL = 3
BLOCK = {"small": 1, "large": 2}
CLUTTER_ITEMS = (6, 12)  # version 2: distractors per image, at least and at most

EXISTENCE_Q = "Is there a {colour} {shape} in the image?"
ATTRIBUTE_Q = {
    "colour": "What colour is the {shape}?",
    "shape": "What shape is the {colour} object?",
    "size": "What size is the {colour} {shape}?",
}
COUNTING_Q = {"shape": "How many {value}s are there?", "colour": "How many {value} objects are there?"}
SPATIAL_Q = {
    "left": "Is the {a} to the left of the {b}?",
    "right": "Is the {a} to the right of the {b}?",
    "above": "Is the {a} above the {b}?",
    "below": "Is the {a} below the {b}?",
}
MC_Q = "Which object is in the image?\n{options}\nAnswer with the option's letter from the given choices directly."

# Words are runs of letters/digits; each punctuation mark is a word of its own; whitespace (newlines
# included) only separates; case is kept. "option's letter" -> ["option", "'", "s", "letter"].
WORD = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True)
class SyntheticConfig:
    """Size and seed of the synthetic set; the defaults suit a small model trained from scratch on CPU."""

    # of the scenes (see the module's docstring): 2 is what the shipped `toy` saw, 1 what `toy-v1` saw
    version: int = 2
    image_size: int | None = None  # None: the version's own (IMAGE_SIZE)
    seed: int = 0
    train_images: int = 20000
    calib_images: int = 512
    test_images: int = 1000
    validation_images: int = 1000
    questions_per_image: int = 5  # one per family, families rotating across images when fewer

    def __post_init__(self) -> None:
        if self.version not in VERSIONS:
            raise ShortLVLMError(f"unknown synthetic version {self.version!r}; use one of {VERSIONS}.")
        if self.image_size is None:
            object.__setattr__(self, "image_size", IMAGE_SIZE[self.version])
        if self.version >= 2 and self.image_size % (GRID * PATCHES_PER_CELL):
            raise ShortLVLMError(f"image_size {self.image_size}: version {self.version} draws objects on a grid of "
                                 f"{GRID * PATCHES_PER_CELL} x {GRID * PATCHES_PER_CELL} patches; use a multiple of "
                                 f"{GRID * PATCHES_PER_CELL} (72 is the default).")
        if self.image_size < 32:
            raise ShortLVLMError(f"image_size {self.image_size} is too small to draw shapes; use at least 32.")
        if self.seed < 0:
            raise ShortLVLMError(f"seed {self.seed} is negative; use a seed >= 0.")
        for name in ("train_images", "calib_images", "test_images", "validation_images"):
            if getattr(self, name) < 1:
                raise ShortLVLMError(f"{name} is {getattr(self, name)}; every split needs at least 1 image.")
        if not 1 <= self.questions_per_image <= len(FAMILIES):
            raise ShortLVLMError(
                f"questions_per_image is {self.questions_per_image}; use 1 to {len(FAMILIES)} (at most one question "
                f"per family per image, so no image repeats a question). For more questions, add images."
            )

    def num_images(self, split: str) -> int:
        return {"train": self.train_images, "calibration": self.calib_images, "test": self.test_images,
                "validation": self.validation_images}[split]


@dataclass(frozen=True)
class _Object:
    colour: str
    shape: str
    size: str
    cell: tuple[int, int]  # (row, column) in the grid
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, inclusive

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class _Scene:
    families: tuple[str, ...]
    objects: tuple[_Object, ...]
    count_kind: str  # the attribute the counting question counts by ("shape" or "colour") ...
    count_value: str  # ... and its value; the scene is built around it so counts 0..4 are balanced


def generate_split(split: str, config: SyntheticConfig) -> list[dict]:
    """The rows of one split: one image per scene, `questions_per_image` questions about it.

    Row fields: id, image_id, image (PIL, shared by the rows of one image), question, answer, family,
    pope_setting ("" outside existence), options ([] outside multiple choice), scene (JSON of the objects).
    """
    if split not in SPLITS:
        raise ShortLVLMError(f"unknown split {split!r}; the synthetic set has {', '.join(SPLITS)}.")
    split_seed = config.seed * 1000 + SPLITS.index(split)  # own stream per split; seed >= 0 keeps them apart
    rng = random.Random(split_seed)
    pixels_rng = np.random.default_rng(split_seed)
    counts: dict[str, Counter] = defaultdict(Counter)  # per choice: how often each option was taken
    scenes = [
        _plan_scene(rng, counts, _families(index, config.questions_per_image), config.image_size, config.version)
        for index in range(config.num_images(split))
    ]
    # POPE's popular negatives come from the most frequent objects of the split; ties in a fixed order.
    frequency = Counter((o.colour, o.shape) for scene in scenes for o in scene.objects)
    popular = sorted(OBJECTS, key=lambda pair: (-frequency[pair], OBJECTS.index(pair)))
    rows = []
    for index, scene in enumerate(scenes):
        image_id = f"{split}-{index:06d}"
        image = _render(scene.objects, config.image_size, pixels_rng, config.version)
        scene_json = json.dumps([
            {"colour": o.colour, "shape": o.shape, "size": o.size, "cell": list(o.cell), "bbox": list(o.bbox)}
            for o in scene.objects
        ], separators=(",", ":"))
        for family in scene.families:
            asked = _ASK[family](rng, scene, counts, popular)
            rows.append({
                "id": f"{image_id}-{family}", "image_id": image_id, "image": image, "question": asked["question"],
                "answer": asked["answer"], "family": family, "pope_setting": asked.get("pope_setting", ""),
                "options": asked.get("options", []), "scene": scene_json,
            })
    return rows


def build_dataset(config: SyntheticConfig) -> datasets.DatasetDict:
    """All three splits as a `datasets.DatasetDict`; each image is PNG-encoded once for all its rows."""
    import datasets

    string = datasets.Value("string")
    features = datasets.Features({
        "id": string, "image_id": string, "image": datasets.Image(), "question": string, "answer": string,
        "family": string, "pope_setting": string, "options": datasets.List(string), "scene": string,
    })
    return datasets.DatasetDict({
        split: datasets.Dataset.from_list(_encode_images(generate_split(split, config)), features=features)
        for split in SPLITS
    })


def write_synthetic(out_dir: str | Path, config: SyntheticConfig, overwrite: bool = False) -> Path:
    """Write `out_dir/dataset` (save_to_disk) and `out_dir/calibration/llava.json` + images, atomically.

    The LLaVA-format copy of the calibration split is what the pruning pass reads; one record per question.
    """
    out = Path(out_dir).absolute()
    with atomic_output_dir(out, overwrite, marker="dataset") as tmp:
        dataset = build_dataset(config)
        dataset.save_to_disk(str(tmp / "dataset"))
        _write_llava(dataset["calibration"], tmp / "calibration")
    return out


def words(text: str) -> list[str]:
    """Split text the way the toy model's word-level tokenizer will (see WORD)."""
    return WORD.findall(text)


def answer_vocabulary() -> list[str]:
    """Every answer the set can hold, sorted."""
    digits = [str(n) for n in range(MAX_OBJECTS + 1)]
    return sorted({"yes", "no", *COLOURS, *SHAPES, *SIZES, *digits, *LETTERS})


def question_vocabulary() -> list[str]:
    """Every word (per `words`) a question can hold, sorted: all templates filled with every value."""
    return sorted({word for question in _all_question_texts() for word in words(question)})


def _all_question_texts() -> Iterator[str]:
    for colour, shape in OBJECTS:
        yield EXISTENCE_Q.format(colour=colour, shape=shape)
        yield from (template.format(colour=colour, shape=shape) for template in ATTRIBUTE_Q.values())
        yield COUNTING_Q["shape"].format(value=shape)
        yield COUNTING_Q["colour"].format(value=colour)
        yield from (template.format(a=f"{colour} {shape}", b=f"{colour} {shape}") for template in SPATIAL_Q.values())
        yield _mc_question([f"{colour} {shape}"] * len(LETTERS))


def _families(index: int, questions_per_image: int) -> tuple[str, ...]:
    """Families rotate across images, so each family gets the same share of the questions."""
    return tuple(FAMILIES[(index * questions_per_image + k) % len(FAMILIES)] for k in range(questions_per_image))


def _balanced(rng: random.Random, keys: list, counts: Counter):
    """The least used of `keys` so far (ties at random), counted: keeps answer distributions flat."""
    least = min(counts[key] for key in keys)
    key = rng.choice([key for key in keys if counts[key] == least])
    counts[key] += 1
    return key


def _plan_scene(rng: random.Random, counts: dict[str, Counter], families: tuple[str, ...], size: int,
                version: int) -> _Scene:
    """Objects with distinct (colour, shape), so a colour + shape names exactly one object.

    The scene is built around a count (how many objects share one shape or one colour), balanced over
    0..4 for the images asked a counting question. An image asked a spatial question has >= 2 objects,
    two of them in different rows and columns, so every relation can be asked both ways.
    """
    asked = "counting" in families
    kind = _balanced(rng, ["shape", "colour"], counts["counting"] if asked else Counter())
    values = SHAPES if kind == "shape" else tuple(COLOURS)
    value = rng.choice(values)
    max_count = min(MAX_OBJECTS, len(OBJECTS) // len(values))
    count = _balanced(rng, list(range(max_count + 1)),
                      counts[f"counting/{kind}"] if asked else Counter())
    attribute = 1 if kind == "shape" else 0
    matching = [pair for pair in OBJECTS if pair[attribute] == value]
    others = [pair for pair in OBJECTS if pair[attribute] != value]
    n = rng.randint(max(count, 2 if "spatial" in families else 1), MAX_OBJECTS)
    pairs = rng.sample(matching, count) + rng.sample(others, n - count)
    rng.shuffle(pairs)
    while True:
        cells = [divmod(cell, GRID) for cell in rng.sample(range(GRID * GRID), n)]
        if n == 1 or any(a[0] != b[0] and a[1] != b[1] for a in cells for b in cells):
            break
    edges = [round(k * size / GRID) for k in range(GRID + 1)]
    patch = size // (GRID * PATCHES_PER_CELL)
    objects = []
    for (colour, shape), (row, column) in zip(pairs, cells, strict=True):
        object_size = rng.choice(SIZES)
        if version == 1:
            side = round(SIZE_FRACTION[object_size] * size)
            # A 1 px margin inside the cell keeps objects in neighbouring cells apart.
            x0 = rng.randint(edges[column] + 1, max(edges[column] + 1, edges[column + 1] - 1 - side))
            y0 = rng.randint(edges[row] + 1, max(edges[row] + 1, edges[row + 1] - 1 - side))
        else:
            block = BLOCK[object_size]
            side = block * patch - 1
            x0 = edges[column] + rng.randint(0, PATCHES_PER_CELL - block) * patch + 1
            y0 = edges[row] + rng.randint(0, PATCHES_PER_CELL - block) * patch + 1
        objects.append(_Object(colour, shape, object_size, (row, column), (x0, y0, x0 + side - 1, y0 + side - 1)))
    return _Scene(families, tuple(objects), kind, value)


def _render(objects: tuple[_Object, ...], size: int, rng: np.random.Generator, version: int) -> Image.Image:
    """Grey background with faint stripes (half the images) and low-contrast speckles, clutter from
    version 2 on, then the objects."""
    base = rng.integers(100, 157) + rng.integers(-8, 9, size=3)  # a grey with a faint tint
    pixels = np.empty((size, size, 3), dtype=np.int16)
    pixels[:] = base
    if rng.random() < 0.5:
        half_period, amplitude = int(rng.integers(2, 6)), int(rng.integers(3, 8))
        stripes = (np.arange(size) // half_period % 2 * amplitude).astype(np.int16)
        pixels += stripes[:, None, None] if rng.random() < 0.5 else stripes[None, :, None]
    speckles = size * size // 40
    ys, xs = rng.integers(0, size, size=(2, speckles))
    pixels[ys, xs] += rng.integers(-30, 31, size=(speckles, 1), dtype=np.int16)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    if version >= 2:
        _draw_clutter(draw, size, base, rng)
    for o in objects:
        _draw_shape(draw, o.shape, o.bbox, COLOURS[o.colour])
    return image


def _draw_clutter(draw: ImageDraw.ImageDraw, size: int, base: np.ndarray, rng: np.random.Generator) -> None:
    """Low-saturation distractors anywhere (objects are drawn over them): blobs, bars and strokes in
    greys darker or lighter than the background, each with a faint tint, none of them a named object."""
    for _ in range(int(rng.integers(CLUTTER_ITEMS[0], CLUTTER_ITEMS[1] + 1))):
        kind = int(rng.integers(0, 3))
        grey = int(base.mean()) + int(rng.choice([-1, 1])) * int(rng.integers(20, 56))
        fill = tuple(int(v) for v in np.clip(grey + rng.integers(-10, 11, size=3), 0, 255))
        x0, y0 = (int(v) for v in rng.integers(0, size, size=2))
        w, h = (int(v) for v in rng.integers(3, 13, size=2))
        if kind == 0:
            draw.ellipse((x0, y0, x0 + w, y0 + h), fill=fill)
        elif kind == 1:
            draw.rectangle((x0, y0, x0 + w, y0 + max(1, h // 4)), fill=fill)
        else:
            draw.line((x0, y0, x0 + int(rng.integers(-12, 13)), y0 + int(rng.integers(-12, 13))), fill=fill,
                      width=int(rng.integers(1, 3)))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, bbox: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = bbox
    if shape == "circle":
        draw.ellipse(bbox, fill=fill)
    elif shape == "square":
        draw.rectangle(bbox, fill=fill)
    else:
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)


def object_patches(scene: str, image_size: int, side: int) -> np.ndarray:
    """[side, side]: which object covers each patch of a side x side patch grid, as 1 + its index in the
    scene JSON, 0 for background. A patch is covered when at least an eighth of its pixels are the
    object's (drawn as `generate_split` draws it); an image_size-px image's patches are image_size/side px."""
    if image_size % side:
        raise ShortLVLMError(f"a {image_size} px image does not split into {side} x {side} whole patches.")
    patch = image_size // side
    owner = np.zeros((side, side), dtype=np.int64)
    most = np.zeros((side, side), dtype=np.int64)
    for k, o in enumerate(json.loads(scene)):
        mask = Image.new("L", (image_size, image_size))
        _draw_shape(ImageDraw.Draw(mask), o["shape"], tuple(o["bbox"]), 1)
        pixels = np.asarray(mask, dtype=np.int64).reshape(side, patch, side, patch).sum(axis=(1, 3))
        take = (pixels * 8 >= patch * patch) & (pixels > most)
        owner[take], most[take] = k + 1, pixels[take]
    return owner


def _ask_existence(rng: random.Random, scene: _Scene, counts: dict[str, Counter], popular: list) -> dict:
    """POPE: "yes" for a present object; "no" for an absent one drawn by the question's setting."""
    setting = _balanced(rng, list(POPE_SETTINGS), counts["existence"])
    present = [(o.colour, o.shape) for o in scene.objects]
    absent = [pair for pair in OBJECTS if pair not in present]
    negatives = {
        "random": absent,
        "popular": [pair for pair in popular if pair not in present][:POPULAR_TOP_K],
        # POPE's co-occurring objects: here, absent objects sharing a colour or a shape with a present one.
        "adversarial": [pair for pair in absent if any(pair[0] == c or pair[1] == s for c, s in present)],
    }[setting]
    answer = _balanced(rng, ["yes", "no"], counts[f"existence/{setting}"])
    colour, shape = rng.choice(present if answer == "yes" else negatives)
    return {"question": EXISTENCE_Q.format(colour=colour, shape=shape), "answer": answer, "pope_setting": setting}


def _ask_attribute(rng: random.Random, scene: _Scene, counts: dict[str, Counter], popular: list) -> dict:
    """Colour of a shape, shape of a colour, or size of an object: only where the reference is unique."""
    shapes = Counter(o.shape for o in scene.objects)
    colours = Counter(o.colour for o in scene.objects)
    candidates = {
        "colour": [o for o in scene.objects if shapes[o.shape] == 1],
        "shape": [o for o in scene.objects if colours[o.colour] == 1],
        "size": list(scene.objects),  # (colour, shape) pairs are distinct within a scene
    }
    template = _balanced(rng, [t for t, objects in candidates.items() if objects], counts["attribute"])
    answers = list(dict.fromkeys(getattr(o, template) for o in candidates[template]))
    answer = _balanced(rng, answers, counts[f"attribute/{template}"])
    target = rng.choice([o for o in candidates[template] if getattr(o, template) == answer])
    return {"question": ATTRIBUTE_Q[template].format(colour=target.colour, shape=target.shape), "answer": answer}


def _ask_counting(rng: random.Random, scene: _Scene, counts: dict[str, Counter], popular: list) -> dict:
    """How many objects of the scene's planned shape or colour; the plan balanced the answers."""
    count = sum(getattr(o, scene.count_kind) == scene.count_value for o in scene.objects)
    return {"question": COUNTING_Q[scene.count_kind].format(value=scene.count_value), "answer": str(count)}


def _ask_spatial(rng: random.Random, scene: _Scene, counts: dict[str, Counter], popular: list) -> dict:
    """Yes/no about one relation between two objects in different columns (left/right) or rows (above/below)."""
    relation = _balanced(rng, list(RELATIONS), counts["spatial"])
    axis = 1 if relation in ("left", "right") else 0
    sign = -1 if relation in ("left", "above") else 1
    answer = _balanced(rng, ["yes", "no"], counts[f"spatial/{relation}"])
    pairs = [
        (a, b) for a in scene.objects for b in scene.objects
        if a.cell[axis] != b.cell[axis] and ((a.cell[axis] - b.cell[axis]) * sign > 0) == (answer == "yes")
    ]
    a, b = rng.choice(pairs)
    return {"question": SPATIAL_Q[relation].format(a=a.name, b=b.name), "answer": answer}


def _ask_multiple_choice(rng: random.Random, scene: _Scene, counts: dict[str, Counter], popular: list) -> dict:
    """Four objects, exactly one present; the correct letter is balanced over A-D."""
    letter = _balanced(rng, list(LETTERS), counts["multiple_choice"])
    present = [o.name for o in scene.objects]
    options = rng.sample([f"{c} {s}" for c, s in OBJECTS if f"{c} {s}" not in present], len(LETTERS) - 1)
    options.insert(LETTERS.index(letter), rng.choice(present))
    return {"question": _mc_question(options), "answer": letter, "options": options}


def _mc_question(options: list[str]) -> str:
    return MC_Q.format(options="\n".join(f"{letter}. {text}" for letter, text in zip(LETTERS, options, strict=True)))


_ASK = {
    "existence": _ask_existence,
    "attribute": _ask_attribute,
    "counting": _ask_counting,
    "spatial": _ask_spatial,
    "multiple_choice": _ask_multiple_choice,
}


def _encode_images(rows: list[dict]) -> list[dict]:
    """Rows with each image as PNG bytes, encoded once per image rather than once per question."""
    png: dict[str, bytes] = {}
    encoded = []
    for row in rows:
        if row["image_id"] not in png:
            buffer = io.BytesIO()
            row["image"].save(buffer, "PNG")
            png[row["image_id"]] = buffer.getvalue()
        encoded.append({**row, "image": {"bytes": png[row["image_id"]], "path": None}})
    return encoded


def _write_llava(split: datasets.Dataset, out_dir: Path) -> None:
    """The split as LLaVA conversations (one record per question) with its images as PNG files."""
    import datasets

    (out_dir / "images").mkdir(parents=True)
    records, written = [], set()
    for row in split.cast_column("image", datasets.Image(decode=False)):
        image = f"images/{row['image_id']}.png"
        if image not in written:
            (out_dir / image).write_bytes(row["image"]["bytes"])
            written.add(image)
        records.append({"id": row["id"], "image": image, "conversations": [
            {"from": "human", "value": f"<image>\n{row['question']}"},
            {"from": "gpt", "value": row["answer"]},
        ]})
    (out_dir / "llava.json").write_text(json.dumps(records, indent=1) + "\n")
