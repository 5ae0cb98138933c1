"""Shared fixtures: tiny LLaVA checkpoints built once per test session, offline."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from shortlvlm_vllm.checkpoint import open_checkpoint, write_pruned_checkpoint
from shortlvlm_vllm.fixtures import build_tiny_llava

DROPPED = [3, 5]


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("models") / "tiny-llava")


@pytest.fixture(scope="session")
def pruned_llava(tiny_llava, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "tiny-llava-pruned"
    return write_pruned_checkpoint(open_checkpoint(tiny_llava), out, DROPPED, {"method": "explicit"})


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
