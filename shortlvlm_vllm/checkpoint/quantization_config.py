"""The quantization_config of a quantized source: which formats can be pruned, and its entries renumbered.

Dropping layers from a quantized checkpoint is the same streamed surgery as for a dense one (the
packed tensors of a layer are renumbered like any other), but the quantization config names
modules, some of them in decoder layers: those entries are renumbered or dropped.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Iterator, Mapping

from shortlvlm_vllm.adapters import ArchitectureAdapter
from shortlvlm_vllm.errors import ShortLVLMError

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


def pruned_quantization_config(
    quantization: Mapping, adapter: ArchitectureAdapter, tensor_names: Iterable[str], renumber: Mapping[int, int]
) -> dict:
    """A source's quantization_config for its pruned copy (`renumber`: kept old layer -> new).

    Names of decoder-layer modules are renumbered, or dropped with their layer. A regex entry is kept as
    written if it selects the same modules after renumbering (of the source's modules, from `tensor_names`),
    and refused otherwise.
    """
    quantization = copy.deepcopy(dict(quantization))
    before = sorted({name.rpartition(".")[0] for name in tensor_names})
    after = {}  # kept module name, old -> new
    for module in before:
        match = adapter.match_layer_key(module)
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
            elif (match := adapter.match_layer_key(name)) is None:
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
