"""`k2 convert --to gguf`: a checkpoint streamed into llama.cpp GGUF files, tensor by tensor, through gguf-py's writer.

What is llama.cpp's about the model (its architecture, hyperparameter keys, tensor names and transforms, pre-tokenizer
name, extra tensors) comes from the family's GGUF mapping (runtime/models/*_gguf.py, `loaded.gguf_arch`); this module
only plans, encodes and writes.

All that precedes the tensor data (metadata, vocabulary, every tensor's name, type and shape) follows from config.json,
the tokenizer and the safetensors headers, so it is planned and written first. Tensors are then produced one row block
at a time (workers encode blocks in parallel; they are written in order) from memory-mapped input shards whose pages
are dropped once used: memory holds a few row blocks, never a layer's stacked experts. The files are written in a
temporary folder next to OUT and renamed into place when all are complete; a progress file there records how many
tensors are safely on disk, so an interrupted run resumes in place, its header rewritten byte for byte and the written
tensors skipped.
"""
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm import tqdm

from quant.gguf import blocks
from runtime.convert.gguf_vocab import add_vocab, read_vocab
from runtime.convert.sources import Source, collect_sources, read_rows, release_rows, row_blocks
from runtime.errors import K2Error
from runtime.files import read_json, writing_to
from runtime.loader import load
from runtime.safetensors_io import MappedShards
from runtime.units import format_shortfall

Q = gguf.GGMLQuantizationType
TYPES = {"f32": Q.F32, "bf16": Q.BF16, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}
FILE_TYPES = {Q.F32: gguf.LlamaFileType.ALL_F32, Q.BF16: gguf.LlamaFileType.MOSTLY_BF16,
              Q.F16: gguf.LlamaFileType.MOSTLY_F16, Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
              Q.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0}
AUTO = "auto"  # --experts-type: INT4 experts copied into Q4_0, other experts as --type
WINDOW_PER_WORKER = 4  # row blocks in flight per worker: enough to keep workers busy while one is written
PROGRESS = "progress.json"  # in the temporary folder: the settings and inputs of the run, and the tensors done


@dataclass(frozen=True)
class ConvertConfig:
    type: str = "bf16"  # linear weights and embeddings
    experts_type: str = AUTO  # routed experts
    split_max_bytes: int = 0  # 0: one file

    def __post_init__(self):
        if self.type not in TYPES:
            raise K2Error(f"--type must be one of {', '.join(TYPES)}, not {self.type!r}")
        if self.experts_type not in (AUTO, *TYPES):
            raise K2Error(f"--experts-type must be one of {', '.join((AUTO, *TYPES))}, not {self.experts_type!r}")
        if self.split_max_bytes < 0:
            raise K2Error("--split-max-size must be positive")


@dataclass(frozen=True)
class OutputTensor:
    name: str  # GGUF name, e.g. blk.3.ffn_down_exps.weight
    shape: tuple[int, ...]  # numpy order, rows last: [experts, out, in] for stacked experts
    qtype: Q
    sources: tuple[Source, ...]  # one, or a layer's experts in expert order; none for a tensor the mapping computes
    part: str = "whole"  # or a part of its one source that the family's GGUF mapping cuts out (`encode_part`)
    int4_copy: bool = False  # INT4 groups copied into Q4_0 blocks, no rounding
    note: str | None = None  # why the type is not the one asked for
    values: np.ndarray | None = None  # the float32 values of a tensor the mapping computes (`extra_tensors`)

    @property
    def nbytes(self) -> int:
        return blocks.nbytes(self.qtype, self.shape)


