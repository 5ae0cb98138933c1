"""Tiny random-weight Qwen-VL-Chat checkpoints, built at test time in the original layout: config.json as the
original QWenConfig writes it (model_type qwen, flat fields, `visual`), the original state_dict keys, a small
qwen.tiktoken vocabulary (every byte, then merges learned from a fixed text) with the original's special tokens
after it, tokenizer_config.json and generation_config.json as the hub's, and no chat template (the hub has none).

The weights are drawn with numpy's PCG64 generator in sorted key order, so the same arguments give the same values
on any machine and torch version: the logits recorded from the original code (tests/test_qwen.py) stay valid.
"""

from __future__ import annotations

import base64
import json
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from shortlvlm_vllm.checkpoint.safetensors_io import OutputTensor
from shortlvlm_vllm.checkpoint.writer import Shard, write_checkpoint
from shortlvlm_vllm.models.mplug_owl2 import sincos_2d
from shortlvlm_vllm.models.qwen import ARCHITECTURE, SPECIAL_TOKENS, QWenConfig, QWenLMHeadModel

MERGE_TEXT = ("You are a helpful assistant. What is in the image? Describe the colours. Several coloured rectangles "
              "on a plain background. A red square and a blue circle. Picture user system\n")
NUM_RANKS = 300  # 256 bytes + 44 merges
IMAGE_SIZE, PATCH_SIZE = 56, 14  # 16 patches; the resampler still gives 256 tokens per image


def tiktoken_ranks(num_ranks: int = NUM_RANKS) -> dict[bytes, int]:
    """Byte-pair ranks: every byte at its own value, then the most frequent adjacent pair of MERGE_TEXT's words,
    merged in turn (ties to the first pair seen)."""
    ranks = {bytes([b]): b for b in range(256)}
    words = [[bytes([b]) for b in word.encode()] for word in MERGE_TEXT.split(" ")]
    while len(ranks) < num_ranks:
        pairs = Counter((a, b) for word in words for a, b in zip(word, word[1:], strict=False))
        (left, right), _ = pairs.most_common(1)[0]
        ranks[left + right] = len(ranks)
        for word in words:
            i = 0
            while i < len(word) - 1:
                if word[i] == left and word[i + 1] == right:
                    word[i:i + 2] = [left + right]
                i += 1
    return ranks


def write_tiktoken(path: Path, ranks: dict[bytes, int]) -> None:
    path.write_text("".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks.items()))


def tiny_config(num_layers: int, hidden_size: int) -> QWenConfig:
    image_start_id = NUM_RANKS + SPECIAL_TOKENS.index("<img>")
    visual = {"heads": 2, "image_size": IMAGE_SIZE, "image_start_id": image_start_id, "layers": 2, "mlp_ratio": 2.0,
              "output_dim": hidden_size, "patch_size": PATCH_SIZE, "width": 64}
    config = QWenConfig(
        vocab_size=576, hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=hidden_size // 32,
        kv_channels=32, intermediate_size=4 * hidden_size, max_position_embeddings=8192, seq_length=2048,
        visual=visual, bf16=False, fp16=False, fp32=False,
    )
    config.architectures = [ARCHITECTURE]
    config.auto_map = {"AutoConfig": "configuration_qwen.QWenConfig",
                       "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"}
    return config


def original_state_dict(config: QWenConfig, seed: int, std: float) -> dict[str, torch.Tensor]:
    """The original model's state_dict for `config`: random weights (norm gains around 1), the resampler's sin-cos
    positions as the original initializes them."""
    with torch.device("meta"):
        model = QWenLMHeadModel(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    rng = np.random.default_rng(seed)
    state = {}
    for name in sorted(shapes):
        noise = rng.standard_normal(shapes[name], dtype=np.float32) * np.float32(std)
        gain = name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight", "ln_pre.weight", "ln_post.weight",
                              "ln_q.weight", "ln_kv.weight"))
        state[name] = torch.from_numpy(noise + np.float32(1.0) if gain else noise)
    state["transformer.visual.attn_pool.pos_embed"] = torch.from_numpy(
        sincos_2d(config.visual["output_dim"], 16, cls_token=False)).float()
    return state


def build_tiny_qwen(out_dir: str | Path, *, num_layers: int = 8, hidden_size: int = 128, seed: int = 0,
                    std: float = 0.1, overwrite: bool = False) -> Path:
    """Write a random-weight Qwen-VL-Chat checkpoint in the original layout; same arguments, same bytes."""
    config = tiny_config(num_layers, hidden_size)
    state = original_state_dict(config, seed, std)
    tensors = [OutputTensor(name, value=state[name]) for name in sorted(state)]
    config_dict = json.loads(config.to_json_string())
    with tempfile.TemporaryDirectory(prefix="shortlvlm-qwen-") as side_files:
        side = Path(side_files)
        write_tiktoken(side / "qwen.tiktoken", tiktoken_ranks())
        (side / "tokenizer_config.json").write_text(json.dumps({  # the hub's, with the size of this model
            "model_max_length": 8192, "tokenizer_class": "QWenTokenizer",
            "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}}))
        (side / "generation_config.json").write_text(json.dumps({
            "chat_format": "chatml", "eos_token_id": NUM_RANKS, "pad_token_id": NUM_RANKS, "max_window_size": 6144,
            "max_new_tokens": 512, "do_sample": True, "top_k": 0, "top_p": 0.5}))
        (side / "processor_config.json").write_text(json.dumps({  # the image size of this model (448 the default)
            "processor_class": "QWenVLProcessor", "image_size": IMAGE_SIZE}))
        return write_checkpoint(out_dir, [Shard(tensors, {"format": "pt"})], config_dict, side_files_from=side,
                                overwrite=overwrite)
