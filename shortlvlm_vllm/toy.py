"""The project's own toy LLaVA: trained from scratch on the synthetic VQA set, so pruning has something to lose.

Same transformers classes and hub layout as llava-hf/llava-1.5-7b-hf (CLIP vision tower, MLP projector,
Llama decoder), scaled down to train on a CPU in about an hour. A word-level tokenizer over the synthetic
set's vocabulary keeps every answer one token.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from shortlvlm_vllm.fixtures import LLAVA_CHAT_TEMPLATE, SPECIAL_TOKENS, make_llava, save_llava
from shortlvlm_vllm.images import template_image_turn
from shortlvlm_vllm.synthetic import FAMILIES, SyntheticConfig, answer_vocabulary, generate_split, question_vocabulary
from shortlvlm_vllm.synthetic import words as words_of

log = logging.getLogger(__name__)

TOY_MODEL_DIR = Path(__file__).parent / "toy_model"
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


@dataclass(frozen=True)
class ToyTrainingConfig:
    """Everything that determines the trained toy model; the same config gives the same weights."""

    seed: int = 0
    num_layers: int = 16
    hidden_size: int = 128
    intermediate_size: int = 384
    vision_hidden_size: int = 128
    vision_layers: int = 4
    image_size: int = 64
    patch_size: int = 16
    train_images: int = 20000
    epochs: float = 2.0
    batch_size: int = 32
    learning_rate: float = 3e-4  # 1e-3 and above stall at the answer prior (measured); 3e-4 learns
    weight_decay: float = 0.01
    warmup_steps: int = 200
    eval_every: int = 500
    eval_questions: int = 1000
    captions: bool = True  # one "Describe the image." target per training image: dense supervision of vision


# BOS comes from the chat template, not from the tokenizer: vLLM's chat endpoint adds no special
# tokens (add_special_tokens=False), so a BOS the tokenizer adds would be missing when served, and a
# model trained with it loses 5 points of accuracy without it (measured: 0.567 against 0.617).
TOY_CHAT_TEMPLATE = "{{ bos_token }}" + LLAVA_CHAT_TEMPLATE


def build_word_tokenizer():
    """A word-level tokenizer over the chat template's and the synthetic set's words."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from shortlvlm_vllm.synthetic import WORD

    words = sorted(set(question_vocabulary()) | set(answer_vocabulary()) | set(CAPTION_WORDS)
                   | {"USER", "ASSISTANT", ":"} | set(words_of(CAPTION_QUESTION)))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(WORD.pattern), behavior="isolated"),
    ])
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"}, chat_template=TOY_CHAT_TEMPLATE,
    )


CAPTION_QUESTION = "Describe the image."
_ROWS, _COLUMNS = ("top", "middle", "bottom"), ("left", "center", "right")
CAPTION_WORDS = (*_ROWS, *_COLUMNS, ",")


def caption(scene_json: str) -> str:
    """Every object, row by row: "large red circle top left , small blue square middle center"."""
    objects = sorted(json.loads(scene_json), key=lambda o: o["cell"])
    return " , ".join(
        f"{o['size']} {o['colour']} {o['shape']} {_ROWS[o['cell'][0]]} {_COLUMNS[o['cell'][1]]}" for o in objects
    )


def with_captions(rows: Sequence[dict]) -> list[dict]:
    """The rows plus one caption row per image (family "caption", never scored)."""
    extra = {r["image_id"]: {**r, "id": f"{r['image_id']}-caption", "question": CAPTION_QUESTION,
                             "answer": caption(r["scene"]), "family": "caption"} for r in rows}
    return list(rows) + list(extra.values())


def prompt_text(tokenizer, question: str) -> str:
    """The prompt exactly as the chat template renders it for a server: "<s>USER: <image>\n... ASSISTANT:"."""
    return tokenizer.apply_chat_template([template_image_turn(question)], add_generation_prompt=True, tokenize=False)


@dataclass
class EncodedSplit:
    """A split as tensors: uint8 images, and per question its prompt ids, answer id and family."""

    images: torch.Tensor  # [num_images, 3, H, W] uint8
    image_index: torch.Tensor  # [num_questions] -> row of `images`
    prompts: list[list[int]]  # with the image placeholder expanded
    answers: list[list[int]]  # answer token ids (one for questions, several for captions)
    families: list[str]
    answer_words: list[str]


def encode_split(rows: Sequence[dict], tokenizer, image_tokens: int) -> EncodedSplit:
    image_ids = list(dict.fromkeys(r["image_id"] for r in rows))
    first = {}
    for r in rows:
        first.setdefault(r["image_id"], r["image"])
    images = torch.from_numpy(np.stack([np.asarray(first[i].convert("RGB")) for i in image_ids])).permute(0, 3, 1, 2)
    position = {image_id: i for i, image_id in enumerate(image_ids)}
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    prompts = []
    for r in rows:
        ids = tokenizer(prompt_text(tokenizer, r["question"]), add_special_tokens=False)["input_ids"]
        at = ids.index(image_id)
        prompts.append(ids[:at] + [image_id] * image_tokens + ids[at + 1:])
    answers = [tokenizer(r["answer"], add_special_tokens=False)["input_ids"] for r in rows]
    return EncodedSplit(
        images.contiguous(), torch.tensor([position[r["image_id"]] for r in rows]), prompts, answers,
        [r["family"] for r in rows], [r["answer"] for r in rows],
    )


