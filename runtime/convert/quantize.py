"""`k2 quantize --int4`: a K2-layout checkpoint (BF16/FP16/FP32, FP8 blocks, or INT4) -> Kimi K2-Thinking's INT4 layout.

Streaming: each logical tensor is read row block by row block from memory-mapped input shards and written straight
into preallocated output shards, so what is resident is a row block per worker, not a shard or a model. Output
shards are planned up front (their contents follow from the input headers), written under temporary names and
renamed when complete; a manifest in the output folder lists finished shards, so `--resume` redoes only the rest.
GPTQ walks the model layer by layer instead (runtime/convert/calibrated.py) into the same planned shards, and saves
the calibration hidden states after each layer, so `--resume` also restarts it where it stopped.
"""
import ctypes
import hashlib
import os
import resource
import shutil
import statistics
import sys
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from quant import int4
from quant.methods import CALIBRATED_METHODS, METHODS, Int4Spec
from runtime.checkpoint import INDEX_FILE, Checkpoint
from runtime.convert.calibrated import CalibratedWalk, calibration_tokens
from runtime.convert.sources import Source, collect_sources, natural_key, read_rows, release_rows, row_blocks
from runtime.errors import K2Error
from runtime.eval import read_text
from runtime.files import copy_atomic, read_json, write_json_atomic, writing_to
from runtime.info import is_linear_weight
from runtime.loader import load
from runtime.models.family import hf_layer_of
from runtime.safetensors_io import TORCH_DTYPES, MappedShards, PlannedTensor, ShardWriter, shard_nbytes
from runtime.units import format_shortfall

MANIFEST = ".k2-quantize.json"
HIDDEN_STATE = ".k2-quantize-hidden-{:05d}.safetensors"  # calibration hidden states entering a layer (GPTQ)
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
COPY_BYTES = 64 << 20


@dataclass(frozen=True)
class Scope:
    components: frozenset[str]  # the family's component names whose linear weights become INT4
    ignore: tuple[str, ...]  # compressed-tensors' ignore list that selects the same modules among `Linear`s


# K2-Thinking's own ignore list is the `experts` one. `mlp.gate` (the router) needs no entry where loaders hold it
# as a plain parameter or an unquantized layer (transformers 5 and vLLM, DeepSeek-V3 and Qwen3-MoE alike).
SCOPES = {
    "experts": Scope(frozenset({"routed_experts"}),
                     ("lm_head", "re:.*self_attn.*", "re:.*shared_experts.*",
                      r"re:.*mlp\.(gate|up|gate_up|down)_proj.*")),
    "experts+shared": Scope(frozenset({"routed_experts", "shared_experts"}),
                            ("lm_head", "re:.*self_attn.*", r"re:.*mlp\.(gate|up|gate_up|down)_proj.*")),
    "all-linear": Scope(frozenset({"routed_experts", "shared_experts", "attention", "dense_mlp"}), ("lm_head",)),
}


@dataclass(frozen=True)
class QuantizeConfig:
    method: str = "rtn"
    grid: str = int4.DEFAULT_GRID
    group_size: int = int4.DEFAULT_GROUP_SIZE
    scope: str = "experts"
    max_shard_bytes: int = 5 * 10**9
    report: bool = False  # measure each quantized tensor's error (costs a dequantization per block)
    calib: str | None = None  # calibration text file (GPTQ)
    calib_tokens: int = 262144  # read at most this many tokens of it (the GPTQ paper's 128 sequences of 2048)
    act_order: bool | None = None  # GPTQ rounds columns by decreasing activation; None: GPTQ's default, on
    min_expert_tokens: int = 128  # a routed expert routed fewer calibration tokens falls back to mse

    def __post_init__(self):
        methods = {**METHODS, **CALIBRATED_METHODS}
        for value, allowed, what in ((self.method, methods, "--method"), (self.grid, int4.GRIDS, "--grid"),
                                     (self.scope, SCOPES, "--scope"),
                                     (self.group_size, int4.GROUP_SIZES, "--group-size")):
            if value not in allowed:
                raise K2Error(f"{what} must be one of {', '.join(map(str, allowed))}, not {value!r}")
        if self.max_shard_bytes <= 0:
            raise K2Error("--max-shard-size must be positive")
        if self.calibrated and self.calib is None:
            raise K2Error(f"--method {self.method} calibrates on text: give it with --calib FILE")
        if not self.calibrated and (self.calib is not None or self.act_order is not None):
            raise K2Error(f"--calib and --act-order/--no-act-order are for --method {', '.join(CALIBRATED_METHODS)}, "
                          f"not {self.method}")
        if self.calib_tokens <= 0 or self.min_expert_tokens <= 0:
            raise K2Error("--calib-tokens and --min-expert-tokens must be positive")

    @property
    def calibrated(self) -> bool:
        return self.method in CALIBRATED_METHODS

    @property
    def ordered(self) -> bool:
        """Whether a calibrated method runs in act order: by default, as llm-compressor's GPTQ does (its `actorder:
        static`, which keeps the stored groups as ours does). On the trained demo, with 198,144 calibration tokens, it
        took the held-out KL from 0.62x round-to-nearest's to 0.59x."""
        return self.calibrated and self.act_order is not False


