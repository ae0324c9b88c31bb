"""The one safetensors reader and writer: shard headers, tensors as views of memory-mapped shards, planned shards.

Reading: a shard's header is checked against its schema and the file's size before anything trusts it (a truncated
download, an entry without offsets, two tensors sharing bytes: one clear error naming the shard and tensor). A tensor
is a zero-copy view of its shard's mapping; once a row block is used its pages are dropped from this process
(`MADV_DONTNEED`), so resident memory does not grow with the shard, however large.
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
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from typing_extensions import TypedDict

from runtime.config_schema import NonNegative, describe
from runtime.errors import K2Error

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
               "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
FLOAT_DTYPES = frozenset(name for name, dtype in TORCH_DTYPES.items() if dtype.is_floating_point)
INTEGER_DTYPES = frozenset(name for name, dtype in TORCH_DTYPES.items() if not dtype.is_floating_point) - {"BOOL"}
MAX_HEADER_BYTES = 100 << 20
HEADER_ALIGN = 8


class _Entry(TypedDict):
    dtype: Literal[*DTYPE_BYTES]
    shape: list[NonNegative]
    data_offsets: Annotated[list[NonNegative], Field(min_length=2, max_length=2)]  # [start, end) after the header


class _Header(BaseModel):
    """A shard's JSON header: an entry per tensor, and free-form `__metadata__`."""

    model_config = ConfigDict(strict=True, extra="allow")
    __pydantic_extra__: dict[str, _Entry]
    metadata: Any = Field(None, alias="__metadata__")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shard: Path
    dtype: str  # safetensors dtype string: BF16, F8_E4M3, I32, ...
    shape: tuple[int, ...]
    offset: int  # where the tensor's bytes start in the shard file

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor infos of one shard, after checking the header against its schema and that the file holds every tensor
    it declares, each in bytes of its own."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise K2Error(f"{path.name} is truncated or not a safetensors file ({size} bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise K2Error(f"{path.name} is truncated or not a safetensors file (header of {header_len} bytes, file of {size})")
            header = json.loads(f.read(header_len))
    except FileNotFoundError:
        raise K2Error(f"shard {path.name} is missing from {path.parent}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise K2Error(f"{path.name} has a corrupt safetensors header") from None
    try:
        entries = _Header.model_validate(header).__pydantic_extra__
    except ValidationError as e:
        error = e.errors(include_url=False)[0]
        where = f"tensor {error['loc'][0]}: {describe(error, skip=1)}" if error["loc"] else describe(error)
        raise K2Error(f"{path.name}: safetensors header: {where}") from None
    data_start = 8 + header_len
    tensors = {}
    for name, entry in entries.items():
        start, end = entry["data_offsets"]
        info = TensorInfo(name, path, entry["dtype"], tuple(entry["shape"]), data_start + start)
        # Views are made from the offset, shape and dtype alone: a byte range that disagrees would read its neighbour.
        if end - start != info.nbytes:
            raise K2Error(f"{path.name}: tensor {name} has {end - start:,} bytes of data, its dtype and shape need "
                          f"{info.nbytes:,}")
        tensors[name] = info
    stored = sorted((info for info in tensors.values() if info.nbytes), key=lambda info: info.offset)
    last = max(stored, key=lambda info: info.offset + info.nbytes, default=None)
    if last is not None and last.offset + last.nbytes > size:
        raise K2Error(f"{path.name} is truncated: {size:,} bytes on disk, its tensor {last.name} needs "
                      f"{last.offset + last.nbytes:,} (re-download it)")
    for before, after in zip(stored, stored[1:]):
        if after.offset < before.offset + before.nbytes:
            raise K2Error(f"{path.name}: tensors {before.name} and {after.name} share bytes of the file (a corrupt "
                          "header)")
    return tensors


class MappedShards:
    """Tensors of `read_safetensors_header`'s infos as views of their shards, each file memory-mapped on first use
    (private, so never written back). A view keeps its file mapped, also past `close`."""

    def __init__(self):
        self._mappings: dict[Path, mmap.mmap] = {}
        self._lock = threading.Lock()

    def _mapping(self, path: Path) -> mmap.mmap:
        with self._lock:
            if path not in self._mappings:
                try:
                    with path.open("rb") as f:
                        self._mappings[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
                except OSError as e:
                    raise K2Error(f"cannot read {path}: {e.strerror}") from None
            return self._mappings[path]

    def tensor(self, info: TensorInfo) -> torch.Tensor:
        dtype = TORCH_DTYPES[info.dtype]
        if not info.numel:
            return torch.empty(info.shape, dtype=dtype)
        # Made from a memoryview, which the tensor holds: torch.frombuffer on the mapping itself would not stop
        # `close` from unmapping memory the tensor still points into.
        data = memoryview(self._mapping(info.shard))[info.offset:info.offset + info.nbytes]
        return torch.frombuffer(data, dtype=dtype).view(info.shape)

    def raw(self, info: TensorInfo, start: int, end: int) -> memoryview:
        """Bytes [start, end) of the tensor's data, without a copy."""
        return memoryview(self._mapping(info.shard))[info.offset + start:info.offset + end]

    def release(self, info: TensorInfo, start: int = 0, end: int | None = None):
        """Drop the mapped pages of bytes [start, end) of a tensor from this process (they stay in the page cache)."""
        first = (info.offset + start) // mmap.PAGESIZE * mmap.PAGESIZE
        stop = info.offset + (info.nbytes if end is None else end)
        if stop > first:
            self._mapping(info.shard).madvise(mmap.MADV_DONTNEED, first, stop - first)

    def close(self):
        for mapping in self._mappings.values():
            try:
                mapping.close()
            except BufferError:  # a view is still referenced somewhere; the file is unmapped when the last one goes
                pass
        self._mappings.clear()


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
                raise K2Error(f"cannot write {self.final_path}: {e.strerror}") from None
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
