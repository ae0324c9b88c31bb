"""Checkpoint conversions: `k2 quantize --int4` (quantize.py) and `k2 convert --to gguf` (gguf.py).

sources.py: a checkpoint's logical tensors, read row block by row block, shared by both. gguf_names.py: llama.cpp's
`deepseek2` tensor names and metadata keys, taken from gguf-py's tables; gguf_vocab.py: the tokenizer as GGUF
vocabulary. The number formats themselves are quant/'s: INT4 packing, FP8 blocks, GGML blocks (quant/gguf/blocks.py).
The GGUF file format is written by gguf-py's GGUFWriter, llama.cpp's own writer.
"""
