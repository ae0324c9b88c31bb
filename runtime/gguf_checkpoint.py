"""A GGUF file (llama.cpp's format) opened as a checkpoint: MODEL may be `X.gguf` or the first file of a split set
(`X-00001-of-0000N.gguf`).

The config.json a file was converted from is rebuilt from its metadata, and its tokenizer from its vocabulary, by the
family's GGUF mapping (runtime/models/*_gguf.py, which writes them too). Its tensors are offered under the names and
shapes of the Hugging Face checkpoint, each made when the loader asks for it: dequantized by gguf-py (llama.cpp's
reference code) straight from the memory-mapped file, one routed expert from its slice of the stacked `ffn_*_exps`
bytes, the family's transforms undone. So runtime/loading.py fills the model as from a folder. A layer whose routed
experts are all Q4_0 is offered as compressed-tensors INT4 instead (the same nibbles and fp16 scales, group 32): the
experts load packed into the INT4 runtime, with no float copy.
"""
import importlib
import math
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import gguf
import numpy as np
import torch

from quant import int4
from quant.gguf import blocks
from runtime import models
from runtime.config_schema import GenerationConfig, validate
from runtime.errors import K2Error
from runtime.safetensors_io import DTYPE_BYTES, MappedShards, TensorInfo

Q = gguf.GGMLQuantizationType
Keys = gguf.Keys
SPLIT_NAME = re.compile(r"(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf")
REQUIRED = object()
INT4_GROUP = blocks.Q4_0_BLOCK  # a Q4_0 block is one INT4 group
INT4_PARTS = {"packed": "I32", "scale": "F16", "shape": "I64"}  # a Q4_0 expert as compressed-tensors' stored tensors
# The torch dtype a model loads as by default, from the file's type: float files as they are, quantized ones in BF16.
FILE_DTYPES = {gguf.LlamaFileType.ALL_F32: "float32", gguf.LlamaFileType.MOSTLY_F16: "float16"}


def is_gguf(path: Path) -> bool:
    return path.suffix == ".gguf" and path.is_file()


