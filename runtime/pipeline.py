"""Pipeline parallelism over torch.distributed: each process (rank) holds one stage, a contiguous range of layers.

Started by torchrun (`torchrun --nproc-per-node 2 -m k2cli generate MODEL`, or with --nnodes / --rdzv-endpoint
across hosts). Rank 0 talks to the user and samples; it drives the other ranks with a small control message per
step (broadcast), hidden states flow rank to rank (send / recv), and the last rank's logits come back to rank 0.
On rank 0 a `PipelineModel` stands in for the model, so the engine runs unchanged (eagerly: a step crosses
processes, so it cannot be one captured graph).
"""
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from runtime.cache import SlotCache
from runtime.checkpoint import Checkpoint
from runtime.errors import K2Error
from runtime.loading import load_model
from runtime.offload import apply_placement
from runtime.placement import pipeline_stage_ranges

OP_FORWARD, OP_NEW_CACHE, OP_STOP = 0, 1, 2
DEFAULT_TIMEOUT_S = 300  # a rank that stops answering for this long fails the others instead of hanging them


def in_pipeline() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Stage:
    """This rank's part of the model and the point-to-point traffic around it."""

    def __init__(self, checkpoint: Checkpoint, dtype, device: str, rank: int, world: int, backend: str,
                 plan: dict | None = None, device_map: dict | None = None):
        self.rank, self.world = rank, world
        # NCCL moves only GPU tensors, so control messages travel on the GPU there.
        self.control_device = torch.device(device) if backend == "nccl" else torch.device("cpu")
        if plan is None:
            self.layer_ids = list(pipeline_stage_ranges(checkpoint.folder, world)[rank])
        else:
            self.layer_ids = [entry["layer"] for entry in plan["stages"][rank]["layers"]]
        load_to = "cpu" if plan else device
        self.model = load_model(checkpoint, dtype, load_to, layer_ids=self.layer_ids, embed=rank == 0,
                                head=rank == world - 1)
        if plan:
            apply_placement(self.model, plan["stages"][rank], device_map)
        self.device = self.model.layer_device(self.layer_ids[0])  # where hidden states arrive
        self.cache: SlotCache | None = None

    @property
    def is_last(self) -> bool:
        return self.rank == self.world - 1

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters() if not p.is_meta)

    def new_cache(self, batch: int, max_len: int) -> SlotCache:
        self.cache = self.model.new_cache(batch, max_len, layer_ids=self.layer_ids)
        return self.cache

    def run(self, tokens: torch.Tensor, first_row: int, lengths: torch.Tensor, last_only: bool) -> torch.Tensor | None:
        """This stage's layers for one step of slots first_row.. holding `lengths` tokens; returns logits on the last
        rank (sent to rank 0 by the caller)."""
        cache = self.cache.rows(first_row, tokens.shape[0])
        cache.lengths.copy_(lengths)
        step = self.model.step_inputs(tokens, cache)
        if self.rank == 0:
            h = self.model.model.embed_tokens(tokens.to(self.model.device))
        else:
            dtype = self.model.model.layers[self.layer_ids[0]].input_layernorm.weight.dtype
            h = torch.empty(*tokens.shape, self.model.args.hidden_size, dtype=dtype, device=self.device)
            _checked(dist.recv, h, self.rank - 1)
        h = self.model.forward_layers(h, step, cache, self.layer_ids)
        cache.lengths += tokens.shape[1]
        if not self.is_last:
            _checked(dist.send, h.contiguous(), self.rank + 1)
            return None
        return self.model.logits(h, last_only)


def _stopped_answering(who: str, e: Exception) -> K2Error:
    return K2Error(f"{who} stopped answering: {str(e).splitlines()[0]}")


def _checked(op, tensor: torch.Tensor, peer: int):
    try:
        op(tensor, peer)
    except (RuntimeError, dist.DistError) as e:
        raise _stopped_answering(f"pipeline rank {peer}", e) from None


