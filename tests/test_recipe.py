"""The prune recipe: flags build it, the output holds it resolved, and pruning again with it gives the same weights."""

from __future__ import annotations

import os
import re
import shutil

import pytest
import yaml

from shortlvlm_vllm.cli import main
from shortlvlm_vllm.prune.recipe import RECIPE_NAME, load_recipe
from tests.test_same_bytes import weights_sha256


def test_pruning_again_with_the_written_recipe_gives_the_same_weights(tiny_llava, llava_calib, tmp_path, monkeypatch):
    # The user names the source by a relative path: the recipe and the model card keep that name.
    shutil.copytree(tiny_llava, tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)
    assert main(["prune", "tiny", "--ratio", "0.25", "--calib", str(llava_calib), "--num-samples", "12",
                 "--heldout", "2", "--rank", "8", "--top-p", "0.2", "-o", "first"]) == 0
    written = yaml.safe_load((tmp_path / "first" / RECIPE_NAME).read_text())
    assert written["model"] == "tiny" and written["ratio"] == 0.25 and written["top_p"] == 0.2
    assert written["compensation"] == {"method": "scp", "rank": 8, "target": "down_proj", "pairing": "nearest",
                                       "shared": "stack"}
    assert written["calibration"]["num_samples"] == 12 and written["calibration"]["heldout"] == 2
    assert (tmp_path / "first" / "README.md").read_text().splitlines()[3].startswith("# tiny, 2 of 8 decoder layers")

    assert main(["prune", "--recipe", str(tmp_path / "first" / RECIPE_NAME), "-o", "second"]) == 0
    assert weights_sha256(tmp_path / "second") == weights_sha256(tmp_path / "first")
    assert (tmp_path / "second" / RECIPE_NAME).read_text() == (tmp_path / "first" / RECIPE_NAME).read_text()
    # MODEL beside --recipe replaces the recipe's model: the same recipe on another checkpoint.
    shutil.copytree(tiny_llava, tmp_path / "other")
    assert main(["prune", "other", "--recipe", str(tmp_path / "first" / RECIPE_NAME), "--dry-run"]) == 0


def test_a_hand_written_recipe_takes_the_defaults_it_leaves_out(tiny_llava, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"model: {tiny_llava}\ndrop_layers: [2, 6]\ncompensation: {{method: none}}\n")
    recipe = load_recipe(path)
    assert recipe.localize == "tis" and recipe.compensation.rank == 64 and recipe.calibration is None
    assert main(["prune", "--recipe", str(path), "-o", str(tmp_path / "out")]) == 0
    assert load_recipe(tmp_path / "out" / RECIPE_NAME) == recipe


@pytest.mark.parametrize(("text", "flags", "message"), [
    ("model: x\nratio: 0.3\nlocalise: tis\n", [], "unknown keys localise; the keys are model, revision"),
    ("model: x\ncompensation: {method: scp, rnak: 4}\n", [], "unknown keys compensation.rnak"),
    ("- a list\n", [], "expected a mapping of settings"),
    ("model: x\nratio: [0.3\n", [], "is not valid YAML"),
    ("model: x\nratio: 0.3\n", ["--ratio", "0.2", "--top-p", "0.5"], "drop --ratio, --top-p, or edit the recipe"),
    (None, [], "does not exist"),
], ids=["unknown-key", "unknown-nested-key", "not-a-mapping", "bad-yaml", "flags-beside-recipe", "missing"])
def test_bad_recipes_are_refused_by_name(tmp_path, capsys, text, flags, message):
    path = tmp_path / "recipe.yaml"
    if text is not None:
        path.write_text(text)
    assert main(["prune", "--recipe", str(path), "-o", str(tmp_path / "out"), *flags]) == 2
    assert re.search(re.escape(message), capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_prune_without_model_or_recipe_says_what_is_missing(tmp_path, capsys):
    assert main(["prune", "-o", str(tmp_path / "out")]) == 2
    assert "name the source checkpoint (MODEL), or pass --recipe" in capsys.readouterr().err
    assert not os.listdir(tmp_path)
