"""Where every layer and expert goes, decided from config.json and safetensors headers before anything is loaded.

A plan is plain data (JSON): pipeline stages as contiguous layer ranges over hosts, and per layer the device of its
attention, dense MLP, router and shared experts and of each routed expert. The runtime applies it to a built model
from outside; `k2 plan` prints it with a decode speed predicted from a bandwidth model:
time per token = sum over devices of (bytes the device reads per token / its bandwidth).
"""
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from runtime.checkpoint import Checkpoint
from runtime.errors import K2Error
from runtime.info import weight_bytes
from runtime.models.family import hf_layer_of
from runtime.units import format_bytes, parse_size

GiB = 1 << 30
GB = 10**9

# Achievable (not datasheet) bandwidths in bytes/s, used when the user gives none; printed with every plan.
CPU_BANDWIDTH = 200 * GB  # a workstation or server with 8+ DDR5 channels
MPS_BANDWIDTH = 600 * GB  # M3 Ultra (819 GB/s peak)
DISK_BANDWIDTH = 5 * GB  # PCIe 4 NVMe, for experts left memory-mapped on disk
PCIE_BANDWIDTH = 25 * GB  # host to GPU copies of streamed experts
NETWORK_BANDWIDTH = 10 * GB  # between pipeline hosts (100 GbE, Thunderbolt 5)
NETWORK_LATENCY_S = 50e-6
GPU_RESERVE = 1 * GiB  # CUDA context, workspaces, activations of a prefill chunk
CPU_RESERVE = 4 * GiB  # the OS and the process
MPS_WIRED_FRACTION = 0.75  # macOS lets the GPU wire about 75% of unified memory by default


def gpu_bandwidth_for(capacity: int) -> float:
    """A guess from the card's memory size when --gpu-bw is not given (stated in the plan's assumptions)."""
    for min_gb, bandwidth in ((120, 4000 * GB), (64, 2600 * GB), (40, 1500 * GB)):
        if capacity >= min_gb * GB:
            return bandwidth
    return 900 * GB  # 24-32 GB consumer cards (RTX 4090: ~1 TB/s peak)


def parse_gpus(specs: list[str]) -> list[int]:
    """--gpu 80G --gpu 80G or --gpu 8x141G -> capacities in bytes."""
    sizes = []
    for spec in specs:
        count, _, size = spec.rpartition("x")
        if count and not count.isdigit():
            raise K2Error(f"cannot read --gpu {spec!r} (examples: 80G, 8x141G)")
        sizes += [parse_size(size, "--gpu")] * int(count or 1)
    return sizes


# --- costs ------------------------------------------------------------------------------------------------------

@dataclass
class LayerCost:
    index: int
    dense_bytes: int  # attention, norms, router, dense MLP, shared experts: all read every token
    expert_bytes: int  # one routed expert with its scales
    n_experts: int
    top_k: int
    kv_bytes_per_token: int
    component_bytes: dict = field(default_factory=dict)


@dataclass
class ModelCost:
    name: str
    layers: list[LayerCost]
    embed_bytes: int
    head_bytes: int  # final norm + lm_head, read every token; a tied head's lm_head is the embedding matrix
    four_bit_experts: bool = False
    tied_head: bool = False  # lm_head is the embedding matrix: one tensor where one stage holds both

    @property
    def total_bytes(self) -> int:
        embed = 0 if self.tied_head else self.embed_bytes  # a tied embedding is counted in head_bytes
        return embed + self.head_bytes + sum(
            layer.dense_bytes + layer.expert_bytes * layer.n_experts for layer in self.layers)

    @property
    def has_experts(self) -> bool:
        return any(layer.n_experts for layer in self.layers)


