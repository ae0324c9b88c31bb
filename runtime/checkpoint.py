"""A Hugging Face model folder: config.json plus safetensors shards, read header by header and tensor by tensor.

Opening a folder reads config.json, the index and the shard headers only, so `k2 info` and `k2 plan` answer without
reading a weight; tensors are then read one at a time as views of the memory-mapped shards (runtime/safetensors_io.py
parses and maps them). Nothing in the folder is ever executed, and every file is checked against its schema as it is
read (config.json against the family's args, runtime/config_schema.py).

The index names shards, and only plain file names inside the folder are followed: `../x.safetensors` or an absolute
path is refused. Where a shard links to is not checked: the Hugging Face cache stores a snapshot's files as links to
`../../blobs/...`, so following a link the folder holds is the normal case, and whoever can place links in the
folder can place any file there anyway.
"""
from pathlib import Path
from typing import Annotated

import torch
from pydantic import AfterValidator, BaseModel

from runtime import models
from runtime.config_schema import STRICT, validate
from runtime.errors import K2Error
from runtime.files import read_json
from runtime.safetensors_io import MappedShards, TensorInfo, read_safetensors_header

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"



def _file_in_folder(name: str) -> str:
    if name in ("", ".", "..") or Path(name).name != name:
        raise ValueError(f"{name!r} is not a file name inside the model folder")
    return name


class Index(BaseModel):
    """model.safetensors.index.json: which shard holds each tensor."""

    model_config = STRICT
    weight_map: dict[str, Annotated[str, AfterValidator(_file_in_folder)]]


class Checkpoint:
    """The folder's config and the name, shard, dtype and shape of every stored tensor."""

    def __init__(self, folder: Path, config: dict, tensors: dict[str, TensorInfo], absent: dict[str, str] | None = None):
        self.folder, self.config, self.tensors = folder, config, tensors
        self.absent = absent or {}  # tensor -> shard, for shards not on disk (downloaded for another pipeline stage)
        self._reader = MappedShards()
        self._loaded: list[TensorInfo] = []  # loaded since the last `release`

    @classmethod
    def open(cls, folder: str | Path, require_weights: bool = True, allow_missing_shards: bool = False) -> "Checkpoint":
        """With `allow_missing_shards`, shards the index names but the folder lacks are recorded, not an error: a
        pipeline stage's folder holds only the shards of its own layers."""
        folder = Path(folder)
        if not folder.is_dir():
            raise K2Error(f"{folder} is not a model folder")
        config = read_json(folder / "config.json")
        models.read_args(config, folder / "config.json")
        tensors: dict[str, TensorInfo] = {}
        if (folder / INDEX_FILE).exists():
            weight_map = validate(Index, read_json(folder / INDEX_FILE), folder / INDEX_FILE).weight_map
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

    def load(self, name: str) -> torch.Tensor:
        """One tensor as a view of its memory-mapped shard, not a copy: the caller copies it where it goes, then
        calls `release`. (The mapping is private: nothing written to a view reaches the file.)"""
        info = self.tensors.get(name)
        if name in self.absent:
            raise K2Error(f"tensor {name} is in shard {self.absent[name]}, which is missing from {self.folder}")
        if info is None:
            raise K2Error(f"tensor {name} is not in the checkpoint (nor in its index)")
        self._loaded.append(info)
        return self._reader.tensor(info)

    def release(self):
        """Drop the pages of the tensors loaded since the last release from this process (they stay in the page
        cache): loading a model tensor by tensor keeps no more than one tensor of the shards resident."""
        for info in self._loaded:
            self._reader.release(info)
        self._loaded.clear()

    def close(self):
        self._reader.close()
