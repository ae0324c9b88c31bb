"""What an architecture family declares, and the only way the rest of the toolkit reaches model specifics.

A family is one module under runtime/models/ (`deepseek_v3.py` serves DeepSeek-V3 and Kimi K2) that defines its
model, its `ModelArgs` (the config.json keys it reads, with their types and constraints: a schema every config.json
is checked against, runtime/config_schema.py) and a `FAMILY` entry; runtime/models/__init__.py finds it by
`model_type`. Info, plan, placement, offload, bench, quantize and convert read a model through this interface:

- the model class builds from its args, keeps Hugging Face's module layout (`model.embed_tokens`, `model.layers`,
  `model.norm`, `lm_head`) and has the forward interface the engine drives (`new_cache`, `step_inputs`,
  `forward_layers`, `logits`, `forward`) and the checkpoint interface the loader fills (`locate`, `skip_tensor`,
  `checkpoint_shapes`), plus `moe_blocks()`: its layers' routed-expert blocks, each with a `gate` (the router, whose
  forward returns (weights, ids)) and `experts` (a `RoutedExperts`);
- its args say what a KV-cache token holds (`cache_kind`, `cache_width`) and how many experts there are;
- `component_of` names the part of the model every checkpoint tensor belongs to (one taxonomy for all);
- `gguf` names the module holding its llama.cpp architecture and tensor mapping; `reply_format` the parser of its
  replies (reasoning and tool calls); `reference_model_type` the transformers implementation the tests compare with.
"""
import re
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

COMPONENTS = ("embeddings", "attention", "dense_mlp", "router", "shared_experts", "routed_experts", "norms", "lm_head")


class RoutedExperts(Protocol):
    """One layer's routed experts, however they are held: stacked BF16 (`Experts`), packed INT4 (`Int4Experts`), the
    fused kernels' layouts, split over devices (`PlacedExperts`) or streamed into a GPU cache (`StreamedExperts`)."""

    n_experts: int

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [N, dim], routing weights and expert ids [N, k] -> sum_k weights * expert_k(x); ids < 0 are skipped
        (those experts live elsewhere)."""


class MovableExperts(RoutedExperts, Protocol):
    """Experts held as tensors (all but the placed and streamed wrappers): what a placement splits over devices and
    what an expert cache refills itself from."""

    def select(self, ids: list[int], device: torch.device | str) -> "MovableExperts":
        """Experts `ids`, renumbered 0..len(ids)-1, copied to `device` in the same layout."""

    def load_slot(self, slot: int, source: "MovableExperts", expert: int):
        """Overwrite expert `slot` with `source`'s expert `expert`."""


_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def hf_layer_of(name: str) -> int | None:
    """The layer index of a checkpoint tensor named the Hugging Face way (`model.layers.N.*`); None for the rest."""
    match = _HF_LAYER.match(name)
    return None if match is None else int(match[1])


def hf_component_of(name: str) -> str:
    """The component of a checkpoint tensor (or its scale / packed companion) named the Hugging Face way:
    `model.embed_tokens`, `model.layers.N.self_attn.*`, `.mlp.experts.E.*`, `.mlp.shared_experts.*`, `.mlp.gate.*`
    (the router), other `.mlp.*` (a dense MLP), `*norm*`, `lm_head`."""
    if "embed_tokens" in name:
        return "embeddings"
    if name.startswith("lm_head"):
        return "lm_head"
    parts = name.split(".")
    if len(parts) >= 2 and "norm" in parts[-2]:
        return "norms"
    if ".self_attn." in name:
        return "attention"
    if ".mlp.experts." in name:
        return "routed_experts"
    if ".mlp.shared_experts." in name:
        return "shared_experts"
    if ".mlp.gate." in name:
        return "router"
    return "dense_mlp"


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.json model_types this family implements
    args_class: type  # its ModelArgs: config.json's keys, a runtime.config_schema.config_args dataclass
    model_class: type  # model_class(args) -> the model
    component_of: Callable[[str], str]
    gguf: str  # module with the llama.cpp (GGUF) architecture and tensor mapping
    reply_format: str  # a name in runtime.chat_format.REPLY_PARSERS
    reference_model_type: str  # transformers' model_type for the reference implementation
