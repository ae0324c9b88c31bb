"""Checkpoint conversions: `k2 quantize --int4` (quantize.py) and `k2 convert --to gguf` (gguf.py).

sources.py: a checkpoint's logical tensors, read row block by row block, shared by both. gguf_vocab.py: the tokenizer
as GGUF vocabulary and back; each family's llama.cpp architecture (keys, tensor names, transforms) is its
runtime/models/*_gguf.py. The number formats themselves are quant/'s: INT4 packing, FP8 blocks, GGML blocks
(quant/gguf/blocks.py). The GGUF file format is written by gguf-py's GGUFWriter, llama.cpp's own writer.
"""