def _broadcast(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    tensor = tensor.to(device)
    try:
        dist.broadcast(tensor, src=0)
    except (RuntimeError, dist.DistError) as e:
        # Not necessarily rank 0: on rank 0 it is a rank it sends to, and the error names an address, not a rank.
        raise _stopped_answering("a pipeline rank", e) from None
    return tensor.cpu()


class PipelineModel:
    """Rank 0's handle on the whole pipeline, with the model's interface: new_cache() and __call__() (on rows of
    the cache new_cache() made)."""

    def __init__(self, stage: Stage, layout: list[dict]):
        self.stage = stage
        self.layout = layout  # per rank: its layers, weight bytes and resident memory after loading
        self.args = stage.model.args
        self.device = stage.device

    def new_cache(self, batch: int, max_len: int) -> SlotCache:
        _broadcast(torch.tensor([OP_NEW_CACHE, batch, max_len, 0, 0]), self.stage.control_device)
        return self.stage.new_cache(batch, max_len)

    def __call__(self, tokens: torch.Tensor, cache: SlotCache, positions: torch.Tensor | None = None,
                 last_only: bool = False) -> torch.Tensor:
        if positions is not None:
            raise K2Error("a pipeline decodes eagerly: its steps take no device positions")
        B, T = tokens.shape
        _broadcast(torch.tensor([OP_FORWARD, B, T, cache.first_row, int(last_only)]), self.stage.control_device)
        _broadcast(tokens, self.stage.control_device)
        lengths = cache.lengths.clone()
        _broadcast(lengths, self.stage.control_device)
        self.stage.run(tokens.to(self.device), cache.first_row, lengths, last_only)
        dtype = self.stage.model.model.embed_tokens.weight.dtype
        logits = torch.empty(B, 1 if last_only else T, self.args.vocab_size, dtype=dtype, device=self.device)
        _checked(dist.recv, logits, self.stage.world - 1)
        return logits

    def close(self):
        """Stop the other ranks and leave the process group, also after a rank died."""
        try:
            _broadcast(torch.tensor([OP_STOP, 0, 0, 0, 0]), self.stage.control_device)
        except K2Error:
            # A rank is gone. Either the run already failed on it, and that error (raised past this close()) is the
            # one to report, or the run is complete; the ranks still listening got the stop.
            pass
        finally:
            # A gloo worker thread may still hold the failed operation, and one left running at exit aborts the
            # process ("terminate called without an active exception"); destroying the group joins those threads.
            dist.destroy_process_group()


def serve(stage: Stage):
    """The loop of every rank but 0: follow rank 0's control messages until it says stop."""
    while True:
        control = stage.control_device
        op, batch, length, first_row, last_only = _broadcast(torch.zeros(5, dtype=torch.long), control).tolist()
        if op == OP_STOP:
            return
        if op == OP_NEW_CACHE:
            stage.new_cache(batch, length)
            continue
        tokens = _broadcast(torch.zeros(batch, length, dtype=torch.long), control).to(stage.device)
        lengths = _broadcast(torch.zeros(batch, dtype=torch.long), control)
        logits = stage.run(tokens, first_row, lengths, bool(last_only))
        if logits is not None:
            _checked(dist.send, logits.contiguous(), 0)


def open_stage(checkpoint: Checkpoint, dtype, device: str, plan: dict | None = None,
               device_map: dict | None = None) -> "PipelineModel | None":
    """Under torchrun: this rank's stage, placed as `plan` (from `k2 plan --json`) says when given. Rank 0 gets a
    PipelineModel; the other ranks serve rank 0 until it is done and get None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if plan is not None and len(plan["stages"]) != world:
        raise K2Error(f"the plan has {len(plan['stages'])} stage(s): run it with "
                      f"torchrun --nproc-per-node {len(plan['stages'])} (this run has {world} process(es))")
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    timeout = timedelta(seconds=float(os.environ.get("K2_PIPELINE_TIMEOUT", DEFAULT_TIMEOUT_S)))
    try:
        dist.init_process_group(backend, timeout=timeout)
    except (RuntimeError, ValueError, dist.DistError) as e:
        raise K2Error(f"pipeline: cannot form the process group of {world} ranks: {str(e).splitlines()[0]}") from None
    pipeline = None
    try:
        stage = Stage(checkpoint, dtype, device, rank, world, backend, plan, device_map)
        layout = [None] * world
        try:
            dist.all_gather_object(layout, {"rank": rank, "layers": [stage.layer_ids[0], stage.layer_ids[-1]],
                                            "weight_bytes": stage.weight_bytes(), "rss_bytes": _rss_bytes()})
        except (RuntimeError, dist.DistError) as e:
            raise _stopped_answering("a pipeline rank loading its stage", e) from None
        if rank == 0:
            pipeline = PipelineModel(stage, layout)
        else:
            serve(stage)
    finally:
        if pipeline is None:  # done or failed; rank 0's PipelineModel leaves the group in close()
            dist.destroy_process_group()
    return pipeline
