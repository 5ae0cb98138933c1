"""The evaluation matrix: configs expand into arms, results into tables and a plot, and bad configs are refused."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.evaluation.matrix import Arm, Matrix, MatrixConfig, load_config
from shortlvlm_vllm.evaluation.tables import pareto_front, write_tables
from shortlvlm_vllm.serving.visual_tokens import fraction_token_count
from shortlvlm_vllm.serving.vllm_plugin import (
    MROPE_RECOMPUTE_ARGS,
    SHORT_LLAVA_ARCHITECTURE,
    SHORT_QWEN2_VL_ARCHITECTURE,
)

CONFIGS = Path(__file__).parent.parent / "eval" / "configs"


def test_shipped_configs_expand_to_the_arms_the_issue_asks_for():
    ablation = load_config(CONFIGS / "ablation.yaml")
    names = [arm.name for arm in ablation.arms]
    # two grids: three localizers x four compensations, and the random localizer's ten seeds x two
    fixed = [arm for arm in ablation.arms if arm.ratio and arm.localize != "random"]
    random = [arm for arm in ablation.arms if arm.localize == "random"]
    assert {arm.localize_name for arm in fixed} == {"all-tokens", "tis", "angular-block"}
    assert sorted({arm.ratio for arm in ablation.arms}) == [0.0, 0.1, 0.2, 0.3, 0.4]
    assert {(arm.compensate, arm.scp_pairing) for arm in fixed} == {
        ("none", "nearest"), ("scp", "nearest"), ("scp", "block"), ("scp", "unique")}
    assert {(arm.compensate, arm.scp_pairing) for arm in random} == {("none", "nearest"), ("scp", "nearest")}
    assert sorted({arm.seed for arm in random}) == list(range(10))
    assert names[0] == "full" and len(fixed) == 4 * 3 * 4 and len(random) == 4 * 10 * 2
    assert len(names) == len(set(names)) == 1 + len(fixed) + len(random)
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


def test_arms_that_differ_only_in_their_visual_tokens_share_one_quantized_checkpoint(tiny_llava, tmp_path,
                                                                                       monkeypatch):
    import shortlvlm_vllm.quantize.driver as driver

    quantized = []

    def fake_quantize(src, dst, recipe, overwrite):  # records the call; a quantization pass is slow and not the point
        quantized.append(Path(dst).name)
        Path(dst).mkdir(parents=True)
        (Path(dst) / "config.json").write_text("{}")

    monkeypatch.setattr(driver, "quantize_checkpoint", fake_quantize)
    config = MatrixConfig(model=str(tiny_llava), arms=[Arm(0.0, "-", "-", "gptq", t) for t in (1.0, 0.5, 0.25)])
    matrix = Matrix(config, tmp_path / "out", cache=tmp_path / "cache")
    assert len({matrix.checkpoint(arm) for arm in config.arms}) == 1
    assert len(quantized) == 1 and quantized[0].startswith("full_gptq-")


def test_qwen_token_fractions_take_their_share_of_the_largest_image(tiny_qwen2_vl, tmp_path):
    """Qwen2-VL's token count grows with the image: the adapter says to count the most an image gets under the
    processor's pixel limit (the fixture's 64 * 28 * 28 pixels: 64 merged tokens), and the arm's server gets the
    M-RoPE switch the budgeted class needs."""
    config = json.loads((tiny_qwen2_vl / "config.json").read_text())
    assert fraction_token_count(tiny_qwen2_vl, config) == 64
    matrix = Matrix(MatrixConfig(model=str(tiny_qwen2_vl), arms=[], server={"extra_args": ["--seed", "1"]}), tmp_path)
    kwargs, budget = matrix.server_kwargs(Arm(0.0, "-", "-", "none", 0.25), tiny_qwen2_vl)
    assert budget == 16
    assert kwargs["extra_args"][:4] == [*MROPE_RECOMPUTE_ARGS, "--seed", "1"]
    assert kwargs["extra_args"][4] == "--hf-overrides"
    overrides = json.loads(kwargs["extra_args"][5])
    assert overrides["architectures"] == [SHORT_QWEN2_VL_ARCHITECTURE]
    assert overrides["short_lvlm"]["visual_tokens"] == 16
    # The hub's own layout (Qwen/Qwen2-VL-2B-Instruct): a flat preprocessor_config.json with max_pixels.
    hub = shutil.copytree(tiny_qwen2_vl, tmp_path / "hub")
    (hub / "preprocessor_config.json").write_text(json.dumps({"max_pixels": 12845056, "min_pixels": 3136,
                                                              "patch_size": 14, "merge_size": 2}))
    assert fraction_token_count(hub, config) == 16384
    (hub / "preprocessor_config.json").write_text(json.dumps({"patch_size": 14, "merge_size": 2}))
    with pytest.raises(ShortLVLMError, match="pixel limit"):
        fraction_token_count(hub, config)


def test_token_fractions_of_an_architecture_without_visual_token_pruning(tiny_mplug_owl2):
    config = json.loads((tiny_mplug_owl2 / "config.json").read_text())
    with pytest.raises(ShortLVLMError, match="visual-token pruning does not apply to model type 'mplug_owl2'"):
        fraction_token_count(tiny_mplug_owl2, config)


@pytest.mark.parametrize(("text", "message"), [
    ("model: toy\n", "grid"),
    ("model: toy\ngrid: {ratio: [0.1], depth: [2]}\n", "unknown axes"),
    ("model: toy\ngrid: [{ratio: [0.1]}, 3]\n", "list of such grids"),
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


def _result(arm: Arm, correct: str, speeds: tuple[float, ...] | None, key: str, layers: int = 16) -> dict:
    from dataclasses import asdict

    from shortlvlm_vllm.evaluation.statistics import Spread

    result = {**asdict(arm), "arm": arm.name, "layers": layers, "pruned_layers": [], "weights_key": arm.name,
              "units": {"ids_sha256": "x", "correct": correct}, "throughput_key": key, "heldout_drift": None,
              "accuracy": {"accuracy": correct.count("1") / len(correct)}}
    if speeds:
        result["throughput"] = {"key": key, "measured_on": arm.name, "rounds": len(speeds),
                                **{f: Spread(speeds).as_dict() for f in ("output_throughput", "request_throughput",
                                                                         "median_ttft_ms", "median_tpot_ms")}}
    return result


def test_tables_carry_intervals_paired_tests_and_the_noise(tmp_path):
    n = 200
    full = "1" * 190 + "0" * 10  # 95%
    scp = "1" * 180 + "0" * 20  # 90%: 10 questions lost, none gained
    none = "1" * 179 + "0" * 21  # one question worse than scp: inside the noise
    arms = [Arm(0.0, "-", "-", "none"), Arm(0.3, "tis", "scp", "none"), Arm(0.3, "tis", "none", "none")]
    results = [_result(arms[0], full, (100.0, 104.0, 98.0), "16-layers"),
               _result(arms[1], scp, (140.0, 150.0, 145.0), "11-layers", 11),
               _result(arms[2], none, (140.0, 150.0, 145.0), "11-layers", 11)]
    (tmp_path / "units.json").write_text(json.dumps({"ids_sha256": "x", "ids": [str(i) for i in range(n)],
                                                     "groups": ["a", "b"] * (n // 2)}))
    write_tables(results, tmp_path)
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["arm"] for r in rows] == ["full", "tis+scp-30%", "tis+none-30%"]
    assert rows[1]["accuracy"] == "0.9" and float(rows[1]["accuracy_low"]) < 0.9 < float(rows[1]["accuracy_high"])
    assert float(rows[1]["vs_full"]) == -0.05 and float(rows[1]["vs_full_p"]) == pytest.approx(2 / 2**10, abs=1e-6)
    assert {"a", "b"} <= set(rows[0]) and rows[1]["output_tok_per_s"] == "145.0"
    table = json.loads((tmp_path / "results.json").read_text())
    (compared,) = table["comparisons"]
    assert (compared["a"], compared["b"]) == ("tis+scp-30%", "tis+none-30%")
    assert compared["only_a"] == 1 and compared["verdict"] == "no difference (inside the noise)"
    shapes = {t["key"]: t for t in table["throughput"]}
    assert shapes["11-layers"]["separated_from"] == ["16-layers"] and len(shapes["11-layers"]["arms"]) == 2
    assert "inside the noise" in (tmp_path / "comparisons.md").read_text()
    assert "95.0 [" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "accuracy_vs_throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_random_seeds_are_summarised_and_ratios_plotted(tmp_path):
    arms = [Arm(0.0, "-", "-", "none")] + [Arm(r, "random", "none", "none", seed=s) for r in (0.1, 0.2) for s in
                                           (0, 1, 2)] + [Arm(r, "tis", "none", "none") for r in (0.1, 0.2)]
    correct = {0: "1111", 0.1: ["1110", "1100", "1111"], 0.2: ["1000", "1100", "1110"]}
    results = [_result(arms[0], correct[0], None, "16-layers")]
    results += [_result(a, correct[a.ratio][a.seed], None, "k") for a in arms[1:7]]
    results += [_result(arms[7], "1111", None, "k"), _result(arms[8], "1110", None, "k")]
    assert [a.name for a in arms[1:4]] == ["random#0+none-10%", "random#1+none-10%", "random#2+none-10%"]
    write_tables(results, tmp_path)
    seeds = json.loads((tmp_path / "results.json").read_text())["random_seeds"]
    assert [s["ratio"] for s in seeds] == [0.1, 0.2]
    assert seeds[0]["mean"] == pytest.approx(0.75) and (seeds[0]["min"], seeds[0]["max"]) == (0.5, 1.0)
    assert seeds[1]["localizers_vs_seeds"]["tis"] == {"accuracy": 0.75, "seeds_below": 2, "seeds": 3}
    assert "| 20% | none | 3 | 50.0 +- 25.0 | 25.0 - 75.0 | tis 75.0 (above 2 of 3 seeds) |" in (
        tmp_path / "random_seeds.md").read_text()
    assert (tmp_path / "accuracy_by_ratio.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "accuracy_vs_throughput.png").exists()  # no throughput measured yet


def test_throughput_rounds_are_interleaved_per_shape_and_resumed(tmp_path, monkeypatch):
    """Round r of every shape runs before round r + 1 of any; a measured round is never rerun."""
    from types import SimpleNamespace

    from shortlvlm_vllm.evaluation import throughput as throughput_module
    from shortlvlm_vllm.serving import launcher

    order = []

    class FakeServer:
        def __init__(self, model, **kwargs):
            self.model, self.base_url, self.api_key = str(model), "http://fake/v1", "EMPTY"

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def fake_run(endpoints, requests, **kwargs):
        order.append(endpoints[0].model)
        figures = {"output_throughput": 10.0 * len(order), "request_throughput": 1.0, "median_ttft_ms": 5.0,
                   "median_tpot_ms": 1.0}
        return SimpleNamespace(to_dict=lambda: figures)

    monkeypatch.setattr(launcher, "VLLMServer", FakeServer)
    monkeypatch.setattr(throughput_module, "run_throughput", fake_run)
    config = MatrixConfig(model="toy", arms=[], benchmark={"name": "synthetic", "limit": 10},
                          throughput={"num_prompts": 2, "repeats": 2})
    matrix = Matrix(config, tmp_path)
    monkeypatch.setattr(matrix, "checkpoint", lambda arm: tmp_path)
    results = [{**_result(arm, "1", None, key), "arm": arm.name} for arm, key in (
        (Arm(0.0, "-", "-", "none"), "16-layers"), (Arm(0.3, "tis", "scp", "none"), "11-layers"),
        (Arm(0.3, "tis", "none", "none"), "11-layers"))]
    speeds = matrix.measure_throughput(results)
    assert order == ["full", "tis+scp-30%", "full", "tis+scp-30%"]
    assert speeds["16-layers"]["output_throughput"]["values"] == [10.0, 30.0]
    assert speeds["11-layers"]["measured_on"] == "tis+scp-30%" and speeds["11-layers"]["rounds"] == 2
    (tmp_path / "throughput" / "16-layers" / "round-1.json").unlink()
    matrix.measure_throughput(results)
    assert order[4:] == ["full"]


def test_scorer_transformers_refuses_what_transformers_cannot_serve():
    with pytest.raises(ShortLVLMError, match="scorer transformers.*tis\\+scp-30%\\+gptq"):
        MatrixConfig(model="toy", arms=[Arm(0.3, "tis", "scp", "gptq")], scorer="transformers")
    with pytest.raises(ShortLVLMError, match="unknown scorer"):
        MatrixConfig(model="toy", arms=[], scorer="llama.cpp")


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


def answer_yes(endpoints, benchmark, out, *, source, limit, seed, config):
    """run_benchmark's stand-in: answers "yes" to everything, written as the client writes its records."""
    from shortlvlm_vllm.evaluation.client import RECORDS_NAME, answer_record, write_scores

    items = benchmark.load(source, limit, seed)
    records = {item.id: answer_record(benchmark, item, "yes", server=endpoints[0].base_url) for item in items}
    out.mkdir(parents=True, exist_ok=True)
    (out / RECORDS_NAME).write_text("".join(json.dumps(r) + "\n" for r in records.values()))
    return write_scores(out, benchmark, endpoints[0].model, items, records)


