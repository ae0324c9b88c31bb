"""The DeepSeek-V3 family in llama.cpp's `deepseek2` architecture, both ways: the hyperparameter keys (config.json
<-> `deepseek2.*`), tensor names from gguf-py's tensor map, and kv_b_proj cut into the per-head halves llama.cpp
loads (and joined back). runtime/convert/gguf.py writes a GGUF and runtime/gguf_checkpoint.py reads one through a
module like this one; llama_gguf.py says what each name in it does.

Current llama.cpp runs MLA with weight absorption: it loads `attn_k_b` / `attn_v_b` (the key and value halves of
`kv_b_proj`, per head) instead of `attn_kv_b`, and treats attention as one shared key/value head of
`kv_lora_rank + qk_rope_head_dim` (keys) and `kv_lora_rank` (values) dims; the per-head sizes go in the `_mla` keys.
Older files store `attn_kv_b` whole, with per-head key and value lengths; both are read.
"""
import gguf
import torch

from runtime.config_schema import rope_type
from runtime.errors import K2Error
from runtime.models.deepseek_v3 import ModelArgs

Keys = gguf.Keys
T = gguf.MODEL_TENSOR
ARCH = gguf.MODEL_ARCH.DEEPSEEK2
ARCH_NAMES = {"deepseek_v3": gguf.MODEL_ARCH_NAMES[ARCH], "kimi_k2": gguf.MODEL_ARCH_NAMES[ARCH]}
EXPERT_KINDS = frozenset({T.FFN_GATE_EXP, T.FFN_UP_EXP, T.FFN_DOWN_EXP})
# Kept in F32 whatever --type says, as llama.cpp's converter does: the router (its logits pick the experts), and
# 1-D tensors (norms, the routing bias), which its kernels read only as F32.
F32_KINDS = frozenset({T.FFN_GATE_INP})
CONFIG_TENSORS = ()  # tensors that carry config rather than weights: none here
# config.json model_types that are this architecture, and the pre-tokenizer name llama.cpp knows each one's by.
PRE_TOKENIZERS = {"kimi_k2": "kimi-k2", "deepseek_v3": "deepseek-v3"}
HF_ARCHITECTURE = "DeepseekV3ForCausalLM"  # config.json `architectures` (Kimi K2 ships the same)


def arch(args: ModelArgs) -> gguf.MODEL_ARCH:
    return ARCH


def tensor_name_map(args: ModelArgs) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(ARCH, args.num_hidden_layers)


def gguf_tensor(name_map: gguf.TensorNameMap, hf_name: str) -> tuple[gguf.MODEL_TENSOR, str]:
    """Checkpoint name (stacked experts as `experts.{proj}`, the kv_b halves as `{k,v}_b_proj`) -> (kind, GGUF name).

    The routing bias is stored as `e_score_correction_bias`; the map knows it, as llama.cpp does, as the `bias` of
    `e_score_correction`, which llama.cpp loads as `blk.N.exp_probs_b.bias`.
    """
    found = name_map.get_type_and_name(hf_name.replace("e_score_correction_bias", "e_score_correction.bias"),
                                       try_suffixes=(".weight", ".bias"))
    if found is None:
        raise K2Error(f"tensor {hf_name} has no place in llama.cpp's {ARCH_NAMES['deepseek_v3']} architecture")
    return found


def check_supported(config: dict, args: ModelArgs):
    """One clear error for what llama.cpp's deepseek2 cannot run, before any work."""
    name = ARCH_NAMES["deepseek_v3"]
    if args.n_routed_experts and args.moe_layer_freq != 1:
        raise K2Error(f"moe_layer_freq {args.moe_layer_freq}: llama.cpp's {name} has a MoE block in every layer "
                      "after the leading dense ones")
    if args.attention_bias:
        raise K2Error(f"attention_bias: llama.cpp's {name} has no attention biases")
    if rope_type(args.rope_scaling) not in ("default", "yarn"):
        raise K2Error(f"rope scaling {rope_type(args.rope_scaling)!r}: only yarn is converted")


def pre_tokenizer(config: dict, folder) -> str:
    return PRE_TOKENIZERS[config["model_type"]]


def add_hparams(writer: gguf.GGUFWriter, args: ModelArgs):
    """The `deepseek2.*` keys llama.cpp reads, from the model's config (gguf-py's writer methods name the keys);
    `read_config` is the way back."""
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


def extra_tensors(args: ModelArgs) -> dict:
    """Tensors llama.cpp needs beyond the checkpoint's: none for deepseek2."""
    return {}