def model_cost(loaded, config_only: bool = False) -> ModelCost:
    """Bytes per layer and component of a model opened without weights (runtime.loader.load(..., weights=False)):
    from the safetensors headers, or (`config_only`, or no weights) config.json."""
    ckpt, model, component_of = loaded.checkpoint, loaded.model, loaded.family.component_of
    if config_only:
        ckpt = Checkpoint(ckpt.folder, ckpt.config, {})
    args = model.args
    sizes, _ = weight_bytes(ckpt, model)
    kv_per_token = args.cache_width * 2  # a BF16 cache
    layers = [LayerCost(i, 0, 0, 0, 0, kv_per_token) for i in range(args.num_hidden_layers)]
    expert_sizes: dict[tuple[int, int], int] = {}
    embed = head = 0
    for name, nbytes in sizes.items():
        component = component_of(name)
        index = hf_layer_of(name)
        if index is None:
            if component == "embeddings":
                embed += nbytes
            else:
                head += nbytes  # lm_head, model.norm
            continue
        if index >= len(layers):
            raise K2Error(f"tensor {name} is in the checkpoint, but config.json describes {len(layers)} layers "
                          "(config and weights disagree)")
        layer = layers[index]
        if component == "routed_experts":
            expert = model.locate(name)[1]
            expert_sizes[layer.index, expert] = expert_sizes.get((layer.index, expert), 0) + nbytes
            continue
        layer.component_bytes[component] = layer.component_bytes.get(component, 0) + nbytes
        layer.dense_bytes += nbytes
    for layer in layers:
        sizes_here = [nbytes for (i, _), nbytes in expert_sizes.items() if i == layer.index]
        if sizes_here:
            layer.n_experts, layer.expert_bytes, layer.top_k = len(sizes_here), max(sizes_here), args.experts_per_token
    # A tied head stores no lm_head: it multiplies by the embedding matrix, all of it every token.
    tied = args.tie_word_embeddings and "lm_head.weight" not in sizes
    quant = ckpt.config.get("quantization_config") or {}
    return ModelCost(ckpt.folder.name, layers, embed, head + (embed if tied else 0),
                     quant.get("quant_method") == "compressed-tensors", tied)


