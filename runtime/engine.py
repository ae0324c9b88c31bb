"""The one generation engine: `k2 generate`, `k2 chat`, `k2 bench` (and the server) all decode through it.

An `Engine` owns a cache of `slots` rows. A request starts in a slot (its prompt prefilled, its first token drawn),
then every `step()` feeds each running slot's last token and draws the next, with that slot's own sampler; a slot
leaves between steps and another request may take it. Slots have their own lengths, so no padding is involved. A
prompt may also be fed in pieces (`prefill`) between other slots' steps, and a slot may start from a prefix another
slot holds, or one copied to the host earlier (`copy_prefix`, `export_prefix`, `import_prefix`): the server's
continuous batching and prefix reuse.

The decode step is one of three interchangeable decoders, chosen by `select_decoder` from the device and the
settings alone: `eager` runs the model's forward as it is (any device, placed models, pipelines); `cuda-graph`
swaps the routed experts for the fused kernels and replays one captured, fixed-shape step; `static` is that same
fixed-shape step run uncaptured, which is how the CPU tests check it against the eager one.
"""
from collections.abc import Iterator

import torch

from runtime.errors import K2Error
from runtime.kernels import say_once
from runtime.models.experts import Experts
from runtime.sampling import NON_FINITE, Sampler, feedable, non_finite_error

DECODERS = ("eager", "static", "cuda-graph")
PREFILL_CHUNK = 2048  # prompt tokens per forward: bounds the per-head K/V a long prompt's prefill materializes


def new_token_budget(prompt_tokens: int, max_new_tokens: int, context: int) -> int:
    """The new tokens a request may draw when the prompt and its reply together must fit `context` tokens (the
    model's max_position_embeddings, or less where asked): past the positions it was trained for, a model's output is
    silently wrong. Refuses a prompt that leaves no room for one new token."""
    if prompt_tokens >= context:
        raise K2Error(f"the prompt has {prompt_tokens} tokens and the context holds {context} (the model's "
                      "max_position_embeddings, or --ctx where smaller): no room for a new token")
    return min(max_new_tokens, context - prompt_tokens)


def select_decoder(device: torch.device | str, eager: bool = False, placed: bool = False,
                   pipeline: bool = False) -> str:
    """The decoder for a model on `device`: the CUDA graph on a CUDA device unless asked for `eager`, or the model
    is placed over several devices or split into pipeline stages (their steps cross devices and processes)."""
    if torch.device(device).type == "cuda" and not (eager or placed or pipeline):
        return "cuda-graph"
    return "eager"


class EagerStep:
    """One decode step through the model's own forward, over the cache's rows up to the last running one: rows past
    it are not computed (the server keeps its requests in the lowest slots it can)."""

    def __init__(self, model, cache):
        self.model, self.cache = model, cache

    def __call__(self, tokens: torch.Tensor, running: list[bool]) -> torch.Tensor:
        """tokens [B, 1] -> logits [n, V] for slots 0..n-1, the last running one n-1; running slots grow by one."""
        n = max(i for i, r in enumerate(running) if r) + 1
        window = self.cache.rows(0, n)
        idle = torch.tensor([not r for r in running[:n]])
        if int(window.lengths.max()) < window.max_len:
            # Rows not running take the step too, writing one column past what they hold (read by nobody), and give
            # it back: attention reads as far as the longest row, not the whole cache.
            logits = self.model(tokens[:n], window)[:, -1]
            window.lengths -= idle.long()
        else:  # an idle row is full, with no column past it: idle rows write in the spare column max_len instead
            positions = torch.where(idle, window.max_len, window.lengths)
            logits = self.model(tokens[:n], window, positions=positions.to(self.model.device))[:, -1]
            window.lengths += (~idle).long()
        return logits


