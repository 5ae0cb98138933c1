"""`shortlvlm prune --ratio`: the whole pipeline from the command line, and its bad input."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from PIL import Image

from shortlvlm_vllm.cli import main


def test_record_plot_and_card(scp_pruned_vlm):
    record = json.loads((scp_pruned_vlm / "config.json").read_text())["short_lvlm"]
    assert record["method"] == "tis" and record["ratio"] == 0.25 and record["candidates"] == [4, 5, 6, 7]
    assert len(record["pruned_layers"]) == 2 and set(record["pruned_layers"]) <= {4, 5, 6, 7}
    assert record["compensation"] == "scp" and record["rank"] == 16 and record["scp_target"] == "down_proj"
    assert set(map(int, record["compensation_pairs"])) == set(record["pruned_layers"])
    assert {"tis", "all-tokens", "text-only", "visual-only", "angular-block"} <= set(record["scores"])
    assert record["calibration"]["num_samples_used"] == 24 and record["top_p"] == 0.1
    tis = {int(k): v for k, v in record["scores"]["tis"].items()}
    assert sorted(record["pruned_layers"]) == sorted(sorted(tis, key=lambda k: (tis[k], k))[-2:])
    with Image.open(scp_pruned_vlm / "short_lvlm_scores.png") as plot:
        assert plot.size[0] > 400
    assert "short_lvlm_scores.png" in (scp_pruned_vlm / "README.md").read_text()


def test_the_card_of_a_tis_scp_prune_of_the_toy_shows_the_feature_gap(tmp_path):
    """The paper's Fig. 6 for the user's own model: each pruned layer's features and its kept partner's, before and
    after SCP, beside the score plot, with the gap in numbers."""
    from shortlvlm_vllm.toy import TOY_MODEL_DIR

    out = tmp_path / "toy-tis-scp"
    assert main(["prune", str(TOY_MODEL_DIR), "--ratio", "0.3", "--calib", "synthetic", "--num-samples", "32",
                 "--heldout", "8", "--rank", "16", "--scp-pairing", "nearest", "-o", str(out)]) == 0
    record = json.loads((out / "config.json").read_text())["short_lvlm"]
    gap = record["feature_gap"]
    assert gap["samples"] == "8 held-out samples"
    bridged = {(b["pruned"], b["kept"]) for b in gap["bridges"]}
    assert bridged == {(p, r) for p, r in ((int(p), r) for p, r in record["compensation_pairs"].items())}
    assert all(b["before"] > 0 and b["after"] > 0 for b in gap["bridges"])
    assert record["figures"] == {"Layer scores": "short_lvlm_scores.png",
                                 "Feature gap (the paper's Fig. 6)": "short_lvlm_feature_gap.png"}
    with Image.open(out / "short_lvlm_feature_gap.png") as figure:
        assert figure.size[0] > 400
    card = (out / "README.md").read_text()
    assert "![Feature gap (the paper's Fig. 6)](short_lvlm_feature_gap.png)" in card
    assert "## Feature gap in numbers" in card
    assert f"Mean over the gaps: {gap['mean_before']:.4g} -> {gap['mean_after']:.4g}" in card
    first = gap["bridges"][0]
    assert f"| {first['pruned']} | {first['kept']} | {first['before']:.4g} " in card


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_llava, llava_calib, tmp_path, capsys):
    args = ["prune", str(tiny_llava), "--ratio", "0.25", "--calib", str(llava_calib), "--num-samples", "8",
            "--heldout", "0", "--rank", "4", "--localize", "angular-block", "--dry-run", "-o", str(tmp_path / "o")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert re.search(r"prune 2 layers by angular-block: \[\d, \d\]", out) and "dry run" in out
    assert list(tmp_path.iterdir()) == []


def test_explicit_layers_with_scp(tiny_llava, llava_calib, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["prune", str(tiny_llava), "--drop-layers", "2,6", "--calib", str(llava_calib),
                 "--num-samples", "8", "--heldout", "2", "--rank", "4", "--scp-target", "down_proj+o_proj",
                 "-o", str(out)]) == 0
    record = json.loads((out / "config.json").read_text())["short_lvlm"]
    assert record["pruned_layers"] == [2, 6] and record["method"] == "explicit"
    assert record["compensation_pairs"] == {"2": 1, "6": 5} and record["scp_target"] == "down_proj+o_proj"


def _no_images(tmp_path, _):
    path = tmp_path / "text-only.json"
    path.write_text(json.dumps([{"id": "t1", "conversations": [{"from": "human", "value": "Hi"},
                                                                {"from": "gpt", "value": "Hello"}]}]))
    return ["--calib", str(path)]


def _not_vlm(tmp_path, tiny):
    model = shutil.copytree(tiny, tmp_path / "llama")
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (model / "config.json").write_text(json.dumps(config))
    return ["MODEL", str(model)]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ratio", "0"], "ratio must be > 0"),
        (["--ratio", "-0.2"], "ratio must be > 0"),
        (["--ratio", "0.6"], "--force"),
        (["--ratio", "1.0", "--force"], "ratio"),
        (["--rank", "64"], r"--rank 64 must be between 1 and min\(N, D\) = min\(8 samples"),
        (["--rank", "200", "--num-samples", "256"], r"hidden size 128"),
        (["--rank", "60", "--num-samples", "500"], "larger than the 40 calibration samples"),
        (_no_images, "no samples with images"),
        (_not_vlm, "not a supported vision-language checkpoint.*Supported model types: llava, qwen2_vl"),
        (["--no-calib"], "needs calibration data: pass --calib"),
        (["--localize", "tis", "--candidates", "2-99"], "out of range"),
    ],
    ids=["zero", "negative", "above-half", "one", "rank>N", "rank>D", "rank>available", "no-images", "not-vlm",
         "no-calib", "candidates"],
)
def test_bad_input_is_a_clear_error_and_writes_nothing(tiny_llava, llava_calib, tmp_path, capsys, extra, message):
    model, calib = str(tiny_llava), ["--calib", str(llava_calib)]
    if callable(extra):
        extra = extra(tmp_path, tiny_llava)
    if extra[:1] == ["MODEL"]:
        model, extra = extra[1], []
    if extra[:1] == ["--calib"]:
        calib, extra = extra, []
    if extra == ["--no-calib"]:
        calib, extra = [], []
    args = ["prune", model, "-o", str(tmp_path / "out"), "--num-samples", "8", "--heldout", "0", "--rank", "4",
            *calib, *extra]
    if "--ratio" not in args:
        args += ["--ratio", "0.25"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err), err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
