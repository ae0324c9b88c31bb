"""A Hugging Face model folder: config.json plus safetensors shards, read header by header and tensor by tensor.

Headers are parsed here without torch, so `k2 info` and `k2 plan` answer instantly; tensors are memory-mapped
through safetensors and read one at a time. Nothing in the folder is ever executed.
"""
import json
import struct
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import K2Error

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
               "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER_BYTES = 100 << 20


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shard: Path
    dtype: str  # safetensors dtype string: BF16, F8_E4M3, I32, ...
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise K2Error(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise K2Error(f"{path} is not valid JSON: {e}") from None


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor infos of one shard, after checking the file is long enough to hold every tensor it declares."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise K2Error(f"{path.name} is truncated or not a safetensors file ({size} bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise K2Error(f"{path.name} is truncated or not a safetensors file (header of {header_len} bytes, file of {size})")
            header = json.loads(f.read(header_len))
    except FileNotFoundError:
        raise K2Error(f"shard {path.name} is missing from {path.parent}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise K2Error(f"{path.name} has a corrupt safetensors header") from None
    header.pop("__metadata__", None)
    tensors, data_end = {}, 0
    for name, entry in header.items():
        if entry.get("dtype") not in DTYPE_BYTES:
            raise K2Error(f"{path.name}: tensor {name} has unsupported dtype {entry.get('dtype')!r}")
        tensors[name] = TensorInfo(name, path, entry["dtype"], tuple(entry["shape"]))
        data_end = max(data_end, entry["data_offsets"][1])
    if 8 + header_len + data_end > size:
        raise K2Error(f"{path.name} is truncated: {size:,} bytes on disk, its header needs {8 + header_len + data_end:,}"
                      " (re-download it)")
    return tensors


class Checkpoint:
    """The folder's config and the name, shard, dtype and shape of every stored tensor."""

    def __init__(self, folder: Path, config: dict, tensors: dict[str, TensorInfo], absent: dict[str, str] | None = None):
        self.folder, self.config, self.tensors = folder, config, tensors
        self.absent = absent or {}  # tensor -> shard, for shards not on disk (downloaded for another pipeline stage)
        self._handles = {}

    @classmethod
    def open(cls, folder: str | Path, require_weights: bool = True, allow_missing_shards: bool = False) -> "Checkpoint":
        """With `allow_missing_shards`, shards the index names but the folder lacks are recorded, not an error: a
        pipeline stage's folder holds only the shards of its own layers."""
        folder = Path(folder)
        if not folder.is_dir():
            raise K2Error(f"{folder} is not a model folder")
        config = read_json(folder / "config.json")
        tensors: dict[str, TensorInfo] = {}
        if (folder / INDEX_FILE).exists():
            weight_map = read_json(folder / INDEX_FILE).get("weight_map")
            if not isinstance(weight_map, dict):
                raise K2Error(f"{folder / INDEX_FILE} has no weight_map")
            names = sorted(set(weight_map.values()))
            missing = {shard for shard in names if allow_missing_shards and not (folder / shard).exists()}
            shards = {shard: read_safetensors_header(folder / shard) for shard in names if shard not in missing}
            absent = {name: shard for name, shard in weight_map.items() if shard in missing}
            for name, shard in weight_map.items():
                if shard in missing:
                    continue
                if name not in shards[shard]:
                    raise K2Error(f"the index puts tensor {name} in {shard}, but {shard} does not contain it")
                tensors[name] = shards[shard][name]
            return cls(folder, config, tensors, absent)
        if (folder / SINGLE_FILE).exists():
            tensors = read_safetensors_header(folder / SINGLE_FILE)
        elif require_weights:
            raise K2Error(f"{folder} has config.json but no weights ({SINGLE_FILE} or {INDEX_FILE})")
        return cls(folder, config, tensors)

    @property
    def missing_shards(self) -> set[str]:
        return set(self.absent.values())

    def load(self, name: str):
        """One tensor, read from its memory-mapped shard."""
        from safetensors import SafetensorError, safe_open

        info = self.tensors.get(name)
        if name in self.absent:
            raise K2Error(f"tensor {name} is in shard {self.absent[name]}, which is missing from {self.folder}")
        if info is None:
            raise K2Error(f"tensor {name} is not in the checkpoint (nor in its index)")
        try:
            if info.shard not in self._handles:
                self._handles[info.shard] = safe_open(info.shard, framework="pt", device="cpu")
            return self._handles[info.shard].get_tensor(name)
        except SafetensorError as e:
            raise K2Error(f"{info.shard.name}: cannot read {name}: {e}") from None

    def close(self):
        self._handles.clear()


def eos_token_ids(folder: Path) -> set[int]:
    """End-of-sequence ids from config.json and generation_config.json (either may hold an int or a list)."""
    ids = set()
    for file in ("config.json", "generation_config.json"):
        path = Path(folder) / file
        value = read_json(path).get("eos_token_id") if path.exists() else None
        ids.update(value if isinstance(value, list) else [] if value is None else [value])
    return ids
