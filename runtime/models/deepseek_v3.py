"""DeepSeek-V3 architecture (Kimi K2 is the same model): MLA attention with a compressed cache, sigmoid-routed MoE.

Module names follow the checkpoint's tensor names, so loading is a strict name match. `FAMILY` at the end is what
the rest of the toolkit knows of it (runtime/models/family.py).
"""
from typing import Annotated, Literal, Self

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from runtime.config_schema import NonNegative, Positive, RopeScaling, config_args, rope_type
from runtime.layers import MLP, RMSNorm, apply_rope_interleaved, route_sigmoid_topk, yarn_mscale
from runtime.models.experts import Experts
from runtime.models.decoder import Decoder, StepInputs
from runtime.models.family import Family, hf_component_of


@config_args
class ModelArgs:
    """The `config.json` keys the model reads, with what the model needs of them; unknown keys are ignored."""

    vocab_size: Positive
    hidden_size: Positive
    intermediate_size: Positive
    moe_intermediate_size: Positive
    num_hidden_layers: Positive
    num_attention_heads: Positive
    kv_lora_rank: Positive
    qk_nope_head_dim: Positive
    qk_rope_head_dim: Annotated[int, Field(gt=0, multiple_of=2)]  # rotated in pairs
    v_head_dim: Positive
    q_lora_rank: Positive | None = None
    n_routed_experts: NonNegative | None = None
    n_shared_experts: NonNegative | None = None
    num_experts_per_tok: Positive | None = None
    routed_scaling_factor: float = 1.0
    n_group: Positive | None = 1
    topk_group: Positive | None = 1
    norm_topk_prob: bool = True
    scoring_func: Literal["sigmoid"] = "sigmoid"  # the routing implemented (DeepSeek-V3, Kimi K2)
    first_k_dense_replace: NonNegative = 0
    moe_layer_freq: Positive = 1
    hidden_act: Literal["silu"] = "silu"
    rms_norm_eps: Annotated[float, Field(ge=0)] = 1e-6
    rope_theta: Annotated[float, Field(gt=1)] = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: Positive = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    num_nextn_predict_layers: NonNegative = 0

    @model_validator(mode="after")
    def _routing_possible(self) -> Self:
        """Routing picks num_experts_per_tok experts within the topk_group best of n_group equal groups (scored by
        their two best experts)."""
        if not self.n_routed_experts:
            return self
        n_group, topk_group = self.n_group or 1, self.topk_group or 1
        if self.num_experts_per_tok is None:
            raise ValueError(f"n_routed_experts is {self.n_routed_experts} but num_experts_per_tok is not given")
        if self.n_routed_experts % n_group or (n_group > 1 and self.n_routed_experts // n_group < 2):
            raise ValueError(f"n_routed_experts ({self.n_routed_experts}) must split into n_group ({n_group}) "
                             "groups of at least two experts")
        if topk_group > n_group:
            raise ValueError(f"topk_group ({topk_group}) exceeds n_group ({n_group})")
        if self.num_experts_per_tok > topk_group * (self.n_routed_experts // n_group):
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the "
                             f"{topk_group * (self.n_routed_experts // n_group)} experts routing may choose from")
        return self

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    # What every family's args answer (runtime/models/family.py).
    cache_kind = "MLA compressed latent"

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim

    @property
    def extra_layers(self) -> int:
        """Stored layers past the last one the model runs: the multi-token-prediction layers."""
        return self.num_nextn_predict_layers

    @property
    def cache_width(self) -> int:
        """Values per token and layer in the KV cache: the compressed latent and the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def routed_experts(self) -> int:
        return self.n_routed_experts or 0

    @property
    def experts_per_token(self) -> int:
        return (self.num_experts_per_tok or 0) if self.routed_experts else 0

    @property
    def shared_experts(self) -> int:
        return self.n_shared_experts or 0

    def is_moe_layer(self, i: int) -> bool:
        return bool(self.n_routed_experts) and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    def softmax_scale(self) -> float:
        scale = self.qk_head_dim ** -0.5
        scaling = self.rope_scaling or {}
        if rope_type(scaling) == "yarn" and scaling.get("mscale_all_dim"):
            scale *= yarn_mscale(scaling["factor"], scaling["mscale_all_dim"]) ** 2
        return scale


class Attention(nn.Module):
    """Multi-head latent attention. Prefill expands per-head K/V; decode attends in the latent space (absorbed)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        self.kv_lora_rank = args.kv_lora_rank
        self.scale = args.softmax_scale()
        q_out = self.n_heads * args.qk_head_dim
        if args.q_lora_rank:
            self.q_a_proj = nn.Linear(args.hidden_size, args.q_lora_rank, bias=args.attention_bias)
            self.q_a_layernorm = RMSNorm(args.q_lora_rank)
            self.q_b_proj = nn.Linear(args.q_lora_rank, q_out, bias=False)
        else:
            self.q_proj = nn.Linear(args.hidden_size, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(args.hidden_size, args.kv_lora_rank + args.qk_rope_head_dim, bias=args.attention_bias)
        self.kv_a_layernorm = RMSNorm(args.kv_lora_rank)
        self.kv_b_proj = nn.Linear(args.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, args.hidden_size, bias=args.attention_bias)

    def forward(self, x: torch.Tensor, step: StepInputs, layer_cache: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if hasattr(self, "q_a_proj") else self.q_proj(x)
        q_nope, q_pe = q.view(B, T, self.n_heads, -1).split([self.nope_dim, self.rope_dim], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        # The query's and the shared key's rope parts rotate in one call. [B, T, H + 1, rope_dim]
        rotated = apply_rope_interleaved(torch.cat([q_pe, k_pe.unsqueeze(2)], dim=2), step.cos, step.sin)
        q_pe, k_pe = rotated.split([self.n_heads, 1], dim=2)
        new = torch.cat([self.kv_a_layernorm(c_kv), k_pe.squeeze(2)], dim=-1)  # [B, T, kv_lora_rank + rope_dim]
        layer_cache.index_put_((step.rows, step.positions), new)
        latent = layer_cache[:, :step.span]  # [B, S, kv_lora_rank + rope_dim]
        attend = self.attend_absorbed if T == 1 else self.attend_naive
        return self.o_proj(attend(q_nope, q_pe, latent, step.mask).flatten(2))

    def attend_naive(self, q_nope, q_pe, latent, mask):
        """Expand the latent into per-head keys and values: cheaper for long prompts, and the test oracle."""
        B, S, _ = latent.shape
        c_kv, k_pe = latent.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_nope, v = self.kv_b_proj(c_kv).view(B, S, self.n_heads, -1).split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, self.n_heads, -1)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask.unsqueeze(1), scale=self.scale)
        return out.transpose(1, 2)  # [B, T, H, v_dim]

    def attend_absorbed(self, q_nope, q_pe, latent, mask):
        """Fold kv_b_proj into the query and the output so attention reads only the cached latent.

        Written as batched matmuls over views (no einsum): at decode every op is tiny, and its count is the cost.
        """
        B, T, H, _ = q_nope.shape
        r = self.kv_lora_rank
        w_uk, w_uv = self.kv_b_proj.weight.view(H, -1, r).split([self.nope_dim, self.v_dim], dim=1)
        q_latent = torch.bmm(q_nope.reshape(B * T, H, -1).transpose(0, 1), w_uk)  # [H, B*T, r]
        # Query in the latent's own layout [c_kv | k_pe]: one matmul scores the cached rows. [B, T*H, r + rope_dim]
        q_full = torch.cat([q_latent.transpose(0, 1).reshape(B, T * H, r), q_pe.reshape(B, T * H, -1)], dim=-1)
        scores = torch.bmm(q_full, latent.transpose(1, 2)).view(B, T, H, -1) * self.scale  # [B, T, H, S]
        scores = scores.masked_fill(~mask.unsqueeze(2), float("-inf"))
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(q_nope.dtype)
        out_latent = torch.bmm(probs.view(B, T * H, -1), latent[..., :r])  # [B, T*H, r]
        out = torch.bmm(out_latent.view(B * T, H, r).transpose(0, 1), w_uv.transpose(1, 2))  # [H, B*T, v_dim]
        return out.transpose(0, 1).view(B, T, H, self.v_dim)


class Router(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(args.n_routed_experts, dtype=torch.float32))
        self.top_k, self.n_group, self.topk_group = args.num_experts_per_tok, args.n_group or 1, args.topk_group or 1
        self.normalize, self.scaling_factor = args.norm_topk_prob, args.routed_scaling_factor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight.float())
        return route_sigmoid_topk(logits, self.e_score_correction_bias, self.top_k, self.n_group, self.topk_group,
                                  self.normalize, self.scaling_factor)


class MoE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate = Router(args)
        self.experts = Experts(args.n_routed_experts, args.hidden_size, args.moe_intermediate_size)
        self.shared_experts = (MLP(args.hidden_size, args.moe_intermediate_size * args.n_shared_experts)
                               if args.n_shared_experts else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, ids = self.gate(x)  # [N, k] each
        y = self.experts(x, weights, ids)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, i: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MoE(args) if args.is_moe_layer(i) else MLP(args.hidden_size, args.intermediate_size)

    def forward(self, h, step: StepInputs, layer_cache):
        h = h + self.self_attn(self.input_layernorm(h), step, layer_cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class DeepseekV3(Decoder):
    layer_class = DecoderLayer
    moe_block_class = MoE
    # Linears the model reads as matrices, not only through forward: absorbed MLA decode splits kv_b_proj's weight
    # into W_UK and W_UV, so it loads dequantized from an INT4 checkpoint.
    dense_linears = ("self_attn.kv_b_proj",)
    fp32_tensors = ("e_score_correction_bias",)  # kept in fp32 whatever the model dtype: routing needs it


FAMILY = Family(
    name="deepseek_v3",
    model_types=("deepseek_v3", "kimi_k2"),
    args_class=ModelArgs,
    model_class=DeepseekV3,
    component_of=hf_component_of,
    gguf="runtime.models.deepseek_v3_gguf",
    reply_format="kimi_k2",
    reference_model_type="deepseek_v3",
)
