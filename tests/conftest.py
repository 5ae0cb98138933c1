"""Shared fixtures: tiny LLaVA, Qwen2-VL, Qwen2.5-VL, mPLUG-Owl2 and Qwen-VL-Chat checkpoints built once per test
session, offline."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from shortlvlm_vllm.checkpoint.reader import open_checkpoint
from shortlvlm_vllm.checkpoint.surgery import write_pruned_checkpoint
from shortlvlm_vllm.cli import main
from shortlvlm_vllm.data.calibration import CalibrationSource
from shortlvlm_vllm.models import register_with_transformers
from shortlvlm_vllm.prune.compensate import CompensationSettings
from shortlvlm_vllm.prune.pipeline import plan_pruning, write_plan
from shortlvlm_vllm.prune.recipe import PruneRecipe
from shortlvlm_vllm.tiny_models import build_tiny_llava
from tests.tiny_mplug_owl2 import build_tiny_mplug_owl2
from tests.tiny_qwen import build_tiny_qwen
from tests.tiny_qwen_vl import build_tiny_qwen_vl

register_with_transformers()  # the Auto classes the tests call load mPLUG-Owl2 and Qwen-VL-Chat as prune does
DROPPED = [3, 5]
ARCHITECTURES = ("llava", "qwen2_vl", "qwen2_5_vl", "mplug_owl2", "qwen")
# Qwen resizes images to multiples of 28 pixels: these two sizes give 9 and 35 image tokens.
IMAGE_SIZES = ((96, 80), (200, 150))


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("models") / "tiny-llava")


@pytest.fixture(scope="session")
def tiny_qwen2_vl(tmp_path_factory) -> Path:
    return build_tiny_qwen_vl(tmp_path_factory.mktemp("models") / "tiny-qwen2-vl", "qwen2_vl")


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl(tmp_path_factory) -> Path:
    return build_tiny_qwen_vl(tmp_path_factory.mktemp("models") / "tiny-qwen2.5-vl", "qwen2_5_vl")


@pytest.fixture(scope="session")
def tiny_mplug_owl2(tmp_path_factory) -> Path:
    return build_tiny_mplug_owl2(tmp_path_factory.mktemp("models") / "tiny-mplug-owl2")


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> Path:
    """Qwen-VL-Chat in the original remote-code layout."""
    return build_tiny_qwen(tmp_path_factory.mktemp("models") / "tiny-qwen")


@pytest.fixture(scope="session", params=ARCHITECTURES)
def tiny_vlm(request) -> Path:
    """The tiny checkpoint of each supported architecture in turn."""
    return request.getfixturevalue(f"tiny_{request.param}")


@pytest.fixture(scope="session")
def pruned_llava(tiny_llava, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "tiny-llava-pruned"
    return write_pruned_checkpoint(open_checkpoint(tiny_llava), out, DROPPED, {"method": "explicit"})


@pytest.fixture(scope="session")
def llava_calib(tmp_path_factory) -> Path:
    """A LLaVA-format conversation file with 40 image questions, images of two sizes."""
    root = tmp_path_factory.mktemp("calib")
    (root / "images").mkdir()
    records = []
    for i in range(40):
        random_image(100 + i, IMAGE_SIZES[i % 2]).save(root / "images" / f"{i}.png")
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
    recipe = PruneRecipe(ratio=0.25, compensation=CompensationSettings(rank=16),
                         calibration=CalibrationSource(str(llava_calib), num_samples=24))
    return write_plan(src, tmp_path_factory.mktemp("models") / "tiny-llava-tis-scp", recipe, plan_pruning(src, recipe))


def _cli_tis_scp(source: Path, calib: Path, out: Path) -> Path:
    """`shortlvlm prune` by TIS with SCP folded in, 25% of the layers, as a user runs it."""
    assert main(["prune", str(source), "--ratio", "0.25", "--calib", str(calib), "--num-samples", "24",
                 "--heldout", "4", "--rank", "16", "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def scp_pruned_qwen2_vl(tiny_qwen2_vl, llava_calib, tmp_path_factory) -> Path:
    return _cli_tis_scp(tiny_qwen2_vl, llava_calib, tmp_path_factory.mktemp("models") / "tiny-qwen2-vl-tis-scp")


@pytest.fixture(scope="session")
def scp_pruned_qwen2_5_vl(tiny_qwen2_5_vl, llava_calib, tmp_path_factory) -> Path:
    return _cli_tis_scp(tiny_qwen2_5_vl, llava_calib, tmp_path_factory.mktemp("models") / "tiny-qwen2.5-vl-tis-scp")


@pytest.fixture(scope="session")
def scp_pruned_mplug_owl2(tiny_mplug_owl2, llava_calib, tmp_path_factory) -> Path:
    return _cli_tis_scp(tiny_mplug_owl2, llava_calib, tmp_path_factory.mktemp("models") / "tiny-mplug-owl2-tis-scp")


@pytest.fixture(scope="session")
def scp_pruned_qwen(tiny_qwen, llava_calib, tmp_path_factory) -> Path:
    return _cli_tis_scp(tiny_qwen, llava_calib, tmp_path_factory.mktemp("models") / "tiny-qwen-tis-scp")


@pytest.fixture(scope="session", params=ARCHITECTURES)
def scp_pruned_vlm(request) -> Path:
    """Each architecture's tiny checkpoint pruned 25% by TIS with SCP folded in."""
    return request.getfixturevalue(f"scp_pruned_{request.param}")


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
