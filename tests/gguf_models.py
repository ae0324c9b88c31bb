"""Small random checkpoints of each family for the GGUF tests, written by transformers' save_pretrained (as
tests/test_families.py `write_random` writes them), each with a tiny byte-level BPE tokenizer.json trained here by the
tokenizers library behind the pre-tokenizer its family's real tokenizers have: SmolLM's (digits one by one, then
GPT-2's split), Llama 3's and Qwen2's split regexes as their tokenizer.json files write them.
"""
import json
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM

from tests.test_families import SMALL

# As Meta-Llama-3's and Qwen2's tokenizer.json write them (llama.cpp spells the case-insensitive part another way).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
CORPUS = ["Hello, how are you today? They're fine, I'M SURE.", "def forward(self, x):\n    return x * 2 + 1234567",
          "The quick brown fox jumps over the lazy dog. 3.14159 and 2.71828", "你好，世界。今天天气很好。",
          "naïve café ÉCOLE 😀", "   indented\n\n\ttabs and  double  spaces", "x = [1, 2, 3]; y = {'a': 1}"]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Text a test tokenizes, in NFC (which llama.cpp does not normalize to): the corpus's scripts and more (emoji, runs of
# digits, spaces, line breaks, special and added tokens).
TEXTS = ["Hello, how are you today? They're fine, I'M SURE. We'VE 'll", "def f(x):\n\treturn 1234567  \n\n\n  x",
         "你好，世界。ひらがな 한국어", "naïve café ÉCOLE 😀🚀 <|im_end|> <think> [PAD5]", "   \n \t 3.14 1e-5 -7"]


def write_tokenizer(folder: Path, style: str, vocab_size: int = 360):
    """tokenizer.json (a `style` pre-tokenizer: smollm, llama-bpe or qwen2) and tokenizer_config.json with a ChatML
    template; `<think>` is a plain added token (as Qwen3's is)."""
    tokenizer = Tokenizer(models.BPE())
    if style == "smollm":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                           pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        split = pre_tokenizers.Split(Regex(QWEN2_SPLIT if style == "qwen2" else LLAMA3_SPLIT), behavior="isolated")
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if style == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS * 20, trainer)
    if style == "llama-bpe":
        tokenizer.model.ignore_merges = True
    tokenizer.add_tokens(["<think>"])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "chat_template": TEMPLATE, "add_bos_token": False}))


def write_model(folder: Path, overrides: dict, style: str, seed: int = 1, scale: float = 0.3) -> Path:
    """A random checkpoint of `overrides` (tests/test_families.py SMALL, vocabulary 400) with a `style` tokenizer:
    weights of standard deviation `scale`, norms around 1. At 0.3 logits differ widely between tokens, and a
    perturbation grows layer by layer; a smaller scale gives a model as calm as a trained one."""
    settings = SMALL | {"vocab_size": 400} | overrides
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (scale if "norm" not in name else 0.2) + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(folder)
    write_tokenizer(folder, style)
    return folder
