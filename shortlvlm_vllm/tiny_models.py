"""Tiny random-weight LLaVA checkpoints built offline in seconds, in the hub layout that vLLM loads
(`shortlvlm make-tiny-llava`), and the writer of a transformers model in that layout (the toy model uses it).

Same transformers classes, key names and files (tokenizer, processor, chat template) as llava-hf/llava-1.5-7b-hf.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from shortlvlm_vllm.adapters import adapter_for_config
from shortlvlm_vllm.adapters.llava import LLAVA
from shortlvlm_vllm.checkpoint.safetensors_io import OutputTensor
from shortlvlm_vllm.checkpoint.writer import Shard, write_checkpoint

# The chat template of llava-hf/llava-1.5-7b-hf: "USER: <image>\n{question} ASSISTANT:".
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]


def byte_level_bpe(special_tokens: list[str], unk_token: str | None = None, vocab_size: int | None = None):
    """A tokenizers.Tokenizer where every byte is a token, special tokens first; with `vocab_size`, padded with
    two-byte tokens that text never encodes to (no merges) but that decode, so a model of a real vocabulary size can
    generate any id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = special_tokens + alphabet
    if vocab_size is not None:
        pairs = (a + b for a in alphabet for b in alphabet)
        tokens += [next(pairs) for _ in range(vocab_size - len(tokens))]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk_token))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(special_tokens)
    return tok


