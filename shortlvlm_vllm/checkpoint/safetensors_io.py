"""Streaming safetensors reading and writing, one tensor's bytes at a time.

The official writer needs every tensor of a shard in memory; a 7B checkpoint has 5 GB shards.
Copying raw byte ranges keeps peak memory at one read buffer and copies untouched tensors
exactly, which is what checkpoint surgery needs.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from shortlvlm_vllm.errors import ShortLVLMError

CHUNK_BYTES = 16 << 20
_MAX_HEADER_BYTES = 100 << 20

TORCH_TO_SAFETENSORS = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
SAFETENSORS_TO_TORCH = {v: k for k, v in TORCH_TO_SAFETENSORS.items()}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in `file`
    end: int


@dataclass(frozen=True)
class ShardHeader:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None


def read_header(path: Path) -> ShardHeader:
    """Parse and validate a safetensors header; a corrupt or truncated file is named in the error."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise ValueError("file is shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(_MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"header length {header_len} does not fit in a {size}-byte file")
            header = json.loads(f.read(header_len))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ShortLVLMError(f"weight file {path} is corrupt or truncated: {exc}") from exc
    data_start = 8 + header_len
    metadata = header.pop("__metadata__", None)
    tensors = {}
    end_max = 0
    for name, entry in header.items():
        try:
            begin, end = entry["data_offsets"]
            info = TensorInfo(name, entry["dtype"], tuple(entry["shape"]), path,
                              data_start + begin, data_start + end)
        except (KeyError, TypeError, ValueError) as exc:
            raise ShortLVLMError(f"weight file {path} is corrupt: bad entry for {name}") from exc
        tensors[name] = info
        end_max = max(end_max, info.end)
    if end_max > size:
        raise ShortLVLMError(
            f"weight file {path} is truncated: its header needs {end_max} bytes, the file has {size}."
        )
    return ShardHeader(path, tensors, metadata)


def load_tensor(info: TensorInfo) -> torch.Tensor:
    """One tensor, read into memory (for the few tensors an edit needs)."""
    with open(info.file, "rb") as f:
        f.seek(info.start)
        data = bytearray(f.read(info.end - info.start))
    dtype = SAFETENSORS_TO_TORCH[info.dtype]
    if not data:
        return torch.empty(info.shape, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype).reshape(info.shape)


@dataclass(frozen=True)
class OutputTensor:
    """A tensor to write: copied byte for byte from `copy_from`, or the bytes of `value`."""

    name: str
    copy_from: TensorInfo | None = None
    value: torch.Tensor | None = None

    @property
    def dtype(self) -> str:
        return self.copy_from.dtype if self.copy_from else TORCH_TO_SAFETENSORS[self.value.dtype]

    @property
    def shape(self) -> list[int]:
        return list(self.copy_from.shape if self.copy_from else self.value.shape)

    @property
    def nbytes(self) -> int:
        if self.copy_from:
            return self.copy_from.end - self.copy_from.start
        return self.value.numel() * self.value.element_size()


def write_shard(
    path: Path,
    tensors: Iterable[OutputTensor],
    metadata: dict[str, str] | None = None,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> int:
    """Write one safetensors file, streaming each tensor's bytes; returns the data size."""
    tensors = list(tensors)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(header_bytes)))
        out.write(header_bytes)
        for t in tensors:
            if t.copy_from is not None:
                _copy_range(t.copy_from, out, on_bytes)
            else:
                out.write(t.value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
                on_bytes(t.nbytes)
    return offset


def _copy_range(info: TensorInfo, out: BinaryIO, on_bytes: Callable[[int], None]) -> None:
    """Copy a tensor's bytes in the kernel (copy_file_range, as `cp` does), through a buffer where it cannot."""
    out.flush()
    position, end = info.start, info.end
    with open(info.file, "rb") as src:
        while position < end:
            try:
                copied = os.copy_file_range(src.fileno(), out.fileno(), min(CHUNK_BYTES, end - position), position)
            except OSError:  # across file systems on some kernels, or a file system without it
                src.seek(position)
                copied = out.write(src.read(min(CHUNK_BYTES, end - position)))
                out.flush()
            if not copied:
                raise ShortLVLMError(f"weight file {info.file} ended early while copying {info.name}.")
            position += copied
            on_bytes(copied)
