"""The DeepSeek-V3 family in llama.cpp's `deepseek2` architecture: tensor names from gguf-py's tensor map, the
hyperparameter keys, and kv_b_proj cut into the per-head halves llama.cpp loads. runtime/convert/gguf.py writes
any family's GGUF through a module like this one.

Current llama.cpp runs MLA with weight absorption: it loads `attn_k_b` / `attn_v_b` (the key and value halves of
`kv_b_proj`, per head) instead of `attn_kv_b`, and treats attention as one shared key/value head of
`kv_lora_rank + qk_rope_head_dim` (keys) and `kv_lora_rank` (values) dims; the per-head sizes go in the `_mla` keys.
"""
import gguf

from runtime.errors import K2Error
import torch

from runtime.models.deepseek_v3 import ModelArgs

ARCH = gguf.MODEL_ARCH.DEEPSEEK2
ARCH_NAME = gguf.MODEL_ARCH_NAMES[ARCH]
T = gguf.MODEL_TENSOR
TENSOR_KINDS = frozenset(gguf.MODEL_TENSORS[ARCH])  # what llama.cpp's deepseek2 loader may find in a file
EXPERT_KINDS = frozenset({T.FFN_GATE_EXP, T.FFN_UP_EXP, T.FFN_DOWN_EXP})
# Kept in F32 whatever --type says, as llama.cpp's converter does: the router (its logits pick the experts), and
# 1-D tensors (norms, the routing bias), which its kernels read only as F32.
F32_KINDS = frozenset({T.FFN_GATE_INP})
# config.json model_types that are this architecture, and the pre-tokenizer name llama.cpp knows each one's by.
PRE_TOKENIZERS = {"kimi_k2": "kimi-k2", "deepseek_v3": "deepseek-v3"}


def tensor_name_map(n_layers: int) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(ARCH, n_layers)


def gguf_tensor(name_map: gguf.TensorNameMap, hf_name: str) -> tuple[gguf.MODEL_TENSOR, str]:
    """Checkpoint name (stacked experts as `experts.{proj}`, the kv_b halves as `{k,v}_b_proj`) -> (kind, GGUF name).

    The routing bias is stored as `e_score_correction_bias`; the map knows it, as llama.cpp does, as the `bias` of
    `e_score_correction`, which llama.cpp loads as `blk.N.exp_probs_b.bias`.
    """
    found = name_map.get_type_and_name(hf_name.replace("e_score_correction_bias", "e_score_correction.bias"),
                                       try_suffixes=(".weight", ".bias"))
    if found is None or found[0] not in TENSOR_KINDS:
        raise K2Error(f"tensor {hf_name} has no place in llama.cpp's {ARCH_NAME} architecture")
    return found


def check_supported(config: dict, args: ModelArgs):
    """One clear error for what llama.cpp's deepseek2 cannot run, before any work."""
    if config.get("model_type") not in PRE_TOKENIZERS:
        raise K2Error(f"converting model_type {config.get('model_type')!r} to GGUF is not supported "
                      f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})")
    if args.n_routed_experts and args.moe_layer_freq != 1:
        raise K2Error(f"moe_layer_freq {args.moe_layer_freq}: llama.cpp's {ARCH_NAME} has a MoE block in every layer "
                      "after the leading dense ones")
    if args.attention_bias:
        raise K2Error(f"attention_bias: llama.cpp's {ARCH_NAME} has no attention biases")
    scaling = args.rope_scaling or {}
    if scaling and scaling.get("type", scaling.get("rope_type")) != "yarn":
        raise K2Error(f"rope scaling {scaling.get('type', scaling.get('rope_type'))!r}: only yarn is converted")


def add_hparams(writer: gguf.GGUFWriter, args: ModelArgs):
    """The `deepseek2.*` keys llama.cpp reads, from the model's config (gguf-py's writer methods name the keys)."""
    w = writer
    w.add_block_count(args.num_hidden_layers)
    w.add_context_length(args.max_position_embeddings)
    w.add_embedding_length(args.hidden_size)
    w.add_feed_forward_length(args.intermediate_size)
    w.add_vocab_size(args.vocab_size)
    w.add_head_count(args.num_attention_heads)
    w.add_head_count_kv(1)  # absorbed MLA: every head attends to the one cached latent
    w.add_layer_norm_rms_eps(args.rms_norm_eps)
    if args.q_lora_rank:
        w.add_q_lora_rank(args.q_lora_rank)
    w.add_kv_lora_rank(args.kv_lora_rank)
    w.add_key_length(args.kv_lora_rank + args.qk_rope_head_dim)
    w.add_value_length(args.kv_lora_rank)
    w.add_key_length_mla(args.qk_head_dim)  # their presence is what makes llama.cpp load attn_k_b / attn_v_b
    w.add_value_length_mla(args.v_head_dim)
    w.add_rope_dimension_count(args.qk_rope_head_dim)
    w.add_rope_freq_base(args.rope_theta)

    w.add_leading_dense_block_count(args.first_k_dense_replace if args.n_routed_experts else args.num_hidden_layers)
    w.add_expert_feed_forward_length(args.moe_intermediate_size)
    w.add_expert_shared_count(args.n_shared_experts or 0)
    if args.n_routed_experts:
        w.add_expert_count(args.n_routed_experts)
        w.add_expert_used_count(args.num_experts_per_tok)
        w.add_expert_group_count(args.n_group or 1)
        w.add_expert_group_used_count(args.topk_group or 1)
        # Without this key llama.cpp falls back to softmax gating for a deepseek2 file.
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        w.add_expert_weights_scale(args.routed_scaling_factor)
        w.add_expert_weights_norm(args.norm_topk_prob)

    scaling = args.rope_scaling or {}
    if scaling:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(scaling["factor"])
        w.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
        if scaling.get("beta_fast") is not None:
            w.add_rope_scaling_yarn_beta_fast(scaling["beta_fast"])
        if scaling.get("beta_slow") is not None:
            w.add_rope_scaling_yarn_beta_slow(scaling["beta_slow"])
        if scaling.get("mscale_all_dim"):
            # llama.cpp divides this key by 0.1 for deepseek2 (a convention kept from its converter) and scales
            # attention by (1 + 0.1 * mscale_all_dim * ln(factor))^2, as the model's softmax scale does.
            w.add_rope_scaling_yarn_log_mul(0.1 * scaling["mscale_all_dim"])


def split_tensor(name: str, args: ModelArgs) -> list[tuple[str, tuple[int, ...], str]] | None:
    """kv_b_proj -> its key and value halves per head, as (checkpoint-style name, shape, part); None for the rest."""
    if "kv_b_proj" not in name:
        return None
    heads, rank = args.num_attention_heads, args.kv_lora_rank
    return [(name.replace("kv_b_proj", "k_b_proj"), (heads, rank, args.qk_nope_head_dim), "k_b"),
            (name.replace("kv_b_proj", "v_b_proj"), (heads, args.v_head_dim, rank), "v_b")]


def encode_part(part: str, weight: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A part `split_tensor` planned, from kv_b_proj's weight [heads * (nope + v), rank]: attn_k_b [heads, rank, nope]
    (transposed, as llama.cpp multiplies by it) or attn_v_b [heads, v, rank]."""
    heads = weight.view(shape[0], -1, weight.shape[1])  # [H, nope + v, rank]
    if part == "k_b":
        return heads[:, :shape[2]].transpose(1, 2)
    return heads[:, heads.shape[1] - shape[1]:]
