"""Checkpoint surgery: a copy of a checkpoint with some decoder layers removed and the rest renumbered.

Surgery knows nothing of how layers were chosen or how tensors were edited: it takes the layers to drop,
optional replacement and added tensors (by source key name) and the entries of config.json's `short_lvlm`
section. Everything else is copied byte for byte, in the source's own key names, so stock transformers and
stock vLLM load the result.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from shortlvlm_vllm.checkpoint.model_card import render_model_card, short_lvlm_section
from shortlvlm_vllm.checkpoint.quantization_config import pruned_quantization_config
from shortlvlm_vllm.checkpoint.reader import SourceCheckpoint
from shortlvlm_vllm.checkpoint.safetensors_io import OutputTensor, TensorInfo
from shortlvlm_vllm.checkpoint.writer import INDEX_NAME, Shard, write_checkpoint
from shortlvlm_vllm.errors import ShortLVLMError

log = logging.getLogger(__name__)


def validate_drop_layers(drop_layers: Sequence[int], num_layers: int) -> list[int]:
    seen: set[int] = set()
    for layer in drop_layers:
        if not 0 <= layer < num_layers:
            raise ShortLVLMError(
                f"layer {layer} is out of range: the model has {num_layers} decoder layers (0..{num_layers - 1})."
            )
        if layer in seen:
            raise ShortLVLMError(f"layer {layer} is listed more than once.")
        seen.add(layer)
    if len(seen) == num_layers:
        raise ShortLVLMError(f"cannot drop all {num_layers} decoder layers: keep at least one.")
    return sorted(seen)


def layer_renumbering(num_layers: int, drop: Sequence[int]) -> dict[int, int]:
    """Kept layer's old index -> its index in the pruned checkpoint."""
    dropped = set(drop)
    return {old: new for new, old in enumerate(i for i in range(num_layers) if i not in dropped)}


def write_pruned_checkpoint(
    src: SourceCheckpoint,
    dst: str | Path,
    drop_layers: Sequence[int],
    record: Mapping | None = None,
    *,
    replaced: Mapping[str, torch.Tensor] | None = None,
    added: Mapping[str, torch.Tensor] | None = None,
    extra_files: Mapping[str, bytes] | None = None,
    architectures: Sequence[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `src` without `drop_layers` to `dst` (atomically) and return `dst`.

    replaced: new values for source tensors (source key names, same dtype and shape).
    added: tensors the source lacks, named and numbered as the source would name them (renumbered with
    their layer like the rest).
    record: entries for the `short_lvlm` section of config.json (the model card shows them).
    architectures: replaces config.json's top-level `architectures` (`model_type` is kept), for a
    checkpoint that needs a model class registered by the vLLM plugin.
    extra_files: files written beside the weights (figures the record lists).
    """
    drop = validate_drop_layers(drop_layers, src.num_layers)
    replaced = dict(replaced or {})
    _check_replacements(src, replaced, drop)
    _check_additions(src, added or {}, drop)
    renumber = layer_renumbering(src.num_layers, drop)

    def new_name(name: str) -> str | None:
        if m := src.adapter.match_layer_key(name):
            prefix, layer, rest = m
            return f"{prefix}{renumber[layer]}{rest}" if layer in renumber else None
        return name

    shards = []
    for shard in src.shards:
        out = [_output(name, info, replaced) for info in shard.tensors.values() if (name := new_name(info.name))]
        if out:
            shards.append(Shard(out, shard.metadata))
    shards[-1] = Shard([*shards[-1].tensors, *(OutputTensor(new_name(name), value=value)
                                               for name, value in (added or {}).items())], shards[-1].metadata)

    config = _pruned_config(src, drop, record or {})
    if architectures is not None:
        config["architectures"] = list(architectures)
    log.info("writing %s: %d of %d decoder layers kept, %.1f MB of weights",
             dst, len(renumber), src.num_layers, sum(s.nbytes for s in shards) / 1e6)
    return write_checkpoint(
        dst, shards, config, side_files_from=src.path, extra_files=extra_files,
        model_card=render_model_card(config["short_lvlm"]), index=(src.path / INDEX_NAME).is_file(),
        overwrite=overwrite, sources=src.protected,
    )


def _output(name: str, info: TensorInfo, replaced: Mapping[str, torch.Tensor]) -> OutputTensor:
    if info.name in replaced:
        return OutputTensor(name, value=replaced[info.name])
    return OutputTensor(name, copy_from=info)


def _check_replacements(src: SourceCheckpoint, replaced: Mapping[str, torch.Tensor], drop: list[int]) -> None:
    for name, value in replaced.items():
        try:
            info = src.tensor_info(name)
        except KeyError:
            raise ShortLVLMError(f"cannot replace {name}: the source has no such tensor.") from None
        if tuple(value.shape) != info.shape or OutputTensor(name, value=value).dtype != info.dtype:
            raise ShortLVLMError(
                f"replacement for {name} is {value.dtype} {tuple(value.shape)}, "
                f"the source tensor is {info.dtype} {info.shape}."
            )
        m = src.adapter.match_layer_key(name)
        if m and m[1] in drop:
            raise ShortLVLMError(f"cannot replace {name}: its layer {m[1]} is being dropped.")


def _check_additions(src: SourceCheckpoint, added: Mapping[str, torch.Tensor], drop: list[int]) -> None:
    for name in added:
        if any(name in shard.tensors for shard in src.shards):
            raise ShortLVLMError(f"cannot add {name}: the source already has it (replace it instead).")
        m = src.adapter.match_layer_key(name)
        if m and m[1] in drop:
            raise ShortLVLMError(f"cannot add {name}: its layer {m[1]} is being dropped.")


def _pruned_config(src: SourceCheckpoint, drop: list[int], record: Mapping) -> dict:
    config = copy.deepcopy(src.config)
    renumber = layer_renumbering(src.num_layers, drop)
    if src.quantization:
        config["quantization_config"] = pruned_quantization_config(
            src.config["quantization_config"], src.adapter, (t.name for t in src.tensors()), renumber)
    for section in src.adapter.text_configs(config):
        section["num_hidden_layers"] = len(renumber)
        for key in src.adapter.per_layer_config_lists:
            values = section.get(key)
            if isinstance(values, list) and len(values) == src.num_layers:
                section[key] = [v for i, v in enumerate(values) if i not in drop]
        for key in src.adapter.layer_boundary_config_keys:
            boundary = section.get(key)
            if isinstance(boundary, int):
                section[key] = boundary - sum(1 for i in drop if i < boundary)
    config["short_lvlm"] = short_lvlm_section(
        src.name, src.revision, {"source_num_layers": src.num_layers, "pruned_layers": drop, **record},
        previous=src.config.get("short_lvlm"))
    return config
