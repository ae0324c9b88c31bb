"""Running a placement (one stage of a `k2 plan`) in one process: layers on their devices, routed experts split.

Applied to a built, loaded model from outside; the model code does not know where anything lives. Only hidden
states (and the small per-step rope and mask tensors) cross devices: a forward pre-hook moves a layer's inputs to
the layer's device. Routed experts are computed where they live (the KTransformers / llama.cpp `--cpu-moe` mode),
or kept in host memory and copied on demand into a small per-layer cache on the GPU (`--offload stream`).
"""
import json
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Annotated

import torch
from pydantic import BaseModel, Field
from torch import nn

from runtime.config_schema import STRICT, NonNegative, validate
from runtime.devices import check_device
from runtime.errors import K2Error
from runtime.files import read_json


def _inputs_to(device: torch.device):
    def hook(module, args):
        return tuple(a.to(device, non_blocking=True) if isinstance(a, torch.Tensor) else a for a in args)
    return hook


def _local_ids(n_experts: int, ids: list[int], device) -> torch.Tensor:
    """Global expert id -> index within a group, -1 for experts of other groups (skipped by Experts.forward)."""
    local = torch.full((n_experts,), -1, dtype=torch.long)
    local[torch.tensor(ids, dtype=torch.long)] = torch.arange(len(ids))
    return local.to(device)


class PlacedExperts(nn.Module):
    """One layer's routed experts split over devices; every selection is computed on its expert's device."""

    def __init__(self, experts, placement: dict[str, list[int]], home: torch.device):
        super().__init__()
        self.n_experts, self.home = experts.n_experts, home
        self.devices = [torch.device(d) for d in placement]
        self.parts = nn.ModuleList(experts.select(ids, device) for device, ids in placement.items())
        self.local_ids = [_local_ids(self.n_experts, ids, home) for ids in placement.values()]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # Inputs for other devices are copied first, so their compute overlaps the home device's queued kernels.
        remote = [(part, x.to(d), weights.to(d), local[ids].to(d))
                  for d, part, local in zip(self.devices, self.parts, self.local_ids) if d != self.home]
        y = torch.zeros_like(x)
        for d, part, local in zip(self.devices, self.parts, self.local_ids):
            if d == self.home:
                y = y + part(x, weights, local[ids])
        for part, xr, wr, lr in remote:
            y = y + part(xr, wr, lr).to(self.home, non_blocking=True)
        return y