def read_config(meta) -> dict:
    """config.json from a deepseek2 file's keys (`meta`: runtime/gguf_checkpoint.Metadata): `add_hparams` reversed,
    and older files' per-head key and value lengths."""
    n = meta.number
    heads, rope = n(Keys.Attention.HEAD_COUNT), n(Keys.Rope.DIMENSION_COUNT)
    mla = n(Keys.Attention.KEY_LENGTH_MLA, None) is not None
    if n(Keys.LLM.EXPERT_GATING_FUNC, gguf.ExpertGatingFuncType.SIGMOID) != gguf.ExpertGatingFuncType.SIGMOID:
        raise K2Error(f"{meta.path}: softmax expert gating (DeepSeek-V2) is not supported; k2 runs DeepSeek-V3's "
                      "sigmoid routing")
    layers = n(Keys.LLM.BLOCK_COUNT)
    experts = n(Keys.LLM.EXPERT_COUNT, 0)
    pre = meta.value(gguf.Keys.Tokenizer.PRE, None)
    config = {
        "model_type": next((t for t, name in PRE_TOKENIZERS.items() if name == pre), "deepseek_v3"),
        "architectures": [HF_ARCHITECTURE],
        "vocab_size": n(Keys.LLM.VOCAB_SIZE, None) or meta.tensors["token_embd.weight"].shape[0],
        "hidden_size": n(Keys.LLM.EMBEDDING_LENGTH),
        "intermediate_size": n(Keys.LLM.FEED_FORWARD_LENGTH),
        "moe_intermediate_size": n(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH, n(Keys.LLM.FEED_FORWARD_LENGTH)),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "q_lora_rank": n(Keys.Attention.Q_LORA_RANK, None) or None,
        "kv_lora_rank": n(Keys.Attention.KV_LORA_RANK),
        "qk_rope_head_dim": rope,
        "qk_nope_head_dim": (n(Keys.Attention.KEY_LENGTH_MLA) if mla else n(Keys.Attention.KEY_LENGTH)) - rope,
        "v_head_dim": n(Keys.Attention.VALUE_LENGTH_MLA) if mla else n(Keys.Attention.VALUE_LENGTH),
        "n_routed_experts": experts or None,
        "n_shared_experts": n(Keys.LLM.EXPERT_SHARED_COUNT, 0),
        "num_experts_per_tok": n(Keys.LLM.EXPERT_USED_COUNT, None) if experts else None,
        "n_group": n(Keys.LLM.EXPERT_GROUP_COUNT, 1),
        "topk_group": n(Keys.LLM.EXPERT_GROUP_USED_COUNT, 1),
        "routed_scaling_factor": float(n(Keys.LLM.EXPERT_WEIGHTS_SCALE, 1.0)),
        "norm_topk_prob": bool(meta.arch_value(Keys.LLM.EXPERT_WEIGHTS_NORM, False)),
        "first_k_dense_replace": min(n(Keys.LLM.LEADING_DENSE_BLOCK_COUNT, 0), layers) if experts else 0,
        "rms_norm_eps": n(Keys.Attention.LAYERNORM_RMS_EPS),
        "rope_theta": float(n(Keys.Rope.FREQ_BASE, 10000.0)),
        "max_position_embeddings": n(Keys.LLM.CONTEXT_LENGTH),
        "tie_word_embeddings": False,
    }
    scaling = meta.arch_value(Keys.Rope.SCALING_TYPE, "none")
    if scaling == "yarn":
        rope_scaling = {"type": "yarn", "factor": float(n(Keys.Rope.SCALING_FACTOR)),
                        "original_max_position_embeddings": n(Keys.Rope.SCALING_ORIG_CTX_LEN)}
        for key, hf_key in ((Keys.Rope.SCALING_YARN_BETA_FAST, "beta_fast"),
                            (Keys.Rope.SCALING_YARN_BETA_SLOW, "beta_slow")):
            if (value := n(key, None)) is not None:
                rope_scaling[hf_key] = float(value)
        if log_mul := n(Keys.Rope.SCALING_YARN_LOG_MUL, 0.0):
            # llama.cpp runs rope at magnitude 1 and folds mscale_all_dim into the attention scale: mscale equal to
            # mscale_all_dim is that (runtime/layers.py)
            mscale = float(str(round(log_mul / 0.1, 6)))
            rope_scaling |= {"mscale": mscale, "mscale_all_dim": mscale}
        config["rope_scaling"] = rope_scaling
    elif scaling != "none":
        raise K2Error(f"{meta.path}: rope scaling {scaling!r} is not supported for {ARCH_NAMES['deepseek_v3']}")
    return config


def split_tensor(name: str, args: ModelArgs) -> list[tuple[str, tuple[int, ...], str]] | None:
    """kv_b_proj -> its key and value halves per head, as (checkpoint-style name, shape, part); None for the rest."""
    if "kv_b_proj" not in name:
        return None
    heads, rank = args.num_attention_heads, args.kv_lora_rank
    return [(name.replace("kv_b_proj", "k_b_proj"), (heads, rank, args.qk_nope_head_dim), "k_b"),
            (name.replace("kv_b_proj", "v_b_proj"), (heads, args.v_head_dim, rank), "v_b")]


def encode_part(part: str, weight: torch.Tensor, shape: tuple[int, ...], args: ModelArgs) -> torch.Tensor:
    """A part `split_tensor` planned, from kv_b_proj's weight [heads * (nope + v), rank]: attn_k_b [heads, rank, nope]
    (transposed, as llama.cpp multiplies by it) or attn_v_b [heads, v, rank]."""
    heads = weight.view(shape[0], -1, weight.shape[1])  # [H, nope + v, rank]
    if part == "k_b":
        return heads[:, :shape[2]].transpose(1, 2)
    return heads[:, heads.shape[1] - shape[1]:]


def join_parts(parts: dict[str, torch.Tensor], shape: tuple[int, ...], args: ModelArgs) -> torch.Tensor:
    """kv_b_proj [heads * (nope + v), rank] from attn_k_b and attn_v_b: `encode_part` undone."""
    k_b, v_b = parts["k_b"], parts["v_b"]  # [H, rank, nope], [H, v, rank]
    return torch.cat([k_b.transpose(1, 2), v_b], dim=1).reshape(shape)