def test_arms_with_the_same_weights_served_differently_are_each_asked(tiny_llava, tmp_path, monkeypatch):
    """A random choice of K tokens has the weights of VisionZip's K: reusing its answers would report VisionZip's
    accuracy for it (the first tokens_random run did). Byte-identical weights served alike are still asked once."""
    asked = []

    class Server:
        def __init__(self, model, *, log_path, served_model_name, **kwargs):
            asked.append(kwargs.get("extra_args", []))
            self.base_url, self.api_key = "http://fake/v1", "EMPTY"

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    monkeypatch.setattr("shortlvlm_vllm.serving.launcher.VLLMServer", Server)
    monkeypatch.setattr("shortlvlm_vllm.evaluation.client.run_benchmark", answer_yes)
    path = tmp_path / "matrix.yaml"
    path.write_text(f"model: {tiny_llava}\ngrid: {{ratio: [0], token_fraction: [0.5], "
                    "token_selection: [visionzip, random]}\nbenchmark: {name: synthetic, limit: 4}\n"
                    "throughput: {repeats: 0}\n")
    results = Matrix(load_config(path), tmp_path / "out").run()
    selections = [json.loads(args[-1])["short_lvlm"].get("visual_token_selection", "visionzip")
                  for args in asked if args]
    assert selections == ["visionzip", "random"], asked
    assert len({r["weights_key"] for r in results if r["visual_tokens"]}) == 2


