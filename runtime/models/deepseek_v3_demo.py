"""The demo checkpoints: a tiny Kimi K2 in exactly the real on-disk layout, trained or random.

The trained demo is what every command runs on when no model is named: scripts/train_demo.py trained it, and its
weights, tokenizer and config ship in deepseek_v3_demo_trained/ beside this file, so writing it needs no training and
no network. The random one (a fixed seed) is the test suite's fixture, where only the structure matters.
"""
import json
import os
import re
import shutil
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import torch

from quant.fp8 import quantize_fp8_block
from runtime import models
from runtime.tokenizer import NUM_RESERVED_SPECIAL, read_ranks, write_ranks

# K2's named special tokens, as offsets from the first id after the BPE ranks (163584 in the real model).
K2_SPECIAL_OFFSETS = {
    0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>", 6: "<|start_header_id|>",
    7: "<|end_header_id|>", 9: "[EOT]", 10: "<|im_system|>", 11: "<|tool_calls_section_begin|>",
    12: "<|tool_calls_section_end|>", 13: "<|tool_call_begin|>", 14: "<|tool_call_argument_begin|>",
    15: "<|tool_call_end|>", 17: "<|im_middle|>", 22: "<think>", 23: "</think>", 254: "[UNK]", 255: "[PAD]",
}

DEMO_BPE_RANKS = 1024
CHAT_TEMPLATE = Path(__file__).with_name("deepseek_v3_demo_chat_template.jinja")  # Kimi K2-Thinking's own
TRAINED = Path(__file__).with_name("deepseek_v3_demo_trained")  # config.json, model.safetensors, tiktoken.model
DEMO_SHARDS = 3
DEMO_SEED = 0

# Text the demo's byte-level BPE is trained on: enough English, code and Chinese for plausible merges.
_BPE_CORPUS = """\
Kimi K2 is a mixture-of-experts language model with one trillion parameters, of which about thirty-two billion
are active for each token. Every token is routed to eight of three hundred and eighty-four experts, plus one shared
expert that sees every token. Attention uses multi-head latent attention: the keys and values of all heads are
compressed into one latent vector per token, so the cache that grows with the conversation stays small.
The model was trained to think before it answers. It writes its reasoning between think tags, then the answer.
When it needs a tool, it writes a tool call with the function name and its arguments as JSON, and waits for the
result before it goes on. A person who owns one graphics card and a lot of memory can run the whole model at home:
the attention and the shared expert stay on the card, the routed experts live in memory and are computed by the
processor. The weights are stored in four bits, in groups of thirty-two values that share one scale.
def forward(self, tokens, cache=None):
    hidden = self.embed_tokens(tokens)
    for layer in self.layers:
        hidden = layer(hidden, cache)
    return self.lm_head(self.norm(hidden))
Hello, how are you today? I am fine, thank you. What would you like to talk about? Tell me a story about the sea.
The quick brown fox jumps over the lazy dog. 1234567890 + 42 = 1234567932. It's, they're, we've, I'm, you'll, he'd.
你好，世界。今天天气很好。我们一起学习语言模型。月之暗面发布了新的模型。
"""
_BPE_SPLIT = r" ?[^\W\d_]+| ?\d{1,3}| ?[^\w\s]+|\s+"


def train_bpe(words: Counter, n_ranks: int) -> dict[bytes, int]:
    """Byte-level BPE of pre-split `words` (word -> count): the 256 bytes, then the most frequent adjacent pair (ties:
    the greater pair) merged until `n_ranks` or no pair is left. Deterministic. A merge recounts only the words that
    hold its pair, so a corpus of megabytes trains in seconds."""
    ranks = {bytes([b]): b for b in range(256)}
    pieces = {word: [bytes([b]) for b in word.encode()] for word in words}
    pairs, holders = Counter(), defaultdict(set)  # pair -> count; pair -> the words that held it when counted
    for word, seq in pieces.items():
        for pair in zip(seq, seq[1:]):
            pairs[pair] += words[word]
            holders[pair].add(word)
    while len(ranks) < n_ranks and pairs:
        left, right = best = max(pairs, key=lambda p: (pairs[p], p))
        ranks.setdefault(left + right, len(ranks))
        for word in holders.pop(best):
            seq, count = pieces[word], words[word]
            for pair in zip(seq, seq[1:]):
                pairs[pair] -= count
            merged, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == left and seq[i + 1] == right:
                    merged.append(left + right)
                    i += 2
                else:
                    merged.append(seq[i])
                    i += 1
            for pair in zip(merged, merged[1:]):
                pairs[pair] += count
                holders[pair].add(word)
            pieces[word] = merged
        for pair in [p for p, n in pairs.items() if n <= 0]:
            del pairs[pair]
    return ranks


def demo_config(n_ranks: int) -> dict:
    """A small config with every feature of Kimi K2's: YaRN, a dense first layer, top-k > 1 of many experts, a shared expert."""
    vocab = n_ranks + NUM_RESERVED_SPECIAL
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "kimi_k2",
        "vocab_size": vocab,
        "hidden_size": 128,
        "intermediate_size": 384,
        "moe_intermediate_size": 96,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "q_lora_rank": 96,
        "kv_lora_rank": 64,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
        "n_routed_experts": 16,
        "num_experts_per_tok": 4,
        "n_shared_experts": 1,
        "n_group": 1,
        "topk_group": 1,
        "routed_scaling_factor": 2.827,
        "norm_topk_prob": True,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 50000.0,
        "rope_scaling": {"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096, "beta_fast": 1.0,
                         "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
        "num_nextn_predict_layers": 0,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": n_ranks,
        "eos_token_id": n_ranks + 2,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "bfloat16",
    }


