"""The logical tensors of a checkpoint, read row block by row block in float32, for `k2 quantize` and `k2 convert`.

A logical tensor is a weight as the model uses it, whatever its storage: a plain tensor, an FP8 weight with its block
scales, or an INT4 weight with its group scales and shape. Both commands read it through here, so FP8 and INT4 inputs
are dequantized in one place. A row block is about 4 MB in float32; its mapped pages are dropped once it is used.
"""
import re
from dataclasses import dataclass

import torch

from quant import int4
from quant.fp8 import DEFAULT_BLOCK, dequantize_fp8_block
from runtime.checkpoint import Checkpoint
from runtime.errors import K2Error
from runtime.safetensors_io import MappedShards, TensorInfo

CHUNK_ELEMENTS = 1 << 20  # a row block of about 4 MB in float32: fits in cache, small per worker
ROW_ALIGN = 128  # row blocks start on FP8 block rows


@dataclass(frozen=True)
class Source:
    """One logical tensor of the input and the stored tensors it is made of."""

    name: str
    kind: str  # "plain"; "fp8": weight, weight_scale_inv; "int4": weight_packed, weight_scale, weight_shape
    parts: tuple[TensorInfo, ...]
    shape: tuple[int, ...]
    fp8_block: tuple[int, int] = DEFAULT_BLOCK
    int4_group_size: int = int4.DEFAULT_GROUP_SIZE

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    @property
    def dtype(self) -> str:
        return self.parts[0].dtype if self.kind == "plain" else "BF16"


def natural_key(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def collect_sources(ckpt: Checkpoint, reader: MappedShards) -> list[Source]:
    """The input's logical tensors in natural name order (layer 2 before layer 10): the output's layout then depends
    on the model alone, not on how the input was sharded, and published checkpoints are stored in that order anyway."""
    if not isinstance(ckpt, Checkpoint):
        raise K2Error(f"{ckpt.folder} is a GGUF file; this reads safetensors checkpoints (k2 convert "
                      f"{ckpt.folder.name} OUT --to hf writes one)")
    tensors = ckpt.tensors
    quant = ckpt.config.get("quantization_config") or {}
    group_size = int4.DEFAULT_GROUP_SIZE
    if quant.get("quant_method") == "compressed-tensors":
        group_size = int4.group_size_of(quant)
    elif quant.get("quant_method") not in (None, "fp8"):
        raise K2Error(f"cannot quantize a {quant.get('quant_method')!r} checkpoint (BF16/FP16/FP32, FP8 and "
                      "compressed-tensors INT4 inputs are supported)")
    block = tuple(quant.get("weight_block_size", DEFAULT_BLOCK))
    companions = set()
    sources = []
    for name, info in tensors.items():
        if name.endswith(".weight_packed"):
            prefix = name[: -len("_packed")]
            parts = [info] + [_companion(tensors, f"{prefix}_{suffix}", name) for suffix in ("scale", "shape")]
            shape = tuple(int(v) for v in reader.tensor(parts[2]).tolist())
            expected = int4.stored_shapes(*shape, group_size) if len(shape) == 2 else {}
            if (parts[0].shape, parts[1].shape) != (expected.get("weight_packed"), expected.get("weight_scale")):
                raise K2Error(f"{prefix}: weight_packed {list(parts[0].shape)} and weight_scale "
                              f"{list(parts[1].shape)} do not fit weight_shape {list(shape)}")
            companions.update(p.name for p in parts[1:])
            sources.append(Source(prefix, "int4", tuple(parts), shape, int4_group_size=group_size))
        elif info.dtype.startswith("F8_"):
            scale = _companion(tensors, name + "_scale_inv", name)
            companions.add(scale.name)
            sources.append(Source(name, "fp8", (info, scale), info.shape, block))
        else:
            sources.append(Source(name, "plain", (info,), info.shape))
    sources = [s for s in sources if s.name not in companions]
    return sorted(sources, key=lambda s: natural_key(s.name))


def _companion(tensors: dict[str, TensorInfo], name: str, of: str) -> TensorInfo:
    if name not in tensors:
        raise K2Error(f"{of} is stored without its {name.rsplit('.', 1)[-1]} ({name} is missing)")
    return tensors[name]


def row_blocks(shape: tuple[int, ...]):
    if len(shape) != 2:
        yield None, None
        return
    rows = max(ROW_ALIGN, CHUNK_ELEMENTS // max(shape[1], 1) // ROW_ALIGN * ROW_ALIGN)
    for r0 in range(0, shape[0], rows):
        yield r0, min(r0 + rows, shape[0])


def read_rows(source: Source, reader: MappedShards, r0, r1) -> torch.Tensor:
    """Rows [r0, r1) of the logical tensor in float32 (the whole tensor when it is not 2-D)."""
    stored = reader.tensor(source.parts[0])
    if r0 is not None:
        stored = stored[r0:r1]
    if source.kind == "fp8":
        b0 = source.fp8_block[0]
        scale = reader.tensor(source.parts[1])
        if r0 is not None:
            scale = scale[r0 // b0: -(-r1 // b0)]
        return dequantize_fp8_block(stored, scale, source.fp8_block)
    if source.kind == "int4":
        scale = reader.tensor(source.parts[1])[r0:r1]
        return int4.dequantize(stored, scale, source.shape[1], source.int4_group_size)
    return stored.float()


def release_rows(source: Source, reader: MappedShards, r0, r1):
    info = source.parts[0]
    if r0 is None:
        reader.release(info)
    else:
        row_bytes = info.nbytes // max(info.shape[0], 1)
        reader.release(info, r0 * row_bytes, r1 * row_bytes)
