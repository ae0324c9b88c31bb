"""The tokenizer as llama.cpp reads it: a GPT-2-style byte-level BPE vocabulary (tokens, types, merges) in GGUF.

K2's `tiktoken.model` holds only ranks, so the merges are derived: replaying BPE on a token's bytes with the merges
ranked below it ends in exactly two parts for every token a merge creates, and that pair is the merge. Tokens are
written with GPT-2's byte-to-character table (llama.cpp's byte-level BPE reads them so); special tokens are written
as their text and typed as control tokens. A Hugging Face `tokenizer.json` is already in that form.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import gguf

from runtime.files import read_json
from runtime.errors import K2Error
from runtime.tokenizer import read_ranks

TokenType = gguf.TokenType
SPECIAL_ROLES = ("bos", "eos", "unk", "pad")
BYTE_TO_UNICODE = gguf.vocab.bytes_to_unicode()  # byte -> its GPT-2 stand-in character


def token_text(token: bytes) -> str:
    return "".join(BYTE_TO_UNICODE[b] for b in token)


def merge_of(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes] | None:
    """The pair whose merge creates `token`: BPE replayed on its bytes, lowest rank first, with the merges ranked below
    it. None when that does not end in two parts (a token no merge creates)."""
    rank = ranks[token]
    parts = [bytes([b]) for b in token]
    while True:
        best, best_rank = None, rank
        for i in range(len(parts) - 1):
            pair_rank = ranks.get(parts[i] + parts[i + 1])
            if pair_rank is not None and pair_rank < best_rank:
                best, best_rank = i, pair_rank
        if best is None:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return (parts[0], parts[1]) if len(parts) == 2 else None


@dataclass
class Vocab:
    tokens: list[str]  # by id, vocab_size of them
    types: list[int]  # gguf.TokenType by id
    merges: list[str]  # "left right" in merge order
    special_ids: dict[str, int]  # bos/eos/unk/pad ids named by tokenizer_config.json

    @classmethod
    def empty(cls, vocab_size: int) -> "Vocab":
        # ids no token uses still need a unique name: llama.cpp's converter writes [PAD{id}], typed unused.
        return cls([f"[PAD{i}]" for i in range(vocab_size)], [TokenType.UNUSED] * vocab_size, [], {})

    def put(self, token_id: int, text: str, token_type: int, source: str):
        if not 0 <= token_id < len(self.tokens):
            raise K2Error(f"{source}: token id {token_id} ({text!r}) is outside the model's vocab_size "
                          f"{len(self.tokens)}")
        self.tokens[token_id], self.types[token_id] = text, token_type


def _tokenizer_config(folder: Path) -> dict:
    path = folder / "tokenizer_config.json"
    return read_json(path) if path.exists() else {}


def _named_special_ids(config: dict, id_of: dict[str, int]) -> dict[str, int]:
    """bos/eos/unk/pad as tokenizer_config.json names them (a string or {"content": ...}), by id."""
    ids = {}
    for role in SPECIAL_ROLES:
        entry = config.get(f"{role}_token")
        content = entry.get("content") if isinstance(entry, dict) else entry
        if isinstance(content, str) and content in id_of:
            ids[role] = id_of[content]
    return ids


def tiktoken_vocab(folder: Path, vocab_size: int) -> Vocab:
    """K2's `tiktoken.model` ranks plus the special tokens of `tokenizer_config.json`'s `added_tokens_decoder`."""
    ranks = read_ranks(folder / "tiktoken.model")
    vocab = Vocab.empty(vocab_size)
    for token, rank in ranks.items():
        vocab.put(rank, token_text(token), TokenType.NORMAL, "tiktoken.model")
    config = _tokenizer_config(folder)
    id_of = {}
    for token_id, entry in config.get("added_tokens_decoder", {}).items():
        token_type = TokenType.CONTROL if entry.get("special", True) else TokenType.USER_DEFINED
        vocab.put(int(token_id), entry["content"], token_type, "tokenizer_config.json")
        id_of[entry["content"]] = int(token_id)
    for token in sorted(ranks, key=ranks.__getitem__):
        if len(token) > 1 and (pair := merge_of(ranks, token)):
            vocab.merges.append(f"{token_text(pair[0])} {token_text(pair[1])}")
    vocab.special_ids = _named_special_ids(config, id_of)
    return vocab


def hf_vocab(folder: Path, vocab_size: int) -> Vocab:
    """A byte-level BPE `tokenizer.json`: its vocab and added tokens as they are; merges as gguf-py reads them."""
    tokenizer = read_json(folder / "tokenizer.json")
    model = tokenizer.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(tokenizer.get("pre_tokenizer")):
        raise K2Error(f"{folder / 'tokenizer.json'}: only byte-level BPE tokenizers convert to llama.cpp's gpt2 "
                      f"vocabulary (this one is {model.get('type')!r})")
    vocab = Vocab.empty(vocab_size)
    for text, token_id in model.get("vocab", {}).items():
        vocab.put(token_id, text, TokenType.NORMAL, "tokenizer.json")
    for entry in tokenizer.get("added_tokens", []):
        vocab.put(entry["id"], entry["content"], TokenType.CONTROL if entry.get("special") else TokenType.USER_DEFINED,
                  "tokenizer.json")
    vocab.merges = gguf.SpecialVocab(folder, load_merges=True).merges
    return vocab


def read_vocab(folder: Path, vocab_size: int) -> Vocab:
    if (folder / "tiktoken.model").exists():
        return tiktoken_vocab(folder, vocab_size)
    if (folder / "tokenizer.json").exists():
        return hf_vocab(folder, vocab_size)
    raise K2Error(f"{folder} has no tokenizer (tiktoken.model or tokenizer.json); llama.cpp needs one in the GGUF")


def add_vocab(writer: gguf.GGUFWriter, folder: Path, vocab: Vocab, pre: str):
    """Tokenizer keys: the vocabulary, special token ids, add-bos/eos flags and the chat template."""
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    # gguf-py's reader of tokenizer_config.json, chat_template.jinja and config.json; names tokenizer_config.json
    # gives by text win over config.json's ids (gguf-py resolves text only through a tokenizer.json).
    special = gguf.SpecialVocab(folder, load_merges=False, n_vocab=len(vocab.tokens))
    special.special_token_ids.update(vocab.special_ids)
    special.add_to_gguf(writer, quiet=True)
