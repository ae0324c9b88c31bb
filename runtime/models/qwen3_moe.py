"""Qwen3-MoE (Qwen3MoeForCausalLM): Qwen3's attention (qwen3.py) with routed experts in place of the MLP.

Routing is softmax over every expert, the top k, renormalized to sum to one when `norm_topk_prob`; no shared expert,
no bias, no scaling. Layer i routes experts unless it is in `mlp_only_layers` or (i + 1) is not a multiple of
`decoder_sparse_step`; those layers keep a dense MLP of `intermediate_size`.
"""
from typing import Self

import torch
import torch.nn.functional as F
from pydantic import AliasChoices, Field, model_validator
from torch import nn

from runtime.config_schema import NonNegative, Positive, config_args
from runtime.layers import MLP, route_softmax_topk
from runtime.models import llama, qwen3
from runtime.models.decoder import Decoder
from runtime.models.experts import Experts
from runtime.models.family import Family, hf_component_of


@config_args
class ModelArgs(qwen3.ModelArgs):
    # Published configs say num_experts; transformers 5 writes num_local_experts.
    num_experts: Positive = Field(128, validation_alias=AliasChoices("num_experts", "num_local_experts"))
    num_experts_per_tok: Positive = 8
    moe_intermediate_size: Positive = 768
    decoder_sparse_step: Positive = 1
    mlp_only_layers: list[NonNegative] = ()
    norm_topk_prob: bool = False
    head_dim: llama.HeadDim | None = None  # transformers' Qwen3MoeConfig has none: hidden_size / heads

    @model_validator(mode="after")
    def _routing_possible(self) -> Self:
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_experts ({self.num_experts})")
        return self

    @property
    def routed_experts(self) -> int:
        return self.num_experts

    @property
    def experts_per_token(self) -> int:
        return self.num_experts_per_tok

    def is_moe_layer(self, i: int) -> bool:
        return i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0


class Router(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(args.num_experts, args.hidden_size))
        self.top_k, self.normalize = args.num_experts_per_tok, args.norm_topk_prob

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return route_softmax_topk(F.linear(x.float(), self.weight.float()), self.top_k, self.normalize)


class MoE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate = Router(args)
        self.experts = Experts(args.num_experts, args.hidden_size, args.moe_intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, ids = self.gate(x)
        return self.experts(x, weights, ids).view(shape)


class DecoderLayer(llama.DecoderLayer):
    @staticmethod
    def feed_forward(args: ModelArgs, i: int) -> nn.Module:
        return MoE(args) if args.is_moe_layer(i) else MLP(args.hidden_size, args.intermediate_size)


class Qwen3Moe(Decoder):
    layer_class = DecoderLayer
    moe_block_class = MoE


FAMILY = Family(
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    args_class=ModelArgs,
    model_class=Qwen3Moe,
    component_of=hf_component_of,
    gguf="runtime.models.qwen3_gguf",
    reply_format="qwen3",
    reference_model_type="qwen3_moe",
)
