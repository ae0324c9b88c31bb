"""Streaming safetensors I/O for the quantizer: memory-mapped input views and shards written at planned offsets.

Reading: a tensor is a zero-copy view of its shard's mapping; once a row block is used its pages are dropped from
this process (`MADV_DONTNEED`), so resident memory does not grow with the shard, however large.
Writing: a shard's header is known before any tensor is computed (shapes follow from the input's), so it is written
first and every tensor goes straight to its byte range, by any worker, in any order. The file is preallocated,
which makes a full disk fail at the shard's start rather than halfway through it.
"""
import json
import mmap
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.checkpoint import TensorInfo
from runtime.errors import K2Error

TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
HEADER_ALIGN = 8


class MappedShards:
    """Read-only views of tensors in memory-mapped shards (mapped on first use, private so never written back)."""

    def __init__(self):
        self._shards: dict[Path, tuple[mmap.mmap, int, dict]] = {}
        self._lock = threading.Lock()

    def _open(self, path: Path) -> tuple[mmap.mmap, int, dict]:
        with self._lock:
            if path not in self._shards:
                with path.open("rb") as f:
                    (header_len,) = struct.unpack("<Q", f.read(8))
                    header = json.loads(f.read(header_len))
                    mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
                self._shards[path] = (mapping, 8 + header_len, header)
            return self._shards[path]

    def byte_range(self, info: TensorInfo) -> tuple[int, int]:
        _, data_start, header = self._open(info.shard)
        start, end = header[info.name]["data_offsets"]
        return data_start + start, data_start + end

    def tensor(self, info: TensorInfo) -> torch.Tensor:
        mapping = self._open(info.shard)[0]
        start, _ = self.byte_range(info)
        dtype = TORCH_DTYPES[info.dtype]
        flat = torch.frombuffer(mapping, dtype=dtype, count=info.numel, offset=start) if info.numel else \
            torch.empty(0, dtype=dtype)
        return flat.view(info.shape)

    def raw(self, info: TensorInfo, start: int, end: int) -> memoryview:
        """Bytes [start, end) of the tensor's data, without a copy."""
        base, _ = self.byte_range(info)
        return memoryview(self._open(info.shard)[0])[base + start:base + end]

    def release(self, info: TensorInfo, start: int = 0, end: int | None = None):
        """Drop the mapped pages of bytes [start, end) of a tensor from this process (they stay in the page cache)."""
        mapping = self._open(info.shard)[0]
        base, tensor_end = self.byte_range(info)
        first = (base + start) // mmap.PAGESIZE * mmap.PAGESIZE
        stop = tensor_end if end is None else base + end
        if stop > first:
            mapping.madvise(mmap.MADV_DONTNEED, first, stop - first)

    def close(self):
        for mapping, _, _ in self._shards.values():
            try:
                mapping.close()
            except BufferError:  # a view is still referenced somewhere; the mapping goes when it does
                pass
        self._shards.clear()


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: str  # safetensors dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = TORCH_DTYPES[self.dtype].itemsize
        for d in self.shape:
            n *= d
        return n


def header_bytes(tensors: list[PlannedTensor]) -> tuple[bytes, dict[str, int]]:
    """The shard's 8-byte length + JSON header (space-padded to 8 bytes), and each tensor's absolute file offset."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % HEADER_ALIGN)
    prefix = struct.pack("<Q", len(text)) + text
    starts, position = {}, len(prefix)
    for t in tensors:
        starts[t.name] = position
        position += t.nbytes
    return prefix, starts


def shard_nbytes(tensors: list[PlannedTensor]) -> int:
    prefix, _ = header_bytes(tensors)
    return len(prefix) + sum(t.nbytes for t in tensors)


class ShardWriter:
    """Writes one planned shard under a temporary name; `finish` renames it into place."""

    def __init__(self, final_path: Path, tensors: list[PlannedTensor]):
        self.final_path = final_path
        self.tmp_path = final_path.with_name(f".{final_path.name}.tmp")
        prefix, self._starts = header_bytes(tensors)
        self.nbytes = len(prefix) + sum(t.nbytes for t in tensors)
        self._fd = os.open(self.tmp_path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        try:
            os.posix_fallocate(self._fd, 0, self.nbytes)
        except OSError as e:
            self.abort()
            raise K2Error(f"cannot write {final_path.name} ({self.nbytes:,} bytes) in {final_path.parent}: "
                          f"{e.strerror}") from None
        self._write_at(prefix, 0)

    def _write_at(self, data, position: int):
        view = memoryview(data).cast("B")
        while view:
            try:
                written = os.pwrite(self._fd, view, position)
            except OSError as e:
                raise K2Error(f"writing {self.final_path.name} failed: {e.strerror}") from None
            view, position = view[written:], position + written

    def write(self, name: str, data: torch.Tensor | memoryview, byte_offset: int = 0):
        """Bytes of tensor `name` (a tensor of its dtype, or raw bytes), placed `byte_offset` bytes into its data."""
        if isinstance(data, torch.Tensor):
            data = data.contiguous().view(torch.uint8).numpy() if data.numel() else b""
        self._write_at(data, self._starts[name] + byte_offset)

    def finish(self):
        os.fsync(self._fd)
        os.close(self._fd)
        os.replace(self.tmp_path, self.final_path)

    def abort(self):
        os.close(self._fd)
        self.tmp_path.unlink(missing_ok=True)