def _choose_type(arch, kind, shape: tuple[int, ...], sources: tuple[Source, ...], part: str,
                 config: ConvertConfig) -> tuple[Q, bool, str | None]:
    """(type, INT4 copied as is, note) of one output tensor."""
    if len(shape) == 1 or kind in arch.F32_KINDS:
        return Q.F32, False, None
    int4 = [s for s in sources if s.kind == "int4"]
    copyable = part == "whole" and len(int4) == len(sources) and all(
        blocks.int4_groups(s.shape[1], s.parts[1].shape[1]) for s in sources)
    wanted = config.experts_type if kind in arch.EXPERT_KINDS else AUTO
    if copyable and wanted in (AUTO, "q4_0"):
        return Q.Q4_0, True, None  # an INT4 weight stays the INT4 weight it is
    qtype = TYPES[config.type if wanted == AUTO else wanted]
    note = f"INT4 weights dequantized and written as {qtype.name}" if int4 else None
    if shape[-1] % blocks.block_size(qtype):
        note, qtype = f"rows of {shape[-1]} are not whole {qtype.name} blocks: written as BF16", Q.BF16
    return qtype, False, note


def plan_tensors(loaded, sources: list[Source], config: ConvertConfig) -> list[OutputTensor]:
    """The GGUF tensors of a checkpoint in writing order, after checking its tensors against config.json."""
    model, arch = loaded.model, loaded.gguf_arch
    args = model.args
    expected = model.stored_shapes()  # a tied head has no output.weight: llama.cpp reads token_embd
    # (checkpoint name, its sources, shape, part); a stacked tensor's sources are its experts by id, filled as found
    jobs: list[tuple[str, tuple[Source, ...] | dict[int, Source], tuple[int, ...], str]] = []
    stacks: dict[str, dict[int, Source]] = {}
    seen = set()
    for s in sources:
        if model.skip_tensor(s.name) or (args.tie_word_embeddings and s.name == "lm_head.weight"):
            continue
        if s.name not in expected:
            raise K2Error(f"tensor {s.name} is in the checkpoint but not in the model config.json describes")
        if s.shape != expected[s.name]:
            raise K2Error(f"tensor {s.name} has shape {list(s.shape)} but config.json implies {list(expected[s.name])}")
        seen.add(s.name)
        stacked, expert = model.locate(s.name)
        if expert is not None:
            stacked += ".weight"
            if stacked not in stacks:
                stacks[stacked] = {}
                jobs.append((stacked, stacks[stacked], (args.routed_experts, *s.shape), "whole"))
            stacks[stacked][expert] = s
        elif parts := arch.split_tensor(s.name, args):
            jobs.extend((name, (s,), shape or s.shape, part) for name, shape, part in parts)
        else:
            jobs.append((s.name, (s,), s.shape, "whole"))
    missing = [n for n in expected if n not in seen]
    if missing:
        raise K2Error(f"the checkpoint lacks {len(missing)} tensor(s) that config.json implies, first {missing[0]}")

    name_map = arch.tensor_name_map(args)
    planned = [OutputTensor(name, values.shape, Q.F32, (), values=values)
               for name, values in arch.extra_tensors(args).items()]
    for hf_name, parts, shape, part in jobs:
        parts = tuple(parts[e] for e in sorted(parts)) if isinstance(parts, dict) else parts
        kind, gguf_name = arch.gguf_tensor(name_map, hf_name)
        qtype, int4_copy, note = _choose_type(arch, kind, shape, parts, part, config)
        planned.append(OutputTensor(gguf_name, shape, qtype, parts, part, int4_copy, note))
    return planned


# ---------------------------------------------------------------------------------------------------------------
# producing a tensor's bytes, row block by row block


def _encode_rows(tensor: OutputTensor, source: Source, reader: MappedShards, r0, r1):
    """Rows [r0, r1) of one source in the tensor's encoding: (uint8 bytes, INT4 scale report or None)."""
    report = None
    if tensor.int4_copy:
        packed_info, scale_info = source.parts[:2]
        packed, scale = reader.tensor(packed_info)[r0:r1], reader.tensor(scale_info)[r0:r1]
        data, report = blocks.int4_to_q4_0(packed, scale, source.shape[1])
        row_bytes = scale_info.nbytes // scale_info.shape[0]
        reader.release(scale_info, r0 * row_bytes, r1 * row_bytes)
    elif tensor.qtype == Q.BF16 and source.kind == "plain" and source.parts[0].dtype == "BF16":
        stored = reader.tensor(source.parts[0])
        data = (stored if r0 is None else stored[r0:r1]).view(torch.uint8).numpy().copy()  # the bytes as they are
    else:
        rows = read_rows(source, reader, r0, r1)
        data = blocks.encode(rows.reshape(-1, tensor.shape[-1]).numpy(), tensor.qtype)
    release_rows(source, reader, r0, r1)
    return data, report


