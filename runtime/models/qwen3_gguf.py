"""Qwen3 and Qwen3-MoE in llama.cpp's `qwen3` and `qwen3moe` architectures, both ways: the Llama mapping
(llama_gguf.py, which says what each name here does) with Qwen3's switches. Qwen3 rotates halves of each head (NEOX
rope), as llama.cpp's qwen3 does, so q_proj and k_proj are stored as they are; llama.cpp's qwen3moe routes every
layer through its experts and always renormalizes the top-k routing weights.
"""
import gguf

from runtime.config_schema import rope_type
from runtime.errors import K2Error
from runtime.models import llama_gguf

Keys = gguf.Keys
ARCH_NAMES = {"qwen3": gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN3],
              "qwen3_moe": gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN3MOE]}
HF_ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
EXPERT_KINDS, F32_KINDS = llama_gguf.EXPERT_KINDS, llama_gguf.F32_KINDS
CONFIG_TENSORS = ()
gguf_tensor = llama_gguf.gguf_tensor


def arch(args) -> gguf.MODEL_ARCH:
    return gguf.MODEL_ARCH.QWEN3MOE if args.routed_experts else gguf.MODEL_ARCH.QWEN3


def tensor_name_map(args) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(arch(args), args.num_hidden_layers)


def check_supported(config: dict, args):
    """One clear error for what llama.cpp's qwen3 / qwen3moe cannot run, before any work."""
    name = gguf.MODEL_ARCH_NAMES[arch(args)]
    if rope_type(args.rope_scaling) not in ("default", "linear", "yarn"):
        raise K2Error(f"rope scaling {rope_type(args.rope_scaling)!r}: llama.cpp's {name} takes linear or yarn")
    if not args.routed_experts:
        return
    if not args.norm_topk_prob:
        raise K2Error(f"norm_topk_prob false: llama.cpp's {name} always renormalizes the top-k routing weights")
    dense = [i for i in range(args.num_hidden_layers) if not args.is_moe_layer(i)]
    if dense:
        raise K2Error(f"layer {dense[0]} has a dense MLP (mlp_only_layers / decoder_sparse_step): llama.cpp's {name} "
                      "routes every layer through its experts")


def pre_tokenizer(config: dict, folder) -> str:
    return "qwen2"  # every Qwen3 tokenizer is Qwen2's, as llama.cpp's converter names it


def add_hparams(writer: gguf.GGUFWriter, args):
    llama_gguf.add_hparams(writer, args)
    if args.routed_experts:
        writer.add_expert_count(args.num_experts)
        writer.add_expert_used_count(args.num_experts_per_tok)
        writer.add_expert_feed_forward_length(args.moe_intermediate_size)


def extra_tensors(args) -> dict:
    return {}


def read_config(meta) -> dict:
    """config.json from a `qwen3` / `qwen3moe` file's keys (`meta`: runtime/gguf_checkpoint.Metadata)."""
    model_type = next(t for t, name in ARCH_NAMES.items() if name == meta.arch)
    config = llama_gguf.read_config_as(meta, model_type, HF_ARCHITECTURES[model_type])
    if model_type == "qwen3_moe":
        n = meta.number
        config |= {"num_experts": n(Keys.LLM.EXPERT_COUNT), "num_experts_per_tok": n(Keys.LLM.EXPERT_USED_COUNT),
                   "moe_intermediate_size": n(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH), "norm_topk_prob": True,
                   "decoder_sparse_step": 1, "mlp_only_layers": []}
    return config


def split_tensor(name: str, args) -> None:
    """Nothing is stored transformed."""
    return None
