"""Tokenizers of the model folder: Kimi K2's tiktoken rank file, or a Hugging Face `tokenizer.json` (Qwen3,
DeepSeek-V3).

Both keep one rule: `encode(text)` is ordinary text, never a special id, even where the text spells a special token.
Only a chat template's own markers become special ids, through `encode_marked` (see runtime/chat_template.py).

The folder is untrusted input: a malformed `tiktoken.model`, `tokenizer.json` or `tokenizer_config.json` is a one-line
K2Error naming the file and the line or field, never an exception from inside a library.
"""
import base64
import codecs
import re
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, Field, ValidationError

from runtime.errors import K2Error

# K2's split pattern; `&&` is class intersection, which tiktoken's regex engine honours.
_LETTERS_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
_LETTERS_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
K2_SPLIT_PATTERN = "|".join([
    r"[\p{Han}]+",
    rf"[^\r\n\p{{L}}\p{{N}}]?{_LETTERS_UPPER}*{_LETTERS_LOWER}+{_CONTRACTIONS}",
    rf"[^\r\n\p{{L}}\p{{N}}]?{_LETTERS_UPPER}+{_LETTERS_LOWER}*{_CONTRACTIONS}",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])
NUM_RESERVED_SPECIAL = 256
# The most characters one encode call takes. A prompt that fits K2's context window (262,144 tokens) is a few million
# characters; the tokenizers library holds about 120 bytes per character while it encodes (1.2 GB here) and aborts
# the whole process, past any error handling, when an allocation fails on text of hundreds of MB.
MAX_TEXT_CHARS = 10_000_000

_PIECE_END = re.compile(r"\n(?=\S)")  # where encode_document may cut a long text

# A control token that came from user text is wrapped in these private-use characters before the template renders it
# (the convention of transformers' `sanitize_control_tokens`), so it can be told from the template's own markers.
MARK_START, MARK_END = "\U000f0000", "\U000f0001"


def read_ranks(path: Path) -> dict[bytes, int]:
    """`base64(token) rank` per line, as tiktoken's own loader reads it. The ranks must run 0..n-1 (K2's special ids
    follow them) and give every single byte a token (tiktoken's encoder aborts on a byte without one)."""
    ranks = {}
    for line_no, line in enumerate(path.read_bytes().splitlines(), 1):
        if line:
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:  # also binascii.Error: not base64
                raise K2Error(f"{path}:{line_no}: not a tiktoken rank line (base64 token, space, rank)") from None
    missing = next((b for b in range(256) if bytes([b]) not in ranks), None)
    if missing is not None:
        raise K2Error(f"{path}: no token for the byte 0x{missing:02x} (a tiktoken rank file ranks every byte)")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise K2Error(f"{path}: the ranks of its {len(ranks):,} tokens are not 0..{len(ranks) - 1}, each once")
    return ranks


def write_ranks(path: Path, ranks: dict[bytes, int]):
    path.write_text("".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks.items()))


class AddedToken(BaseModel):
    """A token as `tokenizer_config.json` writes it (transformers' AddedToken; k2 reads its text only)."""

    content: str


class NamedTemplate(BaseModel):
    name: str
    template: str


TokenId = Annotated[int, Field(ge=0, lt=2**32)]  # tiktoken and tokenizers hold ids as u32
Token = str | AddedToken | None  # a special token is written as its text or as an AddedToken


class TokenizerConfig(BaseModel):
    """The fields of `tokenizer_config.json` that k2 reads; the others are transformers' business and pass."""

    added_tokens_decoder: dict[TokenId, AddedToken] = {}
    chat_template: str | list[NamedTemplate] | None = None
    bos_token: Token = None
    eos_token: Token = None
    unk_token: Token = None
    pad_token: Token = None
    sep_token: Token = None
    cls_token: Token = None
    mask_token: Token = None
    add_bos_token: bool = False

    def special_tokens(self) -> dict[str, str]:
        """`bos_token`, `eos_token`, ... as strings: chat templates read them (DeepSeek-V3's starts with
        `{{ bos_token }}`)."""
        names = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
        tokens = {name: getattr(self, name) for name in names}
        return {name: token if isinstance(token, str) else token.content
                for name, token in tokens.items() if token is not None}


def read_tokenizer_config(folder: Path) -> TokenizerConfig:
    path = folder / "tokenizer_config.json"
    if not path.exists():
        return TokenizerConfig()
    try:
        return TokenizerConfig.model_validate_json(path.read_bytes())
    except ValidationError as e:
        problems = [_problem(error) for error in e.errors()]
        more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
        raise K2Error(f"{path}: {'; '.join(problems[:2])}{more}") from None


