"""`k2 bench`: prefill and decode speed, time to first token, memory, and decode against the bandwidth roofline.

Every number comes from this run: prompts are random ids with end-of-sequence suppressed so every rep decodes the
full length; decode tok/s excludes the first token (it comes out of the prefill); the bandwidth is a copy measured
on the device, and weight bytes per token count what a decode step reads: every non-expert weight, one embedding
row per token, and the routed experts the router actually picked (distinct per step, counted on a probe run).
With a peer engine (transformers, or llama.cpp on a GGUF file: runtime/peers.py), reps of both alternate so
background load hits both rows alike.
"""
import math
import resource
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from runtime import numa, peers
from runtime.check import cpu_kernel_modules
from runtime.engine import Engine
from runtime.errors import K2Error
from runtime.kernels import cpu
from runtime.sampling import NON_FINITE, Sampler, non_finite_error

COPY_BYTES = {"cuda": 1 << 30, "cpu": 256 << 20}  # past every cache level, small enough for any test machine
PROBE_STEPS = 16  # decode steps whose routing is recorded to count the experts a step reads


@dataclass
class BenchSettings:
    prompt_len: int = 512
    gen: int = 128
    batch: int = 1
    reps: int = 5
    warmup: int = 1
    seed: int = 0


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, reps: int = 5) -> float:
    """Bytes per second that `dst.copy_(src)` moves on `device` (read + write counted), best of `reps`."""
    nbytes = COPY_BYTES.get(device.type, COPY_BYTES["cpu"])
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = math.inf
    for _ in range(reps + 1):  # the first copy faults the destination's pages in
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def _tensor_bytes(module) -> dict[int, int]:
    """Bytes of the module's weights (its state dict: no derived buffers such as rope frequencies), by storage."""
    return {t.data_ptr(): t.numel() * t.element_size() for t in module.state_dict(keep_vars=True).values()
            if not t.is_meta}


def weight_bytes_per_step(model, batch: int, experts_per_step: dict[int, float]) -> int:
    """Weight bytes one decode step reads: all but the embedding and the routed experts, `batch` embedding rows,
    and per MoE layer the distinct experts a step picked (on average) times one expert's bytes. A head tied to the
    embedding reads the whole matrix, rows included."""
    every = _tensor_bytes(model)
    embed = model.model.embed_tokens.weight
    total, skip = 0, set()
    if model.lm_head.weight is not embed:
        total, skip = batch * embed.shape[1] * embed.element_size(), {embed.data_ptr()}
    for i, block in model.moe_blocks().items():
        experts = _tensor_bytes(block.experts)
        skip |= experts.keys()
        total += experts_per_step.get(i, 0.0) * sum(experts.values()) / block.experts.n_experts
    return int(total + sum(n for ptr, n in every.items() if ptr not in skip))


def distinct_experts_per_step(model, prompts: torch.Tensor, max_len: int, sampler: Sampler, steps: int) -> dict[int, float]:
    """Per MoE layer: the distinct routed experts a decode step of this batch picks, averaged over `steps` steps."""
    seen: dict[int, list[int]] = {}
    hooks = []
    for i, block in model.moe_blocks().items():
        def record(module, args, output, i=i):
            seen.setdefault(i, []).append(torch.unique(output[1]).numel())
        hooks.append(block.gate.register_forward_hook(record))
    try:
        run = EngineRun(Engine(model, prompts.shape[0], max_len), sampler)
        run.prefill(prompts)
        seen.clear()  # the prefill's routing is not a decode step's
        run.decode(steps)
    finally:
        for hook in hooks:
            hook.remove()
    return {i: statistics.fmean(counts) for i, counts in seen.items()}


class EngineRun:
    """The engine every command generates with, as a bench row: each prompt row prefilled into its slot, then
    decode steps over all of them, with one sampler for the batch."""

    def __init__(self, engine: Engine, sampler: Sampler):
        self.engine, self.sampler, self.kind = engine, sampler, engine.decoder

    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.engine.start(row, prompt, self.sampler) for row, prompt in enumerate(tokens.tolist())])

    def decode(self, n: int) -> torch.Tensor:
        return torch.stack([self.engine.step() for _ in range(n)], dim=1)


def check_finite(ids: torch.Tensor):
    """ids [B, T], the new tokens of every row: raise at the first one drawn from non-finite logits. Reads the ids,
    so call it after the timing."""
    bad = (ids == NON_FINITE).any(dim=0).nonzero()
    if len(bad):
        raise non_finite_error(int(bad[0]) + 1)


