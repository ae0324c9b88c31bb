"""The one place a model is opened: `load(MODEL, ...)` gives every command what it needs from a model folder or a
GGUF file (runtime/gguf_checkpoint.py).

With weights, the model comes placed as asked: whole on one device, over devices as a `k2 plan` says, or, under
torchrun, this rank's pipeline stage. Without weights (`weights=False`) only config.json and the safetensors headers
(a GGUF's metadata and tensor table) are read and the model is built on the meta device: what `k2 info`, `k2 plan`,
`k2 convert` and the quantizer need, and it works on a folder that holds only config.json. The tokenizer, chat
template and generation defaults are read when first asked for, from the folder's files or the GGUF's metadata, so a
command that needs none of them does not need them.
"""
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from runtime import models
from runtime.checkpoint import Checkpoint
from runtime.config_schema import GenerationConfig, validate
from runtime.devices import check_device
from runtime.errors import K2Error
from runtime.files import read_json
from runtime.gguf_checkpoint import GGUFCheckpoint
from runtime.loading import TORCH_DTYPES, load_model, open_checkpoint
from runtime.offload import apply_placement, read_plan
from runtime.resolve import DEMO, resolve_model
from runtime.sampling import SamplingParams


def torch_dtype(name: str | None) -> torch.dtype | None:
    """--dtype: None or "auto" is the checkpoint's own."""
    if name in (None, "auto"):
        return None
    if name not in TORCH_DTYPES:
        raise K2Error(f"--dtype must be auto, {', '.join(TORCH_DTYPES)}; not {name!r}")
    return TORCH_DTYPES[name]


class FolderFiles:
    """A model folder's tokenizer, chat template and generation defaults (a GGUF's are runtime/gguf_checkpoint.py's
    GGUFFiles, with the same interface)."""

    def __init__(self, folder: Path):
        self.folder = folder

    @property
    def has_tokenizer(self) -> bool:
        return (self.folder / "tiktoken.model").exists() or (self.folder / "tokenizer.json").exists()

    def tokenizer(self):
        from runtime.tokenizer import Tokenizer

        return Tokenizer.from_folder(self.folder)

    def template(self):
        from runtime.chat_template import ChatTemplate

        return ChatTemplate.from_folder(self.folder)

    def generation_config(self) -> dict:
        path = self.folder / "generation_config.json"
        if not path.exists():
            return {}
        config = read_json(path)
        validate(GenerationConfig, config, path)
        return config


@dataclass
class LoadedModel:
    """A model folder (or GGUF file) opened for a command. `model` is on the meta device when loaded without weights,
    and a PipelineModel (with the model's interface) on rank 0 of a pipeline."""

    folder: Path  # the model folder, or the (first) GGUF file
    checkpoint: Checkpoint | GGUFCheckpoint  # config.json and every stored tensor's name, dtype and shape
    model: object
    device: torch.device
    placed: bool = False  # spread over devices by a plan
    pipeline: object | None = None  # the PipelineModel on rank 0 under torchrun

    @property
    def config(self) -> dict:
        return self.checkpoint.config

    @property
    def family(self):
        """The architecture family (runtime/models/family.py): what the toolkit may know of this model."""
        return models.family_of(self.config)

    @property
    def args(self):
        return self.model.args

    @property
    def gguf_arch(self):
        """The family's llama.cpp architecture: its hyperparameter keys and tensor mapping (runtime/convert/gguf.py)."""
        import importlib

        return importlib.import_module(self.family.gguf)

    @property
    def gguf_file(self) -> Path | None:
        """The GGUF file the model was read from (the first of a split set); None for a model folder."""
        return self.folder if isinstance(self.checkpoint, GGUFCheckpoint) else None

    @cached_property
    def files(self):
        """Where the tokenizer, chat template and generation defaults come from: a folder's files, a GGUF's
        metadata."""
        return self.checkpoint.files if isinstance(self.checkpoint, GGUFCheckpoint) else FolderFiles(self.folder)

    @property
    def has_tokenizer(self) -> bool:
        return self.files.has_tokenizer

    @cached_property
    def tokenizer(self):
        return self.files.tokenizer()

    @cached_property
    def template(self):
        return self.files.template()

    @cached_property
    def generation_config(self) -> dict:
        return self.files.generation_config()

    def sampling(self, **overrides) -> SamplingParams:
        """The model's recommended sampling (generation_config.json), with the options given (None: not given)."""
        return SamplingParams.from_generation_config(self.generation_config, **overrides)

    @property
    def reply_parser(self):
        """The parser of the model's replies (reasoning, content, tool calls), as its family names it."""
        from runtime.chat_format import REPLY_PARSERS

        return REPLY_PARSERS[self.family.reply_format]

    @property
    def eos_ids(self) -> set[int]:
        """End-of-sequence ids from config.json and generation_config.json (either may hold an int or a list)."""
        ids = set()
        for value in (self.config.get("eos_token_id"), self.generation_config.get("eos_token_id")):
            ids.update(value if isinstance(value, list) else [] if value is None else [value])
        return ids

    def chat_stop_ids(self) -> set[int]:
        """What ends an assistant turn: end-of-sequence and the template's end-of-turn token."""
        stop_ids = self.eos_ids | ({self.template.end_of_turn(self.tokenizer)} - {None})
        if not stop_ids:
            raise K2Error(f"{self.folder}: no end-of-turn token (no eos_token_id in config.json or "
                          "generation_config.json, none found in the chat template)")
        return stop_ids

    def context(self, ctx: int | None = None) -> int:
        """The tokens a sequence (prompt and reply) may hold: the positions the model was built for, or `ctx` if
        fewer."""
        limit = self.args.max_position_embeddings
        return limit if ctx is None else min(ctx, limit)

    def decoder(self, eager: bool = False) -> str:
        from runtime.engine import select_decoder

        return select_decoder(self.device, eager=eager, placed=self.placed, pipeline=self.pipeline is not None)

    def engine(self, slots: int, max_len: int, eager: bool = False):
        """The engine every command generates with, its decoder chosen by `decoder()`."""
        from runtime.engine import Engine

        return Engine(self.model, slots, max_len, self.decoder(eager))

    def close(self):
        """Release the other pipeline ranks, if any: they serve rank 0 until it says stop."""
        if self.pipeline is not None:
            self.pipeline.close()


