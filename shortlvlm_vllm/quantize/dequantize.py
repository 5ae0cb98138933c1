"""A dense copy of a quantized checkpoint, for the calibration pass.

Calibration needs the model's function, which for compressed-tensors checkpoints transformers cannot load as
written here (their `ignore` list uses the hub layout's module names, which transformers' module names do not
match, so it would treat the vision tower as quantized): `dequantized_copy` writes a temporary dense checkpoint
instead, with compressed-tensors' own decompressors, and calibration runs on it.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

from shortlvlm_vllm.checkpoint.reader import SourceCheckpoint, open_checkpoint
from shortlvlm_vllm.checkpoint.safetensors_io import OutputTensor, load_tensor
from shortlvlm_vllm.checkpoint.writer import INDEX_NAME, Shard, write_checkpoint

log = logging.getLogger(__name__)


@contextlib.contextmanager
def dequantized_copy(src: SourceCheckpoint) -> Iterator[SourceCheckpoint]:
    """A temporary dense copy of a quantized `src` (each quantized weight decompressed, all else copied)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import match_quantizable_tensors

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

    def shards() -> Iterator[Shard]:  # one shard's dense weights in memory at a time
        for shard in src.shards:
            written = []
            for name, info in shard.tensors.items():
                module, _, param = name.rpartition(".")
                if name not in compressed:
                    written.append(OutputTensor(name, copy_from=info))
                elif param == modules[module][2][0]:
                    written.append(OutputTensor(f"{module}.weight", value=dense(module)))
            yield Shard(written, shard.metadata)

    config = copy.deepcopy(src.config)
    del config["quantization_config"]
    with tempfile.TemporaryDirectory(prefix="shortlvlm-dequantized-") as tmp:
        out = Path(tmp) / "dense"
        log.info("writing a dequantized copy of %s (%d quantized weights) to %s for calibration",
                 src.name, len(modules), out)
        write_checkpoint(out, shards(), config, num_shards=len(src.shards), side_files_from=src.path,
                         index=(src.path / INDEX_NAME).is_file())
        yield open_checkpoint(out)