class StaticStep:
    """One decode step with every shape fixed by the cache: inputs are copied into buffers the step reads, so on CUDA
    the step is captured once into a graph and each later step is one replay (no host sync, no launch overhead)."""

    def __init__(self, model, cache, capture: bool):
        self.model, self.cache, self.capture = model, cache, capture
        self.tokens = torch.zeros(cache.batch, 1, dtype=torch.long, device=model.device)
        self.positions = torch.zeros(cache.batch, dtype=torch.long, device=model.device)
        self.logits = None
        self.graph = None

    def _run(self):
        self.logits = self.model(self.tokens, self.cache, positions=self.positions)[:, -1]

    def _capture(self):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up runs compile the Triton kernels and settle the allocator; they
            for _ in range(2):  # write what the captured step writes, so the cache is unchanged
                self._run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._run()

    def __call__(self, tokens: torch.Tensor, running: list[bool]) -> torch.Tensor:
        """tokens [B, 1] -> logits [B, V] for every slot; rows not running write in the spare column max_len."""
        active = torch.tensor(running)
        self.tokens.copy_(tokens)
        self.positions.copy_(torch.where(active, self.cache.lengths, self.cache.max_len), non_blocking=True)
        if self.capture and self.graph is None:
            self._capture()
        if self.graph is not None:
            self.graph.replay()
        else:
            self._run()
        self.cache.lengths += active.long()
        return self.logits


def fuse_experts(model) -> str | None:
    """Swap every layer's routed experts for the fused decode kernels' modules (runtime/kernels/fused_moe.py), in
    place. Returns why a layer could not be swapped (then no decode step can be captured), or None."""
    from runtime.int4 import Int4Experts
    from runtime.kernels.fused_moe import FusedExperts, FusedInt4Experts

    for i, block in model.moe_blocks().items():
        experts = block.experts
        if isinstance(experts, Experts):
            block.experts = FusedExperts(experts.gate_proj.data, experts.up_proj.data, experts.down_proj.data)
        elif isinstance(experts, Int4Experts):
            fused = FusedInt4Experts.repack(experts)
            if fused is None:
                return f"layer {i}'s INT4 expert dimensions admit no kernel tiling"
            block.experts = fused
        elif not isinstance(experts, (FusedExperts, FusedInt4Experts)):
            return f"layer {i}'s experts are placed ({type(experts).__name__})"
    return None


def _single_cuda_device(model) -> str | None:
    devices = {t.device for t in [*model.parameters(), *model.buffers()] if not t.is_meta}
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        return f"the model is on {', '.join(sorted(map(str, devices)))}, not on one CUDA device"
    return None