def is_fp8_target(name: str) -> bool:
    """Which linears K2-Instruct stores in FP8: attention, dense MLP, experts; not the router, embeddings or lm_head."""
    return name.endswith("proj.weight") or name.endswith("proj_with_mqa.weight")


def random_weights(config: dict, seed: int = DEMO_SEED) -> dict[str, torch.Tensor]:
    """Checkpoint tensors for `config`, named and shaped by the model itself, in the real checkpoint dtypes."""
    shapes = models.build_on_meta(config).checkpoint_shapes()
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
            t = 1 + 0.1 * torch.randn(shape, generator=generator)
        elif name.endswith("e_score_correction_bias"):
            tensors[name] = 0.05 * torch.randn(shape, generator=generator)  # stays fp32, as in the real checkpoints
            continue
        elif name.endswith("mlp.gate.weight"):
            t = 0.2 * torch.randn(shape, generator=generator)  # spread router scores so routing is decisive
        else:
            t = config["initializer_range"] * torch.randn(shape, generator=generator)
        tensors[name] = t.to(torch.bfloat16)
    return tensors


def to_fp8(tensors: dict[str, torch.Tensor], block=(128, 128)) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in tensors.items():
        if is_fp8_target(name):
            out[name], out[name + "_scale_inv"] = quantize_fp8_block(t.float(), block)
        else:
            out[name] = t
    return out


def write_sharded(folder: Path, tensors: dict[str, torch.Tensor], n_shards: int):
    """`model-0000i-of-0000n.safetensors` shards of about equal size, plus the index, in the real layout."""
    from safetensors.torch import save_file

    names = list(tensors)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    shards, current, size = [], [], 0
    for name in names:
        current.append(name)
        size += tensors[name].numel() * tensors[name].element_size()
        if size >= total * (len(shards) + 1) / n_shards and len(shards) < n_shards - 1:
            shards.append(current)
            current = []
    shards.append(current)
    weight_map = {}
    for i, shard_names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in shard_names}, folder / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in shard_names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_tokenizer(folder: Path, ranks: dict[bytes, int]):
    n_ranks = len(ranks)
    write_ranks(folder / "tiktoken.model", ranks)
    added = {}
    for offset in range(NUM_RESERVED_SPECIAL):
        token_id = n_ranks + offset
        content = K2_SPECIAL_OFFSETS.get(offset, f"<|reserved_token_{token_id}|>")
        added[str(token_id)] = {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                                "single_word": False, "special": True}
    tokenizer_config = {
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>"],
        "bos_token": "[BOS]", "eos_token": "<|im_end|>", "pad_token": "[PAD]", "unk_token": "[UNK]",
        "model_max_length": 131072,
        "tokenizer_class": "TikTokenTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
    shutil.copyfile(CHAT_TEMPLATE, folder / "chat_template.jinja")
    generation = {"bos_token_id": n_ranks, "eos_token_id": n_ranks + 2, "do_sample": True, "temperature": 1.0}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))


def write_demo(folder: str | Path, fp8: bool = False, config_overrides: dict | None = None, seed: int = DEMO_SEED,
               n_shards: int = DEMO_SHARDS) -> Path:
    """Write the random demo checkpoint into `folder` (created; must not exist), atomically."""
    ranks = train_bpe(Counter(re.findall(_BPE_SPLIT, _BPE_CORPUS)), DEMO_BPE_RANKS)
    config = demo_config(len(ranks)) | (config_overrides or {})
    return write_checkpoint(Path(folder), config, random_weights(config, seed), ranks, fp8, n_shards)


def write_trained_demo(folder: str | Path, fp8: bool = False) -> Path:
    """Write the trained demo checkpoint into `folder` (created; must not exist), atomically."""
    from safetensors.torch import load_file

    config = json.loads((TRAINED / "config.json").read_text())
    stored = load_file(TRAINED / "model.safetensors")
    # In the model's own order, as the random demo's: that order decides which shard holds which tensor.
    tensors = {name: stored[name] for name in models.build_on_meta(config).checkpoint_shapes()}
    return write_checkpoint(Path(folder), config, tensors, read_ranks(TRAINED / "tiktoken.model"), fp8, DEMO_SHARDS)


def write_checkpoint(folder: Path, config: dict, tensors: dict[str, torch.Tensor], ranks: dict[bytes, int], fp8: bool,
                     n_shards: int) -> Path:
    """config.json, the shards and their index, the tokenizer files and the chat template, in a temporary folder
    renamed to `folder` once complete. With `fp8` the linears are stored as K2-Instruct's FP8 blocks."""
    if fp8:
        block = [128, 128]
        tensors = to_fp8(tensors, tuple(block))
        config = config | {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                                   "weight_block_size": block}}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        write_sharded(tmp, tensors, n_shards)
        write_tokenizer(tmp, ranks)
        tmp.chmod(0o755)
        for file in tmp.iterdir():
            file.chmod(0o644)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
