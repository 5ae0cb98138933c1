"""Quantized sources: which formats can be pruned, their per-layer config entries, and a dense copy.

Dropping layers from a quantized checkpoint is the same streamed surgery as for a dense one (the
packed tensors of a layer are renumbered like any other), but the quantization config names
modules, some of them in decoder layers: those entries are renumbered or dropped. Calibration needs
the model's function, which for compressed-tensors checkpoints transformers cannot load as written
here (their `ignore` list uses the hub layout's module names, which transformers' module names do
not match, so it would treat the vision tower as quantized): `dequantized_copy` writes a temporary
dense checkpoint instead, with compressed-tensors' own decompressors, and calibration runs on it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import re
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from shortlvlm_vllm.errors import ShortLVLMError

if TYPE_CHECKING:
    from shortlvlm_vllm.checkpoint import SourceCheckpoint

log = logging.getLogger(__name__)

# quant_method -> the formats this project prunes (what `shortlvlm quantize` writes).
SUPPORTED_FORMATS: dict[str, tuple[str, ...]] = {"compressed-tensors": ("pack-quantized",)}
# quantization_config sections that must be empty: they carry per-tensor layouts the surgery does not handle.
UNSUPPORTED_SECTIONS = ("sparsity_config", "transform_config")
# Where quantization_config lists module names ("*": every entry of a dict); entries naming a module of a
# decoder layer are renumbered with it, or dropped with it.
MODULE_NAME_LISTS: tuple[tuple[str, ...], ...] = (("ignore",), ("config_groups", "*", "targets"))
REGEX_PREFIX = "re:"


def _supported() -> str:
    return "; ".join(f"{method} with format {', '.join(formats)}" for method, formats in SUPPORTED_FORMATS.items())


def quantization_format(config: Mapping, source: str) -> str | None:
    """The source's quantization format (None: not quantized); a clear error for one that cannot be pruned."""
    quantization = config.get("quantization_config")
    if not quantization:
        return None
    method = quantization.get("quant_method", "unknown")
    formats = {quantization.get("format")} | {
        group.get("format") for group in (quantization.get("config_groups") or {}).values()}
    formats.discard(None)
    extras = [key for key in UNSUPPORTED_SECTIONS if quantization.get(key)]
    supported = SUPPORTED_FORMATS.get(method, ())
    if not formats or not formats <= set(supported) or extras:
        described = method + (f" ({', '.join(sorted(formats))})" if formats else "")
        described += "".join(f" with a {key}" for key in extras)
        raise ShortLVLMError(
            f"{source} is quantized as {described}, which cannot be pruned. Supported: {_supported()} "
            f"(W4A16 as `shortlvlm quantize` writes it). Prune the full-precision checkpoint and quantize the "
            f"result instead."
        )
    return f"{method} ({', '.join(sorted(formats))})"


def _module_lists(quantization: dict) -> Iterator[list]:
    """Every list of module names in `quantization`, by MODULE_NAME_LISTS."""
    def walk(node, path):
        if not path:
            if isinstance(node, list):
                yield node
            return
        head, rest = path[0], path[1:]
        if isinstance(node, dict):
            for key in (node if head == "*" else [head]):
                if key in node:
                    yield from walk(node[key], rest)

    for path in MODULE_NAME_LISTS:
        yield from walk(quantization, path)


def pruned_quantization_config(src: SourceCheckpoint, renumber: Mapping[int, int]) -> dict:
    """The source's quantization_config for the pruned checkpoint (`renumber`: kept old layer -> new).

    Names of decoder-layer modules are renumbered, or dropped with their layer. A regex entry is kept as
    written if it selects the same modules after renumbering, and refused otherwise.
    """
    quantization = copy.deepcopy(src.config["quantization_config"])
    before = sorted({t.name.rpartition(".")[0] for t in src.tensors()})
    after = {}  # kept module name, old -> new
    for module in before:
        match = src.adapter.match_layer_key(module)
        if match is None:
            after[module] = module
        elif match[1] in renumber:
            after[module] = f"{match[0]}{renumber[match[1]]}{match[2]}"
    for names in _module_lists(quantization):
        rewritten = []
        for name in names:
            if name.startswith(REGEX_PREFIX):
                _check_regex(name, after)
                rewritten.append(name)
            elif (match := src.adapter.match_layer_key(name)) is None:
                rewritten.append(name)
            elif match[1] in renumber:
                rewritten.append(f"{match[0]}{renumber[match[1]]}{match[2]}")
        names[:] = rewritten
    return quantization


def _check_regex(entry: str, renamed: Mapping[str, str]) -> None:
    pattern = re.compile(entry.removeprefix(REGEX_PREFIX))
    for old, new in renamed.items():
        if bool(pattern.match(old)) != bool(pattern.match(new)):
            raise ShortLVLMError(
                f"quantization_config entry {entry!r} selects {old} but not its renumbered name {new} (or the "
                f"reverse): it names decoder layers by index. Replace it by the module names it means and prune again."
            )


@contextlib.contextmanager
def dequantized_copy(src: SourceCheckpoint) -> Iterator[SourceCheckpoint]:
    """A temporary dense copy of a quantized `src` (each quantized weight decompressed, all else copied)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import match_quantizable_tensors

    from shortlvlm_vllm.checkpoint import INDEX_NAME, copy_side_files, open_checkpoint
    from shortlvlm_vllm.safetensors_io import OutputTensor, load_tensor, write_shard

    quantization = QuantizationConfig.model_validate(src.config["quantization_config"])
    tensors = {t.name: t for t in src.tensors()}
    modules = {}  # module name -> (compressor, scheme, its compressed parameter names)
    for scheme in quantization.config_groups.values():
        scheme.format = scheme.format or quantization.format
        compressor = BaseCompressor.get_value_from_registry(scheme.format)
        params = compressor.compression_param_names(scheme)
        for module, _ in match_quantizable_tensors(tensors, quantization.ignore, scheme.targets, [params[0]]):
            modules[module] = (compressor, scheme, params)
    compressed = {f"{module}.{param}" for module, (_, _, params) in modules.items() for param in params}

    def dense(module: str):
        compressor, scheme, params = modules[module]
        state = {param: load_tensor(tensors[f"{module}.{param}"]) for param in params}
        return compressor.decompress(state, scheme)["weight"]

    with tempfile.TemporaryDirectory(prefix="shortlvlm-dequantized-") as tmp:
        out = Path(tmp)
        log.info("writing a dequantized copy of %s (%d quantized weights) to %s for calibration",
                 src.name, len(modules), out)
        weight_map = {}
        for shard in src.shards:
            written = []
            for name, info in shard.tensors.items():
                module, _, param = name.rpartition(".")
                if name not in compressed:
                    written.append(OutputTensor(name, copy_from=info))
                elif param == modules[module][2][0]:
                    written.append(OutputTensor(f"{module}.weight", value=dense(module)))
            write_shard(out / shard.path.name, written, shard.metadata)
            weight_map.update(dict.fromkeys((t.name for t in written), shard.path.name))
        if (src.path / INDEX_NAME).is_file():
            (out / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2) + "\n")
        config = copy.deepcopy(src.config)
        del config["quantization_config"]
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_side_files(src.path, out)
        yield open_checkpoint(out)
