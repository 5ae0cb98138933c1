"""Opening a checkpoint: its config, its architecture's adapter and its shards' headers, checked, no tensor read."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from shortlvlm_vllm.adapters import ArchitectureAdapter, adapter_for_config
from shortlvlm_vllm.checkpoint.hub import hub_cache_dir, read_config, resolve_model_dir
from shortlvlm_vllm.checkpoint.quantization_config import quantization_format
from shortlvlm_vllm.checkpoint.safetensors_io import ShardHeader, TensorInfo, load_tensor, read_header
from shortlvlm_vllm.checkpoint.writer import INDEX_NAME, OTHER_WEIGHT_SUFFIXES
from shortlvlm_vllm.errors import ShortLVLMError
from shortlvlm_vllm.files import protected_paths

# compressed-tensors replaces a quantized `weight` by `weight_packed`, ... and keeps its shape in `weight_shape`
PACKED_SHAPE_SUFFIX = "_shape"


@dataclass
class SourceCheckpoint:
    """A vision-language checkpoint on disk, read lazily (headers only)."""

    name: str  # what the user passed: hub id, shipped model name or path
    path: Path
    revision: str | None
    config: dict
    adapter: ArchitectureAdapter
    shards: list[ShardHeader]
    num_layers: int

    def tensors(self) -> Iterator[TensorInfo]:
        for shard in self.shards:
            yield from shard.tensors.values()

    @cached_property
    def quantization(self) -> str | None:
        """The quantization format (None: full precision); a clear error for one that cannot be pruned."""
        return quantization_format(self.config, self.name)

    @property
    def hidden_size(self) -> int:
        """The decoder's residual width, read from the weights (hub configs often omit it)."""
        names = {t.name for t in self.tensors()}
        shapes = {name.removesuffix(PACKED_SHAPE_SUFFIX) for name in names if name.endswith(PACKED_SHAPE_SUFFIX)}
        down_proj = self.adapter.layer_weight_key(names | shapes, 0, "down_proj")
        if down_proj in names:
            return self.tensor_info(down_proj).shape[0]
        return int(load_tensor(self.tensor_info(down_proj + PACKED_SHAPE_SUFFIX))[0])

    @property
    def protected(self) -> list[Path]:
        """Paths no output may overlap: the checkpoint, the directories its linked files point into, and for a hub
        download the whole hub cache."""
        cache = hub_cache_dir().resolve()
        return protected_paths(self.path) + ([cache] if cache in self.path.resolve().parents else [])

    @property
    def fingerprint(self) -> dict:
        """What tells two versions of this checkpoint apart cheaply (see `checkpoint_fingerprint`)."""
        return checkpoint_fingerprint(self.path)

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
    others = sorted(p.name for p in path.iterdir() if p.suffix in OTHER_WEIGHT_SUFFIXES)
    found = f" (found {', '.join(others)})" if others else ""
    raise ShortLVLMError(
        f"{path} has no .safetensors weights{found}. Re-save it with "
        f"`save_pretrained(..., safe_serialization=True)` first."
    )


def checkpoint_fingerprint(path: Path) -> dict:
    """config.json's sha256 and each weight file's size: what tells two versions of a checkpoint apart without
    reading its weights (a retrained model rewrites its config, whose training record changes)."""
    return {"config_sha256": hashlib.sha256((path / "config.json").read_bytes()).hexdigest(),
            "weights": {f.name: f.stat().st_size for f in sorted(path.glob("*.safetensors"))}}
