"""INT4 (compressed-tensors pack-quantized) weights in the runtime, held packed and swapped in from outside.

The model file knows nothing of INT4: `swap_int4_modules` replaces, in a model built on the meta device, each
routed-experts block and each Linear whose checkpoint tensors are packed with a module of the same name that holds
the packed words and BF16 scales as stored (4.5 bits per weight at group 32). A forward dequantizes only the
weights it uses: the experts the router picked, one at a time, so memory never holds a BF16 copy of every expert.
On the CPU, the INT4 kernels (runtime/kernels/cpu.py) read the packed words and scales directly instead.
"""
import torch
import torch.nn.functional as F
from torch import nn

from quant import int4
from runtime.errors import K2Error
from runtime.kernels import cpu
from runtime.models.experts import grouped_experts

PACKED_SUFFIX = ".weight_packed"
COMPANION_SUFFIXES = (".weight_scale", ".weight_shape")


def exact_dtype(x: torch.Tensor) -> torch.dtype:
    """What the dequantizing path computes in: float32 on the CPU, where it is the reference the kernels are checked
    against (`k2 check`) and bf16 would round every dequantized weight, q * scale, to 8 bits; the model's dtype
    elsewhere."""
    return torch.float32 if x.device.type == "cpu" else x.dtype


class PackedInt4(nn.Module):
    """Weights [*lead, out, in] as stored: `packed` int32 [*lead, out, ceil(in/8)], BF16 `scale` [*lead, out, groups]."""

    def __init__(self, lead: tuple[int, ...], out_features: int, in_features: int, group_size: int):
        super().__init__()
        self.in_features, self.group_size = in_features, group_size
        words, groups = -(-in_features // int4.PER_WORD), int4.n_groups(in_features, group_size)
        self.register_buffer("packed", torch.empty(*lead, out_features, words, dtype=torch.int32))
        self.register_buffer("scale", torch.empty(*lead, out_features, groups, dtype=int4.SCALE_DTYPE))

    def dense(self, index: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight (or expert `index`'s slice of it) as a dense matrix [out, in] in `dtype`."""
        packed, scale = (self.packed, self.scale) if index is None else (self.packed[index], self.scale[index])
        return int4.dequantize(packed, scale, self.in_features, self.group_size, dtype)


class Int4Linear(nn.Module):
    """A bias-free Linear whose `weight` is packed; the checkpoint's `P.weight_*` tensors load into `P.weight`."""

    def __init__(self, out_features: int, in_features: int, group_size: int):
        super().__init__()
        self.weight = PackedInt4((), out_features, in_features, group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = cpu.int4_linear(x, self.weight)
        if y is not None:
            return y
        dtype = exact_dtype(x)
        return F.linear(x.to(dtype), self.weight.dense(dtype=dtype)).to(x.dtype)


class Int4Experts(nn.Module):
    """Routed experts stacked [E, out, in], packed; same interface and math as the model's `Experts`."""

    def __init__(self, n_experts: int, dim: int, hidden_dim: int, group_size: int):
        super().__init__()
        self.gate_proj = PackedInt4((n_experts,), hidden_dim, dim, group_size)
        self.up_proj = PackedInt4((n_experts,), hidden_dim, dim, group_size)
        self.down_proj = PackedInt4((n_experts,), dim, hidden_dim, group_size)

    @property
    def n_experts(self) -> int:
        return self.gate_proj.packed.shape[0]

    def select(self, ids: list[int], device: torch.device | str) -> "Int4Experts":
        """Experts `ids`, renumbered 0..len(ids)-1, still packed, copied to `device` (see runtime/offload.py)."""
        hidden_dim, dim = self.gate_proj.packed.shape[1], self.gate_proj.in_features
        with torch.device("meta"):
            part = Int4Experts(len(ids), dim, hidden_dim, self.gate_proj.group_size)
        index = torch.tensor(ids, device=self.gate_proj.packed.device)
        for name in ("gate_proj", "up_proj", "down_proj"):
            source, target = getattr(self, name), getattr(part, name)
            target.packed = source.packed.index_select(0, index).to(device)
            target.scale = source.scale.index_select(0, index).to(device)
        return part

    def load_slot(self, slot: int, source: "Int4Experts", expert: int):
        """Overwrite expert `slot` with `source`'s expert `expert`, packed (an expert cache refills itself so)."""
        for name in ("gate_proj", "up_proj", "down_proj"):
            for leaf in ("packed", "scale"):
                getattr(getattr(self, name), leaf)[slot].copy_(getattr(getattr(source, name), leaf)[expert],
                                                               non_blocking=True)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [N, dim], weights and ids [N, k] -> sum_k weights * expert_k(x); unpacks only the experts hit. Ids < 0
        are skipped: those slots' experts live elsewhere (runtime/offload.py). On the CPU the INT4 kernels
        (runtime/kernels/cpu.py) read the packed weights directly where they apply."""
        y = cpu.int4_moe(x, weights, ids, self)
        if y is not None:
            return y
        dtype = exact_dtype(x)
        return grouped_experts(x.to(dtype), weights, ids, self.n_experts,
                               lambda e: self.expert_weights(e, dtype)).to(x.dtype)

    def expert_weights(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(p.dense(e, dtype) for p in (self.gate_proj, self.up_proj, self.down_proj))


def packed_modules(tensor_names) -> set[str]:
    """Names of the linears a checkpoint stores packed (`P` for each `P.weight_packed`)."""
    return {n[: -len(PACKED_SUFFIX)] for n in tensor_names if n.endswith(PACKED_SUFFIX)}


def swap_int4_modules(model: nn.Module, packed: set[str], group_size: int) -> nn.Module:
    """Replace the modules whose weights are stored packed, in place; experts of a layer go all packed or none.
    Linears the model reads as matrices (its `dense_linears`, e.g. MLA's kv_b_proj, split for absorbed decode) stay
    dense: the loader dequantizes them (vLLM does the same for that layer)."""
    expert_blocks: dict[str, int] = {}
    replacements: dict[str, tuple[type, tuple]] = {}
    for name in packed:
        if name.endswith(model.dense_linears):
            continue
        stacked, expert = model.locate(f"{name}.weight")
        if expert is not None:
            block = stacked.rsplit(".", 1)[0]
            expert_blocks[block] = expert_blocks.get(block, 0) + 1
            continue
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise K2Error(f"{name}.weight_packed belongs to no layer of the model config.json describes") from None
        if not isinstance(linear, nn.Linear) or linear.bias is not None:
            raise K2Error(f"{name} is stored as INT4, but it is not a bias-free linear layer in this model")
        replacements[name] = (Int4Linear, (linear.out_features, linear.in_features, group_size))
    for block, count in expert_blocks.items():
        try:
            n_experts, hidden_dim, dim = model.get_submodule(block).gate_proj.shape
        except AttributeError:
            raise K2Error(f"{block} holds INT4 experts, but that layer has no routed experts in this model") from None
        if count != 3 * n_experts:
            raise K2Error(f"{block}: {count} of {3 * n_experts} expert weights are INT4; a layer's experts must all be")
        replacements[block] = (Int4Experts, (n_experts, dim, hidden_dim, group_size))
    with torch.device("meta"):  # shapes now, memory when the loader fills them, like the rest of the model
        for name, (cls, args) in replacements.items():
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, cls(*args))
    return model


def holds_packed(model: nn.Module, name: str) -> bool:
    """Is model tensor `name` (as `locate` names it) held by a packed module?"""
    try:
        return isinstance(model.get_submodule(name), PackedInt4)
    except AttributeError:  # a parameter, not a module
        return False


def held_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of weights held by INT4 modules, and how many weights they stand for."""
    nbytes = weights = 0
    for module in model.modules():
        if isinstance(module, PackedInt4):
            nbytes += sum(t.numel() * t.element_size() for t in (module.packed, module.scale))
            weights += module.packed.shape[:-1].numel() * module.in_features
    return {"int4_bytes": nbytes, "int4_weights": weights}