class StreamedExperts(nn.Module):
    """All of a layer's experts in host memory (pinned for fast copies), and a cache of `slots` of them on the
    compute device, filled on demand, least recently used out.

    Works for any `MovableExperts` (runtime/models/family.py): BF16 `Experts`, packed `Int4Experts`, the fused
    kernels' layouts.
    """

    def __init__(self, experts, slots: int, device: torch.device):
        super().__init__()
        self.n_experts, self.slots, self.device = experts.n_experts, slots, device
        self.source = experts.select(list(range(self.n_experts)), "cpu")
        if device.type == "cuda":
            for tensor in [*self.source.parameters(), *self.source.buffers()]:
                tensor.data = tensor.data.pin_memory()
        self.cache = experts.select(list(range(slots)), device)  # its contents count as empty until fetched
        self.slot_of: OrderedDict[int, int] = OrderedDict()  # expert -> slot, least recently used first
        self.hits = self.misses = 0
        # Copies run on their own stream, so cached experts compute while missing ones are still arriving.
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def _fetch(self, expert: int, keep: set[int]) -> int:
        """The slot holding `expert`, copying it in (on the copy stream) if it is not cached."""
        if expert in self.slot_of:
            self.slot_of.move_to_end(expert)
            return self.slot_of[expert]
        if len(self.slot_of) < self.slots:
            slot = len(self.slot_of)
        else:
            victim = next(e for e in self.slot_of if e not in keep)
            slot = self.slot_of.pop(victim)
        if self.copy_stream is None:
            self.cache.load_slot(slot, self.source, expert)
        else:
            with torch.cuda.stream(self.copy_stream):
                self.cache.load_slot(slot, self.source, expert)
        self.slot_of[expert] = slot
        return slot

    def _compute(self, x, weights, ids, experts: list[int], slots: list[int]) -> torch.Tensor:
        local = torch.full((self.n_experts,), -1, dtype=torch.long)
        local[experts] = torch.tensor(slots, dtype=torch.long)
        return self.cache(x, weights, local.to(x.device)[ids])

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        needed = torch.unique(ids).tolist()  # which experts to bring in: the one host sync of this mode
        y = torch.zeros_like(x)
        for start in range(0, len(needed), self.slots):  # more experts than slots: in rounds
            chunk = needed[start:start + self.slots]
            cached = [e for e in chunk if e in self.slot_of]
            missing = [e for e in chunk if e not in self.slot_of]
            self.hits += len(cached)
            self.misses += len(missing)
            keep = set(chunk)
            if self.copy_stream is not None and missing:  # a slot about to be refilled may still be read
                self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            cached_slots = [self._fetch(e, keep) for e in cached]
            missing_slots = [self._fetch(e, keep) for e in missing]  # queued on the copy stream
            if cached:
                y = y + self._compute(x, weights, ids, cached, cached_slots)
            if missing:
                if self.copy_stream is not None:
                    torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
                y = y + self._compute(x, weights, ids, missing, missing_slots)
        return y


class ExpertStats:
    """How often each routed expert is chosen, per layer, counted on the device (no host sync per token)."""

    def __init__(self, model):
        self.counts: dict[int, torch.Tensor] = {}
        for i, block in model.moe_blocks().items():
            if not block.gate.weight.is_meta:
                self.counts[i] = torch.zeros(block.experts.n_experts, dtype=torch.long, device=block.gate.weight.device)
                block.gate.register_forward_hook(self._hook(i))

    def _hook(self, i: int):
        def hook(module, args, output):
            ids = output[1].flatten()
            self.counts[i] += torch.bincount(ids, minlength=self.counts[i].numel())
        return hook

    def save(self, path: str | Path):
        """The file `k2 plan --expert-stats` reads."""
        layers = {str(i): c.tolist() for i, c in self.counts.items()}
        Path(path).write_text(json.dumps({"layers": layers}))


def _remap(device: str, device_map: dict[str, str]) -> torch.device:
    # Experts a plan leaves on disk are read into host memory: the runtime holds no memory-mapped experts (yet).
    name = device_map.get(device, "cpu" if device == "disk" else device)
    if name == "meta":  # shapes only: a dry run of a plan for devices this machine lacks
        return torch.device("meta")
    return check_device(name, "the plan's device",
                        f"; map the plan's devices to this machine's with --device-map {device}=cpu")


def expert_cache_hit_rate(model) -> float | None:
    """The share of streamed-expert uses served from the GPU cache, over all layers; None without streaming."""
    streamed = [m for m in model.modules() if isinstance(m, StreamedExperts)]
    uses = sum(m.hits + m.misses for m in streamed)
    return sum(m.hits for m in streamed) / uses if uses else None


class PlanLayer(BaseModel):
    """One layer of a stage: its device, and where its routed experts live (or how many a GPU cache streams)."""

    model_config = STRICT
    layer: NonNegative
    device: str
    components: dict[str, str] = {}
    experts: dict[str, list[NonNegative]] = {}  # device -> expert ids
    expert_cache: NonNegative = 0  # > 0: every expert streamed through a cache of this many slots on `device`


class PlanStage(BaseModel):
    model_config = STRICT
    layers: Annotated[list[PlanLayer], Field(min_length=1)]
    embeddings: str | None = None
    lm_head: str | None = None


