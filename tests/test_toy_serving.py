"""The shipped toy model, served by vLLM, passes the synthetic test split, and transformers agrees with vLLM."""

from __future__ import annotations

import pytest

from shortlvlm_vllm.data.synthetic import FAMILIES
from shortlvlm_vllm.evaluation.benchmarks import get_benchmark
from shortlvlm_vllm.evaluation.client import Endpoint, run_benchmark
from shortlvlm_vllm.evaluation.reference import ask_transformers
from shortlvlm_vllm.serving.launcher import VLLMServer
from shortlvlm_vllm.toy import TOY_MODEL_DIR

TEST_QUESTIONS = 1000  # the first 200 test images x 5 families (of 5000 questions; the note on issue 4 has all)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    assert (TOY_MODEL_DIR / "config.json").is_file(), f"the toy model must ship with the package ({TOY_MODEL_DIR})"
    logs = tmp_path_factory.mktemp("toy-server")
    with VLLMServer(TOY_MODEL_DIR, log_path=logs / "vllm.log", served_model_name="toy") as server:
        yield server


@pytest.fixture(scope="module")
def vllm_scores(served, tmp_path_factory):
    benchmark = get_benchmark("synthetic")
    endpoint = Endpoint(served.base_url, "toy", served.api_key)
    return run_benchmark(endpoint, benchmark, tmp_path_factory.mktemp("toy-eval"), limit=TEST_QUESTIONS)


def test_the_toy_model_served_by_vllm_reaches_its_targets(vllm_scores):
    per_family = {family: vllm_scores[f"accuracy/{family}"] for family in FAMILIES}
    assert vllm_scores["accuracy"] >= 0.95, per_family
    assert min(per_family.values()) >= 0.85, per_family


def test_transformers_agrees_with_vllm_within_one_point(vllm_scores):
    benchmark = get_benchmark("synthetic")
    items = benchmark.load(limit=TEST_QUESTIONS)
    replies = ask_transformers(TOY_MODEL_DIR, items, benchmark.max_tokens, batch_size=50)  # batched = one at a time
    scores = benchmark.score(items, {item.id: benchmark.parse(item, reply) for item, reply in zip(
        items, replies, strict=True)})
    assert abs(scores["accuracy"] - vllm_scores["accuracy"]) <= 0.01, (scores["accuracy"], vllm_scores["accuracy"])
