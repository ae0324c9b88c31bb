"""The Llama family in llama.cpp's `llama` architecture, both ways; qwen3_gguf.py is this mapping with Qwen3's switches.

A family's GGUF mapping, as runtime/convert/gguf.py (writing) and runtime/gguf_checkpoint.py (reading) use it:
`ARCH_NAMES` (model_type -> llama.cpp architecture), `arch(args)`, `tensor_name_map(args)` and `gguf_tensor` (gguf-py's
tensor map: checkpoint name -> GGUF name), `check_supported`, `add_hparams` and its reverse `read_config` (config.json
<-> the `{arch}.*` keys), `pre_tokenizer`, `extra_tensors` (what llama.cpp needs beyond the checkpoint's tensors;
`CONFIG_TENSORS` names them for the reader), and `split_tensor` / `encode_part` / `join_parts` (a checkpoint tensor
stored transformed, and the transform undone). `EXPERT_KINDS` and `F32_KINDS` say which tensors follow
`--experts-type` and which stay F32.

Here: llama.cpp's `llama` rotates adjacent pairs of each head (GPT-J style) where Hugging Face's Llama rotates halves,
so its converter reorders each head's q_proj and k_proj rows (`_to_pairs`) and a reader undoes it. Llama 3's rope
scaling is stored as the per-frequency divisors llama.cpp applies (`rope_freqs`), read back into its parameters.
"""
import math

import gguf
import numpy as np
import torch

from runtime.config_schema import rope_type
from runtime.convert.gguf_vocab import pre_tokenizer_name
from runtime.errors import K2Error
from runtime.layers import rope_frequencies

Keys = gguf.Keys
T = gguf.MODEL_TENSOR
ARCH_NAMES = {"llama": gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]}
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM"}
EXPERT_KINDS = frozenset({T.FFN_GATE_EXP, T.FFN_UP_EXP, T.FFN_DOWN_EXP})
F32_KINDS = frozenset({T.FFN_GATE_INP})
ROPE_FREQS = gguf.TENSOR_NAMES[T.ROPE_FREQS] + ".weight"
CONFIG_TENSORS = (ROPE_FREQS,)


def arch(args) -> gguf.MODEL_ARCH:
    return gguf.MODEL_ARCH.LLAMA


def tensor_name_map(args) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(arch(args), args.num_hidden_layers)


def gguf_tensor(name_map: gguf.TensorNameMap, hf_name: str) -> tuple[gguf.MODEL_TENSOR, str]:
    """Checkpoint name (stacked experts as `experts.{proj}.weight`) -> (kind, GGUF name)."""
    found = name_map.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
    if found is None:
        raise K2Error(f"tensor {hf_name} has no place in llama.cpp's architecture")
    return found


def check_supported(config: dict, args):
    """Nothing to refuse: what the Llama args can express (whole-head rope, default / linear / yarn / llama3 scaling,
    attention biases, a tied head), llama.cpp's llama runs."""


def pre_tokenizer(config: dict, folder) -> str:
    return pre_tokenizer_name(folder)


def add_hparams(writer: gguf.GGUFWriter, args):
    """The `{arch}.*` keys llama.cpp's converter writes for a Llama-style config; `read_config` is the way back."""
    w = writer
    w.add_block_count(args.num_hidden_layers)
    w.add_context_length(args.max_position_embeddings)
    w.add_embedding_length(args.hidden_size)
    w.add_feed_forward_length(args.intermediate_size)
    w.add_head_count(args.num_attention_heads)
    w.add_head_count_kv(args.num_key_value_heads)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.rms_norm_eps)
    w.add_vocab_size(args.vocab_size)
    w.add_rope_dimension_count(args.head_dim)
    w.add_key_length(args.head_dim)
    w.add_value_length(args.head_dim)
    scaling = args.rope_scaling or {}
    kind = rope_type(scaling)
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(scaling["factor"])
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(scaling["factor"])
        w.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
        if scaling.get("beta_fast") is not None:
            w.add_rope_scaling_yarn_beta_fast(scaling["beta_fast"])
        if scaling.get("beta_slow") is not None:
            w.add_rope_scaling_yarn_beta_slow(scaling["beta_slow"])


def extra_tensors(args) -> dict[str, np.ndarray]:
    """Llama 3's rope scaling, as llama.cpp takes it: each frequency's divisor in `rope_freqs`."""
    if rope_type(args.rope_scaling) != "llama3":
        return {}
    plain, _ = rope_frequencies(args.head_dim, args.rope_theta, None)
    scaled, _ = rope_frequencies(args.head_dim, args.rope_theta, args.rope_scaling)
    return {ROPE_FREQS: (plain / scaled).numpy().astype(np.float32)}


def read_config(meta) -> dict:
    """config.json from a `llama` file's keys (`meta`: runtime/gguf_checkpoint.Metadata)."""
    return read_config_as(meta, "llama", HF_ARCHITECTURES["llama"])


