"""What a checkpoint holds, from config.json and safetensors headers alone (works before the weights are downloaded)."""
import re
from collections import defaultdict

from runtime.checkpoint import Checkpoint
from runtime.models.family import COMPONENTS
from runtime.safetensors_io import DTYPE_BYTES

TORCH_TO_SAFETENSORS = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def is_linear_weight(name: str) -> bool:
    """The weights of linear layers: what FP8 and INT4 checkpoints quantize (`targets: ["Linear"]`)."""
    return name.endswith(("_proj.weight", "_proj_with_mqa.weight")) or name == "lm_head.weight"


def _ignored(module: str, ignore: list[str]) -> bool:
    """compressed-tensors' ignore list: exact module names, or `re:` patterns matched against the whole name."""
    return any(re.fullmatch(p[3:], module) if p.startswith("re:") else p == module for p in ignore)


def estimated_storage(name: str, shape: tuple[int, ...], config: dict, fp32_tensors: tuple[str, ...]) -> dict[str, int]:
    """Bytes by safetensors dtype that the config's format would use to store one weight; `fp32_tensors` are the
    model's tensors kept in fp32 whatever its dtype (its `fp32_tensors`)."""
    numel = 1
    for d in shape:
        numel *= d
    base = TORCH_TO_SAFETENSORS.get(config.get("torch_dtype") or config.get("dtype") or "bfloat16", "BF16")
    if name.endswith(fp32_tensors):
        return {"F32": numel * 4}
    quant = config.get("quantization_config") or {}
    method = quant.get("quant_method")
    if method == "fp8" and is_linear_weight(name) and name != "lm_head.weight":
        b0, b1 = quant.get("weight_block_size", (128, 128))
        return {"F8_E4M3": numel, "F32": 4 * -(-shape[0] // b0) * -(-shape[1] // b1)}
    if method == "compressed-tensors" and is_linear_weight(name) and not _ignored(name[:-len(".weight")], quant.get("ignore", [])):
        weights = next(iter(quant.get("config_groups", {}).values()), {}).get("weights", {})
        bits, group = weights.get("num_bits", 4), weights.get("group_size") or shape[-1]
        per_word = 32 // bits
        return {"I32": 4 * shape[0] * -(-shape[1] // per_word), "BF16": 2 * shape[0] * -(-shape[1] // group), "I64": 16}
    return {base: numel * DTYPE_BYTES[base]}


_COMPANION = re.compile(r"\.weight(_packed|_scale|_shape|_scale_inv)$")


def weight_bytes(ckpt: Checkpoint, model) -> tuple[dict[str, int], bool]:
    """(bytes on disk of every model weight by checkpoint name, scales and packing included; from headers?).

    From the safetensors headers when the folder has weights, else estimated from config.json's format.
    """
    stored = {n: t for n, t in ckpt.tensors.items() if not model.skip_tensor(n)}
    if not stored or ckpt.missing_shards:  # partial folders (one pipeline stage's shards) are costed from the config
        return {n: sum(estimated_storage(n, s, ckpt.config, model.fp32_tensors).values())
                for n, s in model.stored_shapes().items()}, False
    sizes = defaultdict(int)
    for name, tensor in stored.items():
        sizes[_COMPANION.sub(".weight", name)] += tensor.nbytes
    return dict(sizes), True


def describe_quantization(config: dict) -> str:
    quant = config.get("quantization_config")
    if not quant:
        return "none"
    method = quant.get("quant_method")
    if method == "fp8":
        return f"fp8 {quant.get('fmt', 'e4m3')}, blocks {quant.get('weight_block_size')}"
    if method == "compressed-tensors":
        weights = next(iter(quant.get("config_groups", {}).values()), {}).get("weights", {})
        return (f"compressed-tensors {quant.get('format')}: int{weights.get('num_bits')} "
                f"{'symmetric' if weights.get('symmetric') else 'asymmetric'}, group {weights.get('group_size')}")
    return str(method)


def model_info(loaded) -> dict:
    """What `k2 info` prints, for a model opened without weights (runtime.loader.load(..., weights=False))."""
    import torch

    ckpt, model, component_of = loaded.checkpoint, loaded.model, loaded.family.component_of
    config = ckpt.config
    args = model.args
    shapes = model.stored_shapes()  # a tied head counted once, as transformers counts parameters

    params = defaultdict(int)
    for name, shape in shapes.items():
        params[component_of(name)] += torch.Size(shape).numel()
    storage = defaultdict(lambda: defaultdict(int))  # component -> dtype -> bytes
    stored = {n: t for n, t in ckpt.tensors.items() if not model.skip_tensor(n)}
    if stored and not ckpt.missing_shards:
        for name, tensor in stored.items():
            storage[component_of(name)][tensor.dtype] += tensor.nbytes
    else:
        for name, shape in shapes.items():
            for dtype, nbytes in estimated_storage(name, shape, config, model.fp32_tensors).items():
                storage[component_of(name)][dtype] += nbytes

    total = sum(params.values())
    active = total - params["routed_experts"] + params["routed_experts"] * args.experts_per_token // args.routed_experts \
        if args.routed_experts else total
    cache_dtype = TORCH_TO_SAFETENSORS.get(config.get("torch_dtype") or config.get("dtype") or "bfloat16", "BF16")
    kv_per_token = args.num_hidden_layers * args.cache_width * DTYPE_BYTES[cache_dtype]
    moe_layers = sum(args.is_moe_layer(i) for i in range(args.num_hidden_layers))
    return {
        "model": str(ckpt.folder),
        "architecture": (config.get("architectures") or ["?"])[0],
        "model_type": config.get("model_type"),
        "layers": args.num_hidden_layers,
        "dense_layers": args.num_hidden_layers - moe_layers,
        "moe_layers": moe_layers,
        "hidden_size": args.hidden_size,
        "attention_heads": args.num_attention_heads,
        "routed_experts": args.routed_experts,
        "experts_per_token": args.experts_per_token,
        "shared_experts": args.shared_experts,
        "vocab_size": args.vocab_size,
        "max_context": args.max_position_embeddings,
        "parameters": {"total": total, "active_per_token": active},
        "components": {
            c: {"parameters": params[c], "bytes": sum(storage[c].values()), "bytes_by_dtype": dict(storage[c])}
            for c in COMPONENTS if params[c] or storage[c]
        },
        "total_bytes": sum(sum(d.values()) for d in storage.values()),
        "bytes_source": ("safetensors headers" if stored and not ckpt.missing_shards else
                         f"estimated from config.json ({len(ckpt.missing_shards)} shard(s) missing)" if stored else
                         "estimated from config.json (no weights in the folder)"),
        "quantization": describe_quantization(config),
        "kv_cache": {
            "dtype": cache_dtype,
            "kind": args.cache_kind,
            "bytes_per_token": kv_per_token,
            "bytes_at_max_context": kv_per_token * args.max_position_embeddings,
        },
    }
