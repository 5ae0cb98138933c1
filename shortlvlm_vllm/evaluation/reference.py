"""Replies from the checkpoint in stock transformers: the reference that served accuracy is checked against.

The chat (image + prompt) goes through the model's own chat template, as a server renders it, and the reply
is greedy, so the same benchmark scores both paths alike.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from shortlvlm_vllm.chat import template_image_turn
from shortlvlm_vllm.evaluation.benchmarks.base import Item

log = logging.getLogger(__name__)


@torch.no_grad()
def ask_transformers(model_dir: str | Path, items: Sequence[Item], max_tokens: int) -> list[str]:
    """Greedy replies from the checkpoint loaded with stock transformers, one item at a time."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from shortlvlm_vllm.models import register_with_transformers

    register_with_transformers()
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype="auto").eval()  # as vLLM's default
    replies = []
    started = time.perf_counter()
    for item in tqdm(items, desc="transformers", unit="q", disable=None):
        text = processor.apply_chat_template([template_image_turn(item.prompt)], add_generation_prompt=True)
        inputs = processor(images=item.image, text=text, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
        replies.append(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    log.info("answered %d items with transformers in %.0f s", len(items), time.perf_counter() - started)
    return replies