def read_config_as(meta, model_type: str, architecture: str) -> dict:
    """`add_hparams` reversed, into the config.json of `model_type`."""
    n = meta.number
    heads, hidden = n(Keys.Attention.HEAD_COUNT), n(Keys.LLM.EMBEDDING_LENGTH)
    head_dim = n(Keys.Attention.KEY_LENGTH, None) or n(Keys.Rope.DIMENSION_COUNT, None) or hidden // heads
    if n(Keys.Rope.DIMENSION_COUNT, head_dim) != head_dim:
        raise K2Error(f"{meta.path}: rope over {n(Keys.Rope.DIMENSION_COUNT)} of a head's {head_dim} dims is not "
                      "supported (k2 rotates whole heads)")
    theta = float(n(Keys.Rope.FREQ_BASE, 10000.0))
    return {
        "model_type": model_type,
        "architectures": [architecture],
        "vocab_size": n(Keys.LLM.VOCAB_SIZE, None) or meta.tensors["token_embd.weight"].shape[0],
        "hidden_size": hidden,
        "intermediate_size": n(Keys.LLM.FEED_FORWARD_LENGTH),
        "num_hidden_layers": n(Keys.LLM.BLOCK_COUNT),
        "num_attention_heads": heads,
        "num_key_value_heads": n(Keys.Attention.HEAD_COUNT_KV, heads),
        "head_dim": head_dim,
        "rms_norm_eps": n(Keys.Attention.LAYERNORM_RMS_EPS),
        "rope_theta": theta,
        "max_position_embeddings": n(Keys.LLM.CONTEXT_LENGTH),
        "tie_word_embeddings": "output.weight" not in meta.tensors,
        "attention_bias": "blk.0.attn_q.bias" in meta.tensors,
        "rope_scaling": _rope_scaling(meta, head_dim, theta),
    }


def _rope_scaling(meta, head_dim: int, theta: float) -> dict | None:
    n = meta.number
    kind = meta.arch_value(Keys.Rope.SCALING_TYPE, "none")
    if ROPE_FREQS in meta.tensors:
        return _llama3_scaling(meta, meta.tensor(ROPE_FREQS), head_dim, theta)
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(n(Keys.Rope.SCALING_FACTOR))}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": float(n(Keys.Rope.SCALING_FACTOR)),
                   "original_max_position_embeddings": n(Keys.Rope.SCALING_ORIG_CTX_LEN)}
        for key, hf_key in ((Keys.Rope.SCALING_YARN_BETA_FAST, "beta_fast"),
                            (Keys.Rope.SCALING_YARN_BETA_SLOW, "beta_slow")):
            if (value := n(key, None)) is not None:
                scaling[hf_key] = float(value)
        return scaling
    raise K2Error(f"{meta.path}: rope scaling {kind!r} is not supported (none, linear, yarn, or llama3's rope_freqs)")


def _llama3_scaling(meta, divisors: np.ndarray, head_dim: int, theta: float) -> dict:
    """Llama 3's rope scaling parameters from the divisors llama.cpp stores per frequency.

    Frequencies whose wavelength w is under original_len / high_freq_factor keep divisor 1, those over original_len /
    low_freq_factor take `factor`, and between them 1 / divisor = (1 - s) / factor + s with s = (original_len / w -
    low) / (high - low). Scaling original_len, low and high together changes no frequency, so low is solved as 1,
    then all three rescaled to make original_len a whole number. With two or more frequencies in the band, s gives
    original_len and high; with fewer, the band's edges are placed in the gaps between the wavelengths. The result
    is checked by recomputing the divisors with the model's own rope code.
    """
    plain, _ = rope_frequencies(head_dim, theta, None)
    wavelen = (2 * math.pi / plain).double().numpy()
    divisors = divisors.astype(np.float64)
    factor = float(divisors.max())
    kept, scaled = divisors <= 1 + 1e-6, divisors >= factor * (1 - 1e-6)
    band = ~kept & ~scaled
    smooth = (1 / divisors[band] - 1 / factor) / (1 - 1 / factor)
    # the longest wavelength kept, the longest not scaled, the shortest scaled (past the ends when there is none)
    kept_edge = wavelen[kept].max() if kept.any() else wavelen.min() / 2
    band_edge = wavelen[~scaled].max() if (~scaled).any() else wavelen.min() / 2
    scaled_edge = wavelen[scaled].min() if scaled.any() else wavelen.max() * 2
    if band.sum() >= 2:  # original_len / w - s * high = 1 - s over the band, by least squares
        (original_len, high), *_ = np.linalg.lstsq(np.stack([1 / wavelen[band], -smooth], axis=1), 1 - smooth,
                                                   rcond=None)
    elif band.any():
        original_len = math.sqrt(band_edge * scaled_edge)
        high = 1 + (original_len / wavelen[band][0] - 1) / smooth[0]
    else:  # original_len / high and original_len both between the longest kept and the shortest scaled wavelength
        original_len = kept_edge ** (1 / 3) * scaled_edge ** (2 / 3)
        high = original_len / (kept_edge ** (2 / 3) * scaled_edge ** (1 / 3))
    whole = max(1, round(original_len))
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": whole / original_len,
               "high_freq_factor": float(high) * whole / original_len, "original_max_position_embeddings": whole}
    recomputed, _ = rope_frequencies(head_dim, theta, scaling)
    if not np.allclose((plain / recomputed).double().numpy(), divisors, rtol=1e-4):
        raise K2Error(f"{meta.path}: {ROPE_FREQS} is not a Llama 3 rope scaling k2 can run")
    return scaling


def split_tensor(name: str, args) -> list[tuple[str, tuple[int, ...] | None, str]] | None:
    """q_proj and k_proj (weights and biases) are stored with each head's rows reordered for paired rope: one part,
    of the tensor's own shape (None)."""
    if not name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
        return None
    return [(name, None, "rope_pairs")]


def encode_part(part: str, weight: torch.Tensor, shape: tuple[int, ...], args) -> torch.Tensor:
    """Each head's rows [first half | second half] -> interleaved, row i of each half side by side (llama.cpp's
    converter `permute`)."""
    heads = weight.shape[0] // args.head_dim
    return weight.reshape(heads, 2, args.head_dim // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def join_parts(parts: dict[str, torch.Tensor], shape: tuple[int, ...], args) -> torch.Tensor:
    """`encode_part` undone."""
    weight = parts["rope_pairs"].reshape(shape)
    heads = weight.shape[0] // args.head_dim
    return weight.reshape(heads, args.head_dim // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)
