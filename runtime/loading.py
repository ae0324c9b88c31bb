"""Build a model on the meta device and fill it tensor by tensor from a checkpoint: never two copies in RAM.

Every stored tensor is checked as it is read: its dtype must be of the kind the model holds (any float for a
weight, since converting between floats is what loading does; integers for packed INT4 words), and a float tensor
must hold only finite numbers. A NaN weight otherwise loads silently and the model emits token 0 forever. The check is
one min/max pass over the tensor as stored, before any conversion (FP8: once dequantized). Tensors are copied into the
model straight out of the mapped shard, with no copy in between, which pays for that pass.
"""
import math
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from quant.fp8 import dequantize_fp8_block
from quant.gguf.blocks import READABLE
from quant.int4 import dequantize, group_size_of, stored_shapes
from runtime import models
from runtime.checkpoint import Checkpoint
from runtime.errors import K2Error
from runtime.gguf_checkpoint import GGUFCheckpoint, is_gguf
from runtime.int4 import COMPANION_SUFFIXES, PACKED_SUFFIX, holds_packed, packed_modules, swap_int4_modules
from runtime.models.family import hf_layer_of
from runtime.safetensors_io import FLOAT_DTYPES, INTEGER_DTYPES

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SCALE_SUFFIX = "_scale_inv"
# What a weight may be stored as: floats, and a GGUF file's block encodings (dequantized as they are read).
WEIGHT_DTYPES = FLOAT_DTYPES | {qtype.name for qtype in READABLE}


def open_checkpoint(path: str | Path, **options) -> Checkpoint | GGUFCheckpoint:
    """A model folder (Checkpoint.open's `options`), or a GGUF file (runtime/gguf_checkpoint.py)."""
    path = Path(path)
    return GGUFCheckpoint.open(path) if is_gguf(path) else Checkpoint.open(path, **options)


def checkpoint_dtype(config: dict) -> torch.dtype:
    name = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    return TORCH_DTYPES.get(name, torch.bfloat16)


def _quant_method(config: dict) -> str | None:
    return (config.get("quantization_config") or {}).get("quant_method")


def _require_finite(name: str, tensor: torch.Tensor):
    if not tensor.is_floating_point() or not tensor.numel():
        return
    if tensor.element_size() == 1:  # FP8 has no min/max on the CPU; widening it to BF16 is exact
        tensor = tensor.to(torch.bfloat16)
    # One pass with no temporary: a NaN anywhere makes both NaN, an infinity shows as the min or the max.
    low, high = torch.aminmax(tensor)
    if not (math.isfinite(low.item()) and math.isfinite(high.item())):
        raise K2Error(f"tensor {name} holds NaN or infinite values: the checkpoint is corrupt")


def _load(ckpt: Checkpoint, name: str, dtypes: frozenset[str] = WEIGHT_DTYPES, check: bool = True) -> torch.Tensor:
    """Stored tensor `name` (a view of its shard), refused unless its dtype is one of `dtypes` (what the model can
    hold it as) and, with `check`, unless every value is finite."""
    dtype = ckpt.tensors[name].dtype
    if dtype not in dtypes:
        raise K2Error(f"tensor {name} is stored as {dtype}, but the model reads it as {' or '.join(sorted(dtypes))}")
    tensor = ckpt.load(name)
    if check:
        _require_finite(name, tensor)
    return tensor


