"""`k2 convert --to gguf`: DeepSeek-V3-architecture checkpoints (Kimi K2, DeepSeek-V3) as llama.cpp's `deepseek2`.

names.py: tensor names and metadata keys, taken from gguf-py's tables. vocab.py: the tokenizer as GGUF vocabulary.
blocks.py: GGML block encodings (gguf-py's quantizers; INT4 copied into Q4_0). export.py: the streaming writer.
The file format itself is written by gguf-py's GGUFWriter, llama.cpp's own writer.
"""
