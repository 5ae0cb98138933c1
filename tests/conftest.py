"""Shared fixtures: tiny LLaVA checkpoints built once per test session, offline."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from shortlvlm_vllm.checkpoint import open_checkpoint, write_pruned_checkpoint
from shortlvlm_vllm.fixtures import build_tiny_llava
from shortlvlm_vllm.prune import CalibrationSource, PruneRecipe, plan_pruning, write_plan

DROPPED = [3, 5]


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("models") / "tiny-llava")


@pytest.fixture(scope="session")
def pruned_llava(tiny_llava, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "tiny-llava-pruned"
    return write_pruned_checkpoint(open_checkpoint(tiny_llava), out, DROPPED, {"method": "explicit"})


@pytest.fixture(scope="session")
def llava_calib(tmp_path_factory) -> Path:
    """A LLaVA-format conversation file with 40 image questions."""
    root = tmp_path_factory.mktemp("calib")
    (root / "images").mkdir()
    records = []
    for i in range(40):
        random_image(100 + i).save(root / "images" / f"{i}.png")
        records.append({"id": f"sample-{i}", "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colours are in the picture?"},
            {"from": "gpt", "value": "Several coloured rectangles on a plain background."},
        ]})
    (root / "llava.json").write_text(json.dumps(records))
    return root / "llava.json"


@pytest.fixture(scope="session")
def scp_pruned_llava(tiny_llava, llava_calib, tmp_path_factory) -> Path:
    """The tiny LLaVA pruned 25% by TIS with SCP folded in."""
    src = open_checkpoint(tiny_llava)
    recipe = PruneRecipe(ratio=0.25, rank=16, calibration=CalibrationSource(str(llava_calib), num_samples=24))
    return write_plan(src, tmp_path_factory.mktemp("models") / "tiny-llava-tis-scp", recipe, plan_pruning(src, recipe))


def random_image(seed: int, size: tuple[int, int] = (96, 80)) -> Image.Image:
    """A deterministic picture with a few coloured shapes."""
    rng = random.Random(seed)
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x, y = rng.randrange(size[0] - 20), rng.randrange(size[1] - 20)
        draw.rectangle((x, y, x + rng.randrange(8, 20), y + rng.randrange(8, 20)),
                       fill=tuple(rng.randrange(256) for _ in range(3)))
    return image