class Engine:
    """Generation over `model` in `slots` cache rows of `max_len` tokens each, decoded by `decoder`."""

    def __init__(self, model, slots: int, max_len: int, decoder: str = "eager"):
        if decoder not in DECODERS:
            raise K2Error(f"unknown decoder {decoder!r} (one of {', '.join(DECODERS)})")
        if decoder == "cuda-graph":
            reason = _single_cuda_device(model) or fuse_experts(model)
            if reason:
                say_once(f"CUDA graph decode unavailable ({reason}); decoding eagerly")
                decoder = "eager"
        self.model, self.decoder = model, decoder
        self.cache = model.new_cache(slots, max_len)
        self.samplers: list[Sampler | None] = [None] * slots  # the running requests' samplers; None: slot free
        self.next_ids = torch.zeros(slots, 1, dtype=torch.long, device=model.device)  # drawn (feedable), not yet cached
        self._step = EagerStep(model, self.cache) if decoder == "eager" else \
            StaticStep(model, self.cache, capture=decoder == "cuda-graph")

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def length(self, slot: int) -> int:
        """Tokens slot `slot` holds in the cache."""
        return int(self.cache.lengths[slot])

    @torch.inference_mode()
    def prefill(self, slot: int, ids: list[int]) -> torch.Tensor:
        """Append `ids` to what slot `slot` holds, computing their cache entries; returns the last one's logits [1, V].
        The server feeds a long prompt in pieces this way, between the other slots' decode steps."""
        if self.length(slot) + len(ids) > self.max_len:
            raise K2Error(f"slot {slot} holds {self.length(slot)} tokens; {len(ids)} more pass the cache's "
                          f"{self.max_len}")
        view = self.cache.rows(slot)
        tokens = torch.tensor([ids], device=self.model.device)
        for start in range(0, tokens.shape[1], PREFILL_CHUNK):
            logits = self.model(tokens[:, start:start + PREFILL_CHUNK], view, last_only=True)
        return logits[:, -1]

    @torch.inference_mode()
    def start(self, slot: int, prompt: list[int], sampler: Sampler, keep: int = 0) -> torch.Tensor:
        """Begin a request in `slot`: keep the first `keep` tokens the slot holds (a prefix `prompt` shares with
        them), prefill the rest of `prompt`, and draw the first new token ([1], on the device; `NON_FINITE` if the
        logits were not finite)."""
        if keep >= len(prompt):
            raise K2Error(f"cannot keep {keep} tokens of a {len(prompt)}-token prompt: at least one is computed")
        if len(prompt) > self.max_len:
            raise K2Error(f"the prompt has {len(prompt)} tokens; the cache holds {self.max_len}")
        self.truncate(slot, keep)
        logits = self.prefill(slot, prompt[keep:])
        sampler.observe(torch.tensor([prompt], device=self.model.device))
        first = sampler(logits)
        self.next_ids[slot] = feedable(first)
        self.samplers[slot] = sampler
        return first

    def truncate(self, slot: int, length: int):
        """Keep only the first `length` tokens slot `slot` holds."""
        if not 0 <= length <= self.length(slot):
            raise K2Error(f"slot {slot} holds {self.length(slot)} tokens, not {length}")
        self.cache.lengths[slot] = length

    def finish(self, slot: int):
        """The request in `slot` leaves the running batch; what it cached stays until the slot starts again."""
        self.samplers[slot] = None

    # Prefixes moved between slots and the host: what lets requests that share a beginning compute it once. A
    # pipeline's cache lives partly in other processes, so there only a slot's own prefix is kept (truncate).

    @property
    def copies_prefixes(self) -> bool:
        from runtime.pipeline import PipelineModel

        return not isinstance(self.model, PipelineModel)

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one token of one slot takes, over every layer."""
        return sum(b.shape[-1] * b.element_size() for b in self.cache.buffers.values())

    @torch.inference_mode()
    def copy_prefix(self, source: int, target: int, n: int):
        """Make slot `target` hold the first `n` tokens slot `source` holds."""
        if not 0 < n <= self.length(source):
            raise K2Error(f"slot {source} holds {self.length(source)} tokens, not {n}")
        for buffer in self.cache.buffers.values():
            buffer[target, :n] = buffer[source, :n]
        self.cache.lengths[target] = n

    @torch.inference_mode()
    def export_prefix(self, slot: int, n: int) -> dict[int, torch.Tensor]:
        """A host copy of the first `n` tokens slot `slot` holds: per layer [n, width]."""
        if not 0 < n <= self.length(slot):
            raise K2Error(f"slot {slot} holds {self.length(slot)} tokens, not {n}")
        return {i: buffer[slot, :n].to("cpu", copy=True) for i, buffer in self.cache.buffers.items()}

    @torch.inference_mode()
    def import_prefix(self, slot: int, rows: dict[int, torch.Tensor], n: int):
        """Make slot `slot` hold the first `n` tokens of `rows` (what export_prefix gave)."""
        for i, buffer in self.cache.buffers.items():
            buffer[slot, :n].copy_(rows[i][:n])
        self.cache.lengths[slot] = n

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        """Feed every running slot its last drawn token and draw the next: ids [slots] on the device (a free slot's
        entry is meaningless; `NON_FINITE` where a slot's logits were not finite). Each running slot's length grows by
        one."""
        running = [s is not None for s in self.samplers]
        if not any(running):
            raise K2Error("no request is running")
        if int(self.cache.lengths[torch.tensor(running)].max()) >= self.max_len:
            raise K2Error(f"the cache holds {self.max_len} tokens per slot and a running slot is full")
        logits = self._step(self.next_ids, running)  # [n, V]: slots 0..n-1
        shared = self.samplers[0]
        if all(s is shared for s in self.samplers):  # one sampler for the whole batch (k2 bench)
            drawn = shared(logits)
        else:
            drawn = self.next_ids[:, 0].clone()
            for slot, sampler in enumerate(self.samplers[:logits.shape[0]]):
                if sampler is not None:
                    drawn[slot] = sampler(logits[slot:slot + 1])[0]
        self.next_ids = feedable(drawn)[:, None]
        return drawn

    def stream(self, slot: int, prompt: list[int], sampler: Sampler, max_new_tokens: int, stop_ids=(),
               keep: int = 0) -> Iterator[int]:
        """Start a request in `slot` and yield its ids as they are drawn, at most `max_new_tokens`, the last one a
        stop id if one came. Each id but the last is in the cache when the next is drawn; the slot is then free.
        Raises at the first token drawn from non-finite logits."""
        try:
            token = int(self.start(slot, prompt, sampler, keep))  # one host sync per token: the caller prints it
            for n in range(1, max_new_tokens + 1):
                if token == NON_FINITE:
                    raise non_finite_error(n)
                yield token
                if token in stop_ids or n == max_new_tokens:
                    return
                token = int(self.step()[slot])
        finally:
            self.finish(slot)