def _stored_to_weight(ckpt: Checkpoint, name: str, block: tuple[int, int]) -> torch.Tensor:
    """The tensor as the model uses it: FP8 block weights are dequantized here, the one place that knows the format."""
    fp8 = ckpt.tensors[name].dtype == "F8_E4M3"
    tensor = _load(ckpt, name, check=not fp8)  # FP8 is checked dequantized: widening it only to check costs more
    if fp8:
        scale_name = name + SCALE_SUFFIX
        if scale_name not in ckpt.tensors:
            raise K2Error(f"FP8 tensor {name} has no {scale_name}")
        scale = _load(ckpt, scale_name)
        grid = tuple(-(-size // edge) for size, edge in zip(tensor.shape, block))
        if tensor.dim() != 2 or tuple(scale.shape) != grid:
            raise K2Error(f"FP8 tensor {name} {list(tensor.shape)} needs a 2-D weight and a {scale_name} of one scale "
                          f"per {list(block)} block, {list(grid)}; it has {list(scale.shape)}")
        tensor = dequantize_fp8_block(tensor, scale, block)
        _require_finite(name, tensor)
    return tensor


def _stored_int4(ckpt: Checkpoint, name: str, group_size: int) -> tuple[tuple[int, ...], dict[str, torch.Tensor]]:
    """INT4 weight `name` (`P.weight`): (its [out, in], the packed words and scales as stored).

    The one place that knows compressed-tensors' tensor names. The weight stays packed where runtime/int4.py swapped
    in a packed module, and is dequantized where the model reads it as a matrix.
    """
    stored = {}
    for part, dtypes in (("packed", frozenset({"I32"})), ("scale", FLOAT_DTYPES), ("shape", INTEGER_DTYPES)):
        stored_name = f"{name}_{part}"
        if stored_name not in ckpt.tensors:
            raise K2Error(f"INT4 weight {name} has no {stored_name}")
        stored[part] = _load(ckpt, stored_name, dtypes)
    shape = tuple(int(v) for v in stored.pop("shape").tolist())
    expected = stored_shapes(*shape, group_size) if len(shape) == 2 else {}
    for part, tensor in stored.items():
        if tuple(tensor.shape) != expected.get(f"weight_{part}"):
            raise K2Error(f"{name}_{part} has shape {list(tensor.shape)}, but weight_shape {list(shape)} and group size "
                          f"{group_size} imply {list(expected.get(f'weight_{part}', ()))}")
    return shape, stored


def _materialize(model: nn.Module, name: str, dtype: torch.dtype, device) -> torch.Tensor:
    """The model tensor `name`, allocated on `device` the first time it is needed (it was built on meta)."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    current = getattr(module, leaf)
    if current.is_meta:
        current = torch.empty(current.shape, dtype=dtype, device=device)
        if leaf in module._parameters:
            module._parameters[leaf] = nn.Parameter(current, requires_grad=False)
        else:
            module._buffers[leaf] = current
    return current


def _wanted(name: str, layer_ids: set[int] | None, embed: bool, head: bool) -> bool:
    """Is this checkpoint tensor part of the slice of the model being loaded (a pipeline stage loads its own)?"""
    if layer_ids is None:
        return True
    if name.startswith("model.layers."):
        return hf_layer_of(name) in layer_ids
    return embed if "embed_tokens" in name else head


def load_model(source: str | Path | Checkpoint | GGUFCheckpoint, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu", progress: bool = False, layer_ids=None, embed: bool = True,
               head: bool = True) -> nn.Module:
    """The model with weights from `source` (a folder or GGUF file, or its checkpoint opened); with `layer_ids`, only
    those layers (plus the embedding and/or the head when asked) are read, the rest stay on the meta device and take
    no memory."""
    layer_ids = None if layer_ids is None else set(layer_ids)
    ckpt = open_checkpoint(source, allow_missing_shards=layer_ids is not None) if isinstance(source, (str, Path)) \
        else source
    method = _quant_method(ckpt.config)
    if method not in (None, "fp8", "compressed-tensors"):
        raise K2Error(f"loading {method!r} quantized checkpoints is not supported (BF16/FP16/FP32, FP8 and "
                      "compressed-tensors INT4 are)")
    block = tuple((ckpt.config.get("quantization_config") or {}).get("weight_block_size", (128, 128)))
    model = models.build_on_meta(ckpt.config)
    args = model.args
    dtype = dtype or checkpoint_dtype(ckpt.config)
    embed = embed or (head and args.tie_word_embeddings)  # a tied head is the embedding matrix
    expected = {n: shape for n, shape in model.checkpoint_shapes().items() if _wanted(n, layer_ids, embed, head)}
    group_size = None
    if method == "compressed-tensors":
        group_size = group_size_of(ckpt.config["quantization_config"])
        swap_int4_modules(model, packed_modules(ckpt.tensors), group_size)

    names = sorted((n for n in ckpt.tensors if not n.endswith((SCALE_SUFFIX, *COMPANION_SUFFIXES))
                    and not model.skip_tensor(n) and _wanted(n, layer_ids, embed, head)),
                   key=lambda n: (ckpt.tensors[n].shard, n))
    loaded = set()
    for stored_name in tqdm(names, desc="loading", unit="tensor", disable=not progress):
        packed = stored_name.endswith(PACKED_SUFFIX)
        name = stored_name.removesuffix("_packed") if packed else stored_name  # the weight it stands for
        if name not in expected:
            raise K2Error(f"tensor {stored_name} is in the checkpoint but not in the model config.json describes "
                          "(config and weights disagree)")
        shape, int4_parts = _stored_int4(ckpt, name, group_size) if packed else (ckpt.tensors[name].shape, None)
        if shape != expected[name]:
            raise K2Error(f"tensor {name} has shape {list(shape)} but config.json implies {list(expected[name])}")
        target_name, expert = model.locate(name)
        if packed and holds_packed(model, target_name):
            for leaf, tensor in int4_parts.items():
                target = _materialize(model, f"{target_name}.{leaf}", tensor.dtype, device)
                (target if expert is None else target[expert]).copy_(tensor)
        else:
            weight = (dequantize(int4_parts["packed"], int4_parts["scale"], shape[1], group_size) if packed
                      else _stored_to_weight(ckpt, name, block))
            target_dtype = torch.float32 if name.endswith(model.fp32_tensors) else dtype
            target = _materialize(model, target_name, target_dtype, device)
            (target if expert is None else target[expert]).copy_(weight)
        ckpt.release()
        loaded.add(name)
    ckpt.close()

    if args.tie_word_embeddings and head and "lm_head.weight" not in loaded:
        model.lm_head.weight = model.model.embed_tokens.weight
        loaded.add("lm_head.weight")
    missing = [n for n in expected if n not in loaded]
    absent = [n for n in missing if n in ckpt.absent]
    if absent:
        raise K2Error(f"this part of the model needs shard {ckpt.absent[absent[0]]} (tensor {absent[0]}), "
                      f"which is missing from {ckpt.folder}")
    if missing:
        raise K2Error(f"the checkpoint lacks {len(missing)} tensor(s) that config.json implies, first {missing[0]}")
    model.inv_freq = model.inv_freq.to(device)
    return model.eval()
