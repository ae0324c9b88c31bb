"""GGML block encodings (blocks.py), the numbers of a GGUF file; runtime/convert/gguf.py writes the files."""
