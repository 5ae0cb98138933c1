"""Replies from the checkpoint in stock transformers: the reference that served accuracy is checked against, and a
batched in-process scorer for ablations too large to serve arm by arm.

The chat (image + prompt) goes through the model's own chat template, as a server renders it, and the reply is
greedy, so the same benchmark scores both paths alike. Batches are left-padded (the prompt ends where generation
starts) and sorted by prompt length, so little is padded; the replies come back in the items' order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from shortlvlm_vllm.chat import template_image_turn
from shortlvlm_vllm.evaluation.benchmarks.base import Benchmark, Item

log = logging.getLogger(__name__)


def load_reference(model_dir: str | Path):
    """The checkpoint in stock transformers, in its own dtype (as vLLM's default), and its processor."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from shortlvlm_vllm.models import register_with_transformers

    register_with_transformers()
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype="auto").eval()
    return model, processor


@torch.no_grad()
def generate_replies(model, processor, items: Sequence[Item], max_tokens: int, batch_size: int = 1) -> list[str]:
    """Greedy replies to `items`, `batch_size` at a time (left-padded), in the items' order."""
    texts = [processor.apply_chat_template([template_image_turn(item.prompt)], add_generation_prompt=True)
             for item in items]
    tokenizer = processor.tokenizer
    lengths = [len(tokenizer(text)["input_ids"]) for text in texts]
    order = sorted(range(len(items)), key=lambda i: lengths[i])
    replies: list[str] = [""] * len(items)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    started = time.perf_counter()
    try:
        with tqdm(total=len(items), desc="transformers", unit="q", disable=None) as bar:
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                inputs = processor(images=[items[i].image for i in chunk], text=[texts[i] for i in chunk],
                                   return_tensors="pt", padding=True).to(model.device)
                out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
                for i, reply in zip(chunk, processor.batch_decode(out[:, inputs["input_ids"].shape[1]:],
                                                                  skip_special_tokens=True), strict=True):
                    replies[i] = reply
                bar.update(len(chunk))
    finally:
        tokenizer.padding_side = side
    log.info("answered %d items with transformers in %.0f s (batches of %d)", len(items),
             time.perf_counter() - started, batch_size)
    return replies


def ask_transformers(model_dir: str | Path, items: Sequence[Item], max_tokens: int, batch_size: int = 1) -> list[str]:
    """Greedy replies from the checkpoint loaded with stock transformers (one item at a time by default)."""
    model, processor = load_reference(model_dir)
    return generate_replies(model, processor, items, max_tokens, batch_size)


def score_with_transformers(
    model_dir: str | Path,
    benchmark: Benchmark,
    out_dir: str | Path,
    *,
    model_name: str,
    source: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, float]:
    """`run_benchmark`'s output (records.jsonl, scores.json) without a server: the checkpoint answers in-process.

    A records file that already holds every item is scored as it is (a rerun resumes nothing else).
    """
    import json

    from shortlvlm_vllm.evaluation.client import RECORDS_NAME, answer_record, check_run, load_records, write_scores

    out_dir = Path(out_dir)
    check_run(out_dir, benchmark, model_name)
    items = benchmark.load(source, limit, seed)
    records = load_records(out_dir / RECORDS_NAME)
    todo = [item for item in items if item.id not in records]
    if todo:
        model, processor = load_reference(model_dir)
        replies = generate_replies(model, processor, todo, benchmark.max_tokens, batch_size)
        with open(out_dir / RECORDS_NAME, "a", encoding="utf-8") as out:
            for item, reply in zip(todo, replies, strict=True):
                records[item.id] = answer_record(benchmark, item, reply)
                out.write(json.dumps(records[item.id], ensure_ascii=False) + "\n")
    return write_scores(out_dir, benchmark, model_name, items, records)
