"""The shipped toy model: its accuracy through vLLM meets the targets and agrees with transformers."""

from __future__ import annotations

import pytest

from shortlvlm_vllm.evaluate import accuracy, ask_server, ask_transformers, synthetic_questions
from shortlvlm_vllm.serve import VLLMServer
from shortlvlm_vllm.synthetic import FAMILIES
from shortlvlm_vllm.toy import TOY_MODEL_DIR

pytestmark = pytest.mark.vllm
QUESTIONS = 300


@pytest.fixture(scope="module")
def questions():
    return synthetic_questions("test", limit=QUESTIONS)


@pytest.fixture(scope="module")
def vllm_answers(questions, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("logs") / "toy.log"
    with VLLMServer(TOY_MODEL_DIR, log_path=log_path, served_model_name="toy") as server:
        return ask_server(server.base_url, "toy", questions, api_key=server.api_key)


def test_toy_model_meets_its_accuracy_targets_through_vllm(questions, vllm_answers):
    result = accuracy(questions, vllm_answers)
    assert set(result) == {*FAMILIES, "overall"}
    assert result["overall"] >= 0.90, result
    assert all(result[f] >= 0.75 for f in FAMILIES), result


def test_vllm_and_transformers_agree_within_one_point(questions, vllm_answers):
    via_vllm = accuracy(questions, vllm_answers)["overall"]
    via_transformers = accuracy(questions, ask_transformers(TOY_MODEL_DIR, questions))["overall"]
    assert abs(via_vllm - via_transformers) <= 0.01, (via_vllm, via_transformers)