def load(spec: str | Path = DEMO, device: str = "cpu", dtype: str | None = None, weights: bool = True,
         plan: str | Path | None = None, device_map: dict[str, str] | None = None, progress: bool = False,
         complete: bool = False, int8: bool = False) -> LoadedModel | None:
    """Open MODEL (a folder, a GGUF file, a cached repo id or "demo"). With `plan` (a `k2 plan --json` file) the
    model is placed as it says. Under torchrun each rank loads its own stage; every rank but 0 serves rank 0 until it
    is done and then gets None. Without weights, `complete` requires every shard's header (what reads all the weights
    needs); otherwise config.json alone is enough. `int8` quantizes the dense linears to int8 for the CPU kernels
    (runtime/int8.py)."""
    folder = resolve_model(str(spec))
    if not weights:
        checkpoint = open_checkpoint(folder, require_weights=complete, allow_missing_shards=not complete)
        return LoadedModel(folder, checkpoint, models.build_on_meta(checkpoint.config), torch.device("meta"))
    from runtime.pipeline import in_pipeline, open_stage

    target = check_device(device)
    dtype = torch_dtype(dtype)
    if int8 and (target.type != "cpu" or plan or in_pipeline()):
        raise K2Error("--int8 is for the CPU kernels: load the model whole on the CPU (--device cpu, no --plan, no "
                      "torchrun)")
    plan_data = read_plan(plan) if plan else None
    checkpoint = open_checkpoint(folder, allow_missing_shards=in_pipeline())  # a stage's folder has its shards only
    if in_pipeline():
        if isinstance(checkpoint, GGUFCheckpoint):
            raise K2Error(f"{folder}: pipeline stages load from a model folder (k2 convert --to hf writes one)")
        pipeline = open_stage(checkpoint, dtype, str(target), plan_data, device_map)
        if pipeline is None:
            return None
        return LoadedModel(folder, checkpoint, pipeline, pipeline.device, placed=plan_data is not None,
                           pipeline=pipeline)
    if plan_data is not None and len(plan_data["stages"]) != 1:
        raise K2Error(f"the plan has {len(plan_data['stages'])} stages: run it with "
                      f"torchrun --nproc-per-node {len(plan_data['stages'])}")
    model = load_model(checkpoint, dtype, "cpu" if plan_data else target, progress=progress)
    if int8:
        from runtime.int8 import quantize_dense_int8

        quantize_dense_int8(model)
    if plan_data:
        apply_placement(model, plan_data["stages"][0], device_map)
    return LoadedModel(folder, checkpoint, model, model.device, placed=plan_data is not None)