@dataclass
class ShardPlan:
    file: str
    sources: list[Source] = field(default_factory=list)
    tensors: list[PlannedTensor] = field(default_factory=list)


@dataclass(frozen=True)
class Roles:
    """What becomes of each tensor of one model: INT4 (the linear weights of the scope's components, by the model
    family's taxonomy), F32 (what the model keeps in fp32, such as K2's routing bias), or BF16."""

    quantized: frozenset[str]
    fp32_suffixes: tuple[str, ...]

    @classmethod
    def of(cls, loaded, sources: list[Source], scope: Scope) -> "Roles":
        component_of = loaded.family.component_of
        quantized = frozenset(s.name for s in sources if len(s.shape) == 2 and is_linear_weight(s.name)
                              and s.name != "lm_head.weight" and component_of(s.name) in scope.components)
        return cls(quantized, loaded.model.fp32_tensors)

    def output_dtype(self, source: Source) -> str:
        if source.name.endswith(self.fp32_suffixes):
            return "F32"
        return "BF16" if source.dtype in FLOAT_DTYPES else source.dtype


def planned_outputs(source: Source, config: QuantizeConfig, roles: Roles) -> list[PlannedTensor]:
    if source.name not in roles.quantized:
        return [PlannedTensor(source.name, roles.output_dtype(source), source.shape)]
    prefix = source.name[: -len(".weight")]
    if source.shape[1] % config.group_size:
        # compressed-tensors (and so vLLM and SGLang) cannot read a partial last group.
        raise K2Error(f"{source.name} has {source.shape[1]} input features, not a multiple of --group-size "
                      f"{config.group_size}")
    shapes = int4.stored_shapes(*source.shape, config.group_size)
    return [PlannedTensor(f"{prefix}.{spec.suffix}", spec.dtype, shapes[spec.suffix]) for spec in int4.FORMAT]


def plan_shards(sources: list[Source], config: QuantizeConfig, roles: Roles) -> list[ShardPlan]:
    """Consecutive sources packed into shards of at most `max_shard_bytes` (a single larger tensor gets its own)."""
    plans, size = [ShardPlan("")], 0
    for source in sources:
        outputs = planned_outputs(source, config, roles)
        nbytes = sum(t.nbytes for t in outputs)
        if plans[-1].sources and size + nbytes > config.max_shard_bytes:
            plans.append(ShardPlan(""))
            size = 0
        plans[-1].sources.append(source)
        plans[-1].tensors.extend(outputs)
        size += nbytes
    for i, plan in enumerate(plans, 1):
        plan.file = f"model-{i:05d}-of-{len(plans):05d}.safetensors"
    return plans


# ---------------------------------------------------------------------------------------------------------------
# one logical tensor, row block by row block


class ErrorStats:
    def __init__(self):
        self.signal = self.noise = self.max_error = 0.0
        self.count = 0

    def add(self, w: torch.Tensor, dq: torch.Tensor):
        diff = dq - w
        self.signal += w.double().square().sum().item()
        self.noise += diff.double().square().sum().item()
        self.max_error = max(self.max_error, diff.abs().max().item() if diff.numel() else 0.0)
        self.count += w.numel()

    def as_dict(self, name: str) -> dict:
        sqnr = 10 * torch.log10(torch.tensor(self.signal / self.noise)).item() if self.noise > 0 else None
        return {"name": name, "sqnr_db": sqnr, "max_error": self.max_error,
                "mean_sq_error": self.noise / max(self.count, 1)}