def _time_rep(engine, prompts: torch.Tensor, gen: int, device: torch.device) -> dict[str, float]:
    _sync(device)
    start = time.perf_counter()
    first_ids = engine.prefill(prompts)
    _sync(device)
    first = time.perf_counter()
    rest = engine.decode(gen - 1)
    _sync(device)
    end = time.perf_counter()
    check_finite(torch.cat([first_ids[:, None], rest], dim=1))
    batch, prompt_len = prompts.shape
    return {"prefill_tok_s": batch * prompt_len / (first - start), "ttft_s": first - start,
            "decode_tok_s": batch * (gen - 1) / (end - first)}


def _summary(reps: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    def stats(values: list[float]) -> dict[str, float]:
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "median": statistics.median(values), "min": min(values), "max": max(values)}
    return {key: stats([r[key] for r in reps]) for key in reps[0]}


def time_reps(engines, prompts: torch.Tensor, settings: BenchSettings, device: torch.device) -> dict[str, dict]:
    """Per engine kind: mean and stddev of prefill tok/s, decode tok/s and time to first token over the reps."""
    rows = {engine.kind: [] for engine in engines}
    for rep in range(settings.warmup + settings.reps):
        for engine in engines:  # alternate, so load from other processes falls on every row alike
            result = _time_rep(engine, prompts, settings.gen, device)
            if rep >= settings.warmup:
                rows[engine.kind].append(result)
    return {kind: _summary(reps) for kind, reps in rows.items()}


def random_prompts(vocab_size: int, suppressed: list[int], settings: BenchSettings) -> torch.Tensor:
    """[batch, prompt_len] ids drawn from the ids not suppressed (no end-of-sequence in the prompt either)."""
    allowed = torch.tensor(sorted(set(range(vocab_size)) - set(suppressed)))
    generator = torch.Generator().manual_seed(settings.seed)
    return allowed[torch.randint(0, allowed.numel(), (settings.batch, settings.prompt_len), generator=generator)]


def _peak_host_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_bench(loaded, settings: BenchSettings, compare: str | None = None, eager: bool = False) -> dict:
    """Bench the model of `loaded` (runtime.loader) through the engine every command uses; with `compare` (a name in
    runtime.peers.PEERS) also that engine on the same checkpoint, in the same run."""
    s = settings
    if s.gen < 2:
        raise K2Error("--gen must be at least 2: decode speed excludes the first token")
    peer = peers.peer(compare) if compare else None
    model, device = loaded.model, loaded.device
    vocab = model.args.vocab_size
    suppressed = [i for i in loaded.eos_ids if 0 <= i < vocab]
    sampler = Sampler.greedy(vocab, device, suppress_ids=suppressed)
    prompts = random_prompts(vocab, suppressed, s)
    max_len = s.prompt_len + s.gen

    with torch.inference_mode():
        experts = distinct_experts_per_step(model, prompts, max_len, sampler, min(PROBE_STEPS, s.gen - 1))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        engines = [EngineRun(loaded.engine(s.batch, max_len, eager=eager), sampler)]
        if peer:
            engines.append(peer(loaded, device, sampler, s.batch, max_len))
        rows = time_reps(engines, prompts, s, device)
        peak_device = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _peak_host_bytes()

    bandwidth = copy_bandwidth(device)
    per_step = weight_bytes_per_step(model, s.batch, experts)
    ours = rows[engines[0].kind]
    roofline = bandwidth / per_step * s.batch
    result = {
        "model": str(loaded.folder), "device": str(device), "dtype": str(model.model.embed_tokens.weight.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(), "cpus": sorted(numa.allowed_cpus()),
        "numa_nodes": [n.as_dict() for n in numa.nodes()], "decoder": engines[0].kind,
        "cpu_kernel": cpu.describe() if cpu_kernel_modules(model) else None, **asdict(s),
        **ours,
        "peak_device_bytes": peak_device, "peak_host_bytes": _peak_host_bytes(),
        "weight_bytes_per_step": per_step, "weight_bytes_per_token": per_step // s.batch,
        "experts_read_per_step": sum(experts.values()),
        "copy_bandwidth_bytes_s": bandwidth, "roofline_decode_tok_s": roofline,
        "bandwidth_fraction": ours["decode_tok_s"]["mean"] / roofline,
    }
    if peer:
        theirs = rows[peer.kind]
        result["compare"] = {"engine": peer.kind, peer.kind: theirs,
                             "decode_ratio": ours["decode_tok_s"]["mean"] / theirs["decode_tok_s"]["mean"],
                             "prefill_ratio": ours["prefill_tok_s"]["mean"] / theirs["prefill_tok_s"]["mean"]}
    return result

