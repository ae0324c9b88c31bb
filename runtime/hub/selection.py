"""Which files of a repo `k2 download` fetches: what k2 reads by default, the user's globs, and one pipeline stage's
shards."""
import json
import re
import tempfile
from functools import cache
from pathlib import Path

from runtime.errors import K2Error

# What k2 reads from a model folder: weights and their index, the configs, the tokenizer and the chat template.
DEFAULT_INCLUDE = ("*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
                   "tokenizer*", "tiktoken.model", "*.tiktoken", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "chat_template.jinja", "chat_template.json")
# Remote code (tokenization_kimi.py, modeling_deepseek.py) is never executed by k2, so it is not even fetched.
DEFAULT_EXCLUDE = ("*.py",)

_LAYER = re.compile(r"model\.layers\.(\d+)\.")


@cache
def glob_pattern(glob: str) -> re.Pattern:
    """A --include/--exclude glob as a regex over a repo path: `*` and `?` stay within one folder, `**` crosses
    folders (`**/` also matches none), `[...]` is a character class. Unlike huggingface_hub's allow_patterns
    (fnmatch, where `*.safetensors` also matches `sub/x.safetensors`), a folder is entered only when asked."""
    regex, i = [], 0
    while i < len(glob):
        if glob.startswith("**/", i):
            regex.append("(?:.*/)?")
            i += 3
        elif glob.startswith("**", i):
            regex.append(".*")
            i += 2
        elif glob[i] == "*":
            regex.append("[^/]*")
            i += 1
        elif glob[i] == "?":
            regex.append("[^/]")
            i += 1
        elif glob[i] == "[" and (end := glob.find("]", i + 2)) != -1:
            body = glob[i + 1:end]
            regex.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            regex.append(re.escape(glob[i]))
            i += 1
    return re.compile("".join(regex))


def _matches(path: str, globs) -> bool:
    return any(glob_pattern(glob).fullmatch(path) for glob in globs)


def check_remote_path(path: str):
    """A path of the hub's listing stays inside the folder it is written to: relative, no '.' or '..' component, no
    empty component, no backslash (a separator on Windows), no drive letter starting any component (Windows joins
    `a/C:b` as a drive path; huggingface_hub's own check raises a ValueError on it), no NUL."""
    parts = path.split("/")
    if (not path or "\0" in path or "\\" in path or path.startswith("/")
            or any(part in ("", ".", "..") or re.match(r"[A-Za-z]:", part) for part in parts)):
        raise K2Error(f"the hub lists a file named {path!r}, which would be written outside the download folder; "
                      "refusing this listing")


def select_paths(paths, include: list[str] | None = None, exclude: list[str] | None = None) -> list[str]:
    """The repo files to fetch, after checking every listed path. By default the top-level files k2 reads;
    --include globs replace that set, --exclude globs remove from it (see glob_pattern)."""
    for path in paths:
        check_remote_path(path)
    if include:
        chosen = [p for p in paths if _matches(p, include)]
    else:
        chosen = [p for p in paths if "/" not in p and _matches(p, DEFAULT_INCLUDE) and not _matches(p, DEFAULT_EXCLUDE)]
    return sorted(p for p in chosen if not _matches(p, exclude or ()))


def parse_stage(text: str) -> tuple[int, int]:
    """'2/4' -> (1, 4): the 0-based stage index and the number of stages."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise K2Error(f"--stage takes I/N with 1 <= I <= N (e.g. 1/2), got {text!r}")
    return int(match[1]) - 1, int(match[2])


def parse_layers(text: str) -> range:
    """'0-29' -> range(0, 30); '7' -> range(7, 8). Both ends are included, as layers are numbered in config.json."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    if not match or (match[2] is not None and int(match[2]) < int(match[1])):
        raise K2Error(f"--layers takes A-B with A <= B (e.g. 0-29), got {text!r}")
    return range(int(match[1]), int(match[2] if match[2] is not None else match[1]) + 1)


def stage_layers(config: dict, stage: int, n_stages: int) -> range:
    """The layers pipeline stage `stage` (0-based) of `n_stages` runs.

    The one rule of runtime/pipeline.py when it runs without a plan: placement.pipeline_stage_ranges.
    """
    from runtime.placement import pipeline_stage_ranges

    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(config))
        return pipeline_stage_ranges(folder, n_stages)[stage]


def tensor_needed(name: str, layers: range, n_layers: int) -> bool:
    """Whether a run of `layers` reads tensor `name`: their own tensors, the embeddings with the first layer, the
    final norm and lm_head with the last. Layers past num_hidden_layers (DeepSeek-V3's MTP) are never loaded."""
    match = _LAYER.match(name)
    if match:
        return int(match[1]) in layers
    if name.startswith("model.embed_tokens."):
        return 0 in layers
    if name.startswith(("model.norm.", "lm_head.")):
        return n_layers - 1 in layers
    return True  # a tensor of no known part: every stage fetches it rather than miss it


def shards_for_layers(weight_map: dict[str, str], layers: range, n_layers: int) -> set[str]:
    """The shards (as the index names them) holding any tensor a run of `layers` reads."""
    if layers.start < 0 or layers.stop > n_layers:
        raise K2Error(f"--layers {layers.start}-{layers.stop - 1} is outside the model's layers 0-{n_layers - 1}")
    return {shard for name, shard in weight_map.items() if tensor_needed(name, layers, n_layers)}