def build_byte_tokenizer(vocab_size: int | None = None):
    """A byte-level tokenizer (every byte a token) with LLaVA's special tokens (padded to `vocab_size`)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = byte_level_bpe(SPECIAL_TOKENS, unk_token="<unk>", vocab_size=vocab_size)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


def llava_config(
    tokenizer,
    *,
    num_layers: int,
    hidden_size: int,
    intermediate_size: int | None = None,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    vocab_size: int | None = None,
    vision_hidden_size: int = 64,
    vision_intermediate_size: int | None = None,
    vision_heads: int | None = None,
    vision_layers: int = 2,
    image_size: int = 64,
    patch_size: int = 8,
    initializer_range: float = 0.02,
):
    """A LLaVA-1.5-architecture config; the defaults give heads of size 32 (LLaVA-1.5-7B: 4096 x 32 layers,
    intermediate 11008, 32 heads, vocabulary 32064; CLIP ViT-L/14-336: 1024 x 24 layers, intermediate 4096, 16 heads,
    336 px, patch 14)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    special = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "<pad>", "<image>")}
    num_heads = num_heads or hidden_size // 32
    text_config = LlamaConfig(
        vocab_size=vocab_size or -(-len(tokenizer) // 32) * 32, hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads or max(1, hidden_size // 64),
        head_dim=hidden_size // num_heads, max_position_embeddings=1024, rms_norm_eps=1e-5,
        initializer_range=initializer_range, tie_word_embeddings=False, bos_token_id=special["<s>"],
        eos_token_id=special["</s>"], pad_token_id=special["<pad>"],
    )
    vision_config = CLIPVisionConfig(
        hidden_size=vision_hidden_size, intermediate_size=vision_intermediate_size or 2 * vision_hidden_size,
        projection_dim=vision_hidden_size, num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads or vision_hidden_size // 32, image_size=image_size, patch_size=patch_size,
        initializer_range=initializer_range,
    )
    config = LlavaConfig(
        vision_config=vision_config, text_config=text_config, image_token_index=special["<image>"],
        projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=-2,
        image_seq_length=(image_size // patch_size) ** 2, tie_word_embeddings=False,
    )
    config.architectures = list(LLAVA.architectures)
    return config


def llava_processor(tokenizer, config):
    """The CLIP image processor and LLaVA processor llava-hf ships, for `config`'s image and patch size."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    vision = config.vision_config
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": vision.image_size}, crop_size={"height": vision.image_size, "width": vision.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=vision.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=tokenizer.chat_template,
    )


def make_llava(tokenizer, *, seed: int = 0, **config_kwargs):
    """A randomly initialised LLaVA-1.5-architecture model (llava_config's arguments) and its processor."""
    from transformers import LlavaForConditionalGeneration

    config = llava_config(tokenizer, **config_kwargs)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    return model, llava_processor(tokenizer, config)


def _shard_plan(sizes: list[tuple[str, int]], max_shard_bytes: int | None) -> list[list[str]]:
    """Names in order, cut into shards of at most `max_shard_bytes` (a larger tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes:
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


@contextlib.contextmanager
def _side_files(processor, text_config) -> Iterator[Path]:
    """A temporary directory with the processor's files and a generation config, for write_checkpoint to copy."""
    from transformers import GenerationConfig

    with tempfile.TemporaryDirectory(prefix="shortlvlm-processor-") as side_files:
        processor.save_pretrained(side_files)
        GenerationConfig(bos_token_id=text_config.bos_token_id, eos_token_id=text_config.eos_token_id,
                         pad_token_id=text_config.pad_token_id).save_pretrained(side_files)
        yield Path(side_files)


def save_hub_checkpoint(
    model,
    processor,
    out_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int | None = None,
    hub_layout: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write a model with its processor and generation config, its weights in the hub's key names
    (the adapter's hub_key_renames) or, with hub_layout=False, in transformers' own names."""
    adapter = adapter_for_config(model.config.to_dict())
    model.config.dtype = str(dtype).removeprefix("torch.")
    rename = adapter.hub_key if hub_layout else str
    state = {rename(k): v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    tensors = {name: OutputTensor(name, value=state[name]) for name in sorted(state)}
    plan = _shard_plan([(name, t.nbytes) for name, t in tensors.items()], max_shard_bytes)
    with _side_files(processor, model.config.get_text_config()) as side_files:
        return write_checkpoint(out_dir, [Shard([tensors[n] for n in names], {"format": "pt"}) for names in plan],
                                json.loads(model.config.to_json_string()), side_files_from=side_files,
                                overwrite=overwrite)


def write_random_llava(
    config,
    processor,
    out_dir: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 2 << 30,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """A random-weight checkpoint of `config` (a LlavaConfig of any size) in the hub layout, generated shard by shard:
    memory holds one shard, never the model, so a 7B-shaped model is written on a machine with a few GB.

    Weights are normal(0, initializer_range), norm gains one, biases zero: the shapes and the compute of the real
    model, not its function."""
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        skeleton = LlavaForConditionalGeneration(config)
    config.dtype = str(dtype).removeprefix("torch.")
    rename = adapter_for_config(config.to_dict()).hub_key
    shapes = {rename(name): (name, tuple(t.shape)) for name, t in skeleton.state_dict().items()}
    nbytes = {name: math.prod(shape) * dtype.itemsize for name, (_, shape) in shapes.items()}
    plan = _shard_plan([(name, nbytes[name]) for name in sorted(shapes)], max_shard_bytes)
    std = config.text_config.initializer_range
    generator = torch.Generator().manual_seed(seed)

    def random_tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name.endswith(".bias"):
            return torch.zeros(shape, dtype=dtype)
        if "norm" in name.rsplit(".", 2)[-2]:  # RMSNorm and LayerNorm gains (layernorm, layer_norm1, pre_layrnorm)
            return torch.ones(shape, dtype=dtype)
        return (torch.randn(shape, generator=generator) * std).to(dtype)

    def shards() -> Iterator[Shard]:
        for names in plan:
            yield Shard([OutputTensor(name, value=random_tensor(shapes[name][0], shapes[name][1])) for name in names],
                        {"format": "pt"})

    with _side_files(processor, config.text_config) as side_files:
        return write_checkpoint(out_dir, shards(), json.loads(config.to_json_string()), num_shards=len(plan),
                                side_files_from=side_files, overwrite=overwrite)


def build_tiny_llava(
    out_dir: str | Path,
    *,
    num_layers: int = 8,
    hidden_size: int = 128,
    image_size: int = 64,
    patch_size: int = 8,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    initializer_range: float = 0.1,
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a random-weight LLaVA-1.5-architecture checkpoint; same arguments, same bytes."""
    model, processor = make_llava(
        build_byte_tokenizer(), num_layers=num_layers, hidden_size=hidden_size, image_size=image_size,
        patch_size=patch_size, initializer_range=initializer_range, seed=seed,
    )
    return save_hub_checkpoint(model, processor, out_dir, dtype=dtype, max_shard_bytes=max_shard_bytes,
                               overwrite=overwrite)
