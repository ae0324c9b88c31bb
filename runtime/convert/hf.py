"""`k2 convert X.gguf OUT --to hf`: a GGUF file back into the Hugging Face folder transformers loads.

The GGUF opens as a checkpoint (runtime/gguf_checkpoint.py): its config.json, its tensors under their checkpoint names,
dequantized one at a time, and its vocabulary as a `tokenizers` tokenizer. They are written as safetensors shards
(each laid out from its planned header, tensors streamed into place), config.json, tokenizer.json,
tokenizer_config.json (special tokens and the chat template) and generation_config.json (the stop ids), in a
temporary folder next to OUT that is renamed into place once complete.
"""
import shutil
import time
from pathlib import Path

import gguf
import torch
from tqdm import tqdm

from runtime.errors import K2Error
from runtime.files import write_json_atomic, writing_to
from runtime.gguf_checkpoint import GGUFCheckpoint, is_gguf
from runtime.safetensors_io import PlannedTensor, ShardWriter
from runtime.units import format_shortfall

DTYPES = {"f32": (torch.float32, "F32", "float32"), "bf16": (torch.bfloat16, "BF16", "bfloat16"),
          "f16": (torch.float16, "F16", "float16")}
MAX_SHARD_BYTES = 5 << 30  # transformers' own default shard size


def _shards(tensors: list[PlannedTensor]) -> list[list[PlannedTensor]]:
    shards, size = [[]], 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > MAX_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _tokenizer_files(ckpt: GGUFCheckpoint, folder: Path):
    files = ckpt.files
    if not files.has_tokenizer:
        return
    files.backend.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "model_max_length": ckpt.config["max_position_embeddings"], **files.special_tokens()}
    template = ckpt.meta.value(gguf.Keys.Tokenizer.CHAT_TEMPLATE, None)
    if template:
        config["chat_template"] = template
    write_json_atomic(folder / "tokenizer_config.json", config, indent=2, ensure_ascii=False)


def convert_to_hf(model: str | Path, out: str | Path, type: str = "bf16", force: bool = False,
                  progress: bool = True) -> dict:
    """Write the folder; returns what was written (files, bytes, tensors, seconds)."""
    model, out = Path(model), Path(out)
    if type not in DTYPES:
        raise K2Error(f"--type for --to hf must be one of {', '.join(DTYPES)}, not {type!r}")
    if not is_gguf(model):
        raise K2Error(f"{model} is not a .gguf file; --to hf converts a GGUF into a Hugging Face folder")
    if out.exists() and not force:
        raise K2Error(f"{out} exists; --force overwrites it")
    if out.exists() and not out.is_dir():
        raise K2Error(f"{out} is a file; OUT is the folder to write")
    dtype, st_dtype, config_dtype = DTYPES[type]
    ckpt = GGUFCheckpoint.open(model, int4_experts=False)
    started = time.perf_counter()
    try:
        planned = [PlannedTensor(name, st_dtype, info.shape) for name, info in ckpt.tensors.items()]
        shards = _shards(planned)
        names = ["model.safetensors"] if len(shards) == 1 else \
            [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
        out.parent.mkdir(parents=True, exist_ok=True)
        total, free = sum(t.nbytes for t in planned), shutil.disk_usage(out.parent).free
        if total > free:
            raise K2Error(f"not enough space in {out.parent} for the folder: {format_shortfall(total, free)}")
        tmp = out.parent / f".{out.name}.k2-convert.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        with writing_to(out, "nothing was kept"):
            try:
                bar = tqdm(total=total, unit="B", unit_scale=True, desc="converting", disable=not progress)
                for name, shard in zip(names, shards):
                    writer = ShardWriter(tmp / name, shard)
                    for t in shard:
                        writer.write(t.name, ckpt.load(t.name).to(dtype))
                        ckpt.release()
                        bar.update(t.nbytes)
                    writer.finish()
                bar.close()
                if len(shards) > 1:
                    write_json_atomic(tmp / "model.safetensors.index.json", {
                        "metadata": {"total_size": total},
                        "weight_map": {t.name: name for name, shard in zip(names, shards) for t in shard}}, indent=2)
                write_json_atomic(tmp / "config.json", ckpt.config | {"torch_dtype": config_dtype}, indent=2)
                bos = {"bos_token_id": ckpt.config["bos_token_id"]} if "bos_token_id" in ckpt.config else {}
                write_json_atomic(tmp / "generation_config.json", bos | ckpt.files.generation_config(), indent=2)
                _tokenizer_files(ckpt, tmp)
                if out.exists():
                    shutil.rmtree(out)
                tmp.rename(out)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    finally:
        ckpt.close()
    return {"output": str(out), "files": sorted(p.name for p in out.iterdir()), "tensors": len(planned),
            "bytes": sum(p.stat().st_size for p in out.iterdir()), "seconds": time.perf_counter() - started}