def gguf_files(path: Path) -> list[Path]:
    """The file, or every file of the split set it is the first of."""
    match = SPLIT_NAME.fullmatch(path.name)
    if match is None:
        return [path]
    stem, count = match["stem"], int(match["count"])
    if int(match["no"]) != 1:
        raise K2Error(f"{path} is part {int(match['no'])} of a split GGUF; MODEL is its first file, "
                      f"{stem}-00001-of-{count:05d}.gguf")
    files = [path.with_name(f"{stem}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise K2Error(f"{path} is split in {count} files, but {', '.join(missing)} is missing")
    return files


def _reader(path: Path) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(path)
    except (ValueError, KeyError, IndexError, TypeError, OverflowError) as e:
        # gguf-py checks the magic, version, types and sizes, and maps every tensor: a truncated or corrupt file
        # fails here, each way with its own exception
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise K2Error(f"{path} is not a readable GGUF file ({reason})") from None
    except OSError as e:
        raise K2Error(f"cannot read {path}: {e.strerror}") from None


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of the files: its GGUF name and type, shape in numpy order (rows last), where its bytes are."""

    name: str
    qtype: Q
    shape: tuple[int, ...]
    storage: TensorInfo  # its bytes, as U8


class Metadata:
    """The files' key-value metadata and tensor table, read for the family's GGUF mapping: a key missing or of the
    wrong kind is one error naming the file and the key."""

    def __init__(self, path: Path, readers: list[gguf.GGUFReader]):
        self.path, self._fields = path, readers[0].fields
        self.tensors: dict[str, StoredTensor] = {}
        for reader in readers:
            for t in reader.tensors:
                if t.tensor_type not in blocks.READABLE:
                    raise K2Error(f"{path}: tensor {t.name} is stored as {t.tensor_type.name}, which k2 does not read "
                                  f"(it reads {', '.join(sorted(q.name for q in blocks.READABLE))})")
                shape = tuple(int(d) for d in reversed(t.shape.tolist()))
                storage = TensorInfo(t.name, Path(reader.data.filename), "U8", (int(t.n_bytes),), int(t.data_offset))
                self.tensors[t.name] = StoredTensor(t.name, Q(t.tensor_type), shape, storage)
        self.arch = self.value(Keys.General.ARCHITECTURE)
        self._mapped = MappedShards()

    def value(self, key: str, default=REQUIRED):
        field = self._fields.get(key)
        if field is None:
            if default is REQUIRED:
                raise K2Error(f"{self.path}: metadata key {key} is missing")
            return default
        value = field.contents()
        # float32 values as the shortest decimal that is the same float32 (1e-05, not 9.999999747378752e-06)
        return float(str(np.float32(value))) if isinstance(value, float) else value

    def arch_value(self, key: str, default=REQUIRED):
        """A key of the `{arch}.` family (gguf.Keys.LLM, Attention, Rope, ...)."""
        return self.value(key.format(arch=self.arch), default)

    def number(self, key: str, default=REQUIRED):
        value = self.arch_value(key, default)
        if value is not default and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise K2Error(f"{self.path}: metadata key {key.format(arch=self.arch)} is {value!r}, not a number")
        return value

    def _range(self, tensor: StoredTensor, expert: int | None) -> tuple[int, int, tuple[int, ...]]:
        """(start, end, numpy shape) of the whole tensor, or of one expert's slice of a stacked one."""
        if expert is None:
            return 0, tensor.storage.nbytes, tensor.shape
        nbytes = tensor.storage.nbytes // tensor.shape[0]
        return expert * nbytes, (expert + 1) * nbytes, tensor.shape[1:]

    def bytes_of(self, tensor: StoredTensor, expert: int | None = None) -> np.ndarray:
        """The stored bytes of `tensor` (or of one expert's slice), uint8 in their byte shape; a view of the mapped
        file."""
        start, end, shape = self._range(tensor, expert)
        data = np.frombuffer(self._mapped.raw(tensor.storage, start, end), dtype=np.uint8)
        return data.reshape(blocks.byte_shape(tensor.qtype, shape))

    def release(self, tensor: StoredTensor, expert: int | None = None):
        start, end, _ = self._range(tensor, expert)
        self._mapped.release(tensor.storage, start, end)

    def tensor(self, name: str, expert: int | None = None) -> np.ndarray:
        """Tensor `name` (or one expert's slice) dequantized to float32, numpy order."""
        stored = self.tensors[name]
        return blocks.decode(self.bytes_of(stored, expert), stored.qtype, self._range(stored, expert)[2])

    def close(self):
        self._mapped.close()


@dataclass(frozen=True)
class GGUFTensorInfo:
    """What the loader reads of a checkpoint tensor (name, dtype, shape, shard, nbytes), and how it is made."""

    name: str  # the Hugging Face checkpoint's name
    dtype: str  # the GGML type it is stored in (F32, Q4_K, ...); I32 / F16 / I64 for the parts of packed Q4_0
    shape: tuple[int, ...]
    shard: Path
    nbytes: int
    sources: tuple[str, ...]  # the GGUF tensors it is made of (one, or the family's parts)
    parts: tuple[str, ...] = ("whole",)  # each source's part, as the family's GGUF mapping names it
    expert: int | None = None  # its slice of a stacked experts tensor
    int4: str | None = None  # "packed", "scale" or "shape": one stored tensor of a Q4_0 expert read as INT4


def _family_gguf_modules() -> dict[str, object]:
    """llama.cpp architecture name -> the family's GGUF mapping module that reads it."""
    found = {}
    for family in models.families():
        module = importlib.import_module(family.gguf)
        found.update({name: module for name in module.ARCH_NAMES.values()})
    return found


class GGUFCheckpoint:
    """A GGUF file (or split set) with the interface of runtime/checkpoint.Checkpoint, plus `files`: its tokenizer,
    chat template and generation defaults, read from its metadata."""

    def __init__(self, path: Path, meta: Metadata, arch, args, config: dict, tensors: dict[str, GGUFTensorInfo]):
        self.folder = path  # what names the model in messages and `k2 info`
        self.meta, self.arch, self.args, self.config, self.tensors = meta, arch, args, config, tensors
        self.absent: dict[str, str] = {}
        self.missing_shards: set[str] = set()
        self.files = GGUFFiles(meta)
        self._loaded: list[tuple[StoredTensor, int | None]] = []  # read since the last `release`

    @classmethod
    def open(cls, path: str | Path, int4_experts: bool = True) -> "GGUFCheckpoint":
        """With `int4_experts`, layers whose routed experts are all Q4_0 are offered as INT4 (packed words, scales,
        shapes); without, every tensor as the float weight it stands for."""
        path = Path(path)
        meta = Metadata(path, [_reader(f) for f in gguf_files(path)])
        arch = _family_gguf_modules().get(meta.arch)
        if arch is None:
            raise K2Error(f"{path}: architecture {meta.arch!r} is not supported (supported: "
                          f"{', '.join(sorted(_family_gguf_modules()))})")
        config = arch.read_config(meta) | _token_ids(meta)
        config["torch_dtype"] = FILE_DTYPES.get(meta.value(Keys.General.FILE_TYPE, None), "bfloat16")
        models.read_args(config, f"{path} metadata")
        model = models.build_on_meta(config)
        tensors = _tensor_table(path, meta, arch, model)
        if int4_experts:
            config, tensors = _int4_experts(config, tensors, model)
        return cls(path, meta, arch, model.args, config, tensors)

    def load(self, name: str) -> torch.Tensor:
        """One tensor as the checkpoint it came from held it (float32, or the INT4 parts); then `release`."""
        info = self.tensors.get(name)
        if info is None:
            raise K2Error(f"tensor {name} is not in {self.folder}")
        stored = [self.meta.tensors[s] for s in info.sources]
        self._loaded += [(s, info.expert) for s in stored]
        if info.int4 == "shape":  # the expert's [out, in]
            return torch.tensor(stored[0].shape[1:], dtype=torch.int64)
        if info.int4 is not None:
            packed, scale = blocks.q4_0_to_int4(self.meta.bytes_of(stored[0], info.expert))
            return packed if info.int4 == "packed" else scale
        values = {p: torch.from_numpy(self.meta.tensor(s.name, info.expert)) for p, s in zip(info.parts, stored)}
        if info.parts == ("whole",):
            return values["whole"].view(info.shape)
        return self.arch.join_parts(values, info.shape, self.args)

    def release(self):
        for stored, expert in self._loaded:
            self.meta.release(stored, expert)
        self._loaded.clear()

    def close(self):
        self.meta.close()


def _token_ids(meta: Metadata) -> dict:
    """config.json's bos and eos ids, from the vocabulary's."""
    ids = {"bos_token_id": Keys.Tokenizer.BOS_ID, "eos_token_id": Keys.Tokenizer.EOS_ID}
    return {name: meta.value(key) for name, key in ids.items() if meta.value(key, None) is not None}


def _tensor_table(path: Path, meta: Metadata, arch, model) -> dict[str, GGUFTensorInfo]:
    """Every tensor of the Hugging Face checkpoint the model of this config reads, found in the file: by gguf-py's
    tensor map of the family's architecture, experts as slices of the stacked tensors, the family's split tensors
    from their parts (or whole, as older files store them). Every tensor of the file must have its place."""
    args = model.args
    name_map = arch.tensor_name_map(args)
    used = set(arch.CONFIG_TENSORS)
    table = {}
    for hf_name, shape in model.stored_shapes().items():  # a tied head is the embedding, as the loader ties it
        if model.skip_tensor(hf_name):
            continue
        stacked, expert = model.locate(hf_name)
        if expert is not None:
            gguf_name = arch.gguf_tensor(name_map, stacked + ".weight")[1]
            stored = _stored(path, meta, gguf_name, (args.routed_experts, *shape), hf_name)
            info = GGUFTensorInfo(hf_name, stored.qtype.name, shape, stored.storage.shard,
                                  stored.storage.nbytes // args.routed_experts, (gguf_name,), expert=expert)
        else:
            parts = arch.split_tensor(hf_name, args) or []
            names = [arch.gguf_tensor(name_map, part_name)[1] for part_name, _, _ in parts]
            whole = arch.gguf_tensor(name_map, hf_name)[1]
            if parts and (all(n in meta.tensors for n in names) or whole not in meta.tensors):
                found = [_stored(path, meta, n, part_shape or shape, hf_name)
                         for n, (_, part_shape, _) in zip(names, parts)]
                info = GGUFTensorInfo(hf_name, found[0].qtype.name, shape, found[0].storage.shard,
                                      sum(s.storage.nbytes for s in found), tuple(names), tuple(p for _, _, p in parts))
            else:  # stored as it is (or whole, as older files store what newer ones split)
                stored = _stored(path, meta, whole, shape, hf_name)
                info = GGUFTensorInfo(hf_name, stored.qtype.name, shape, stored.storage.shard, stored.storage.nbytes,
                                      (whole,))
        used.update(info.sources)
        table[hf_name] = info
    unused = [n for n in meta.tensors if n not in used]
    if unused:
        raise K2Error(f"{path}: tensor {unused[0]} has no place in the model its metadata describes "
                      f"({len(unused)} such tensor(s))")
    return table


def _stored(path: Path, meta: Metadata, gguf_name: str, shape: tuple[int, ...], hf_name: str) -> StoredTensor:
    stored = meta.tensors.get(gguf_name)
    if stored is None:
        raise K2Error(f"{path} lacks tensor {gguf_name} ({hf_name}), which its metadata implies")
    if stored.shape != tuple(shape):
        raise K2Error(f"{path}: tensor {gguf_name} has shape {list(stored.shape)}, but the metadata implies "
                      f"{list(shape)}")
    return stored


def _int4_experts(config: dict, tensors: dict[str, GGUFTensorInfo], model):
    """Offer the routed experts of every layer whose three stacked expert tensors are Q4_0 as compressed-tensors INT4
    (runtime/int4.py holds a layer's experts packed only when all of them are)."""
    def block(name: str) -> str:  # `model.layers.N.mlp.experts`
        return model.locate(name)[0].rsplit(".", 1)[0]

    by_block: dict[str, list[GGUFTensorInfo]] = {}
    for info in tensors.values():
        if info.expert is not None:
            by_block.setdefault(block(info.name), []).append(info)
    packed = {b for b, infos in by_block.items() if all(i.dtype == Q.Q4_0.name for i in infos)}
    if not packed:
        return config, tensors
    offered = {}
    for name, info in tensors.items():
        if info.expert is None or block(name) not in packed:
            offered[name] = info
            continue
        out_features, in_features = info.shape
        shapes = {"packed": (out_features, in_features // int4.PER_WORD),
                  "scale": (out_features, in_features // INT4_GROUP), "shape": (2,)}
        for part, dtype in INT4_PARTS.items():
            stored_name = f"{name.removesuffix('.weight')}.weight_{part}"
            offered[stored_name] = GGUFTensorInfo(stored_name, dtype, shapes[part], info.shard,
                                                  math.prod(shapes[part]) * DTYPE_BYTES[dtype], info.sources,
                                                  expert=info.expert, int4=part)
    quantization = int4.compressed_tensors_config(INT4_GROUP, "minmax", ignore=[])
    return config | {"quantization_config": quantization}, offered


class GGUFFiles:
    """A GGUF's tokenizer, chat template and generation defaults (what a folder keeps in tokenizer.json,
    tokenizer_config.json and generation_config.json), from its metadata."""

    def __init__(self, meta: Metadata):
        self.meta = meta

    @property
    def has_tokenizer(self) -> bool:
        return self.meta.value(Keys.Tokenizer.LIST, None) is not None

    @cached_property
    def backend(self):
        """The vocabulary as a `tokenizers.Tokenizer` (what `k2 convert --to hf` saves as tokenizer.json)."""
        from runtime.convert.gguf_vocab import gguf_tokenizer

        return gguf_tokenizer(self.meta)

    def tokenizer(self):
        from runtime.convert.gguf_vocab import added_bos
        from runtime.tokenizer import HFTokenizer

        if not self.has_tokenizer:
            raise K2Error(f"{self.meta.path} has no tokenizer ({Keys.Tokenizer.LIST})")
        return HFTokenizer(self.backend, bos_id=added_bos(self.meta))

    def special_tokens(self) -> dict[str, str]:
        """bos_token, eos_token, unk_token, pad_token as text, as chat templates read them."""
        tokens = self.meta.value(Keys.Tokenizer.LIST, [])
        roles = {"bos_token": Keys.Tokenizer.BOS_ID, "eos_token": Keys.Tokenizer.EOS_ID,
                 "unk_token": Keys.Tokenizer.UNK_ID, "pad_token": Keys.Tokenizer.PAD_ID}
        ids = {role: self.meta.value(key, None) for role, key in roles.items()}
        return {role: tokens[i] for role, i in ids.items() if i is not None and 0 <= i < len(tokens)}

    def template(self):
        from runtime.chat_template import ChatTemplate

        source = self.meta.value(Keys.Tokenizer.CHAT_TEMPLATE, None)
        if not source:
            raise K2Error(f"{self.meta.path} has no chat template ({Keys.Tokenizer.CHAT_TEMPLATE}); use `k2 generate` "
                          "for raw completion")
        return ChatTemplate(source, self.special_tokens(), f"the chat template in {self.meta.path}")

    def generation_config(self) -> dict:
        """The end-of-sequence ids llama.cpp stops at: eos, end-of-turn and end-of-message."""
        keys = (Keys.Tokenizer.EOS_ID, Keys.Tokenizer.EOT_ID, Keys.Tokenizer.EOM_ID)
        ids = [i for i in (self.meta.value(k, None) for k in keys) if i is not None]
        config = {"eos_token_id": sorted(set(ids))} if ids else {}
        validate(GenerationConfig, config, f"{self.meta.path} metadata")
        return config