def _write_int4(writer: ShardWriter, name: str, shape: tuple[int, int], q: torch.Tensor, scale: torch.Tensor,
                r0: int = 0):
    """Rows r0.. of weight `name` as quantized (q [rows, groups, group], scale [rows, groups]); its shape with row 0."""
    out_features, in_features = shape
    prefix = name[: -len(".weight")]
    words, groups = -(-in_features // int4.PER_WORD), scale.shape[1]
    if r0 == 0:
        writer.write(f"{prefix}.weight_shape", torch.tensor([out_features, in_features], dtype=torch.int64))
    writer.write(f"{prefix}.weight_packed", int4.pack(int4.ungroup(q, in_features)), r0 * words * 4)
    writer.write(f"{prefix}.weight_scale", scale, r0 * groups * int4.SCALE_DTYPE.itemsize)


def _quantize_source(source: Source, writer: ShardWriter, reader: MappedShards, method, spec: Int4Spec,
                     measure: bool) -> dict | None:
    in_features = source.shape[1]
    stats = ErrorStats() if measure else None
    for r0, r1 in row_blocks(source.shape):
        w = read_rows(source, reader, r0, r1)
        q, scale = method.quantize(source.name, w, spec)
        _write_int4(writer, source.name, source.shape, q, scale, r0)
        if stats:
            stats.add(w, int4.ungroup(int4.dequantize_groups(q, scale), in_features))
        release_rows(source, reader, r0, r1)
    return stats.as_dict(source.name) if stats else None


def _copy_source(source: Source, writer: ShardWriter, reader: MappedShards, dtype: str):
    info = source.parts[0]
    if source.kind == "plain" and info.dtype == dtype:  # bytes as they are, no conversion
        for start in range(0, info.nbytes, COPY_BYTES):
            end = min(start + COPY_BYTES, info.nbytes)
            writer.write(source.name, reader.raw(info, start, end), start)
            reader.release(info, start, end)
        return
    target = TORCH_DTYPES[dtype]
    row_bytes = target.itemsize * (source.shape[1] if len(source.shape) == 2 else 0)
    for r0, r1 in row_blocks(source.shape):
        writer.write(source.name, read_rows(source, reader, r0, r1).to(target), (r0 or 0) * row_bytes)
        release_rows(source, reader, r0, r1)


# ---------------------------------------------------------------------------------------------------------------
# the run


def fingerprint(ckpt: Checkpoint, config, text: str | None) -> dict:
    """What a resumed run must share with the interrupted one: its settings (a dataclass), the exact input files, and
    the text it calibrates (GPTQ) or trains (qat) on."""
    shards = sorted({info.shard for info in ckpt.tensors.values()})
    fingerprint = {"settings": asdict(config),
                   "config_sha256": hashlib.sha256((ckpt.folder / "config.json").read_bytes()).hexdigest(),
                   "input": {s.name: [s.stat().st_size, s.stat().st_mtime_ns] for s in shards}}
    if text is not None:
        fingerprint["text_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    return fingerprint


def make_output_folder(out: Path, model_dir: Path):
    """OUT created where missing, after checking it can be written to without touching MODEL."""
    if out.exists() and not out.is_dir():
        raise K2Error(f"{out} is a file; OUT must be a folder")
    if out.exists() and out.resolve() == model_dir.resolve():
        raise K2Error("OUT must differ from MODEL")
    out.mkdir(parents=True, exist_ok=True)


def model_files(folder: Path) -> list[Path]:
    """A model folder's files besides its weights, index and config.json: tokenizer, chat template, generation
    config, model card... (what an output checkpoint carries over)."""
    return [item for item in sorted(folder.iterdir())
            if item.is_file() and not item.name.startswith(".") and item.suffix != ".safetensors"
            and item.name not in (INDEX_FILE, "config.json")]


def _prepare_output(out: Path, model_dir: Path, fingerprint: dict, resume: bool, force: bool) -> dict:
    """The manifest to continue from: a fresh one, or the interrupted run's when resuming."""
    make_output_folder(out, model_dir)
    manifest_path = out / MANIFEST
    if resume and manifest_path.exists():
        manifest = read_json(manifest_path)
        if manifest.get("fingerprint") != fingerprint:
            raise K2Error(f"{out} was started from another input or with other settings; "
                          "use the same ones to --resume, or --force to start over")
        for tmp in out.glob(".*.tmp"):
            tmp.unlink()
        return manifest
    existing = sorted(p.name for p in out.iterdir())
    if existing and resume:
        raise K2Error(f"{out} has no unfinished quantization to resume (no {MANIFEST}); --force overwrites it")
    if existing and not force:
        raise K2Error(f"{out} is not empty; --resume continues an interrupted run, --force overwrites")
    for stale in [*out.glob("*.safetensors"), *out.glob(".*.tmp"), *_hidden_states(out), out / INDEX_FILE,
                  manifest_path]:
        stale.unlink(missing_ok=True)
    manifest = {"version": 1, "fingerprint": fingerprint, "shards": {}}
    write_json_atomic(manifest_path, manifest)
    return manifest


def _finalize(ckpt: Checkpoint, out: Path, plans: list[ShardPlan], config: QuantizeConfig, observer: str):
    weight_map = {t.name: plan.file for plan in plans for t in plan.tensors}
    total = sum(t.nbytes for plan in plans for t in plan.tensors)
    write_json_atomic(out / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    for item in model_files(ckpt.folder):
        copy_atomic(item, out / item.name)
    model_config = dict(ckpt.config)
    model_config["quantization_config"] = int4.compressed_tensors_config(
        config.group_size, observer, list(SCOPES[config.scope].ignore),
        actorder="weight" if config.ordered else None)
    for key in [k for k in ("torch_dtype", "dtype") if k in model_config] or ["torch_dtype"]:
        model_config[key] = "bfloat16"
    write_json_atomic(out / "config.json", model_config, indent=2)


def summarize(tensor_stats: list[dict], worst: int = 5) -> dict:
    finite = [s for s in tensor_stats if s["sqnr_db"] is not None]
    return {"tensors": len(tensor_stats), "lossless": len(tensor_stats) - len(finite),
            "median_sqnr_db": statistics.median(s["sqnr_db"] for s in finite) if finite else None,
            "worst": sorted(finite, key=lambda s: s["sqnr_db"])[:worst]}


def quantize_checkpoint(model_dir: str | Path, out: str | Path, config: QuantizeConfig, resume: bool = False,
                        force: bool = False, workers: int | None = None, progress: bool = True) -> dict:
    """Write the INT4 checkpoint; returns what was done (shards, bytes, time, peak memory, GPTQ's calibration, and
    per-tensor errors with `config.report`)."""
    loaded = load(model_dir, weights=False, complete=True)  # an architecture we know, or one clear error
    ckpt = loaded.checkpoint
    out = Path(out)
    reader = MappedShards()
    workers = workers or len(os.sched_getaffinity(0))
    calibration = None
    try:
        sources = collect_sources(ckpt, reader)
        roles = Roles.of(loaded, sources, SCOPES[config.scope])
        if not roles.quantized:  # a dense model under the default scope: an INT4 config over BF16 weights
            raise K2Error(f"--scope {config.scope} quantizes no weight of {ckpt.folder.name}: it has no "
                          f"{' or '.join(sorted(c.replace('_', ' ') for c in SCOPES[config.scope].components))}; "
                          "--scope all-linear quantizes every linear layer but lm_head")
        plans = plan_shards(sources, config, roles)
        calib_text = read_text(Path(config.calib)) if config.calibrated else None
        tokens = calibration_tokens(loaded, calib_text, config.calib_tokens) if config.calibrated else None
        manifest = _prepare_output(out, ckpt.folder, fingerprint(ckpt, config, calib_text), resume, force)
        done = {p.file for p in plans if p.file in manifest["shards"] and (out / p.file).exists()
                and (out / p.file).stat().st_size == manifest["shards"][p.file]["bytes"]}
        todo = [p for p in plans if p.file not in done]
        need, free = sum(shard_nbytes(p.tensors) for p in todo), shutil.disk_usage(out).free
        if need > free:
            raise K2Error(f"not enough space in {out} for the remaining shards: {format_shortfall(need, free)}")
        spec = Int4Spec.of(config.group_size, config.grid)
        started = time.perf_counter()
        with writing_to(out, "the finished shards are kept; free space, then --resume continues"):
            if config.calibrated:
                method = CALIBRATED_METHODS[config.method](config.ordered)
                sink = CalibratedOutput(out, manifest, plans, done, reader, roles, config.report,
                                        loaded.model.args.num_hidden_layers)
                calibration = sink.run(CalibratedWalk(loaded, reader, sources, roles, method, spec,
                                                      config.min_expert_tokens, sink, workers), tokens, progress)
            else:
                method = METHODS[config.method]()
                _run(todo, out, manifest, reader, method, spec, config, roles, workers, progress,
                     total_bytes=sum(s.nbytes for s in sources),
                     done_bytes=sum(s.nbytes for p in plans if p.file in done for s in p.sources))
            _finalize(ckpt, out, plans, config, method.observer)
        seconds = time.perf_counter() - started
    finally:
        reader.close()
        ckpt.close()
    tensor_stats = [s for p in plans for s in manifest["shards"][p.file]["stats"]]
    result = {"output": str(out), "shards": len(plans), "resumed_shards": len(done),
              "input_bytes": sum(s.nbytes for s in sources), "seconds": seconds,
              "output_bytes": sum(manifest["shards"][p.file]["bytes"] for p in plans),
              "quantized_tensors": len(roles.quantized),
              "peak_rss_bytes": _peak_rss_bytes()}
    if calibration is not None:
        result["calibration"] = calibration | {"sequences": tokens.shape[0], "tokens": tokens.numel()}
    if config.report:
        result["report"] = {"settings": asdict(config), "summary": summarize(tensor_stats), "tensors": tensor_stats}
    (out / MANIFEST).unlink()
    for state in _hidden_states(out):
        state.unlink()
    return result


def _peak_rss_bytes() -> int:
    """This process's peak resident memory so far: getrusage counts KiB on Linux, bytes on macOS."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _commit(out: Path, manifest: dict, writer: ShardWriter, plan: ShardPlan, stats: list[dict]):
    """fsync, rename, then the manifest entry: a shard the manifest lists is complete on disk."""
    writer.finish()
    stats = sorted(stats, key=lambda s: natural_key(s["name"]))
    manifest["shards"][plan.file] = {"bytes": writer.nbytes, "stats": stats}
    write_json_atomic(out / MANIFEST, manifest)


def _hidden_states(out: Path) -> list[Path]:
    return sorted(out.glob(HIDDEN_STATE.replace("{:05d}", "*")))


class CalibratedOutput:
    """Where the calibrated walk's tensors go: each into its planned shard at once (unless an interrupted run finished
    that shard). After each layer the hidden states entering the next are saved, then every complete shard is renamed
    into place and listed, then the states no unfinished shard needs are deleted: whatever shards a run finished, the
    states entering the first layer with an unfinished tensor are on disk for `--resume`."""

    def __init__(self, out: Path, manifest: dict, plans: list[ShardPlan], done: set[str], reader: MappedShards,
                 roles: Roles, measure: bool, n_layers: int):
        self.out, self.manifest, self.reader, self.roles, self.measure = out, manifest, reader, roles, measure
        self.n_layers = n_layers
        self.plans = {p.file: p for p in plans}
        self.shard_of = {s.name: p.file for p in plans for s in p.sources}
        self.left = {p.file: {s.name for s in p.sources} for p in plans if p.file not in done}
        self.writers: dict[str, ShardWriter] = {}
        self.stats: dict[str, list[dict]] = {file: [] for file in self.left}
        self._lock = threading.Lock()

    def run(self, walk: CalibratedWalk, tokens: torch.Tensor, progress: bool) -> dict:
        """Walk from the first layer an unfinished shard needs (from its saved hidden states); the walk's summary."""
        first = self._first_layer_needed()
        saved = [layer for layer in range(1, first + 1) if (self.out / HIDDEN_STATE.format(layer)).exists()]
        start = first if first == self.n_layers else saved[-1] if saved else 0
        hidden = load_file(self.out / HIDDEN_STATE.format(start))["hidden"] if 0 < start < self.n_layers else None
        try:
            summary = walk.run(tokens, start, hidden, progress)
            self._commit_ready()
        except BaseException:
            for writer in self.writers.values():
                writer.abort()
            raise
        assert not self.left, f"shards left unwritten: {sorted(self.left)}"
        return summary

    def pending(self, name: str) -> bool:
        return self.shard_of[name] in self.left

    def _writer(self, name: str) -> ShardWriter:
        file = self.shard_of[name]
        with self._lock:
            if file not in self.writers:
                self.writers[file] = ShardWriter(self.out / file, self.plans[file].tensors)
            return self.writers[file]

    def _written(self, name: str, stats: dict | None = None):
        with self._lock:
            file = self.shard_of[name]
            self.left[file].discard(name)
            if stats is not None:
                self.stats[file].append(stats)

    def copy(self, source: Source):
        _copy_source(source, self._writer(source.name), self.reader, self.roles.output_dtype(source))
        self._written(source.name)

    def quantized(self, name: str, w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, info: dict):
        if not self.pending(name):
            return
        _write_int4(self._writer(name), name, tuple(w.shape), q, scale)
        stats = None
        if self.measure:
            stats = ErrorStats()
            stats.add(w, int4.ungroup(int4.dequantize_groups(q, scale), w.shape[1]))
            stats = stats.as_dict(name) | info
        self._written(name, stats)

    def layer_done(self, i: int, hidden: torch.Tensor):
        if i + 1 in self._restart_layers():
            path = self.out / HIDDEN_STATE.format(i + 1)
            tmp = path.with_name(f".{path.name}.tmp")
            save_file({"hidden": hidden.contiguous()}, tmp)
            os.replace(tmp, path)
        self._commit_ready()
        restarts = self._restart_layers()
        for state in _hidden_states(self.out):
            if int(state.name.split("-")[-1].split(".")[0]) not in restarts:
                state.unlink()

    def _restart_layers(self) -> set[int]:
        """The first layer of each unfinished shard: the layers a resumed walk can start from, as it rewrites the
        first unfinished shard whole. Only the states entering these are kept (finishing shards only shrinks the set),
        not every layer's: one output shard would otherwise keep them all, 10 GB on disk for
        SmolLM2-135M on 147,968 calibration tokens."""
        restarts = set()
        for file in self.left:
            layers = [layer for s in self.plans[file].sources
                      if (layer := hf_layer_of(s.name)) is not None and layer < self.n_layers]
            if layers:
                restarts.add(min(layers))
        return restarts

    def _first_layer_needed(self) -> int:
        """The first layer with a tensor in an unfinished shard: a resumed walk rewrites that shard whole."""
        return min(self._restart_layers(), default=self.n_layers)

    def _commit_ready(self):
        for file in [f for f, names in self.left.items() if not names]:
            _commit(self.out, self.manifest, self.writers.pop(file), self.plans[file], self.stats.pop(file))
            del self.left[file]


def _keep_freed_memory():
    """Ask glibc to reuse freed row-block buffers instead of returning them to the kernel after every block.

    Each block allocates a few 4 MB temporaries; above glibc's mmap threshold every one of them is fresh pages that
    the kernel must fault in and zero, which costs a quarter of the quantizer's time. Resident memory grows only by
    the blocks in flight. A no-op where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 256 << 20)
    libc.mallopt(m_trim_threshold, 1 << 30)


def _run(plans: list[ShardPlan], out: Path, manifest: dict, reader: MappedShards, method, spec: Int4Spec,
         config: QuantizeConfig, roles: Roles, workers: int, progress: bool, total_bytes: int, done_bytes: int):
    n_tensors = sum(len(p.sources) for p in plans)
    _keep_freed_memory()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # parallel over tensors, one core each: no oversubscription, no per-op sync
    bar = tqdm(total=total_bytes, initial=done_bytes, unit="B", unit_scale=True, desc="quantizing",
               disable=not progress, dynamic_ncols=True)

    committing = None
    try:
        # The committer flushes shard i to disk while the workers compute shard i + 1.
        with ThreadPoolExecutor(workers, thread_name_prefix="k2-quantize") as pool, \
                ThreadPoolExecutor(1, thread_name_prefix="k2-commit") as committer:
            finished = 0
            for plan in plans:
                writer = ShardWriter(out / plan.file, plan.tensors)

                def convert(source: Source, writer=writer):
                    if source.name in roles.quantized:
                        return _quantize_source(source, writer, reader, method, spec, config.report)
                    _copy_source(source, writer, reader, roles.output_dtype(source))

                futures = {pool.submit(convert, s): s for s in plan.sources}
                stats = []
                try:
                    pending = set(futures)
                    while pending:
                        completed, pending = wait(pending, return_when=FIRST_EXCEPTION)
                        for future in completed:
                            if (result := future.result()) is not None:
                                stats.append(result)
                            finished += 1
                            bar.update(futures[future].nbytes)
                            bar.set_postfix_str(f"{finished}/{n_tensors} tensors", refresh=False)
                    if committing is not None:
                        committing.result()
                except BaseException:
                    for future in futures:
                        future.cancel()
                    wait(futures)
                    writer.abort()
                    raise
                committing = committer.submit(_commit, out, manifest, writer, plan, stats)
            if committing is not None:
                committing.result()
    finally:
        bar.close()
        torch.set_num_threads(threads)
