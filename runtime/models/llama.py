"""Llama architecture (SmolLM2 is one): grouped-query attention with rotate-half RoPE and a per-head KV cache, a
SwiGLU MLP in every layer. Qwen3 and Qwen3-MoE (qwen3.py, qwen3_moe.py) are this model with a few switches.

Module names follow the checkpoint's tensor names (transformers' LlamaForCausalLM), so loading is a strict name
match. `FAMILY` at the end is what the rest of the toolkit knows of it (runtime/models/family.py).
"""
from typing import Annotated, Literal, Self

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from runtime.config_schema import Positive, RopeScaling, config_args
from runtime.layers import MLP, RMSNorm, apply_rope_half
from runtime.models.decoder import Decoder, StepInputs
from runtime.models.family import Family, hf_component_of

HeadDim = Annotated[int, Field(gt=0, multiple_of=2)]  # rotated in halves


@config_args
class ModelArgs:
    """The `config.json` keys the model reads, with what the model needs of them; unknown keys are ignored.
    num_key_value_heads and head_dim default as transformers' LlamaConfig defaults them."""

    vocab_size: Positive
    hidden_size: Positive
    intermediate_size: Positive
    num_hidden_layers: Positive
    num_attention_heads: Positive
    num_key_value_heads: Positive | None = None  # None: one per attention head
    head_dim: HeadDim | None = None  # None: hidden_size / num_attention_heads
    hidden_act: Literal["silu"] = "silu"
    rms_norm_eps: Annotated[float, Field(ge=0)] = 1e-6
    rope_theta: Annotated[float, Field(gt=1)] = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: Positive = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: Literal[False] = False  # no published Llama-family checkpoint the toolkit targets has MLP biases

    @model_validator(mode="after")
    def _heads(self) -> Self:
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim is None:
            if self.hidden_size % (2 * self.num_attention_heads):
                raise ValueError(f"hidden_size ({self.hidden_size}) does not split into {self.num_attention_heads} "
                                 "heads of an even size (give head_dim)")
            self.head_dim = self.hidden_size // self.num_attention_heads
        return self

    # What every family's args answer (runtime/models/family.py).
    cache_kind = "GQA keys and values"
    qk_norm = False  # Qwen3 normalizes each head's query and key before RoPE
    extra_layers = 0
    routed_experts = experts_per_token = shared_experts = 0

    @property
    def cache_width(self) -> int:
        """Values per token and layer in the KV cache: a key and a value per KV head."""
        return 2 * self.num_key_value_heads * self.head_dim

    @property
    def rope_dim(self) -> int:
        return self.head_dim

    def is_moe_layer(self, i: int) -> bool:
        return False


class Attention(nn.Module):
    """Grouped-query attention: each of the KV heads serves num_attention_heads / num_key_value_heads query heads.
    The cache holds each token's rotated keys, then its values, [2 * kv_heads * head_dim]."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.q_proj = nn.Linear(args.hidden_size, self.n_heads * self.head_dim, bias=args.attention_bias)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv * self.head_dim, bias=args.attention_bias)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv * self.head_dim, bias=args.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, args.hidden_size, bias=args.attention_bias)
        if args.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps)

    def forward(self, x: torch.Tensor, step: StepInputs, layer_cache: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        q = self.q_proj(x).view(B, T, H, D)
        k = self.k_proj(x).view(B, T, KV, D)
        v = self.v_proj(x).view(B, T, KV, D)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope_half(torch.cat([q, k], dim=2), step.cos, step.sin).split([H, KV], dim=2)
        layer_cache.index_put_((step.rows, step.positions), torch.cat([k, v], dim=2).flatten(2))
        S = step.span
        keys, values = layer_cache[:, :S].view(B, S, 2 * KV, D).transpose(1, 2).split([KV, KV], dim=1)
        # Query heads grouped under their KV head ([B, KV, G * T, D]): attention reads each cached head once.
        G = H // KV
        q = q.view(B, T, KV, G, D).permute(0, 2, 3, 1, 4).reshape(B, KV, G * T, D)
        mask = step.mask[:, None, None].expand(B, 1, G, T, S).reshape(B, 1, G * T, S)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.o_proj(out.view(B, KV, G, T, D).permute(0, 3, 1, 2, 4).reshape(B, T, H * D))


class DecoderLayer(nn.Module):
    """Pre-norm attention and feed-forward; `feed_forward(args, i)` builds layer i's (a family with routed experts
    overrides it)."""

    def __init__(self, args: ModelArgs, i: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = self.feed_forward(args, i)

    @staticmethod
    def feed_forward(args: ModelArgs, i: int) -> nn.Module:
        return MLP(args.hidden_size, args.intermediate_size)

    def forward(self, h, step: StepInputs, layer_cache):
        h = h + self.self_attn(self.input_layernorm(h), step, layer_cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Llama(Decoder):
    layer_class = DecoderLayer


FAMILY = Family(
    name="llama",
    model_types=("llama",),
    args_class=ModelArgs,
    model_class=Llama,
    component_of=hf_component_of,
    gguf="runtime.models.llama_gguf",
    reply_format="llama",
    reference_model_type="llama",
)
