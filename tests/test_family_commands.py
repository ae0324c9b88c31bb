"""Every command on Llama, Qwen3 (tied and untied head) and Qwen3-MoE (with a dense layer), checked against
transformers on checkpoints its save_pretrained wrote: info's counts against its parameters and DynamicCache, generate
and eval against its logits, plan's placements against the unplaced model, bench's bytes against the safetensors
headers. A tiny byte-level BPE trained here by the tokenizers library is each checkpoint's tokenizer.json.
"""
import codecs
import json
import math
import this

import pytest
import torch
import transformers
from safetensors import safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, DynamicCache

from tests.helpers import assert_one_line_error, run_k2_here
from tests.test_families import SMALL, write_random
from tests.test_pipeline import torchrun

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = codecs.decode(this.s, "rot13")  # the Zen of Python, as the standard library ships it
PROMPT, NEW_TOKENS = "Beautiful is better than ugly.", 8
MOE = dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=64, norm_topk_prob=True)
CONFIGS = {
    "qwen3": dict(model_type="qwen3", head_dim=16, tie_word_embeddings=False),
    "qwen3-tied": dict(model_type="qwen3", head_dim=16, tie_word_embeddings=True),
    "qwen3-moe": dict(model_type="qwen3_moe", **MOE, mlp_only_layers=[1]),  # layers 0 and 2 route, 1 is dense
    "llama": dict(model_type="llama"),
}