def _problem(error: dict) -> str:
    """One pydantic error as `where: what` (`added_tokens_decoder.163584: Input should be an object`)."""
    where = ".".join(map(str, error["loc"]))
    return f"{where}: {error['msg']}" if where else error["msg"]


def marked_pieces(text: str, control_tokens: set[str]) -> list[tuple[str, bool]]:
    """Split marked text into (piece, is_plain): a marked control token is plain text; the rest keeps its control
    tokens. A lone marker (a template's string method cut a pair apart) is dropped but still separates its sides."""
    pattern = "|".join(re.escape(t) for t in sorted(control_tokens, key=len, reverse=True)) or "(?!)"
    parts = re.split(f"{MARK_START}({pattern}){MARK_END}|[{MARK_START}{MARK_END}]", text)
    return [(part, i % 2 == 1) for i, part in enumerate(parts) if part]


def _bounded(text: str) -> str:
    if len(text) > MAX_TEXT_CHARS:
        raise K2Error(f"{len(text):,} characters are more than one tokenizer call takes ({MAX_TEXT_CHARS:,})")
    return text


class Tokenizer:
    """What generation and chat need from a tokenizer. `from_folder` picks the format the folder holds."""

    special_tokens: dict[str, int]  # text -> id of every added (special or control) token
    special_flags: dict[str, bool]  # text -> whether the tokenizer marks it special (the rest are plain added tokens)
    bos_id: int | None = None  # what a document starts with when the vocabulary adds BOS (llama.cpp's add_bos_token)

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Tokenizer":
        """The folder's tokenizer; its `bos_id` is tokenizer_config.json's bos_token where add_bos_token says the
        vocabulary adds it (what llama.cpp's converter writes as add_bos_token)."""
        folder = Path(folder)
        if (folder / "tiktoken.model").exists():
            tokenizer = TiktokenTokenizer.from_folder(folder)
        elif (folder / "tokenizer.json").exists():
            tokenizer = HFTokenizer.from_folder(folder)
        else:
            raise K2Error(f"{folder} has no tokenizer (tiktoken.model or tokenizer.json)")
        config = read_tokenizer_config(folder)
        if config.add_bos_token:
            tokenizer.bos_id = tokenizer.special_tokens.get(config.special_tokens().get("bos_token"))
        return tokenizer

    def encode(self, text: str) -> list[int]:
        """Ordinary text: a user typing a special token's name gets its characters, never the special id."""
        return self._encode(_bounded(text))

    def encode_document(self, text: str) -> list[int]:
        """Ordinary text of any length (a corpus to score), encoded in pieces of at most MAX_TEXT_CHARS that end
        where a line break meets a non-space character: a boundary the pre-tokenizers of K2, DeepSeek-V3 and Qwen
        split text at anyway, so the ids are those one call would give."""
        ids, start = [], 0
        while len(text) - start > MAX_TEXT_CHARS:
            cut = max((m.end() for m in _PIECE_END.finditer(text, start, start + MAX_TEXT_CHARS)), default=None)
            if cut is None:
                raise K2Error(f"{MAX_TEXT_CHARS:,} characters without a line break starting a word: split the text "
                              "into lines")
            ids += self.encode(text[start:cut])
            start = cut
        return ids + self.encode(text[start:])

    def encode_with_added(self, text: str) -> list[int]:
        """Text whose added tokens (special or not) become their ids: for text a chat template wrote."""
        return self._encode_with_added(_bounded(text))

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def _encode_with_added(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def stream(self) -> "StreamDecoder":
        raise NotImplementedError

    def encode_marked(self, text: str, control_tokens: set[str]) -> list[int]:
        """A rendered chat whose user strings had their control tokens marked: those become plain text, every other
        added token in the text (the template's markers) its id."""
        ids = []
        for piece, plain in marked_pieces(_bounded(text), control_tokens):
            ids += self._encode(piece) if plain else self._encode_with_added(piece)
        return ids


class StreamDecoder:
    """Ids in, text out as soon as it is whole: a character split across tokens is held until its last byte."""

    def push(self, token_id: int) -> str:
        raise NotImplementedError

    def finish(self) -> str:
        """What is still held: an incomplete trailing character comes out as U+FFFD, as a full decode would."""
        raise NotImplementedError


class TiktokenTokenizer(Tokenizer):
    """K2's format: `tiktoken.model` (base64 token, rank) and 256 special ids right after the ranks, named by
    `tokenizer_config.json` `added_tokens_decoder` (unnamed ones are `<|reserved_token_{id}|>`, as K2's own code
    does)."""

    def __init__(self, ranks: dict[bytes, int], special_tokens: dict[str, int], name: str = "k2",
                 pattern: str = K2_SPLIT_PATTERN):
        import tiktoken

        self.special_tokens = special_tokens
        self.special_flags = {text: True for text in special_tokens}
        self.encoding = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_tokens)
        self._ids = range(len(ranks)), set(special_tokens.values())

    def _has(self, token_id: int) -> bool:
        # A model's vocabulary may be larger than its tokenizer's (padded, or a config that lies): an id no token has
        # decodes to nothing, as the tokenizers library decodes it, never a KeyError mid-reply.
        ranked, special = self._ids
        return token_id in ranked or token_id in special

    @classmethod
    def from_folder(cls, folder: str | Path) -> "TiktokenTokenizer":
        folder = Path(folder)
        ranks = read_ranks(folder / "tiktoken.model")
        named = {i: token.content for i, token in read_tokenizer_config(folder).added_tokens_decoder.items()}
        first = len(ranks)
        taken = min(named, default=first)
        if taken < first:
            raise K2Error(f"{folder / 'tokenizer_config.json'}: added_tokens_decoder.{taken}: id {taken} belongs to a "
                          f"token of tiktoken.model; the special ids start at {first}")
        special = {named.get(i, f"<|reserved_token_{i}|>"): i for i in range(first, first + NUM_RESERVED_SPECIAL)}
        special.update({text: i for i, text in named.items() if i >= first + NUM_RESERVED_SPECIAL})
        return cls(ranks, special, folder.name)

    def _encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def _encode_with_added(self, text: str) -> list[int]:
        return self.encoding.encode(text, allowed_special="all")

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode([i for i in ids if self._has(i)], errors="replace")

    def stream(self) -> StreamDecoder:
        return _BytesStream(lambda i: self.encoding.decode_single_token_bytes(i) if self._has(i) else b"")