def stage_layer_ranges(costs: list[float], n_stages: int) -> list[range]:
    """Split layers into `n_stages` contiguous ranges that minimize the costliest stage (exact, by dynamic programming).

    The one rule for pipeline stages: `k2 plan`, the runtime and `k2 download --stage` all use it.
    """
    n = len(costs)
    if not 1 <= n_stages <= n:
        raise K2Error(f"cannot split {n} layers into {n_stages} stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    # best[s][i]: the smallest possible maximum stage cost for the first i layers in s stages.
    best = [[math.inf] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, n_stages + 1):
        for i in range(s, n + 1):
            for j in range(s - 1, i):
                value = max(best[s - 1][j], prefix[i] - prefix[j])
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    bounds, i = [], n
    for s in range(n_stages, 0, -1):
        bounds.append(range(cut[s][i], i))
        i = cut[s][i]
    return bounds[::-1]


PIPELINE_CTX = 4096  # the context a plan-less pipeline balances its stages for


def pipeline_stage_ranges(folder: str | Path, n_stages: int) -> list[range]:
    """Each stage's layers when torchrun runs without a plan, and what `k2 download --stage I/N` fetches. Costed
    from config.json alone, so every machine of a pipeline decides its part before any shard is on disk."""
    from runtime.loader import load

    cost = model_cost(load(folder, weights=False), config_only=True)
    return stage_layer_ranges(decode_bytes_per_token(cost, PIPELINE_CTX), n_stages)


def decode_bytes_per_token(cost: ModelCost, ctx: int) -> list[float]:
    """What each layer reads per decoded token at batch 1 (weights used and the KV cache); the head counts with the
    last layer, since it runs in the last stage."""
    per_layer = [layer.dense_bytes + layer.top_k * layer.expert_bytes + layer.kv_bytes_per_token * ctx
                 for layer in cost.layers]
    per_layer[-1] += cost.head_bytes
    return per_layer


# --- the plan ---------------------------------------------------------------------------------------------------

@dataclass
class Device:
    name: str  # cuda:0, mps, cpu, disk
    budget: int  # bytes usable for weights and cache
    bandwidth: float  # bytes/s
    used: dict = field(default_factory=lambda: {"weights": 0, "experts": 0, "kv_cache": 0, "expert_cache": 0})

    @property
    def free(self) -> int:
        return self.budget - sum(self.used.values())


@dataclass
class HostSpec:
    gpus: list[int]  # capacities in bytes
    cpu_mem: int
    mps: int = 0
    gpu_bandwidth: float | None = None
    cpu_bandwidth: float = CPU_BANDWIDTH
    mps_bandwidth: float = MPS_BANDWIDTH
    disk_bandwidth: float = DISK_BANDWIDTH
    margin: float = 0.05

    def devices(self) -> list[Device]:
        keep = 1 - self.margin

        def device(name: str, flag: str, size: int, usable: float, reserve: int, use: str, bandwidth: float):
            budget = int(usable * keep) - reserve
            if budget <= 0:  # a size below the reserve would plan with a negative budget
                raise K2Error(f"{flag} {format_bytes(size)} leaves {name} nothing for the model: k2 keeps "
                              f"{format_bytes(reserve)} of it for {use}, and a {self.margin:.0%} margin")
            return Device(name, budget, bandwidth)

        gpu_use = "the runtime and activations"
        devices = [device(f"cuda:{i}", "--gpu", size, size, GPU_RESERVE, gpu_use,
                          self.gpu_bandwidth or gpu_bandwidth_for(size)) for i, size in enumerate(self.gpus)]
        if self.mps:
            devices.append(device("mps", "--mps", self.mps, self.mps * MPS_WIRED_FRACTION, GPU_RESERVE, gpu_use,
                                  self.mps_bandwidth))
        if self.cpu_mem:
            devices.append(device("cpu", "--cpu-mem", self.cpu_mem, self.cpu_mem, CPU_RESERVE, "the OS and the process",
                                  self.cpu_bandwidth))
        if not devices:
            raise K2Error("no devices: give --gpu, --mps and/or --cpu-mem")
        return devices


def expert_frequencies(stats_file: str | Path | None, cost: ModelCost) -> dict[int, list[float]]:
    """Per layer, how often each expert was chosen ({"layers": {"3": [counts...]}}, as `--expert-stats` records);
    uniform without a file."""
    import json

    uniform = {layer.index: [1.0] * layer.n_experts for layer in cost.layers if layer.n_experts}
    if stats_file is None:
        return uniform
    try:
        recorded = json.loads(Path(stats_file).read_text())["layers"]
        counts = {int(i): [float(c) for c in values] for i, values in recorded.items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise K2Error(f"cannot read expert stats {stats_file}: {e}") from None
    for i, values in counts.items():
        if i in uniform and len(values) != len(uniform[i]):
            raise K2Error(f"expert stats for layer {i} have {len(values)} experts, the model {len(uniform[i])}")
    return uniform | {i: v for i, v in counts.items() if i in uniform}


def _split_proportionally(needs: list[int], devices: list[Device]) -> list[Device | None]:
    """Contiguous layers over GPUs, each GPU taking a share proportional to its budget; None where nothing fits."""
    total = sum(needs)
    capacity = sum(d.budget for d in devices)
    owners, g, filled = [], 0, 0
    for need in needs:
        if total <= capacity:
            target = devices[g].budget * total / capacity
            if filled + need / 2 > target and g + 1 < len(devices):
                g, filled = g + 1, 0
        else:  # not all layers fit: fill each GPU in turn, the rest run on the CPU
            while g < len(devices) and devices[g].free - need < 0:
                g += 1
        if g >= len(devices) or devices[g].free < need:
            owners.append(None)
            continue
        owners.append(devices[g])
        filled += need
        devices[g].used["weights"] += need  # provisional; the caller re-accounts by component
    for d in devices:
        d.used["weights"] = 0
    return owners


def plan_stage(cost: ModelCost, layer_range: range, host: HostSpec, ctx: int, batch: int, offload: str,
               frequencies: dict[int, list[float]], first: bool, last: bool, max_disk_fraction: float) -> dict:
    devices = host.devices()
    gpus = [d for d in devices if d.name.startswith(("cuda", "mps"))]
    cpu = next((d for d in devices if d.name == "cpu"), None)
    disk = Device("disk", 1 << 62, host.disk_bandwidth)
    layers = [cost.layers[i] for i in layer_range]
    kv = {layer.index: layer.kv_bytes_per_token * ctx * batch for layer in layers}

    def needs(layer, with_experts):
        own = layer.dense_bytes + kv[layer.index]
        return own + layer.n_experts * layer.expert_bytes if with_experts else own

    # Experts stay with their layer when there is nowhere else to put them, when asked to, or when the whole stage
    # fits on the GPUs anyway (then layers are balanced over the GPUs experts included). 3% slack for packing.
    whole = sum(needs(layer, True) for layer in layers) + (cost.head_bytes if last else 0)
    experts_with_layer = offload == "none" or not cpu or (
        offload == "auto" and bool(gpus) and whole <= 0.97 * sum(g.budget for g in gpus))

    head_device = embed_device = None
    main = gpus or [cpu]
    owners = _split_proportionally([needs(layer, experts_with_layer) + (cost.head_bytes if last and layer is layers[-1] else 0)
                                    for layer in layers], main)
    placed = []
    for layer, owner in zip(layers, owners):
        if owner is None:
            if cpu is None or cpu in main:
                raise K2Error(f"does not fit: layer {layer.index} needs {format_bytes(needs(layer, experts_with_layer))}"
                              f" and {', '.join(d.name for d in main)} are full; "
                              f"{_remedy(needs(layer, experts_with_layer), cost)}")
            owner = cpu
        owner.used["weights"] += layer.dense_bytes
        owner.used["kv_cache"] += kv[layer.index]
        placed.append({"layer": layer.index, "device": owner.name, "components": {
            c: owner.name for c in layer.component_bytes}, "experts": {}, "expert_cache": 0})
    if last:
        head_device = next(d for d in devices if d.name == placed[-1]["device"])
        head_device.used["weights"] += cost.head_bytes
    if first and last and cost.tied_head:  # the head's matrix, already counted there
        embed_device = head_device
    elif first:
        embed_device = cpu if cpu and gpus else main[0]  # a lookup reads one row per token: keep it off the GPU
        embed_device.used["weights"] += cost.embed_bytes
    by_name = {d.name: d for d in devices}

    # Routed experts: with their layer (offload none, or a host with no CPU pool); else the hottest on the GPUs
    # (auto), the rest in CPU memory, and what does not fit there left memory-mapped on disk.
    moe = [(layer, entry) for layer, entry in zip(layers, placed) if layer.n_experts]
    kept = {layer.index: layer.n_experts if experts_with_layer else 0 for layer, _ in moe}
    if offload == "auto" and not experts_with_layer:
        for gpu in gpus:
            mine = [layer for layer, entry in moe if entry["device"] == gpu.name]
            if not mine:
                continue
            slots = max(0, gpu.free) // max(layer.expert_bytes for layer in mine)
            # Hottest first; among equals, each layer's next expert in turn, so GPU slots spread over the layers.
            ranked = sorted(((freq, -rank, -layer.index) for layer in mine
                             for rank, freq in enumerate(sorted(frequencies[layer.index], reverse=True))), reverse=True)
            for *_, negative_index in ranked[:slots]:
                kept[-negative_index] += 1
    for layer, entry in moe:
        order = sorted(range(layer.n_experts), key=lambda e: (-frequencies[layer.index][e], e))
        home = by_name[entry["device"]]
        groups = [(home, order[:kept[layer.index]])]
        rest = order[kept[layer.index]:]
        if rest:
            in_memory = min(len(rest), max(0, cpu.free) // layer.expert_bytes) if cpu is not None else 0
            groups += [(cpu, rest[:in_memory]), (disk, rest[in_memory:])]
        for device, ids in groups:
            if ids:
                device.used["experts"] += len(ids) * layer.expert_bytes
                entry["experts"][device.name] = sorted(ids)
    if offload == "stream":  # a per-layer GPU cache of experts copied in on demand, from what the GPUs have left
        for gpu in gpus:
            mine = [(layer, entry) for layer, entry in moe if entry["device"] == gpu.name]
            if mine:
                per_layer = min(mine[0][0].n_experts, max(0, gpu.free // (len(mine) * mine[0][0].expert_bytes)))
                for layer, entry in mine:
                    entry["expert_cache"] = per_layer
                    gpu.used["expert_cache"] += per_layer * layer.expert_bytes

    total_experts = sum(layer.n_experts * layer.expert_bytes for layer, _ in moe)
    if disk.used["experts"] > max_disk_fraction * total_experts:
        raise K2Error(
            f"does not fit: {format_bytes(disk.used['experts'])} of the {format_bytes(total_experts)} of routed "
            f"experts would be read from disk every token (more than {max_disk_fraction:.0%}); "
            f"{_remedy(disk.used['experts'] - max_disk_fraction * total_experts, cost)}")
    for d in devices:
        if d.free < 0:
            raise K2Error(f"does not fit: {d.name} would need {format_bytes(sum(d.used.values()))} of its "
                          f"{format_bytes(d.budget)} budget; {_remedy(-d.free, cost)}")
    used = devices + ([disk] if disk.used["experts"] else [])
    return {
        "layers": placed,
        "devices": [{"device": d.name, "budget_bytes": d.budget if d is not disk else None,
                     "bandwidth_bytes_per_s": d.bandwidth, **{f"{k}_bytes": v for k, v in d.used.items()}}
                    for d in used],
        "embeddings": embed_device.name if embed_device else None,
        "lm_head": head_device.name if head_device else None,
    }


def _remedy(short: float, cost: ModelCost) -> str:
    if cost.four_bit_experts:
        quantize = ""
    elif cost.has_experts:
        quantize = ", quantize the experts with `k2 quantize --int4`"
    else:  # the default scope quantizes routed experts only
        quantize = ", quantize it with `k2 quantize --int4 --scope all-linear`"
    return (f"short by {format_bytes(short)} (the model is {format_bytes(cost.total_bytes)}): add GPU or CPU memory, "
            f"split over more hosts with --stages{quantize}, or lower --ctx")


def predict_decode(stage_plans: list[dict], cost: ModelCost, frequencies: dict[int, list[float]], ctx: int, batch: int,
                   pcie_bandwidth: float, network_bandwidth: float, hidden_size: int) -> dict:
    """Seconds per decode step from the bytes each device reads per step over its bandwidth, summed: at batch 1 the
    stages of a pipeline and the devices of a stage work one after another."""
    seconds, read_by_device = 0.0, {}

    def read(stage: int, device: str, nbytes: float, bandwidth: float):
        nonlocal seconds
        seconds += nbytes / bandwidth
        key = f"stage{stage}/{device}" if len(stage_plans) > 1 else device
        read_by_device[key] = read_by_device.get(key, 0) + nbytes

    for s, stage in enumerate(stage_plans):
        bandwidth = {d["device"]: d["bandwidth_bytes_per_s"] for d in stage["devices"]}
        for entry in stage["layers"]:
            layer = cost.layers[entry["layer"]]
            read(s, entry["device"], layer.dense_bytes + layer.kv_bytes_per_token * ctx * batch, bandwidth[entry["device"]])
            if not layer.n_experts:
                continue
            freq = frequencies[layer.index]
            total = sum(freq)
            # Distinct experts a step touches: k per token, overlapping across the batch.
            touched = layer.n_experts * (1 - (1 - layer.top_k / layer.n_experts) ** batch)
            cached = sorted(freq, reverse=True)[:entry["expert_cache"]]
            for device, ids in entry["experts"].items():
                share = sum(freq[e] for e in ids) / total
                if device != entry["device"] and entry["expert_cache"]:  # streamed: hits are read from the GPU cache
                    hit = min(1.0, sum(cached) / total / share) if share else 0.0
                    read(s, entry["device"], touched * share * hit * layer.expert_bytes, bandwidth[entry["device"]])
                    read(s, "pcie", touched * share * (1 - hit) * layer.expert_bytes, pcie_bandwidth)
                else:
                    read(s, device, touched * share * layer.expert_bytes, bandwidth[device])
        if stage["lm_head"]:
            read(s, stage["lm_head"], cost.head_bytes, bandwidth[stage["lm_head"]])
    hops = len(stage_plans) - 1
    seconds += hops * (NETWORK_LATENCY_S + hidden_size * 2 * batch / network_bandwidth)
    return {"seconds_per_step": seconds, "tokens_per_s": batch / seconds, "bytes_read_per_step": read_by_device}


def make_plan(loaded, host: HostSpec, stages: int = 1, ctx: int = 4096, batch: int = 1,
              offload: str = "auto", expert_stats: str | Path | None = None, max_disk_fraction: float = 0.5,
              pcie_bandwidth: float = PCIE_BANDWIDTH, network_bandwidth: float = NETWORK_BANDWIDTH) -> dict:
    if offload not in ("auto", "cpu", "stream", "none"):
        raise K2Error(f"--offload must be auto, cpu, stream or none, not {offload!r}")
    if offload in ("cpu", "stream") and not host.cpu_mem:
        raise K2Error(f"--offload {offload} puts experts in CPU memory: give --cpu-mem")
    if offload == "stream" and not (host.gpus or host.mps):
        raise K2Error("--offload stream copies experts to a GPU: give --gpu or --mps")
    cost = model_cost(loaded)
    config = loaded.config
    frequencies = expert_frequencies(expert_stats, cost)
    ranges = stage_layer_ranges(decode_bytes_per_token(cost, ctx), stages)
    stage_plans = [plan_stage(cost, r, host, ctx, batch, offload, frequencies, i == 0, i == len(ranges) - 1,
                              max_disk_fraction) for i, r in enumerate(ranges)]
    for i, (r, stage) in enumerate(zip(ranges, stage_plans)):
        stage.update(stage=i, first_layer=r.start, last_layer=r.stop - 1)
    prediction = predict_decode(stage_plans, cost, frequencies, ctx, batch, pcie_bandwidth, network_bandwidth,
                                config.get("hidden_size", 0))
    return {
        "model": str(loaded.folder),
        "model_bytes": cost.total_bytes,
        "setup": {"stages": stages, "ctx": ctx, "batch": batch, "offload": offload,
                  "expert_stats": str(expert_stats) if expert_stats else None, **asdict(host)},
        "assumptions": {
            "gpu_bandwidth": "--gpu-bw, else guessed from the card's size: >=120G 4000 GB/s, >=64G 2600, >=40G 1500, "
                             "else 900",
            "cpu_bandwidth_bytes_per_s": host.cpu_bandwidth, "mps_bandwidth_bytes_per_s": host.mps_bandwidth,
            "disk_bandwidth_bytes_per_s": host.disk_bandwidth, "pcie_bandwidth_bytes_per_s": pcie_bandwidth,
            "network_bandwidth_bytes_per_s": network_bandwidth, "margin": host.margin,
            "gpu_reserve_bytes": GPU_RESERVE, "cpu_reserve_bytes": CPU_RESERVE, "mps_wired_fraction": MPS_WIRED_FRACTION,
            "kv_cache": f"BF16 {loaded.args.cache_kind}", "experts_on_disk_at_most": max_disk_fraction,
        },
        "stages": stage_plans,
        "prediction": prediction,
    }
