"""The evaluation matrix: configs expand into arms, results into tables and a plot, and bad configs are refused."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.evaluation.matrix import Arm, Matrix, load_config, pareto_front, write_tables
from shortlvlm_vllm.serving.vllm_plugin import SHORT_LLAVA_ARCHITECTURE

CONFIGS = Path(__file__).parent.parent / "eval" / "configs"


def test_shipped_configs_expand_to_the_arms_the_issue_asks_for():
    ablation = load_config(CONFIGS / "ablation.yaml")
    names = [arm.name for arm in ablation.arms]
    assert names[0] == "full" and len(names) == 1 + 3 * 4  # unpruned once, then 2 localizers x 2 compensations
    assert {"all-tokens+none-10%", "tis+none-20%", "all-tokens+scp-30%", "tis+scp-30%"} <= set(names)
    stacking = load_config(CONFIGS / "stacking.yaml")
    assert len(stacking.arms) == 5 * 3
    assert {arm.quantize for arm in stacking.arms} == {"none", "gptq", "awq"}
    assert sorted({arm.ratio for arm in stacking.arms}) == [0.0, 0.1, 0.2, 0.3, 0.4]


def test_token_axis_expands_names_and_serves_the_budget_through_hf_overrides(tiny_llava, tmp_path):
    config = load_config(CONFIGS / "stacking_tokens.yaml")
    names = [arm.name for arm in config.arms]
    assert len(names) == 3 * 2 * 4  # TIS+SCP 0/30/40% x none/GPTQ x 100/50/25/12.5% of the tokens
    assert names[:4] == ["full", "full+tokens-50%", "full+tokens-25%", "full+tokens-12%"]
    assert {"tis+scp-40%+gptq+tokens-12%", "tis+scp-30%+tokens-50%"} <= set(names)
    random = load_config(CONFIGS / "tokens_random.yaml")
    assert [arm.name for arm in random.arms] == [
        "full", "full+tokens-50%", "full+tokens-50%-random", "full+tokens-25%", "full+tokens-25%-random",
        "full+tokens-12%", "full+tokens-12%-random"]
    assert [Arm(0.0, "-", "-", "none", t).visual_tokens(81) for t in (1.0, 0.5, 0.25, 0.125)] == [81, 40, 20, 10]
    config.server = {"max_model_len": 512, "extra_args": ["--seed", "1"]}
    matrix = Matrix(config, tmp_path)
    assert matrix.server_kwargs(Arm(0.0, "-", "-", "none"), tiny_llava) == (config.server, None)
    kwargs, budget = matrix.server_kwargs(Arm(0.3, "tis", "scp", "gptq", 0.25), tiny_llava)
    assert budget == 16 and kwargs["max_model_len"] == 512
    assert kwargs["extra_args"][:3] == ["--seed", "1", "--hf-overrides"]
    overrides = json.loads(kwargs["extra_args"][3])
    assert overrides["architectures"] == [SHORT_LLAVA_ARCHITECTURE] and overrides["short_lvlm"]["visual_tokens"] == 16
    random_kwargs, _ = matrix.server_kwargs(Arm(0.0, "-", "-", "none", 0.25, "random"), tiny_llava)
    overrides = json.loads(random_kwargs["extra_args"][-1])
    assert overrides["short_lvlm"] == {"visual_tokens": 16, "visual_token_selection": "random"}


@pytest.mark.parametrize(("text", "message"), [
    ("model: toy\n", "grid"),
    ("model: toy\ngrid: {ratio: [0.1], depth: [2]}\n", "unknown axes"),
    ("model: toy\ngrid: {ratio: [1.5]}\n", "ratio 1.5"),
    ("model: toy\ngrid: {token_fraction: [0]}\n", "token_fraction 0.0 must be in"),
    ("model: toy\ngrid: {token_fraction: [0.5], token_selection: [best]}\n", "token_selection 'best'"),
    ("grid: {ratio: [0.1]}\n", "name the model"),
    ("model: toy\ngrid: {ratio: [0.1]}\nbenchmrk: {}\n", "unknown keys"),
    ("model: toy\ngrid: {ratio: [0.1\n", "not valid YAML"),
])
def test_bad_configs_are_refused_with_the_problem_named(tmp_path, text, message):
    path = tmp_path / "matrix.yaml"
    path.write_text(text)
    with pytest.raises(ShortLVLMError, match=message):
        load_config(path)
    with pytest.raises(ShortLVLMError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_pareto_front_keeps_only_undominated_points():
    points = [(0.9, 10.0), (0.8, 12.0), (0.7, 11.0), (0.9, 9.0), (0.6, 15.0)]
    assert pareto_front(points) == [0, 1, 4]


def _result(arm: Arm, accuracy: float, tokens_per_s: float) -> dict:
    return {
        "ratio": arm.ratio, "localize": arm.localize, "compensate": arm.compensate, "quantize": arm.quantize,
        "arm": arm.name, "layers": 16, "accuracy": {"accuracy": accuracy, "accuracy/existence": accuracy},
        "throughput": {"request_throughput": 1.0, "output_throughput": tokens_per_s, "median_ttft_ms": 50.0,
                       "median_tpot_ms": 10.0},
    }


def test_tables_and_plot_hold_every_arm(tmp_path):
    arms = [Arm(0.0, "-", "-", "none"), Arm(0.3, "tis", "scp", "none"), Arm(0.3, "tis", "none", "gptq")]
    results = [_result(arms[0], 0.95, 100.0), _result(arms[1], 0.90, 140.0), _result(arms[2], 0.80, 130.0)]
    write_tables(results, tmp_path)
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["arm"] for r in rows] == ["full", "tis+scp-30%", "tis+none-30%+gptq"]
    assert [r["pareto"] for r in rows] == ["True", "True", "False"]
    assert rows[1]["existence"] == "0.9" and rows[1]["output_tok_per_s"] == "140.0"
    markdown = (tmp_path / "results.md").read_text().splitlines()
    assert len(markdown) == 2 + 3 and "tis+scp-30%" in markdown[3]
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert (tmp_path / "accuracy_vs_throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_directory_measured_on_other_weights_is_not_resumed(tiny_llava, tmp_path):
    """Arms are reused by name and checkpoints by recipe: a model retrained in place must not be mixed in."""
    model = tmp_path / "model"
    shutil.copytree(tiny_llava, model)
    out = tmp_path / "out"
    config = load_config(CONFIGS / "stacking_tokens.yaml")
    config.model = str(model)
    Matrix(config, out).check_source()
    Matrix(config, out).check_source()  # same weights: resumes
    retrained = {**json.loads((model / "config.json").read_text()), "retrained": True}
    (model / "config.json").write_text(json.dumps(retrained))
    with pytest.raises(ShortLVLMError, match="another version of .*delete"):
        Matrix(config, out).check_source()
    legacy = tmp_path / "legacy"
    (legacy / "arms" / "full").mkdir(parents=True)
    (legacy / "arms" / "full" / "result.json").write_text("{}")
    with pytest.raises(ShortLVLMError, match="did not record"):
        Matrix(config, legacy).check_source()