def _encode_part(tensor: OutputTensor, reader: MappedShards, arch, args):
    """A part the family's GGUF mapping cuts out of (or reorders in) one whole source tensor."""
    source = tensor.sources[0]
    part = arch.encode_part(tensor.part, read_rows(source, reader, None, None), tensor.shape, args)
    release_rows(source, reader, None, None)
    return blocks.encode(part.contiguous().view(-1, tensor.shape[-1]).numpy(), tensor.qtype), None


def _encode_values(tensor: OutputTensor):
    return blocks.encode(tensor.values.reshape(-1, tensor.shape[-1]), tensor.qtype), None


def _tasks(tensor: OutputTensor, reader: MappedShards, arch, args):
    if tensor.values is not None:
        yield partial(_encode_values, tensor)
        return
    if tensor.part != "whole":
        yield partial(_encode_part, tensor, reader, arch, args)
        return
    for source in tensor.sources:
        for r0, r1 in row_blocks(source.shape):
            yield partial(_encode_rows, tensor, source, reader, r0, r1)


def _in_order(pool: ThreadPoolExecutor, tasks, window: int):
    """Results of `tasks` run by `pool`, in order, with at most `window` of them computed ahead."""
    pending = deque()
    for task in tasks:
        pending.append(pool.submit(task))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


class _StreamedTensor:
    """What GGUFWriter.write_tensor_data reads of a tensor (`nbytes`, `tofile`), produced one row block at a time."""

    def __init__(self, nbytes: int, chunks, on_chunk):
        self.nbytes, self._chunks, self._on_chunk = nbytes, chunks, on_chunk

    def tofile(self, fp):
        written = 0
        for data, report in self._chunks:
            fp.write(memoryview(data).cast("B"))
            written += data.nbytes
            self._on_chunk(data.nbytes, report)
        if written != self.nbytes:
            raise RuntimeError(f"wrote {written} bytes of a tensor planned as {self.nbytes}")


class _WrittenTensor:
    """A tensor an interrupted run already wrote at this very place of the file: skipped over, not rewritten."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes

    def tofile(self, fp):
        fp.seek(self.nbytes, os.SEEK_CUR)


# ---------------------------------------------------------------------------------------------------------------
# the run


def _model_name(folder: Path) -> str:
    # A Hugging Face cache snapshot is .../models--org--name/snapshots/<hash>: the repo names the model, not the hash.
    if folder.parent.name == "snapshots":
        return folder.parent.parent.name.split("--")[-1]
    return folder.resolve().name


def _file_type(tensors: list[OutputTensor]):
    """The type most bytes of the weight matrices are in (llama.cpp shows it as the file's type)."""
    weights = Counter()
    for t in tensors:
        if len(t.shape) > 1:
            weights[t.qtype] += t.nbytes
    return FILE_TYPES[weights.most_common(1)[0][0]]


def _existing_outputs(out: Path) -> list[Path]:
    """OUT, and files of an earlier split conversion to OUT (llama.cpp's `stem-0000i-of-0000N.gguf`)."""
    split = re.compile(rf"{re.escape(out.stem)}-\d{{5}}-of-\d{{5}}\.gguf")
    found = [out] if out.exists() else []
    if out.parent.is_dir():
        found += sorted(p for p in out.parent.iterdir() if split.fullmatch(p.name))
    return found


def _temporary_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.k2-convert.tmp"


def _fingerprint(folder: Path, config: ConvertConfig, tensors: list[OutputTensor]) -> dict:
    """What a resumed run must share with the interrupted one for its header to come out byte for byte the same."""
    inputs = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(folder.iterdir()) if p.is_file()}
    plan = json.dumps([[t.name, t.qtype.name, list(t.shape)] for t in tensors])
    return {"settings": asdict(config), "inputs": inputs, "plan_sha256": hashlib.sha256(plan.encode()).hexdigest(),
            "gguf": importlib.metadata.version("gguf")}


