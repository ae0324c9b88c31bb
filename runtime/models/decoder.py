"""The decoder-only skeleton every family shares: embedding, a stack of layers over one slot cache, norm, head.

A family subclasses `Decoder` with its layer class and its args (runtime/models/family.py says what both answer);
everything the engine drives (`new_cache`, `step_inputs`, `forward_layers`, `logits`, `forward`) and everything the
loader fills through (`locate`, `skip_tensor`, `checkpoint_shapes`, `moe_blocks`) is here, once.
"""
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from runtime.cache import SlotCache
from runtime.errors import K2Error
from runtime.layers import RMSNorm, rope_cos_sin, rope_frequencies
from runtime.models.family import hf_layer_of

_EXPERT_TENSOR = re.compile(r"(?P<layer>model\.layers\.\d+)\.mlp\.experts\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight")


@dataclass
class StepInputs:
    """What every layer of one forward step needs."""

    cos: torch.Tensor  # [B, T, rope_dim / 2] fp32
    sin: torch.Tensor
    mask: torch.Tensor  # [B, T, S] bool
    rows: torch.Tensor  # [B, 1]: each row's slot in the cache buffers
    positions: torch.Tensor  # [B, T]: each token's position in its slot, where it is written
    span: int  # cache columns attention reads


class Backbone(nn.Module):
    def __init__(self, args, layer_class):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(layer_class(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Decoder(nn.Module):
    """A family's model: `layer_class(args, i)` builds layer i, whose forward is (h, StepInputs, layer cache) -> h
    and whose `mlp` is a dense MLP or a block with `gate` and `experts` (a routed-experts block, `moe_block_class`)."""

    layer_class: type
    moe_block_class: type = type(None)
    dense_linears: tuple[str, ...] = ()  # linears read as matrices (not only through forward): kept dense under INT4
    fp32_tensors: tuple[str, ...] = ()  # kept in fp32 whatever the model dtype

    def __init__(self, args):
        super().__init__()
        self.args = args
        self.model = Backbone(args, self.layer_class)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        # Computed on the CPU even when the model is built on the meta device: this is not a checkpoint tensor.
        with torch.device("cpu"):
            inv_freq, self.rope_magnitude = rope_frequencies(args.rope_dim, args.rope_theta, args.rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def skip_tensor(self, name: str) -> bool:
        """Checkpoint tensors the model does not use: stale rope buffers, and layers past the last one (DeepSeek-V3's
        multi-token-prediction layers, `extra_layers` of them)."""
        if name.endswith("rotary_emb.inv_freq"):
            return True
        layer, n = hf_layer_of(name), self.args.num_hidden_layers
        return layer is not None and n <= layer < n + self.args.extra_layers

    @staticmethod
    def locate(name: str) -> tuple[str, int | None]:
        """Checkpoint tensor name -> (model tensor name, expert slice or None)."""
        match = _EXPERT_TENSOR.fullmatch(name)
        if match:
            return f"{match['layer']}.mlp.experts.{match['proj']}", int(match["expert"])
        return name, None

    def checkpoint_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor a checkpoint of this config holds, by its checkpoint name: stacked experts as their slices
        (views), a tied head included (see stored_shapes)."""
        for name, tensor in self.state_dict().items():
            if name.rsplit(".", 1)[0].endswith("mlp.experts"):
                prefix, proj = name.rsplit(".", 1)
                for e in range(tensor.shape[0]):
                    yield f"{prefix}.{e}.{proj}.weight", tensor[e]
            else:
                yield name, tensor

    def checkpoint_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor a checkpoint of this config holds, by its checkpoint name (experts unstacked)."""
        return {name: tuple(tensor.shape) for name, tensor in self.checkpoint_tensors()}

    def stored_shapes(self) -> dict[str, tuple[int, ...]]:
        """`checkpoint_shapes` as transformers' save_pretrained writes them: a tied head is the embedding matrix,
        stored once (a checkpoint may still hold it, which the loader takes)."""
        shapes = self.checkpoint_shapes()
        if self.args.tie_word_embeddings:
            shapes.pop("lm_head.weight")
        return shapes

    def moe_blocks(self) -> dict[int, nn.Module]:
        """The layers' routed-expert blocks by layer index, each with `gate` (the router) and `experts`."""
        return {i: layer.mlp for i, layer in enumerate(self.model.layers) if isinstance(layer.mlp, self.moe_block_class)}

    @property
    def device(self) -> torch.device:
        """Where token ids go in: the embedding's device."""
        return self.model.embed_tokens.weight.device

    def layer_device(self, i: int) -> torch.device:
        return self.model.layers[i].input_layernorm.weight.device

    def new_cache(self, batch: int, max_len: int, layer_ids: list[int] | None = None) -> SlotCache:
        """A cache of `batch` slots for `layer_ids` (default: all layers), each layer's part on its weights' device,
        `args.cache_width` values per token and layer."""
        layer_ids = range(len(self.model.layers)) if layer_ids is None else layer_ids
        dtype = self.model.layers[layer_ids[0]].input_layernorm.weight.dtype
        return SlotCache({i: self.layer_device(i) for i in layer_ids}, batch, max_len, self.args.cache_width, dtype)

    def step_inputs(self, tokens: torch.Tensor, cache: SlotCache, positions: torch.Tensor | None = None) -> StepInputs:
        """What every layer of one forward step needs: positions as rope cos/sin, the mask, where to write.

        Without `positions`, slot b's tokens follow the `cache.lengths[b]` it holds and attention reads as far as the
        longest slot. With `positions` (one decode token per slot, [B] on the device) nothing is read on the host and
        every shape is fixed by the cache: the form a decode step captured in a CUDA graph needs."""
        B, T = tokens.shape
        device = tokens.device
        if positions is None:
            end = int(cache.lengths.max()) + T
            if end > cache.max_len:
                raise K2Error(f"the cache holds {cache.max_len} tokens; {end - T} are used and {T} more were given")
            positions = (cache.lengths[:, None] + torch.arange(T)).to(device)
        else:
            positions, end = positions.view(B, T), cache.max_len + 1
        keys = torch.arange(end, device=device)
        mask = keys <= positions[..., None]  # [B, T, S]: causal within each slot
        cos, sin = rope_cos_sin(positions, self.inv_freq, self.rope_magnitude)
        return StepInputs(cos, sin, mask, torch.arange(B, device=device)[:, None], positions, end)

    def forward_layers(self, h: torch.Tensor, step: StepInputs, cache: SlotCache, layer_ids=None) -> torch.Tensor:
        for i in range(len(self.model.layers)) if layer_ids is None else layer_ids:
            h = self.model.layers[i](h, step, cache.layer(i))
        return h

    def logits(self, h: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        return self.lm_head(self.model.norm(h[:, -1:] if last_only else h))

    def forward(self, tokens: torch.Tensor, cache: SlotCache | None = None, positions: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, V] (or [B, 1, V] with last_only), appended to each slot of `cache`.
        With `positions` (see step_inputs) the caller keeps `cache.lengths`; otherwise they grow by T here."""
        cache = cache if cache is not None else self.new_cache(*tokens.shape)
        step = self.step_inputs(tokens, cache, positions)
        h = self.forward_layers(self.model.embed_tokens(tokens), step, cache)
        if positions is None:
            cache.lengths += tokens.shape[1]
        return self.logits(h, last_only)