def k2_json(*args) -> dict:
    result = run_k2_here(*args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def tokenizer_json() -> str:
    """A byte-level BPE of the model's vocabulary size, trained on the text the tests score."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=SMALL["vocab_size"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([TEXT], trainer)
    assert tokenizer.get_vocab_size() <= SMALL["vocab_size"]
    return tokenizer.to_str()


@pytest.fixture(scope="module", params=list(CONFIGS))
def family(request, tmp_path_factory, tokenizer_json):
    """(checkpoint folder, transformers' model of it)."""
    folder = write_random(tmp_path_factory.mktemp(request.param) / request.param, CONFIGS[request.param],
                          seed=len(request.param))
    (folder / "tokenizer.json").write_text(tokenizer_json)
    return folder, AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def stored_bytes(folder) -> dict[str, int]:
    """Bytes of every stored tensor, read with the safetensors library."""
    sizes = {}
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, framework="pt") as f:
            sizes.update({n: f.get_tensor(n).nbytes for n in f.keys()})
    return sizes


def test_info_counts_what_transformers_holds(family):
    folder, ref = family
    info = k2_json("info", folder)
    total = sum(p.numel() for p in ref.parameters())  # a tied head is one parameter
    routed = sum(p.numel() for name, p in ref.named_parameters() if ".mlp.experts." in name)
    config = ref.config
    k, n_experts = getattr(config, "num_experts_per_tok", 0), getattr(config, "num_experts", 1)
    assert info["parameters"] == {"total": total, "active_per_token": total - routed + routed * k // n_experts}
    assert info["total_bytes"] == sum(stored_bytes(folder).values())
    moe_blocks = sum(type(m).__name__.endswith("SparseMoeBlock") for m in ref.modules())
    assert (info["moe_layers"], info["dense_layers"]) == (moe_blocks, config.num_hidden_layers - moe_blocks)

    cache, prompt_len = DynamicCache(config=config), 5
    with torch.no_grad():
        ref(torch.arange(prompt_len)[None], cache=cache, use_cache=True)
    cached = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert info["kv_cache"]["bytes_per_token"] == cached // prompt_len


def test_generate_is_transformers_greedy(family):
    folder, ref = family
    ours = k2_json("generate", folder, "--prompt", PROMPT, "-n", NEW_TOKENS)
    assert ours["prompt_ids"] == Tokenizer.from_file(str(folder / "tokenizer.json")).encode(PROMPT).ids
    prompt = torch.tensor([ours["prompt_ids"]])
    with torch.no_grad():
        theirs = ref.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)[0, prompt.shape[1]:]
    assert ours["new_ids"] == theirs.tolist()


def test_eval_perplexity_is_transformers(family, tmp_path):
    """llama.cpp's protocol (runtime/eval.py): whole windows, the second half of each scored."""
    folder, ref = family
    text, ctx = tmp_path / "zen.txt", 48
    text.write_text(TEXT)
    ours = k2_json("eval", folder, "--text", text, "--ctx", ctx)
    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(TEXT).ids
    windows = [ids[i:i + ctx] for i in range(0, len(ids) - ctx + 1, ctx)]
    nll = 0.0
    with torch.no_grad():
        for window in windows:
            log_p = ref(torch.tensor([window])).logits[0, ctx // 2:-1].log_softmax(-1)
            nll -= log_p.gather(1, torch.tensor(window[ctx // 2 + 1:])[:, None]).sum().item()
    n = len(windows) * (ctx - 1 - ctx // 2)
    assert (ours["tokens"], ours["windows"]) == (n, len(windows)) and len(windows) > 2
    assert ours["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)


@pytest.mark.parametrize("offload", ["cpu", "stream"])
def test_generate_with_a_plan_is_the_unplaced_model(family, tmp_path, offload):
    """Layers on a GPU (cuda:0, mapped to the CPU here), routed experts in CPU memory or streamed through a cache."""
    folder, ref = family
    plan = k2_json("plan", folder, "--gpu", "2G", "--cpu-mem", "8G", "--offload", offload)
    assert plan["model_bytes"] == sum(stored_bytes(folder).values())
    (stage,) = plan["stages"]
    assert stage["lm_head"] == "cuda:0"
    if ref.config.tie_word_embeddings:  # the lookup reads the head's matrix: one copy, on the head's device
        assert stage["embeddings"] == "cuda:0"
    for entry in stage["layers"]:
        block = ref.model.layers[entry["layer"]].mlp
        if not hasattr(block, "experts"):
            assert entry["experts"] == {} and set(entry["components"]) == {"attention", "dense_mlp", "norms"}
            continue
        assert set(entry["components"]) == {"attention", "router", "norms"}
        assert entry["experts"] == {"cpu": list(range(ref.config.num_experts))}
        assert (entry["expert_cache"] > 0) == (offload == "stream")
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan))
    plain = k2_json("generate", folder, "--prompt", PROMPT, "-n", NEW_TOKENS)
    placed = k2_json("generate", folder, "--prompt", PROMPT, "-n", NEW_TOKENS, "--plan", plan_file,
                     "--device-map", "cuda:0=cpu")
    assert placed["new_ids"] == plain["new_ids"]
    streamed = offload == "stream" and hasattr(ref.config, "num_experts")
    assert (placed["expert_cache_hit_rate"] is not None) == streamed


def test_bench_reads_what_the_headers_say(family):
    """Weight bytes a batch-1 decode step reads, recounted from the headers: every tensor but the embedding and the
    routed experts, one embedding row (a tied head: the whole matrix), k experts of each MoE layer."""
    folder, ref = family
    result = k2_json("bench", folder, "--reps", "1", "--warmup", "0", "--prompt-len", "8", "--gen", "4",
                     "--threads", "1")
    for key in ("prefill_tok_s", "decode_tok_s", "ttft_s"):
        assert result[key]["mean"] > 0 and result[key]["std"] == 0, key
    assert (result["reps"], result["batch"], result["dtype"]) == (1, 1, "float32")
    sizes = stored_bytes(folder)
    experts = {n: b for n, b in sizes.items() if ".mlp.experts." in n}
    embed = sizes["model.embed_tokens.weight"]
    config = ref.config
    moe_layers = len({n.split(".mlp.")[0] for n in experts})
    k = getattr(config, "num_experts_per_tok", 0)
    per_expert = sum(experts.values()) // (moe_layers * config.num_experts) if experts else 0
    embed_read = embed if config.tie_word_embeddings else embed // config.vocab_size
    assert result["experts_read_per_step"] == moe_layers * k
    assert result["weight_bytes_per_token"] == sum(sizes.values()) - sum(experts.values()) - embed + embed_read \
        + moe_layers * k * per_expert
    assert result["roofline_decode_tok_s"] == result["copy_bandwidth_bytes_s"] / result["weight_bytes_per_step"]


def test_two_pipeline_stages_follow_the_plan(family, tmp_path):
    """Two processes over gloo, each holding the layers its stage of the plan gives it (a tied head's last stage
    holds the embedding matrix too), produce the one-process tokens."""
    folder, _ = family
    plan = k2_json("plan", folder, "--cpu-mem", "8G", "--stages", "2")
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan))
    result = torchrun(2, "generate", folder, "--prompt", PROMPT, "-n", NEW_TOKENS, "--plan", plan_file, "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["new_ids"] == k2_json("generate", folder, "--prompt", PROMPT, "-n", NEW_TOKENS)["new_ids"]
    stages = plan["stages"]
    assert [r["layers"] for r in out["pipeline"]] == [[s["first_layer"], s["last_layer"]] for s in stages]
    planned = [sum(d["weights_bytes"] + d["experts_bytes"] for d in s["devices"]) for s in stages]
    assert [r["weight_bytes"] for r in out["pipeline"]] == planned


# Published config.json files (the fields k2 reads), and the parameter counts their model cards state.
QWEN3 = {"head_dim": 128, "hidden_act": "silu", "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "vocab_size": 151936,
         "max_position_embeddings": 40960, "torch_dtype": "bfloat16", "attention_bias": False, "eos_token_id": 151645}
QWEN3_MOE = QWEN3 | {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "num_experts": 128,
                     "num_experts_per_tok": 8, "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
                     "num_key_value_heads": 4, "tie_word_embeddings": False}
PUBLISHED = {  # (config, total, active per token, non-embedding: without the embedding and the head)
    "Qwen3-0.6B": (QWEN3 | {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 1024,
                            "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
                            "num_key_value_heads": 8, "tie_word_embeddings": True}, 0.6e9, 0.6e9, 0.44e9),
    "Qwen3-30B-A3B": (QWEN3_MOE | {"hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
                                   "num_hidden_layers": 48, "num_attention_heads": 32}, 30.5e9, 3.3e9, 29.9e9),
    "Qwen3-235B-A22B": (QWEN3_MOE | {"hidden_size": 4096, "intermediate_size": 12288, "moe_intermediate_size": 1536,
                                     "num_hidden_layers": 94, "num_attention_heads": 64}, 235e9, 22e9, 234e9),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_real_qwen3_counts_from_config_only(name, tmp_path):
    config, total, active, non_embedding = PUBLISHED[name]
    (tmp_path / "config.json").write_text(json.dumps(config))
    info = k2_json("info", tmp_path)
    components = {c: v["parameters"] for c, v in info["components"].items()}
    assert info["parameters"]["total"] == pytest.approx(total, rel=0.01)
    assert info["parameters"]["active_per_token"] == pytest.approx(active, rel=0.02)  # the cards round to 0.1 B
    assert info["parameters"]["total"] - components["embeddings"] - components.get("lm_head", 0) == \
        pytest.approx(non_embedding, rel=0.01)
    kv_heads, head_dim = config["num_key_value_heads"], config["head_dim"]
    assert info["kv_cache"]["bytes_per_token"] == config["num_hidden_layers"] * 2 * kv_heads * head_dim * 2


def test_real_qwen3_moe_on_one_consumer_gpu(tmp_path):
    """Qwen3-30B-A3B (57 GiB in BF16) on a 24 GiB card and 64 GiB of RAM: attention on the GPU, the experts split."""
    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED["Qwen3-30B-A3B"][0]))
    plan = k2_json("plan", tmp_path, "--gpu", "24GiB", "--cpu-mem", "64GiB")
    (stage,) = plan["stages"]
    for entry in stage["layers"]:
        assert entry["device"] == "cuda:0" and set(entry["experts"]) == {"cuda:0", "cpu"}
        assert sorted(e for ids in entry["experts"].values() for e in ids) == list(range(128))
    for device in stage["devices"]:
        used = sum(device[f"{k}_bytes"] for k in ("weights", "experts", "kv_cache", "expert_cache"))
        assert 0 < used <= device["budget_bytes"], device
    assert sum(d["weights_bytes"] + d["experts_bytes"] for d in stage["devices"]) == plan["model_bytes"]


def test_a_dense_model_that_does_not_fit_is_told_to_quantize_every_linear(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED["Qwen3-0.6B"][0]))
    assert_one_line_error(run_k2_here("plan", tmp_path, "--gpu", "1.5G"), "does not fit", "--scope all-linear")
