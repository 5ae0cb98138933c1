"""Checkpoint surgery: write a copy of a checkpoint with some decoder layers removed.

The writer knows nothing of how layers were chosen or how tensors were edited: it takes the
layers to drop, optional replacement tensors (by source key name) and an opaque record for
config.json's `short_lvlm` section. Everything else is copied byte for byte, in the source's
own key names, so stock transformers and stock vLLM load the result.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from shortlvlm_vllm import __version__
from shortlvlm_vllm.adapters import ArchitectureAdapter, adapter_for_config
from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.model_card import render_model_card
from shortlvlm_vllm.quantized import pruned_quantization_config, quantization_format
from shortlvlm_vllm.safetensors_io import (
    OutputTensor,
    ShardHeader,
    TensorInfo,
    load_tensor,
    read_header,
    write_shard,
)
from shortlvlm_vllm.source import read_config, resolve_model_dir

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_SHARD_NAME = "model.safetensors"
_OTHER_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
_REWRITTEN_FILES = {"config.json", INDEX_NAME, "README.md"}
PACKED_SHAPE_SUFFIX = "_shape"


@dataclass
class SourceCheckpoint:
    """A vision-language checkpoint on disk, read lazily (headers only)."""

    name: str  # what the user passed: hub id or path
    path: Path
    revision: str | None
    config: dict
    adapter: ArchitectureAdapter
    shards: list[ShardHeader]
    num_layers: int

    def tensors(self) -> Iterator[TensorInfo]:
        for shard in self.shards:
            yield from shard.tensors.values()

    @property
    def hidden_size(self) -> int:
        """The decoder's residual width, read from the weights (hub configs often omit it)."""
        names = {t.name for t in self.tensors()}
        # compressed-tensors replaces a quantized `weight` by `weight_packed`, ... and keeps its shape in `weight_shape`
        shapes = {name.removesuffix(PACKED_SHAPE_SUFFIX) for name in names if name.endswith(PACKED_SHAPE_SUFFIX)}
        down_proj = self.adapter.layer_weight_key(names | shapes, 0, "down_proj")
        if down_proj in names:
            return self.tensor_info(down_proj).shape[0]
        return int(load_tensor(self.tensor_info(down_proj + PACKED_SHAPE_SUFFIX))[0])

    def tensor_info(self, name: str) -> TensorInfo:
        for shard in self.shards:
            if name in shard.tensors:
                return shard.tensors[name]
        raise KeyError(name)


def open_checkpoint(source: str | Path, revision: str | None = None) -> SourceCheckpoint:
    path, resolved_revision = resolve_model_dir(source, revision)
    config = read_config(path)
    adapter = adapter_for_config(config, source=str(source))
    shards = [read_header(p) for p in _shard_paths(path)]
    layers = {m[1] for s in shards for k in s.tensors if (m := adapter.match_layer_key(k))}
    if not layers:
        raise ShortLVLMError(f"{source}: no decoder-layer tensors found in its weights.")
    num_layers = max(layers) + 1
    if layers != set(range(num_layers)):
        missing = sorted(set(range(num_layers)) - layers)
        raise ShortLVLMError(f"{source}: the weights lack decoder layers {missing}; the checkpoint is incomplete.")
    for section in adapter.text_configs(copy.deepcopy(config)):
        declared = section.get("num_hidden_layers")
        if declared is not None and declared != num_layers:
            raise ShortLVLMError(
                f"{source}: config.json says {declared} decoder layers but the weights hold {num_layers}."
            )
    return SourceCheckpoint(str(source), path, resolved_revision or revision, config, adapter,
                            shards, num_layers)


