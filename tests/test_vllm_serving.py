"""vLLM serving the pruned checkpoint through the OpenAI API: agreement with transformers,
streaming, concurrency, the evaluation client, and bad requests. One server per served checkpoint:
the tiny LLaVA pruned by hand and by TIS + SCP, and the tiny Qwen2-VL, Qwen2.5-VL, mPLUG-Owl2 and Qwen-VL-Chat
pruned by TIS + SCP with `shortlvlm prune` (mPLUG-Owl2 and Qwen-VL-Chat through the plugin's
MPLUGOwl2LlamaForCausalLM and QWenLMHeadModel, against the project's reference models of them)."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
import requests
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from shortlvlm_vllm.chat import data_url, image_message, template_image_turn
from shortlvlm_vllm.cli import main
from shortlvlm_vllm.evaluation.client import RECORDS_NAME, SCORES_NAME
from shortlvlm_vllm.serving.launcher import VLLMServer

from .conftest import IMAGE_SIZES, random_image

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(3600)]  # five server starts; one can take 10 minutes on a busy CPU
MODEL = "pruned"
QUESTIONS = ["What is in the image?", "Describe the colours.", "Is there a square? Answer yes or no."]
NEW_TOKENS = 8
TOP = 5


@pytest.fixture(
    scope="module",
    params=["scp_pruned_llava", "scp_pruned_qwen2_vl", "scp_pruned_qwen2_5_vl", "scp_pruned_mplug_owl2",
            "scp_pruned_qwen"],
    ids=["llava-tis-scp", "qwen2-vl-tis-scp", "qwen2.5-vl-tis-scp", "mplug-owl2-tis-scp", "qwen-vl-chat-tis-scp"],
)
def served_checkpoint(request):
    """Each test runs against LLaVA, Qwen2-VL, Qwen2.5-VL, mPLUG-Owl2 and Qwen-VL-Chat pruned with TIS + folded SCP
    (layers removed by hand write the same kind of checkpoint: fewer layers, renumbered; test_checkpoint)."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def server(served_checkpoint, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("logs") / "vllm.log"
    with VLLMServer(served_checkpoint, log_path=log_path, dtype="float32", served_model_name=MODEL,
                    startup_timeout=1500, extra_args=["--limit-mm-per-prompt", '{"image": 1}']) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0)


def _ask(client, image, question, **kwargs):
    return client.chat.completions.create(
        model=MODEL, messages=image_message(data_url(image), question), max_tokens=NEW_TOKENS,
        temperature=0.0, **kwargs,
    )


@torch.no_grad()
def test_greedy_tokens_agree_with_transformers(client, served_checkpoint):
    processor = AutoProcessor.from_pretrained(served_checkpoint)
    model = AutoModelForImageTextToText.from_pretrained(served_checkpoint, dtype=torch.float32).eval()
    exact = 0
    for seed, question in enumerate(QUESTIONS):
        image = random_image(seed, IMAGE_SIZES[seed % 2])
        text = processor.apply_chat_template(
            [template_image_turn(question)],
            add_generation_prompt=True,
        )
        inputs = processor(images=image, text=text, return_tensors="pt")
        hf = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                            do_sample=False, output_logits=True, return_dict_in_generate=True)
        hf_tokens = hf.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        hf_top = [logits[0].topk(TOP).indices.tolist() for logits in hf.logits]

        response = _ask(client, image, question, logprobs=True, top_logprobs=TOP,
                        extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True,
                                    "add_special_tokens": True})
        assert response.usage.prompt_tokens == inputs["input_ids"].shape[1]
        steps = response.choices[0].logprobs.content
        vllm_tokens = [int(s.token.removeprefix("token_id:")) for s in steps]
        vllm_top = [[int(t.token.removeprefix("token_id:")) for t in s.top_logprobs] for s in steps]
        assert len(vllm_tokens) == len(hf_tokens) == NEW_TOKENS
        # vLLM's own rule (check_logprobs_close): equal tokens, or at the first divergence each
        # side's choice is in the other's top-k, after which the sequences no longer compare.
        for i, (v, h) in enumerate(zip(vllm_tokens, hf_tokens, strict=True)):
            if v != h:
                assert v in hf_top[i] and h in vllm_top[i], (i, vllm_tokens, hf_tokens)
                break
        else:
            exact += 1
    assert exact >= 2, "greedy outputs diverged on most prompts"


def test_streaming_and_non_streaming_give_the_same_answer(client):
    image = random_image(7)
    whole = _ask(client, image, QUESTIONS[0]).choices[0].message.content
    stream = _ask(client, image, QUESTIONS[0], stream=True)
    chunks = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len(chunks) > 1
    assert "".join(chunks) == whole


def test_concurrent_requests(server):
    async def run():
        async_client = openai.AsyncOpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0)
        return await asyncio.gather(*(
            async_client.chat.completions.create(
                model=MODEL, messages=image_message(data_url(random_image(i)), QUESTIONS[i % 3]),
                max_tokens=NEW_TOKENS, temperature=0.0, extra_body={"ignore_eos": True},
            )
            for i in range(6)
        ))

    responses = asyncio.run(run())
    assert [r.usage.completion_tokens for r in responses] == [NEW_TOKENS] * 6


def test_eval_client_end_to_end(server, tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", "synthetic", "--base-url", server.base_url, "--model", MODEL, "--limit", "6",
                 "--concurrency", "3", "-o", str(out)]) == 0
    records = [json.loads(line) for line in (out / RECORDS_NAME).read_text().splitlines()]
    assert len(records) == 6 and all(r["error"] is None and r["completion_tokens"] >= 1 for r in records)
    assert json.loads((out / SCORES_NAME).read_text())["failed"] == 0


CORRUPT_PNG = "data:image/png;base64," + "aGVsbG8gd29ybGQ=" * 4
NOT_AN_IMAGE = "data:text/plain;base64,aGVsbG8gd29ybGQ="


@pytest.mark.parametrize("case", ["corrupt-image", "not-an-image", "too-many-images", "malformed-json"])
def test_bad_request_is_4xx_and_server_keeps_serving(server, client, case):
    good = data_url(random_image(1))
    if case == "malformed-json":
        r = requests.post(f"{server.base_url}/chat/completions", data=b'{"model": "pruned", "messages": [',
                          headers={"Content-Type": "application/json"}, timeout=60)
        status = r.status_code
    else:
        messages = {
            "corrupt-image": image_message(CORRUPT_PNG, "What is it?"),
            "not-an-image": image_message(NOT_AN_IMAGE, "What is it?"),
            "too-many-images": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": good}},
                {"type": "image_url", "image_url": {"url": good}},
                {"type": "text", "text": "Compare them."},
            ]}],
        }[case]
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
        status = exc.value.status_code
    assert 400 <= status < 500
    assert _ask(client, random_image(2), QUESTIONS[0]).choices[0].message.content is not None
