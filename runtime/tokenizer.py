"""Kimi K2's tokenizer: a tiktoken rank file (`tiktoken.model`) plus special tokens from `tokenizer_config.json`."""
import base64
import json
from pathlib import Path

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


def read_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    try:
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    except (ValueError, base64.binascii.Error):
        raise K2Error(f"{path}:{line_no}: not a tiktoken rank line") from None
    return ranks


def write_ranks(path: Path, ranks: dict[bytes, int]):
    path.write_text("".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks.items()))


class Tokenizer:
    def __init__(self, ranks: dict[bytes, int], special_tokens: dict[str, int], name: str = "k2"):
        import tiktoken

        self.special_tokens = special_tokens
        self.encoding = tiktoken.Encoding(name, pat_str=K2_SPLIT_PATTERN, mergeable_ranks=ranks,
                                          special_tokens=special_tokens)

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Tokenizer":
        folder = Path(folder)
        if not (folder / "tiktoken.model").exists():
            raise K2Error(f"{folder} has no tiktoken.model")
        ranks = read_ranks(folder / "tiktoken.model")
        config = json.loads((folder / "tokenizer_config.json").read_text())
        special = {entry["content"]: int(i) for i, entry in config.get("added_tokens_decoder", {}).items()}
        return cls(ranks, special, folder.name)

    def encode(self, text: str) -> list[int]:
        """Ordinary text: a user typing a special token's name gets its characters, never the special id."""
        return self.encoding.encode(text, disallowed_special=())

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids, errors="replace")