def _shard_paths(path: Path) -> list[Path]:
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ShortLVLMError(f"{index} is not a valid safetensors index: {exc}") from exc
        names = list(dict.fromkeys(weight_map.values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise ShortLVLMError(f"{path}: shards listed in {INDEX_NAME} are missing: {', '.join(missing)}")
        return [path / n for n in names]
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        return shards
    others = sorted(p.name for p in path.iterdir() if p.suffix in _OTHER_WEIGHT_SUFFIXES)
    found = f" (found {', '.join(others)})" if others else ""
    raise ShortLVLMError(
        f"{path} has no .safetensors weights{found}. Re-save it with "
        f"`save_pretrained(..., safe_serialization=True)` first."
    )


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


def check_output_dir(dst: str | Path, overwrite: bool = False) -> Path:
    """Refuse an output that exists (without overwrite) or cannot be created; check before long work."""
    dst = Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise ShortLVLMError(f"output {dst} already exists: choose another path or pass --overwrite.")
    if dst.exists() and not dst.is_dir():
        raise ShortLVLMError(f"output {dst} exists and is not a directory.")
    for parent in dst.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ShortLVLMError(f"cannot write {dst}: {parent} is a file, not a directory.")
            break
    return dst


@contextlib.contextmanager
def atomic_output_dir(dst: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `dst`; it becomes `dst` only if the block succeeds."""
    dst = check_output_dir(dst, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if dst.exists():
            old = dst.parent / f".{dst.name}.old-{os.getpid()}"
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old)
        else:
            tmp.rename(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_pruned_checkpoint(
    src: SourceCheckpoint,
    dst: str | Path,
    drop_layers: Sequence[int],
    record: Mapping | None = None,
    *,
    replaced: Mapping[str, torch.Tensor] | None = None,
    added: Mapping[str, torch.Tensor] | None = None,
    extra_files: Mapping[str, bytes] | None = None,
    card_extra: str = "",
    architectures: Sequence[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `src` without `drop_layers` to `dst` (atomically) and return `dst`.

    replaced: new values for source tensors (source key names, same dtype and shape).
    added: tensors the source lacks, named and numbered as the source would name them (renumbered with
    their layer like the rest).
    record: extra entries for the `short_lvlm` section of config.json.
    architectures: replaces config.json's top-level `architectures` (`model_type` is kept), for a
    checkpoint that needs a model class registered by the vLLM plugin.
    extra_files / card_extra: files written beside the weights, and markdown for the model card.
    """
    dst = Path(dst).absolute()
    if dst == src.path.absolute():
        raise ShortLVLMError("output and source are the same directory: choose another output path.")
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

    plan: list[tuple[ShardHeader, list[OutputTensor]]] = []
    for shard in src.shards:
        out = [_output(name, info, replaced) for info in shard.tensors.values() if (name := new_name(info.name))]
        if out:
            plan.append((shard, out))
    plan[-1][1].extend(OutputTensor(new_name(name), value=value) for name, value in (added or {}).items())

    config = _pruned_config(src, drop, record or {})
    if architectures is not None:
        config["architectures"] = list(architectures)
    total = sum(t.nbytes for _, ts in plan for t in ts)
    log.info("writing %s: %d of %d decoder layers kept, %.1f MB of weights",
             dst, len(renumber), src.num_layers, total / 1e6)
    with atomic_output_dir(dst, overwrite) as tmp:
        names = _shard_names(src, len(plan))
        weight_map = {}
        with tqdm(total=total, unit="B", unit_scale=True, desc="writing weights", disable=None) as bar:
            for (shard, tensors), name in zip(plan, names, strict=True):
                write_shard(tmp / name, tensors, shard.metadata, bar.update)
                weight_map.update({t.name: name for t in tensors})
        if len(names) > 1 or (src.path / INDEX_NAME).is_file():
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_side_files(src.path, tmp)
        for fname, data in (extra_files or {}).items():
            (tmp / fname).write_bytes(data)
        (tmp / "README.md").write_text(render_model_card(config["short_lvlm"], card_extra))
    log.info("wrote %s", dst)
    return dst


def layer_renumbering(num_layers: int, drop: Sequence[int]) -> dict[int, int]:
    """Kept layer's old index -> its index in the pruned checkpoint."""
    dropped = set(drop)
    return {old: new for new, old in enumerate(i for i in range(num_layers) if i not in dropped)}


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
    if quantization_format(src.config, src.name):
        config["quantization_config"] = pruned_quantization_config(src, layer_renumbering(src.num_layers, drop))
    kept = src.num_layers - len(drop)
    for section in src.adapter.text_configs(config):
        section["num_hidden_layers"] = kept
        for key in src.adapter.per_layer_config_lists:
            values = section.get(key)
            if isinstance(values, list) and len(values) == src.num_layers:
                section[key] = [v for i, v in enumerate(values) if i not in drop]
        for key in src.adapter.layer_boundary_config_keys:
            boundary = section.get(key)
            if isinstance(boundary, int):
                section[key] = boundary - sum(1 for i in drop if i < boundary)
    section = {
        "tool": "shortlvlm-vllm",
        "tool_version": __version__,
        "source": src.name,
        "source_revision": src.revision,
        "source_num_layers": src.num_layers,
        "pruned_layers": drop,
        **record,
    }
    if "short_lvlm" in src.config:
        section["previous"] = src.config["short_lvlm"]
    config["short_lvlm"] = section
    return config


def _shard_names(src: SourceCheckpoint, count: int) -> list[str]:
    if count == 1:
        return [SINGLE_SHARD_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def copy_side_files(src_dir: Path, dst_dir: Path) -> None:
    """Tokenizer, processor, chat template, generation config: everything but weights."""
    for path in sorted(src_dir.iterdir()):
        if (
            path.is_file()
            and not path.name.startswith(".")
            and path.name not in _REWRITTEN_FILES
            and path.suffix not in (".safetensors", *_OTHER_WEIGHT_SUFFIXES)
            and not path.name.endswith(".index.json")
        ):
            shutil.copyfile(path, dst_dir / path.name)