def _pixels(images: torch.Tensor) -> torch.Tensor:
    return (images.float() / 255 - CLIP_MEAN) / CLIP_STD


def _batch(split: EncodedSplit, index: Sequence[int], pad_id: int, eos_id: int, with_answer: bool):
    """Right-padded batch; with_answer appends answer + EOS and labels only those two tokens."""
    seqs = [split.prompts[i] + (split.answers[i] + [eos_id] if with_answer else []) for i in index]
    length = max(map(len, seqs))
    input_ids = torch.full((len(seqs), length), pad_id)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    labels = torch.full((len(seqs), length), -100)
    for row, (i, seq) in enumerate(zip(index, seqs, strict=True)):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        if with_answer:
            labels[row, len(split.prompts[i]): len(seq)] = input_ids[row, len(split.prompts[i]): len(seq)]
    last = torch.tensor([len(s) - 1 for s in seqs])
    return input_ids, mask, labels, _pixels(split.images[split.image_index[list(index)]]), last


@torch.no_grad()
def answer_accuracy(model, split: EncodedSplit, pad_id: int, batch_size: int = 128) -> dict[str, float]:
    """Greedy first-token accuracy per family and overall (every answer is one token)."""
    model.eval()
    correct: Counter = Counter()
    total: Counter = Counter()
    for start in range(0, len(split.prompts), batch_size):
        index = list(range(start, min(start + batch_size, len(split.prompts))))
        input_ids, mask, _, pixels, last = _batch(split, index, pad_id, 0, with_answer=False)
        logits = model(input_ids=input_ids, attention_mask=mask, pixel_values=pixels).logits
        predicted = logits[torch.arange(len(index)), last].argmax(-1)
        for i, p in zip(index, predicted.tolist(), strict=True):
            total[split.families[i]] += 1
            correct[split.families[i]] += int(p == split.answers[i][0])
    result = {f: correct[f] / total[f] for f in FAMILIES if total[f]}
    result["overall"] = sum(correct.values()) / max(1, sum(total.values()))
    return result


def train_toy_model(config: ToyTrainingConfig, out_dir: str | Path, overwrite: bool = False) -> dict:
    """Train from scratch, log loss and held-out accuracy, save in the hub layout; returns the final metrics."""
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    tokenizer = build_word_tokenizer()
    model, processor = make_llava(
        tokenizer, num_layers=config.num_layers, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, vision_hidden_size=config.vision_hidden_size,
        vision_layers=config.vision_layers, image_size=config.image_size, patch_size=config.patch_size,
        seed=config.seed,
    )
    image_tokens = model.config.image_seq_length
    data = SyntheticConfig(seed=config.seed, train_images=config.train_images, image_size=config.image_size)
    started = time.perf_counter()
    train_rows = generate_split("train", data)
    train = encode_split(with_captions(train_rows) if config.captions else train_rows, tokenizer, image_tokens)
    test_rows = generate_split("test", data)
    test = encode_split(test_rows[: config.eval_questions], tokenizer, image_tokens)
    log.info("encoded %d training and %d held-out questions in %.0f s",
             len(train.prompts), len(test.prompts), time.perf_counter() - started)

    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    steps = math.ceil(config.epochs * len(train.prompts) / config.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay,
                                  betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / config.warmup_steps) * (
        0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    order_rng = torch.Generator().manual_seed(config.seed)
    order: list[int] = []
    history = []
    started = time.perf_counter()
    running = 0.0
    for step in range(1, steps + 1):
        if len(order) < config.batch_size:
            order += torch.randperm(len(train.prompts), generator=order_rng).tolist()
        index, order = order[: config.batch_size], order[config.batch_size:]
        input_ids, mask, labels, pixels, _ = _batch(train, index, pad_id, eos_id, with_answer=True)
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=input_ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        running = 0.98 * running + 0.02 * loss.item() if step > 1 else loss.item()
        if step % config.eval_every == 0 or step == steps:
            accuracy = answer_accuracy(model, test, pad_id)
            elapsed = time.perf_counter() - started
            history.append({"step": step, "loss": round(running, 4), "elapsed_s": round(elapsed),
                            **{k: round(v, 4) for k, v in accuracy.items()}})
            log.info("step %d/%d  loss %.4f  held-out accuracy %.3f  (%s)  %.0f s", step, steps, running,
                     accuracy["overall"], ", ".join(f"{f} {accuracy[f]:.2f}" for f in FAMILIES if f in accuracy),
                     elapsed)
    model.eval()
    model.config.short_lvlm_toy = {"training": asdict(config), "history": history}
    save_llava(model, processor, out_dir, dtype=torch.bfloat16, overwrite=overwrite)
    return history[-1]