def test_replicas_give_each_arm_several_servers_sharing_the_requests(tiny_llava, tmp_path, monkeypatch):
    from shortlvlm_vllm.evaluation.throughput import RequestTiming, summarize

    started = []

    class Server:
        def __init__(self, model, *, log_path, served_model_name, replica, replicas, **kwargs):
            started.append((replica, replicas, log_path.name))
            log_path.parent.mkdir(parents=True, exist_ok=True)  # as VLLMServer.start does
            self.base_url, self.api_key = f"http://replica-{replica}/v1", "EMPTY"

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    seen = {}

    def fake_eval(endpoints, *args, **kwargs):
        seen.update(eval=endpoints)
        return answer_yes(endpoints, *args, **kwargs)

    monkeypatch.setattr("shortlvlm_vllm.serving.launcher.VLLMServer", Server)
    monkeypatch.setattr("shortlvlm_vllm.evaluation.client.run_benchmark", fake_eval)
    monkeypatch.setattr("shortlvlm_vllm.evaluation.throughput.run_throughput",
                        lambda endpoints, *args, **kwargs: seen.update(bench=endpoints) or summarize(
                            [RequestTiming(1.0, 0.1, (0.1,), 10, 2)], 1.0, output_len=2, servers=len(endpoints)))
    path = tmp_path / "matrix.yaml"
    path.write_text(f"model: {tiny_llava}\nreplicas: 2\ngrid: {{ratio: [0]}}\n"
                    "benchmark: {name: synthetic, limit: 4}\nthroughput: {num_prompts: 2, output_len: 2, repeats: 1}\n")
    result = Matrix(load_config(path), tmp_path / "out").run()[0]
    assert started == [(0, 2, "server-0.log"), (1, 2, "server-1.log"), (0, 2, "round-0-0.log"),
                       (1, 2, "round-0-1.log")]
    assert [e.base_url for e in seen["eval"]] == [e.base_url for e in seen["bench"]] == [
        "http://replica-0/v1", "http://replica-1/v1"]
    assert result["throughput"]["servers"] == 2
    path.write_text(f"model: {tiny_llava}\nreplicas: 0\ngrid: {{ratio: [0]}}\n")
    with pytest.raises(ShortLVLMError, match="replicas 0 must be"):
        load_config(path)