def convert_checkpoint(model_dir: str | Path, out: str | Path, config: ConvertConfig, force: bool = False,
                       resume: bool = False, workers: int | None = None, progress: bool = True) -> dict:
    """Write the GGUF file(s); returns what was written and how (files, bytes, types, INT4 scale report, notes
    with the tensors each applies to)."""
    out = Path(out)
    if out.is_dir():
        raise K2Error(f"{out} is a folder; OUT is the .gguf file to write")
    if resume and force:
        raise K2Error("--resume and --force exclude each other")
    stale = _existing_outputs(out)
    model_files = {p.resolve() for p in Path(model_dir).iterdir() if p.is_file()} if Path(model_dir).is_dir() else set()
    clash = next((p for p in stale if p.resolve() in model_files), None)
    if clash is not None:  # --force or not: overwriting what the conversion reads destroys the input
        raise K2Error(f"{clash} is a file of MODEL, which the conversion reads; write OUT elsewhere")
    if stale and not force:
        raise K2Error(f"{stale[0]} exists; --force overwrites it")
    interrupted = (_temporary_folder(out) / PROGRESS).exists()
    if interrupted and not (resume or force):
        raise K2Error(f"a conversion to {out} was interrupted; --resume continues it, --force starts over")
    if resume and not interrupted:
        raise K2Error(f"there is no interrupted conversion to {out} to resume")
    loaded = load(model_dir, weights=False, complete=True)
    ckpt, args, arch = loaded.checkpoint, loaded.args, loaded.gguf_arch
    arch.check_supported(ckpt.config, args)
    arch_name = gguf.MODEL_ARCH_NAMES[arch.arch(args)]
    reader = MappedShards()
    try:
        sources = collect_sources(ckpt, reader)
        tensors = plan_tensors(loaded, sources, config)
        vocab = read_vocab(ckpt.folder, args.vocab_size)
        total = sum(t.nbytes for t in tensors)
        # gguf-py splits when a file would pass the limit (and warns when asked to split what fits in one).
        split = config.split_max_bytes if config.split_max_bytes and total > config.split_max_bytes else 0
        writer = gguf.GGUFWriter(None, arch_name, split_max_size=split)
        writer.add_name(_model_name(ckpt.folder))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_file_type(_file_type(tensors))
        arch.add_hparams(writer, args)
        add_vocab(writer, ckpt.folder, vocab, arch.pre_tokenizer(ckpt.config, ckpt.folder))
        for t in tensors:
            writer.add_tensor_info(t.name, blocks.byte_shape(t.qtype, t.shape), np.dtype(np.uint8), t.nbytes,
                                   raw_dtype=t.qtype)
        files = writer.format_shard_names(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(out.parent).free
        if total > free:
            raise K2Error(f"not enough space in {out.parent} for the GGUF: {format_shortfall(total, free)}")
        started = time.perf_counter()
        with writing_to(out, "the tensors written so far are kept; free space, then --resume continues"):
            scale_report, resumed = _write(writer, tensors, out, files, reader, arch, args,
                                           workers or len(os.sched_getaffinity(0)), progress,
                                           _fingerprint(ckpt.folder, config, tensors), resume)
        seconds = time.perf_counter() - started
    finally:
        reader.close()
        ckpt.close()
    for path in stale:
        if path not in files:
            path.unlink()  # an earlier conversion's split files this one does not replace
    types = Counter(t.qtype.name for t in tensors)
    return {"output": [str(f) for f in files], "files": len(files), "bytes": sum(f.stat().st_size for f in files),
            "tensors": len(tensors), "resumed_tensors": resumed, "input_bytes": sum(s.nbytes for s in sources),
            "seconds": seconds,
            "types": dict(sorted(types.items())), "int4_copied_tensors": sum(t.int4_copy for t in tensors),
            "int4_groups": scale_report.groups, "inexact_scale_groups": scale_report.inexact,
            "max_int4_weight_error": scale_report.max_weight_error,
            "notes": _grouped_notes(tensors)}


def _grouped_notes(tensors: list[OutputTensor]) -> dict[str, list[str]]:
    """Each note once, with the tensors it applies to (a real model repeats one for every layer)."""
    notes: dict[str, list[str]] = {}
    for t in tensors:
        if t.note:
            notes.setdefault(t.note, []).append(t.name)
    return notes


def _write(writer: gguf.GGUFWriter, tensors: list[OutputTensor], out: Path, files: list[Path], reader: MappedShards,
           arch, args, workers: int, progress: bool, fingerprint: dict, resume: bool) -> tuple[blocks.ScaleReport, int]:
    """Write every file in the temporary folder, then rename them into place: (INT4 scale report, tensors resumed)."""
    tmp = _temporary_folder(out)
    done, report = 0, blocks.ScaleReport()
    if resume:
        state = read_json(tmp / PROGRESS)
        if state.get("fingerprint") != fingerprint:
            raise K2Error(f"the interrupted conversion to {out} was started from other inputs or with other settings; "
                          "use the same ones to --resume, or --force to start over")
        if not all((tmp / f.name).exists() for f in files):
            raise K2Error(f"the interrupted conversion's files in {tmp} are incomplete; --force starts over")
        done, report = state["done"], blocks.ScaleReport(**state["int4_report"])
        # Continue in place: gguf-py's writer only creates files, so it is handed the existing ones open for update;
        # it rewrites the same header over the old one and goes past the tensors already written.
        writer.path = tmp / out.name
        writer.fout = [open(tmp / f.name, "r+b") for f in files]
        writer.state = gguf.gguf_writer.WriterState.EMPTY
    else:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()

    def save_progress(n_done: int):
        # Tensor bytes first, then the record that they are there.
        writer.flush()
        for f in writer.fout:
            os.fsync(f.fileno())
        state = {"fingerprint": fingerprint, "done": n_done, "int4_report": asdict(report)}
        (tmp / f".{PROGRESS}.tmp").write_text(json.dumps(state))
        os.replace(tmp / f".{PROGRESS}.tmp", tmp / PROGRESS)

    bar = tqdm(total=sum(t.nbytes for t in tensors), initial=sum(t.nbytes for t in tensors[:done]), unit="B",
               unit_scale=True, desc="converting", disable=not progress, dynamic_ncols=True)

    def on_chunk(nbytes: int, chunk_report: blocks.ScaleReport | None):
        bar.update(nbytes)
        if chunk_report:
            report.add(chunk_report)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # parallel over row blocks, one core each
    try:
        writer.write_header_to_file(tmp / out.name)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        if not resume:
            save_progress(0)
        with ThreadPoolExecutor(workers, thread_name_prefix="k2-convert") as pool:
            for i, t in enumerate(tensors):
                if i < done:
                    writer.write_tensor_data(_WrittenTensor(t.nbytes))
                    continue
                bar.set_postfix_str(f"{i + 1}/{len(tensors)} tensors", refresh=False)
                chunks = _in_order(pool, _tasks(t, reader, arch, args), workers * WINDOW_PER_WORKER)
                writer.write_tensor_data(_StreamedTensor(t.nbytes, chunks, on_chunk))
                save_progress(i + 1)
        writer.close()
        for path in files:
            os.replace(tmp / path.name, path)
        shutil.rmtree(tmp)
    finally:
        writer.close()  # an interrupted run leaves its folder and progress for --resume
        bar.close()
        torch.set_num_threads(threads)
    return report, done
