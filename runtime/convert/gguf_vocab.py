"""The tokenizer as llama.cpp reads it, both ways: a GPT-2-style byte-level BPE vocabulary (tokens, types, merges)
and the name of the pre-tokenizer that splits text before BPE (`tokenizer.ggml.pre`).

Writing: K2's `tiktoken.model` holds only ranks, so the merges are derived: replaying BPE on a token's bytes with the
merges ranked below it ends in exactly two parts for every token a merge creates, and that pair is the merge. Tokens
are written with GPT-2's byte-to-character table (llama.cpp's byte-level BPE reads them so); special tokens are
written as their text and typed as control tokens. A Hugging Face `tokenizer.json` is already in that form; its
pre-tokenizer is named by the llama.cpp one that splits a probe text the same way.

Reading: the vocabulary becomes a Hugging Face `tokenizers` BPE behind llama.cpp's regexes for the file's
pre-tokenizer name (src/llama-vocab.cpp), control tokens special, user-defined tokens added, a BOS prepended where
the file says llama.cpp adds one.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import gguf

from runtime.errors import K2Error
from runtime.files import read_json
from runtime.tokenizer import K2_SPLIT_PATTERN, read_ranks

TokenType = gguf.TokenType
Keys = gguf.Keys.Tokenizer
SPECIAL_ROLES = ("bos", "eos", "unk", "pad")
BYTE_TO_UNICODE = gguf.vocab.bytes_to_unicode()  # byte -> its GPT-2 stand-in character
UNICODE_TO_BYTE = {c: b for b, c in BYTE_TO_UNICODE.items()}


@dataclass(frozen=True)
class PreTokenizer:
    """How llama.cpp splits text before BPE for one `tokenizer.ggml.pre` name: its regexes in order (each splits the
    pieces the previous ones left, keeping what it does not match as pieces too), and whether a piece that is itself
    a token is taken whole instead of merged (Llama 3's `ignore_merges`)."""

    regexes: tuple[str, ...]
    ignore_merges: bool = False


_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_PUNCT_AND_SPACE = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# llama.cpp's regexes (src/llama-vocab.cpp, llm_tokenizer_bpe) for the names k2 reads and writes; the first of two
# names that split alike is the one a conversion writes.
PRE_TOKENIZERS = {
    "llama-bpe": PreTokenizer((_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}" + _PUNCT_AND_SPACE,),
                              ignore_merges=True),
    "qwen2": PreTokenizer((_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}" + _PUNCT_AND_SPACE,)),
    "smollm": PreTokenizer((r"\p{N}", _GPT2)),
    "gpt-2": PreTokenizer((_GPT2,)),
    "default": PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]")),
    "deepseek-v3": PreTokenizer((r"\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
                                 r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|"""
                                 r"[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|"
                                 r"\s*[\r\n]+|\s+(?!\S)|\s+")),
    "kimi-k2": PreTokenizer((K2_SPLIT_PATTERN,)),  # llama.cpp runs K2's pattern in its own code for this name
}
PRE_TOKENIZER_ALIASES = {"llama3": "llama-bpe", "llama-v3": "llama-bpe"}  # other names llama.cpp gives the same
# Text the known pre-tokenizers split differently: spaces and line breaks in runs, digit runs, contractions in both
# cases, punctuation runs, letters with marks, CJK and kana, emoji.
PROBE_TEXT = ("\n \n\n \t\t x  \r\n  y   \n    1 22 333 4444 55555 3.14 I've THEY'RE we'Ll 'd ... !!!??? (x)=[y]; "
              "naïve Ĳ café e\u0301 中文字符 ひらがな カタカナ 한국어 🚀😶\u200d🌫️ $$ ^^ ~~ <|> __init__\n\n\n")


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
    if (folder / "tokenizer.model").exists():
        raise K2Error(f"{folder / 'tokenizer.model'}: SentencePiece tokenizers are not converted; k2 writes byte-level "
                      "BPE vocabularies (tiktoken.model or tokenizer.json)")
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


# ---------------------------------------------------------------------------------------------------------------
# the pre-tokenizer's name, and the vocabulary back as a Hugging Face tokenizer


def _pre_tokenizer(spec: PreTokenizer):
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(regex), behavior="isolated") for regex in spec.regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def pre_tokenizer_name(folder: Path) -> str:
    """The llama.cpp pre-tokenizer the folder's tokenizer is: K2's tiktoken pattern, or the one that splits the probe
    text exactly as tokenizer.json's own pre-tokenizer does (and agrees on ignore_merges)."""
    if (folder / "tiktoken.model").exists():
        return "kimi-k2"
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    try:
        theirs = Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises a bare Exception for every parse error
        raise K2Error(f"{path} cannot be read: {e}") from None
    if theirs.pre_tokenizer is None:
        raise K2Error(f"{path} has no pre-tokenizer; llama.cpp's byte-level BPE needs one")
    pieces = [p for p, _ in theirs.pre_tokenizer.pre_tokenize_str(PROBE_TEXT)]
    ignore_merges = bool(getattr(theirs.model, "ignore_merges", False))
    for name, spec in PRE_TOKENIZERS.items():
        ours = [p for p, _ in _pre_tokenizer(spec).pre_tokenize_str(PROBE_TEXT)]
        if ours == pieces and spec.ignore_merges == ignore_merges:
            return name
    raise K2Error(f"{path}: its pre-tokenizer splits text as none of llama.cpp's that k2 knows "
                  f"({', '.join(PRE_TOKENIZERS)}) does")


def _merges_from_ranks(tokens: list[str], types: list[int]) -> list[tuple[str, str]]:
    """A vocabulary stored without merges (llama.cpp allows it for kimi-k2, whose ids are tiktoken ranks): each
    token's merge derived as the writer derives it from tiktoken.model."""
    ranks = {bytes(UNICODE_TO_BYTE[c] for c in t): i for i, t in enumerate(tokens) if types[i] == TokenType.NORMAL}
    merges = []
    for token in sorted(ranks, key=ranks.__getitem__):
        if len(token) > 1 and (pair := merge_of(ranks, token)):
            merges.append((token_text(pair[0]), token_text(pair[1])))
    return merges


def _spec(meta) -> tuple[str, PreTokenizer]:
    pre_name = meta.value(Keys.PRE, "default")
    spec = PRE_TOKENIZERS.get(PRE_TOKENIZER_ALIASES.get(pre_name, pre_name))
    if spec is None:
        raise K2Error(f"{meta.path}: pre-tokenizer {pre_name!r} is not supported (supported: "
                      f"{', '.join([*PRE_TOKENIZERS, *PRE_TOKENIZER_ALIASES])})")
    return pre_name, spec


def added_bos(meta) -> int | None:
    """The BOS id llama.cpp puts before a text of the file's vocabulary (add_bos_token; on by default for
    llama-bpe), or None."""
    bos = meta.value(Keys.BOS_ID, None)
    return bos if bos is not None and meta.value(Keys.ADD_BOS, _spec(meta)[1].ignore_merges) else None


def gguf_tokenizer(meta):
    """The file's vocabulary as a `tokenizers.Tokenizer` that tokenizes as llama.cpp does (`meta`: the file's
    metadata, runtime/gguf_checkpoint.py)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    source = meta.path
    kind = meta.value(Keys.MODEL)
    if kind != "gpt2":
        raise K2Error(f"{source}: tokenizer model {kind!r}: k2 reads byte-level BPE (gpt2) vocabularies only")
    pre_name, spec = _spec(meta)
    tokens = meta.value(Keys.LIST)
    types = meta.value(Keys.TOKEN_TYPE, [TokenType.NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise K2Error(f"{source}: {len(types)} token types for {len(tokens)} tokens")
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        repeated = next(t for i, t in enumerate(tokens) if vocab[t] != i)
        raise K2Error(f"{source}: token {repeated!r} appears twice in the vocabulary")
    stored = meta.value(Keys.MERGES, None)
    if stored is None and pre_name != "kimi-k2":
        raise K2Error(f"{source}: no tokenizer merges ({Keys.MERGES})")
    # llama.cpp splits a merge at its first space after the first character
    merges = _merges_from_ranks(tokens, types) if stored is None else \
        [(m[:m.find(" ", 1)], m[m.find(" ", 1) + 1:]) for m in stored if m.find(" ", 1) > 0]
    backend = Tokenizer(models.BPE(vocab, merges, ignore_merges=spec.ignore_merges))
    backend.pre_tokenizer = _pre_tokenizer(spec)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                for i, t in enumerate(types) if t == TokenType.CONTROL])
    backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                        for i, t in enumerate(types) if t == TokenType.USER_DEFINED])
    bos = added_bos(meta)
    if bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A {tokens[bos]} $B", special_tokens=[(tokens[bos], bos)])
    return backend