def test_a_transformers_scored_matrix_end_to_end(tiny_llava, tmp_path, monkeypatch):
    """Accuracy answered in-process (no server), one calibration pass for every arm, arms with the same weights scored
    once, and the tables written with intervals; throughput rounds are faked (they need vLLM)."""
    from types import SimpleNamespace

    from shortlvlm_vllm.evaluation import throughput as throughput_module
    from shortlvlm_vllm.prune import calibrate
    from shortlvlm_vllm.serving import launcher

    class FakeServer:
        def __init__(self, model, **kwargs):
            self.base_url, self.api_key = "http://fake/v1", "EMPTY"

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    figures = {"output_throughput": 10.0, "request_throughput": 1.0, "median_ttft_ms": 5.0, "median_tpot_ms": 1.0}
    monkeypatch.setattr(launcher, "VLLMServer", FakeServer)
    monkeypatch.setattr(throughput_module, "run_throughput", lambda *a, **k: SimpleNamespace(to_dict=lambda: figures))
    passes = []
    real_pass = calibrate.run_calibration
    monkeypatch.setattr(calibrate, "run_calibration", lambda *a, **k: passes.append(1) or real_pass(*a, **k))
    path = tmp_path / "matrix.yaml"
    path.write_text(f"""model: {tiny_llava}
grid: {{ratio: [0.0, 0.25], localize: [tis, last], compensate: [none, scp/unique/down_proj]}}
calibration: {{source: synthetic, num_samples: 12, heldout: 2}}
rank: 4
benchmark: {{name: synthetic, limit: 15}}
scorer: transformers
batch_size: 4
throughput: {{num_prompts: 2, repeats: 2}}
""")
    config = load_config(path)
    results = Matrix(config, tmp_path / "out").run()
    assert len(passes) == 1  # one calibration pass for the four pruned arms
    assert [r["arm"] for r in results] == ["full", "tis+none-25%", "tis+scp/unique/down_proj-25%",
                                           "last+none-25%", "last+scp/unique/down_proj-25%"]
    assert all(len(r["units"]["correct"]) == 15 for r in results)
    by_layers = {}
    for r in results[1:]:
        by_layers.setdefault((tuple(r["pruned_layers"]), r["compensate"]), []).append(r)
    for twins in by_layers.values():  # the same layers and compensation: byte-identical, answered once
        assert all(t["units"] == twins[0]["units"] for t in twins)
        assert all(t.get("same_weights_as") == twins[0]["arm"] for t in twins[1:])
    assert {r["throughput_key"] for r in results} == {"8-layers", "6-layers"}
    table = json.loads((tmp_path / "out" / "results.json").read_text())
    assert all(row["accuracy_low"] <= row["accuracy"] <= row["accuracy_high"] for row in table["arms"])
    assert {row["kind"] for row in table["comparisons"]} == {"compensation", "localization"}
    records = (tmp_path / "out" / "arms" / "tis_none-25pct" / "accuracy" / "records.jsonl").read_text().splitlines()
    assert len(records) == 15 and json.loads(records[0])["answer"] is not None


def test_batched_transformers_replies_equal_one_at_a_time(tiny_llava):
    """Left-padded batches sorted by length give the replies of one item at a time, in the items' order."""
    from shortlvlm_vllm.evaluation.benchmarks import get_benchmark
    from shortlvlm_vllm.evaluation.reference import generate_replies, load_reference

    benchmark = get_benchmark("synthetic")
    items = benchmark.load(limit=7)
    model, processor = load_reference(tiny_llava)
    one = generate_replies(model, processor, items, benchmark.max_tokens, batch_size=1)
    batched = generate_replies(model, processor, items, benchmark.max_tokens, batch_size=3)
    assert batched == one and len(set(one)) > 1
    assert processor.tokenizer.padding_side == "right"  # restored
