"""The one generation engine: `k2 generate`, `k2 chat`, `k2 bench` (and the server) all decode through it.

An `Engine` owns a cache of `slots` rows. A request starts in a slot (its prompt prefilled, its first token drawn),
then every `step()` feeds each running slot's last token and draws the next, with that slot's own sampler; a slot
leaves between steps and another request may take it. Slots have their own lengths, so no padding is involved.

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
    """One decode step through the model's own forward."""

    def __init__(self, model, cache):
        self.model, self.cache = model, cache

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """tokens [B, 1] -> logits [B, V]; `positions` [B] (host) as in the model's step_inputs, or None."""
        if positions is not None:
            positions = positions.to(self.model.device, non_blocking=True)
        return self.model(tokens, self.cache, positions=positions)[:, -1]


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

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.positions.copy_(positions, non_blocking=True)
        if self.capture and self.graph is None:
            self._capture()
        if self.graph is not None:
            self.graph.replay()
        else:
            self._run()
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
    def start(self, slot: int, prompt: list[int], sampler: Sampler, keep: int = 0) -> torch.Tensor:
        """Begin a request in `slot`: keep the first `keep` tokens the slot holds (a prefix `prompt` shares with
        them), prefill the rest of `prompt`, and draw the first new token ([1], on the device; `NON_FINITE` if the
        logits were not finite)."""
        if keep >= len(prompt):
            raise K2Error(f"cannot keep {keep} tokens of a {len(prompt)}-token prompt: at least one is computed")
        if len(prompt) > self.max_len:
            raise K2Error(f"the prompt has {len(prompt)} tokens; the cache holds {self.max_len}")
        self.truncate(slot, keep)
        view = self.cache.rows(slot)
        tokens = torch.tensor([prompt[keep:]], device=self.model.device)
        for start in range(0, tokens.shape[1], PREFILL_CHUNK):
            logits = self.model(tokens[:, start:start + PREFILL_CHUNK], view, last_only=True)
        sampler.observe(torch.tensor([prompt], device=self.model.device))
        first = sampler(logits[:, -1])
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

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        """Feed every running slot its last drawn token and draw the next: ids [slots] on the device (a free slot's
        entry is meaningless; `NON_FINITE` where a slot's logits were not finite). Each running slot's length grows by
        one."""
        running = [s is not None for s in self.samplers]
        lengths = self.cache.lengths
        if all(running):  # the common case (one request, or a full batch): no masking
            active, longest = 1, int(lengths.max())
            positions = None if self.decoder == "eager" else lengths.clone()
        elif any(running):
            # Free slots write their step past max_len, where no sequence reads.
            active = torch.tensor(running)
            longest = int(lengths[active].max())
            positions = torch.where(active, lengths, self.max_len)
        else:
            raise K2Error("no request is running")
        if longest >= self.max_len:
            raise K2Error(f"the cache holds {self.max_len} tokens per slot and a running slot is full")
        logits = self._step(self.next_ids, positions)
        if positions is not None:  # without positions, the forward grew them itself
            lengths += active
        shared = self.samplers[0]
        if all(s is shared for s in self.samplers):  # one sampler for the whole batch (k2 bench)
            drawn = shared(logits)
        else:
            drawn = self.next_ids[:, 0].clone()
            for slot, sampler in enumerate(self.samplers):
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
