"""Accuracy on the synthetic VQA benchmark, asked through an OpenAI-compatible server or transformers.

Both paths send the same chat (image + question) through the model's own chat template and read a
greedy short answer, so their accuracies compare directly.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from shortlvlm_vllm.images import data_url, image_message, template_image_turn

log = logging.getLogger(__name__)

MAX_ANSWER_TOKENS = 4


@dataclass(frozen=True)
class Question:
    id: str
    image: Image.Image
    question: str
    answer: str
    family: str


def synthetic_questions(split: str = "test", limit: int | None = None, seed: int = 0) -> list[Question]:
    """The first `limit` questions of a split of the synthetic set (families interleave, so any prefix mixes them)."""
    from shortlvlm_vllm.synthetic import SyntheticConfig, generate_split

    rows = generate_split(split, SyntheticConfig(seed=seed))[:limit]
    return [Question(r["id"], r["image"], r["question"], r["answer"], r["family"]) for r in rows]


def normalize_answer(text: str | None) -> str:
    """The first word of a reply, lower-cased, without punctuation ("Yes." -> "yes")."""
    match = re.search(r"\w+", text or "")
    return match.group(0).lower() if match else ""


def accuracy(questions: Sequence[Question], answers: Sequence[str]) -> dict[str, float]:
    """Accuracy per family and overall."""
    correct: Counter = Counter()
    total: Counter = Counter()
    for q, a in zip(questions, answers, strict=True):
        total[q.family] += 1
        correct[q.family] += normalize_answer(a) == q.answer.lower()
    result = {family: correct[family] / total[family] for family in total}
    result["overall"] = sum(correct.values()) / max(1, len(questions))
    return result


def ask_server(
    base_url: str, model: str, questions: Sequence[Question], api_key: str = "EMPTY", concurrency: int = 8
) -> list[str]:
    """Greedy answers from an OpenAI-compatible server, `concurrency` requests in flight."""
    import openai

    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key)
        gate = asyncio.Semaphore(concurrency)
        bar = tqdm(total=len(questions), desc="asking", unit="q", disable=None)

        async def one(q: Question) -> str:
            async with gate:
                response = await client.chat.completions.create(
                    model=model, messages=image_message(data_url(q.image), q.question),
                    max_tokens=MAX_ANSWER_TOKENS, temperature=0.0,
                )
                bar.update()
                return response.choices[0].message.content or ""

        try:
            return await asyncio.gather(*(one(q) for q in questions))
        finally:
            bar.close()
            await client.close()

    return asyncio.run(run())


@torch.no_grad()
def ask_transformers(model_dir: str | Path, questions: Sequence[Question]) -> list[str]:
    """Greedy answers from the checkpoint loaded with stock transformers, one question at a time."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype="auto").eval()  # as vLLM's default
    answers = []
    started = time.perf_counter()
    for q in tqdm(questions, desc="transformers", unit="q", disable=None):
        text = processor.apply_chat_template(
            [template_image_turn(q.question)],
            add_generation_prompt=True,
        )
        inputs = processor(images=q.image, text=text, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=MAX_ANSWER_TOKENS, do_sample=False)
        answers.append(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    log.info("answered %d questions with transformers in %.0f s", len(questions), time.perf_counter() - started)
    return answers