class _BytesStream(StreamDecoder):
    def __init__(self, token_bytes):
        self.token_bytes = token_bytes
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self.utf8.decode(self.token_bytes(token_id))

    def finish(self) -> str:
        return self.utf8.decode(b"", final=True)


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json`, run by the `tokenizers` library (Qwen3, DeepSeek-V3)."""

    def __init__(self, backend, bos_id: int | None = None):
        self.backend, self.bos_id = backend, bos_id
        added = backend.get_added_tokens_decoder()  # id -> AddedToken
        self.special_tokens = {token.content: i for i, token in added.items()}
        self.special_flags = {token.content: token.special for token in added.values()}

    @classmethod
    def from_folder(cls, folder: str | Path) -> "HFTokenizer":
        from tokenizers import Tokenizer as Backend

        folder = Path(folder)
        try:
            backend = Backend.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # the library raises a bare Exception for every parse error
            raise K2Error(f"{folder / 'tokenizer.json'} cannot be read: {e}") from None
        return cls(backend)

    def _encode(self, text: str) -> list[int]:
        # The library always matches added tokens, so run its stages without them: normalize, pre-tokenize, model.
        backend = self.backend
        if backend.normalizer is not None:
            text = backend.normalizer.normalize_str(text)
        splits = [s for s, _ in backend.pre_tokenizer.pre_tokenize_str(text)] if backend.pre_tokenizer else [text]
        return [token.id for split in splits for token in backend.model.tokenize(split)]

    def _encode_with_added(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=False)

    def stream(self) -> StreamDecoder:
        return _HFStream(self)


class _HFStream(StreamDecoder):
    """The library's DecodeStream holds a partial character back; `finish` flushes what it still holds."""

    def __init__(self, tokenizer: HFTokenizer):
        from tokenizers.decoders import DecodeStream

        self.tokenizer, self.ids, self.emitted = tokenizer, [], []
        self.decoder = DecodeStream(skip_special_tokens=False)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.decoder.step(self.tokenizer.backend, token_id) or ""
        self.emitted.append(text)
        return text

    def finish(self) -> str:
        full, emitted = self.tokenizer.decode(self.ids), "".join(self.emitted)
        tail = full[len(emitted):] if full.startswith(emitted) else ""
        self.emitted.append(tail)
        return tail
