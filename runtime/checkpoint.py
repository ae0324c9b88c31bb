"""A Hugging Face model folder: config.json plus safetensors shards, read header by header and tensor by tensor.

Opening a folder reads config.json, the index and the shard headers only, so `k2 info` and `k2 plan` answer without
reading a weight; tensors are then copied one at a time out of the memory-mapped shards (runtime/safetensors_io.py
parses and maps them). Nothing in the folder is ever executed.
"""
import json
from pathlib import Path

from runtime.errors import K2Error
from runtime.safetensors_io import MappedShards, TensorInfo, read_safetensors_header

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise K2Error(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise K2Error(f"{path} is not valid JSON: {e}") from None


class Checkpoint:
    """The folder's config and the name, shard, dtype and shape of every stored tensor."""

    def __init__(self, folder: Path, config: dict, tensors: dict[str, TensorInfo], absent: dict[str, str] | None = None):
        self.folder, self.config, self.tensors = folder, config, tensors
        self.absent = absent or {}  # tensor -> shard, for shards not on disk (downloaded for another pipeline stage)
        self._reader = MappedShards()

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
        """One tensor, copied out of its memory-mapped shard; the pages read are then dropped from this process, so
        loading a model tensor by tensor keeps no more than one tensor of the shards resident."""
        info = self.tensors.get(name)
        if name in self.absent:
            raise K2Error(f"tensor {name} is in shard {self.absent[name]}, which is missing from {self.folder}")
        if info is None:
            raise K2Error(f"tensor {name} is not in the checkpoint (nor in its index)")
        tensor = self._reader.tensor(info).clone()
        self._reader.release(info)
        return tensor

    def close(self):
        self._reader.close()