class Plan(BaseModel):
    """What runtime/placement.py's `make_plan` writes (`k2 plan --json`) and a run reads: its pipeline stages."""

    model_config = STRICT
    stages: Annotated[list[PlanStage], Field(min_length=1)]


def read_plan(path: str | Path) -> dict:
    """A plan file, checked against `Plan`: any other JSON is one error naming the file and the field."""
    return validate(Plan, read_json(Path(path), f"plan {path}"), f"plan {path}").model_dump()


def parse_device_map(text: str | None) -> dict[str, str]:
    """'cuda:0=cuda:1,cuda:1=cpu' -> {'cuda:0': 'cuda:1', 'cuda:1': 'cpu'}"""
    if not text:
        return {}
    try:
        return dict(pair.split("=", 1) for pair in text.split(","))
    except ValueError:
        raise K2Error(f"--device-map takes PLAN_DEVICE=DEVICE pairs separated by commas, not {text!r}") from None


def _check_fits(entry: dict, model, moe_blocks: dict):
    """A plan made for another model (or edited by hand) would index past the model, or leave experts out: their
    tokens would then be skipped silently."""
    i, n_layers = entry["layer"], len(model.model.layers)
    if i >= n_layers:
        raise K2Error(f"the plan places layer {i}, but the model has {n_layers} layers (a plan for another model?)")
    if i not in moe_blocks:
        return
    n_experts = moe_blocks[i].experts.n_experts
    if entry["expert_cache"]:
        if entry["expert_cache"] > n_experts:
            raise K2Error(f"the plan gives layer {i} a cache of {entry['expert_cache']} experts; it has {n_experts}")
        return
    times = Counter(e for ids in entry["experts"].values() for e in ids)
    beyond = [e for e in times if e >= n_experts]
    if beyond:
        raise K2Error(f"the plan places expert {beyond[0]} of layer {i}, which has {n_experts} experts (a plan for "
                      "another model?)")
    wrong = next((e for e in range(n_experts) if times[e] != 1), None)
    if wrong is not None:
        placed = f"places expert {wrong} of layer {i} {times[wrong]} times" if times[wrong] else \
            f"does not place expert {wrong} of layer {i}"
        raise K2Error(f"the plan {placed}; each expert goes in exactly one place")


def apply_placement(model, stage: dict, device_map: dict[str, str] | None = None) -> list[StreamedExperts]:
    """Move a loaded model's parts where one stage of a plan (`k2 plan --json`'s stages[i]) puts them.

    `device_map` renames the plan's devices (run a plan made for cuda:0 on cuda:1, or on the CPU for a test).
    Returns the streamed expert caches, whose hit counts a run reports.
    """
    device_map = device_map or {}
    streamed = []
    moe_blocks = model.moe_blocks()
    for entry in stage["layers"]:
        _check_fits(entry, model, moe_blocks)
        layer = model.model.layers[entry["layer"]]
        home = _remap(entry["device"], device_map)
        block = moe_blocks.get(entry["layer"])
        routed = None if block is None else block.experts
        if block is not None:
            block.experts = None  # detached while the rest of the layer moves home; placed below
        layer.to(home)
        layer.register_forward_pre_hook(_inputs_to(home))
        if block is None:
            continue
        if entry.get("expert_cache"):
            block.experts = StreamedExperts(routed, entry["expert_cache"], home)
            streamed.append(block.experts)
        else:
            placement: dict[str, list[int]] = {}
            for device, ids in entry["experts"].items():
                placement.setdefault(str(_remap(device, device_map)), []).extend(ids)
            block.experts = PlacedExperts(routed, placement, home)
    if stage.get("embeddings"):
        model.model.embed_tokens.to(_remap(stage["embeddings"], device_map))
    if stage.get("lm_head"):
        head = _remap(stage["lm_head"], device_map)
        model.model.norm.to(head)
        model.lm_head.to(head)
        model.model.norm.register_forward_pre_hook(_inputs_to(head))
    return streamed
