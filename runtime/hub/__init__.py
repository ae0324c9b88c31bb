"""Model downloads from the Hugging Face hub (`k2 download`) through huggingface_hub's own client.

selection.py: which files (defaults, globs, a pipeline stage's shards); remote.py: the hub's listing, metadata and
bytes, errors as one line; store.py: the cache and --local-dir layouts; transfer.py: resumable, hashed, parallel
transfers; download.py: one run from listing to verified folder.
"""
