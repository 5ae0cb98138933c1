"""The one writer of checkpoint directories: shards, index, config.json, the source's side files, extra files and
the model card, into a temporary sibling that becomes the output only when everything is written.

Surgery, prune-after-quantize, quantization and the tiny-model builders all write through `write_checkpoint`;
it knows nothing of what the tensors are or how they were chosen.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from shortlvlm_vllm.checkpoint.safetensors_io import OutputTensor, write_shard
from shortlvlm_vllm.files import atomic_output_dir, check_output_dir

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_SHARD_NAME = "model.safetensors"
OTHER_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
MODEL_CARD_NAME = "README.md"
# What write_checkpoint writes itself, so never copies from the source.
_WRITTEN_FILES = {CONFIG_NAME, INDEX_NAME, MODEL_CARD_NAME}


@dataclass(frozen=True)
class Shard:
    """One safetensors file to write: its tensors in order, and its header metadata."""

    tensors: Sequence[OutputTensor]
    metadata: Mapping[str, str] | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def shard_names(count: int) -> list[str]:
    """transformers' names for `count` shards."""
    if count == 1:
        return [SINGLE_SHARD_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def check_checkpoint_output(dst: str | Path, overwrite: bool = False, sources: Iterable[Path] = ()) -> Path:
    """Refuse a checkpoint output early: it exists (without overwrite), overlaps a source, or with overwrite would
    replace a directory that is not a checkpoint (no config.json)."""
    return check_output_dir(dst, overwrite, sources, marker=CONFIG_NAME)


def write_checkpoint(
    dst: str | Path,
    shards: Iterable[Shard],
    config: Mapping,
    *,
    num_shards: int | None = None,
    side_files_from: Path | None = None,
    extra_files: Mapping[str, bytes] | None = None,
    model_card: str | None = None,
    index: bool = False,
    overwrite: bool = False,
    sources: Iterable[Path] = (),
) -> Path:
    """Write a checkpoint directory at `dst` atomically and return `dst`.

    shards: written in order; a generator with `num_shards` given is consumed one shard at a time, so only one
    shard's computed tensors are ever held (a list shows the progress bar's total too).
    side_files_from: a directory whose tokenizer, processor, chat template and generation config are copied.
    index: write model.safetensors.index.json even for a single shard (always written for several).
    sources: directories the output must not overlap (links resolved).
    """
    if num_shards is None:
        shards = list(shards)
        num_shards = len(shards)
    total = sum(shard.nbytes for shard in shards) if isinstance(shards, list) else None
    written = 0
    with atomic_output_dir(dst, overwrite, sources, marker=CONFIG_NAME) as tmp:
        weight_map = {}
        with tqdm(total=total, unit="B", unit_scale=True, desc="writing weights", disable=None) as bar:
            for shard, name in zip(shards, shard_names(num_shards), strict=True):
                written += write_shard(tmp / name, shard.tensors, shard.metadata and dict(shard.metadata), bar.update)
                weight_map.update(dict.fromkeys((t.name for t in shard.tensors), name))
        if index or num_shards > 1:
            index_data = {"metadata": {"total_size": written}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_NAME).write_text(json.dumps(index_data, indent=2) + "\n")
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        if side_files_from is not None:
            copy_side_files(side_files_from, tmp)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        if model_card is not None:
            (tmp / MODEL_CARD_NAME).write_text(model_card)
    log.info("wrote %s (%d shards, %.1f MB of weights)", dst, num_shards, written / 1e6)
    return Path(dst)


def copy_side_files(src_dir: Path, dst_dir: Path) -> None:
    """Tokenizer, processor, chat template, generation config, figures: everything but weights and what is rewritten."""
    for path in sorted(src_dir.iterdir()):
        if (
            path.is_file()
            and not path.name.startswith(".")
            and path.name not in _WRITTEN_FILES
            and path.suffix not in (".safetensors", *OTHER_WEIGHT_SUFFIXES)
            and not path.name.endswith(".index.json")
        ):
            shutil.copyfile(path, dst_dir / path.name)
